"""Chat history per session on a plain Redis list, next to the namespace.

Not a module feature: a list of JSON messages that applications keep with
their cache. Its key carries the namespace's hash tag, so in a cluster it
lives on the namespace's shard, and ACL patterns written for the namespace's
module keys (``aicache:*:{tenant}:*``) cover it too.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional

from ._core import history_append, history_clear, history_last, history_len
from ._io import Op, T, executor, run
from .keys import DEFAULT_PREFIX, Text, history_key

__all__ = ["ChatHistory"]

Message = Dict[str, Any]


class HistoryBase:
    """What the sync and async histories share: the key and the limits."""

    def __init__(self, namespace: Text, session_id: Text, *, max_messages: int = 100,
                 ttl_s: Optional[int] = None, prefix: str = DEFAULT_PREFIX) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        if ttl_s is not None and ttl_s < 1:
            raise ValueError("ttl_s must be at least 1 second, or None for no expiry")
        self.namespace = namespace
        self.session_id = session_id
        self.max_messages = max_messages
        self.ttl_s = ttl_s
        #: ``<prefix>hist:v1:{<tag>}:<sha256>``, laid out like the module's keys.
        self.key: bytes = history_key(prefix, namespace, session_id)

    @staticmethod
    def _messages(messages: Iterable[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
        out = list(messages)
        for m in out:
            if not isinstance(m, Mapping):
                raise TypeError(f"a message must be a mapping, not {type(m).__name__}")
        return out

    def _op_append(self, messages: Iterable[Mapping[str, Any]]) -> "Op[int]":
        return history_append(self.key, self._messages(messages), self.max_messages, self.ttl_s)


class ChatHistory(HistoryBase):
    """The last ``max_messages`` messages of one session, oldest first.

    Every append pushes, trims to the cap and (with ``ttl_s``) renews the
    session's expiry in one MULTI/EXEC, so the list is never seen over its
    cap or without its TTL."""

    def __init__(self, redis_client: Any, namespace: Text, session_id: Text, *,
                 max_messages: int = 100, ttl_s: Optional[int] = None,
                 prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__(namespace, session_id, max_messages=max_messages, ttl_s=ttl_s,
                         prefix=prefix)
        self.redis = redis_client
        self._execute = executor(redis_client)

    def _run(self, op: "Op[T]") -> T:
        return run(self._execute, op)

    def append(self, message: Mapping[str, Any]) -> int:
        """Adds one message (a JSON-serialisable dict such as
        ``{"role": "user", "content": "hi"}``); returns the length kept."""
        return self._run(self._op_append([message]))

    def extend(self, messages: Iterable[Mapping[str, Any]]) -> int:
        """Adds several messages in one transaction."""
        return self._run(self._op_append(messages))

    def last(self, n: int) -> List[Message]:
        """The last ``n`` messages, oldest first."""
        return self._run(history_last(self.key, n))

    def messages(self) -> List[Message]:
        """Every kept message, oldest first."""
        return self._run(history_last(self.key, None))

    def clear(self) -> bool:
        """Deletes the session; True if it existed."""
        return self._run(history_clear(self.key)) > 0

    def length(self) -> int:
        """How many messages the session keeps (also ``len(history)``)."""
        return self._run(history_len(self.key))

    def __len__(self) -> int:
        return self.length()
