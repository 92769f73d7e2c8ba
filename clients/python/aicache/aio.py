"""asyncio forms of AICache and ChatHistory, over ``redis.asyncio``.

Same methods, arguments and results as the sync classes (they run the same
operations from ``_core``); every method is a coroutine except ``stream``,
which returns an async iterator.
"""
from __future__ import annotations

from typing import (Any, AsyncIterator, Dict, Iterable, List, Literal, Mapping, Optional, Tuple,
                    Union, overload)

from ._core import Core, Pairs, Vector, VectorLike, history_clear, history_last, history_len
from ._io import Op, T, aiterate, arun, async_executor
from .history import HistoryBase, Message
from .keys import DEFAULT_PREFIX, Request, Text
from .results import Meta, Throttle

__all__ = ["AsyncAICache", "AsyncChatHistory"]


class AsyncAICache(Core):
    """:class:`aicache.AICache` on a ``redis.asyncio.Redis`` or
    ``redis.asyncio.cluster.RedisCluster``."""

    def __init__(self, redis_client: Any, namespace: Text, model: Optional[Text] = None, *,
                 timeout_ms: Optional[int] = None, tenant: Optional[Text] = None,
                 key_prefix: Optional[str] = None,
                 normalize_whitespace: Optional[bool] = None) -> None:
        super().__init__(namespace, model, timeout_ms=timeout_ms, tenant=tenant,
                         key_prefix=key_prefix, normalize_whitespace=normalize_whitespace)
        self.redis = redis_client
        self._execute = async_executor(redis_client)

    async def _run(self, op: "Op[T]") -> T:
        return await arun(self._execute, op)

    @overload
    async def embed(self, texts: Iterable[Text], model: Optional[Text] = None, *,
                    dimensions: Optional[int] = None, refresh: bool = False,
                    nostore: bool = False, ex: Optional[int] = None,
                    timeout_ms: Optional[int] = None,
                    with_meta: Literal[False] = False) -> Vector: ...

    @overload
    async def embed(self, texts: Iterable[Text], model: Optional[Text] = None, *,
                    dimensions: Optional[int] = None, refresh: bool = False,
                    nostore: bool = False, ex: Optional[int] = None,
                    timeout_ms: Optional[int] = None,
                    with_meta: Literal[True]) -> Tuple[Vector, List[Meta]]: ...

    async def embed(self, texts: Iterable[Text], model: Optional[Text] = None, *,
                    dimensions: Optional[int] = None, refresh: bool = False,
                    nostore: bool = False, ex: Optional[int] = None,
                    timeout_ms: Optional[int] = None,
                    with_meta: bool = False) -> Union[Vector, Tuple[Vector, List[Meta]]]:
        return await self._run(self.op_embed(texts, model, dimensions=dimensions,
                                             refresh=refresh, nostore=nostore, ex=ex,
                                             timeout_ms=timeout_ms, with_meta=with_meta))

    @overload
    async def embed_one(self, text: Text, model: Optional[Text] = None, *,
                        dimensions: Optional[int] = None, refresh: bool = False,
                        nostore: bool = False, ex: Optional[int] = None,
                        timeout_ms: Optional[int] = None,
                        with_meta: Literal[False] = False) -> Vector: ...

    @overload
    async def embed_one(self, text: Text, model: Optional[Text] = None, *,
                        dimensions: Optional[int] = None, refresh: bool = False,
                        nostore: bool = False, ex: Optional[int] = None,
                        timeout_ms: Optional[int] = None,
                        with_meta: Literal[True]) -> Tuple[Vector, Meta]: ...

    async def embed_one(self, text: Text, model: Optional[Text] = None, *,
                        dimensions: Optional[int] = None, refresh: bool = False,
                        nostore: bool = False, ex: Optional[int] = None,
                        timeout_ms: Optional[int] = None,
                        with_meta: bool = False) -> Union[Vector, Tuple[Vector, Meta]]:
        return await self._run(self.op_embed_one(text, model, dimensions=dimensions,
                                                 refresh=refresh, nostore=nostore, ex=ex,
                                                 timeout_ms=timeout_ms, with_meta=with_meta))

    async def get(self, text: Text, model: Optional[Text] = None) -> Optional[Vector]:
        return await self._run(self.op_get(text, model))

    async def set(self, text: Text, vector: VectorLike, model: Optional[Text] = None,
                  ex: Optional[int] = None) -> None:
        await self._run(self.op_set(text, vector, model, ex))

    async def mget(self, texts: Iterable[Text],
                   model: Optional[Text] = None) -> List[Optional[Vector]]:
        return await self._run(self.op_mget(texts, model))

    async def mset(self, pairs_or_mapping: Pairs, model: Optional[Text] = None) -> None:
        await self._run(self.op_mset(pairs_or_mapping, model))

    async def delete(self, texts: Iterable[Text], model: Optional[Text] = None) -> int:
        return await self._run(self.op_delete(texts, model))

    async def dims(self, model: Optional[Text] = None) -> Optional[int]:
        return await self._run(self.op_dims(model))

    async def reset_dims(self, model: Optional[Text] = None) -> bool:
        return await self._run(self.op_reset_dims(model))

    async def flush(self, *, model: Optional[Text] = None) -> int:
        return await self._run(self.op_flush(model))

    async def embedding_key(self, text: Text, model: Optional[Text] = None,
                            dimensions: Optional[int] = None) -> bytes:
        return await self._run(self.op_embedding_key(text, model, dimensions))

    @overload
    async def chat(self, request: Request, *, refresh: bool = False, nostore: bool = False,
                   ex: Optional[int] = None, timeout_ms: Optional[int] = None,
                   with_meta: Literal[False] = False) -> Dict[str, Any]: ...

    @overload
    async def chat(self, request: Request, *, refresh: bool = False, nostore: bool = False,
                   ex: Optional[int] = None, timeout_ms: Optional[int] = None,
                   with_meta: Literal[True]) -> Tuple[Dict[str, Any], Meta]: ...

    async def chat(self, request: Request, *, refresh: bool = False, nostore: bool = False,
                   ex: Optional[int] = None, timeout_ms: Optional[int] = None,
                   with_meta: bool = False
                   ) -> Union[Dict[str, Any], Tuple[Dict[str, Any], Meta]]:
        return await self._run(self.op_chat(request, refresh=refresh, nostore=nostore, ex=ex,
                                            timeout_ms=timeout_ms, with_meta=with_meta))

    async def chat_get(self, request: Request) -> Optional[Dict[str, Any]]:
        return await self._run(self.op_chat_get(request))

    async def chat_set(self, request: Request, response: Union[Mapping[str, Any], str, bytes],
                       ex: Optional[int] = None) -> None:
        await self._run(self.op_chat_set(request, response, ex))

    async def chat_delete(self, request: Request) -> int:
        return await self._run(self.op_chat_delete(request))

    async def chat_flush(self) -> int:
        return await self._run(self.op_chat_flush())

    async def chat_key(self, request: Request) -> bytes:
        return await self._run(self.op_chat_key(request))

    def stream(self, request: Request, *, refresh: bool = False, nostore: bool = False,
               ex: Optional[int] = None, timeout_ms: Optional[int] = None, block_ms: int = 5000,
               timeout_s: float = 120.0) -> AsyncIterator[Dict[str, Any]]:
        """``async for chunk in cache.stream(request)``."""
        return aiterate(self._execute, self.op_stream(
            request, refresh=refresh, nostore=nostore, ex=ex, timeout_ms=timeout_ms,
            block_ms=block_ms, timeout_s=timeout_s))

    async def throttle(self, key: Text, max: int, window_ms: int, cost: int = 1) -> Throttle:
        return await self._run(self.op_throttle(key, max, window_ms, cost))


class AsyncChatHistory(HistoryBase):
    """:class:`aicache.ChatHistory` on a ``redis.asyncio`` client."""

    def __init__(self, redis_client: Any, namespace: Text, session_id: Text, *,
                 max_messages: int = 100, ttl_s: Optional[int] = None,
                 prefix: str = DEFAULT_PREFIX) -> None:
        super().__init__(namespace, session_id, max_messages=max_messages, ttl_s=ttl_s,
                         prefix=prefix)
        self.redis = redis_client
        self._execute = async_executor(redis_client)

    async def _run(self, op: "Op[T]") -> T:
        return await arun(self._execute, op)

    async def append(self, message: Mapping[str, Any]) -> int:
        return await self._run(self._op_append([message]))

    async def extend(self, messages: Iterable[Mapping[str, Any]]) -> int:
        return await self._run(self._op_append(messages))

    async def last(self, n: int) -> List[Message]:
        return await self._run(history_last(self.key, n))

    async def messages(self) -> List[Message]:
        return await self._run(history_last(self.key, None))

    async def clear(self) -> bool:
        return await self._run(history_clear(self.key)) > 0

    async def length(self) -> int:
        """``len()`` cannot await: the length of the session's list."""
        return await self._run(history_len(self.key))
