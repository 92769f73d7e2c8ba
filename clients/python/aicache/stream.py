"""Streamed chat completions through aicache, as OpenAI chunk dicts.

    from aicache import stream_chat
    for chunk in stream_chat(r, "chat", request):      # r: a redis-py client
        print(chunk["choices"][0]["delta"].get("content") or "", end="")

replaces `client.chat.completions.create(**request, stream=True)`: a cached
answer is replayed as chunks, a running generation is joined from its first
chunk, and a miss starts one generation that every identical caller shares.
A failed generation raises StreamError (also an instance of the specific
error, e.g. UpstreamError) with the module's error text.
``AICache.stream`` and ``AsyncAICache.stream`` are the same, bound to a
namespace; ``astream_chat`` is the asyncio form.
"""
from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Dict, Iterator, List, Mapping, Optional, Sequence

from . import errors
from ._io import Call, StreamOp, aiterate, async_executor, executor, iterate
from .errors import StreamError
from .keys import Request, Text, request_body

__all__ = ["StreamError", "astream_chat", "completion_to_chunks", "stream_chat", "stream_op"]

Chunk = Dict[str, Any]

# Completion fields a chunk repeats (the rest belong to the whole answer).
_HEAD_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def completion_to_chunks(completion: Mapping[str, Any]) -> Iterator[Chunk]:
    """A chat.completion as the chunks a stream of it would have sent: one
    chunk with each choice's whole message as its delta, then a usage chunk."""
    head: Chunk = {k: completion[k] for k in _HEAD_FIELDS if k in completion}
    head["object"] = "chat.completion.chunk"
    choices: List[Chunk] = []
    for c in completion.get("choices", []):
        delta = dict(c.get("message") or {})
        if isinstance(delta.get("tool_calls"), list):
            delta["tool_calls"] = [dict(t, index=i) for i, t in enumerate(delta["tool_calls"])]
        choices.append({"index": c.get("index", 0), "delta": delta,
                        "logprobs": c.get("logprobs"), "finish_reason": c.get("finish_reason")})
    yield dict(head, choices=choices)
    if isinstance(completion.get("usage"), dict):
        yield dict(head, choices=[], usage=completion["usage"])


def stream_options(*, nostore: bool = False, refresh: bool = False, ex: Optional[int] = None,
                   timeout_ms: Optional[int] = None, tenant: Optional[Text] = None) -> List[Any]:
    """The STREAM / FETCH options shared by both chat commands."""
    opts: List[Any] = []
    if nostore:
        opts.append("NOSTORE")
    if refresh:
        opts.append("REFRESH")
    if ex is not None:
        opts += ["EX", int(ex)]
    if timeout_ms is not None:
        opts += ["TIMEOUT", int(timeout_ms)]
    if tenant is not None:
        opts += ["TENANT", tenant]
    return opts


def _fields(flat: Sequence[Any]) -> Dict[str, Any]:
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def stream_op(ns: Text, body: bytes, opts: Sequence[Any], *, block_ms: int = 5000,
              timeout_s: float = 120.0) -> StreamOp:
    """The streaming protocol as an operation for the drivers in ``_io``:
    yields Calls (STREAM once, then READ until the end entry) and chunks."""
    kind, value = yield Call(("LLMCACHE.STREAM", ns, body, *opts))
    if _text(kind) == "hit":
        yield from completion_to_chunks(json.loads(value))
        return
    key, last = value, "0"
    deadline = time.monotonic() + timeout_s
    while True:
        entries = yield Call(("LLMCACHE.READ", ns, key, last, "BLOCK", int(block_ms)))
        if not entries:
            # Only the overall deadline ends a quiet stream: a generation may
            # be slow to start, and READ BLOCK is bounded anyway.
            if time.monotonic() > deadline:
                raise TimeoutError("the generation did not end in time")
            continue
        for entry_id, flat in entries:
            last = _text(entry_id)
            f = _fields(flat)
            if "chunk" in f:
                yield json.loads(f["chunk"])
            elif _text(f.get("end", b"")) == "error":
                raise errors.from_message(_text(f.get("error", b"ERR the stream failed")),
                                          stream=True)
            else:
                return


def stream_chat(r: Any, ns: Text, request: Request, *, block_ms: int = 5000,
                timeout_s: float = 120.0, nostore: bool = False, refresh: bool = False,
                ex: Optional[int] = None, tenant: Optional[Text] = None,
                timeout_ms: Optional[int] = None) -> Iterator[Chunk]:
    """Yields the chat.completion.chunk dicts of `request` (a dict or JSON
    text) through LLMCACHE.STREAM / LLMCACHE.READ on redis-py client `r`.
    Stops after the last chunk; raises StreamError if the generation failed
    and TimeoutError if it has not ended after `timeout_s`."""
    opts = stream_options(nostore=nostore, refresh=refresh, ex=ex, timeout_ms=timeout_ms,
                          tenant=tenant)
    op = stream_op(ns, request_body(request), opts, block_ms=block_ms, timeout_s=timeout_s)
    return iterate(executor(r), op)


def astream_chat(r: Any, ns: Text, request: Request, *, block_ms: int = 5000,
                 timeout_s: float = 120.0, nostore: bool = False, refresh: bool = False,
                 ex: Optional[int] = None, tenant: Optional[Text] = None,
                 timeout_ms: Optional[int] = None) -> AsyncIterator[Chunk]:
    """:func:`stream_chat` on a ``redis.asyncio`` client: ``async for``."""
    opts = stream_options(nostore=nostore, refresh=refresh, ex=ex, timeout_ms=timeout_ms,
                          tenant=tenant)
    op = stream_op(ns, request_body(request), opts, block_ms=block_ms, timeout_s=timeout_s)
    return aiterate(async_executor(r), op)
