"""An OpenAI-SDK-shaped facade over aicache.

    from aicache.openai_compat import CachedOpenAI
    client = CachedOpenAI(redis.Redis(), "app")       # was: client = OpenAI()

    client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])
    for chunk in client.chat.completions.create(..., stream=True): ...

Replies are the SDK's own types (``CreateEmbeddingResponse``,
``ChatCompletion``, ``ChatCompletionChunk``, built with ``model_validate``),
so code written against ``openai.OpenAI`` runs unchanged. The OpenAI API key
and endpoint live in the Redis module, not here. Endpoints other than
embeddings and chat completions are forwarded to ``fallback`` (e.g. a real
``OpenAI()``) when one is given.

What differs from the SDK:

- ``usage`` of an embeddings reply is always 0 tokens: a reply mixes hits,
  which cost nothing, with fills whose token counts the module keeps to
  itself (``INFO aicache`` has them). A chat reply carries the ``usage`` of
  the completion as it was first generated, also on a hit.
- Token-array inputs to ``embeddings.create`` are refused (the cache is keyed
  on text). ``user``, ``extra_headers`` and ``extra_query`` are accepted and
  ignored; ``extra_body`` is merged into a chat request, as the SDK does (and
  ignored by ``embeddings.create``);
  ``timeout`` (seconds) becomes the call's ``TIMEOUT``.
- A streamed reply is an iterator of ``ChatCompletionChunk`` with
  ``close()`` and ``with`` support, not an ``openai.Stream``. Without
  ``stream_options.include_usage`` the usage-only chunk is left out, as the
  API leaves it out.
- Module errors become the SDK's exceptions where one fits: an upstream HTTP
  status becomes its ``APIStatusError`` subclass, a spend-limit refusal a
  ``RateLimitError`` (429, with ``retry-after-ms``), a wait that ran out
  ``APITimeoutError``, an upstream connection failure ``APIConnectionError``,
  a request the module cannot key ``BadRequestError``, a full queue or a
  shutdown ``InternalServerError`` (503). The aicache error is the
  ``__cause__``. Anything else is raised as the aicache error.
"""
from __future__ import annotations

import base64
import copy
import inspect
import itertools
from typing import Any, AsyncIterator, Iterator, List, Optional

import numpy as np

__all__ = ["CachedOpenAI", "AsyncCachedOpenAI", "CachedStream", "AsyncCachedStream"]

# The SDK's per-call transport options: no meaning for a Redis round trip.
_TRANSPORT_ARGS = ("extra_headers", "extra_query")


def _given(v: Any) -> bool:
    """False for the SDK's "argument not passed" sentinels (and None)."""
    if v is None:
        return False
    try:
        from openai import NotGiven, Omit
    except ImportError:  # pragma: no cover - every SDK with these types has them
        return True
    return not isinstance(v, (NotGiven, Omit))


def _plain(v: Any) -> Any:
    """SDK objects an app passes back (a ChatCompletionMessage appended to
    its messages) as the JSON the SDK would send for them."""
    if hasattr(v, "model_dump") and callable(v.model_dump):
        return _plain(v.model_dump(mode="json", exclude_unset=True))
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items() if _given(x) or x is None}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _timeout_ms(timeout: Any, default: Optional[int]) -> Optional[int]:
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return max(1, int(timeout * 1000))
    return default


def _chat_request(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for k in _TRANSPORT_ARGS:
        kwargs.pop(k, None)
    extra_body = kwargs.pop("extra_body", None)
    kwargs.pop("timeout", None)
    req = {k: _plain(v) for k, v in kwargs.items() if _given(v)}
    if isinstance(extra_body, dict):
        req.update(_plain(extra_body))
    return req


def _texts(input: Any) -> List[str]:
    if isinstance(input, str):
        return [input]
    if isinstance(input, (bytes, bytearray)):
        raise TypeError("input must be str or a list of str")
    texts = list(input)
    if not texts:
        raise ValueError("input must not be empty")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("aicache embeds texts: token-array inputs are not supported")
    return texts


def _embedding_response(arr: np.ndarray, model: str, encoding_format: Any):
    from openai.types import CreateEmbeddingResponse
    data = [{"object": "embedding", "index": i, "embedding": row.tolist()}
            for i, row in enumerate(arr)]
    resp = CreateEmbeddingResponse.model_validate({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0}})
    if encoding_format == "base64":
        # What the SDK hands back when a caller asks for base64 itself: the
        # API's string, unparsed, in a field typed as a list of floats.
        for item, row in zip(resp.data, arr):
            item.embedding = base64.b64encode(  # type: ignore[assignment]
                np.ascontiguousarray(row, dtype="<f4").tobytes()).decode()
    return resp


def _chunk_filter(request: dict):
    """The per-chunk step of a stream: the dict as a ChatCompletionChunk, or
    None to leave it out."""
    from openai.types.chat import ChatCompletionChunk
    opts = request.get("stream_options")
    with_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))

    def step(chunk: dict):
        if not with_usage:
            # The module always asks the upstream for usage; the API sends the
            # usage-only chunk only to callers who asked, and code that reads
            # chunk.choices[0] breaks on it.
            if not chunk.get("choices"):
                return None
            if "usage" in chunk:
                chunk = {k: v for k, v in chunk.items() if k != "usage"}
        return ChatCompletionChunk.model_validate(chunk)

    return step


# ---------------------------------------------------------------- errors

def _httpx():
    import openai._exceptions as ex
    return getattr(ex, "httpx2", None) or getattr(ex, "httpx")


def _status_error(status: int, message: str, path: str, body: dict, headers=None):
    import openai
    hx = _httpx()
    request = hx.Request("POST", "http://aicache/v1/" + path)
    response = hx.Response(status, request=request, headers=headers or {})
    classes = {400: openai.BadRequestError, 401: openai.AuthenticationError,
               403: openai.PermissionDeniedError, 404: openai.NotFoundError,
               409: openai.ConflictError, 422: openai.UnprocessableEntityError,
               429: openai.RateLimitError}
    cls = classes.get(status) or (openai.InternalServerError if status >= 500
                                  else openai.APIStatusError)
    return cls(message, response=response, body=body)


def _openai_error(e: BaseException, path: str) -> BaseException:
    """The SDK exception for an aicache error, or e itself when none fits."""
    try:
        from . import errors as E
    except ImportError:  # pragma: no cover
        return e
    if not isinstance(e, E.AICacheError):
        return e
    if isinstance(e, E.BatchError) and e.errors:
        # The SDK has no partial failure: the first refused input's error
        # is the request's, as OpenAI answers a batch with one bad input.
        first = e.errors[min(e.errors)]
        return _openai_error(first, path) if first is not e else e
    import openai
    msg = str(e)
    body = {"message": msg, "type": "aicache_" + type(e).__name__}
    if isinstance(e, E.Throttled):
        headers = {}
        if e.retry_after_ms is not None:
            headers["retry-after-ms"] = str(e.retry_after_ms)
            body["retry_after_ms"] = e.retry_after_ms
        return _status_error(429, msg, path, body, headers)
    if isinstance(e, E.Timeout):
        return openai.APITimeoutError(request=_httpx().Request("POST", "http://aicache/v1/" + path))
    if isinstance(e, E.UpstreamError):
        if e.status is not None:
            return _status_error(e.status, msg, path, body)
        if e.kind == "connect":
            return openai.APIConnectionError(
                message=msg, request=_httpx().Request("POST", "http://aicache/v1/" + path))
        return e
    if isinstance(e, E.InvalidRequest):
        return _status_error(400, msg, path, body)
    if isinstance(e, (E.Overloaded, E.ShuttingDown)):
        return _status_error(503, msg, path, body)
    return e


def _raise_as_openai(e: BaseException, path: str):
    out = _openai_error(e, path)
    if out is e:
        raise e
    raise out from e


# Client-wide SDK wrappers that would hand back the fallback client.
_UNCACHED_WRAPPERS = frozenset({"with_raw_response", "with_streaming_response", "copy"})

# ---------------------------------------------------------------- sync

class CachedStream:
    """The chunks of a streamed completion, as ``ChatCompletionChunk``."""

    def __init__(self, chunks: Iterator[dict], request: dict, close: Any = None) -> None:
        self._chunks = chunks
        self._closing = close if close is not None else chunks
        self._step = _chunk_filter(request)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self):
        while True:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                raise
            except Exception as e:  # noqa: BLE001
                _raise_as_openai(e, "chat/completions")
            out = self._step(chunk)
            if out is not None:
                return out

    def close(self) -> None:
        close = getattr(self._closing, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "CachedStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Embeddings:
    def __init__(self, owner: "CachedOpenAI") -> None:
        self._owner = owner

    def create(self, *, input: Any, model: str, dimensions: Any = None,
               encoding_format: Any = None, user: Any = None, timeout: Any = None,
               extra_headers: Any = None, extra_query: Any = None, extra_body: Any = None):
        o = self._owner
        texts = _texts(input)
        kw = o._call_options(timeout, dimensions=dimensions if _given(dimensions) else None)
        try:
            arr = o._cache.embed(texts, model, **kw)
        except Exception as e:  # noqa: BLE001
            _raise_as_openai(e, "embeddings")
        return _embedding_response(arr, model, encoding_format if _given(encoding_format)
                                   else None)


class _Completions:
    def __init__(self, owner: "CachedOpenAI") -> None:
        self._owner = owner

    def create(self, **kwargs: Any):
        from openai.types.chat import ChatCompletion
        o = self._owner
        request = _chat_request(kwargs)
        kw = o._call_options(kwargs.get("timeout"))
        if request.get("stream") is True:
            # The SDK raises a refused or throttled stream from create(), so
            # retry wrappers around create() work: start it here.
            chunks = iter(o._cache.stream(request, **kw))
            try:
                first = [next(chunks)]
            except StopIteration:
                first = []
            except Exception as e:  # noqa: BLE001
                _raise_as_openai(e, "chat/completions")
            return CachedStream(itertools.chain(first, chunks), request, close=chunks)
        try:
            body = o._cache.chat(request, **kw)
        except Exception as e:  # noqa: BLE001
            _raise_as_openai(e, "chat/completions")
        return ChatCompletion.model_validate(body)


class _Chat:
    def __init__(self, owner: Any, completions: Any) -> None:
        self.completions = completions


class CachedOpenAI:
    """Stands in for ``openai.OpenAI``: ``embeddings.create`` and
    ``chat.completions.create`` are answered by the aicache module.

    ``redis_client``, ``namespace``, ``model``, ``timeout_ms`` and ``tenant``
    build the ``AICache`` (or pass ``cache=`` one you have). ``ex``: TTL of
    what fills store. ``fallback``: an object (normally ``openai.OpenAI()``)
    that serves every other attribute (``files``, ``images``, ...).
    """

    def __init__(self, redis_client: Any = None, namespace: Any = None, model: Optional[str] = None,
                 *, timeout_ms: Optional[int] = None, tenant: Optional[str] = None,
                 ex: Optional[int] = None, cache: Any = None, fallback: Any = None) -> None:
        if cache is None:
            from .client import AICache
            if redis_client is None or namespace is None:
                raise TypeError("CachedOpenAI needs a redis client and a namespace (or cache=)")
            cache = AICache(redis_client, namespace, model, timeout_ms=timeout_ms, tenant=tenant)
        self._cache = cache
        self._timeout_ms = timeout_ms
        self._ex = ex
        self._fallback = fallback
        self.embeddings = _Embeddings(self)
        self.chat = _Chat(self, _Completions(self))

    def _call_options(self, timeout: Any, **extra: Any) -> dict:
        """The AICache keyword arguments of one SDK call."""
        kw = {"timeout_ms": _timeout_ms(timeout, self._timeout_ms), **extra}
        if self._ex is not None:
            kw["ex"] = self._ex
        return kw

    def with_options(self, *, timeout: Any = None, **_ignored: Any) -> "CachedOpenAI":
        """A copy with another default ``timeout`` (seconds); the other SDK
        options concern HTTP and do not apply. Never the fallback client: its
        calls would skip the cache."""
        twin = copy.copy(self)
        twin.embeddings = type(self.embeddings)(twin)
        twin.chat = _Chat(twin, type(self.chat.completions)(twin))
        if timeout is not None:
            twin._timeout_ms = _timeout_ms(timeout, self._timeout_ms)
        return twin

    def close(self) -> None:
        """The redis client is the caller's; nothing to release here."""

    def __enter__(self) -> "CachedOpenAI":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        fallback = self.__dict__.get("_fallback")
        if name in _UNCACHED_WRAPPERS:
            raise AttributeError(f"CachedOpenAI.{name} would bypass the cache; "
                                 f"use with_options() or the fallback client directly")
        if fallback is None or name.startswith("__"):
            raise AttributeError(f"CachedOpenAI serves embeddings and chat.completions; "
                                 f"pass fallback=OpenAI() to reach {name!r}")
        return getattr(fallback, name)


# ---------------------------------------------------------------- async

class AsyncCachedStream:
    """The chunks of a streamed completion, as ``ChatCompletionChunk``."""

    def __init__(self, chunks: Any, request: dict) -> None:
        self._source = chunks
        self._chunks: Optional[AsyncIterator[dict]] = None
        self._first: List[dict] = []
        self._step = _chunk_filter(request)

    def __aiter__(self) -> "AsyncCachedStream":
        return self

    async def start(self) -> None:
        """Starts the stream and holds its first chunk, so a refusal is
        raised now rather than at the first iteration."""
        if self._chunks is not None:
            return
        src = self._source
        if inspect.isawaitable(src):
            src = await src
        self._chunks = src.__aiter__()
        try:
            self._first = [await self._chunks.__anext__()]
        except StopAsyncIteration:
            self._first = []
        except Exception as e:  # noqa: BLE001
            _raise_as_openai(e, "chat/completions")

    async def __anext__(self):
        if self._chunks is None:
            await self.start()
        while True:
            if self._first:
                out = self._step(self._first.pop())
                if out is not None:
                    return out
                continue
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                raise
            except Exception as e:  # noqa: BLE001
                _raise_as_openai(e, "chat/completions")
            out = self._step(chunk)
            if out is not None:
                return out

    async def close(self) -> None:
        close = getattr(self._chunks, "aclose", None)
        if close is not None:
            await close()

    async def __aenter__(self) -> "AsyncCachedStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class _AsyncEmbeddings:
    def __init__(self, owner: "AsyncCachedOpenAI") -> None:
        self._owner = owner

    async def create(self, *, input: Any, model: str, dimensions: Any = None,
                     encoding_format: Any = None, user: Any = None, timeout: Any = None,
                     extra_headers: Any = None, extra_query: Any = None,
                     extra_body: Any = None):
        o = self._owner
        texts = _texts(input)
        kw = o._call_options(timeout, dimensions=dimensions if _given(dimensions) else None)
        try:
            arr = await o._cache.embed(texts, model, **kw)
        except Exception as e:  # noqa: BLE001
            _raise_as_openai(e, "embeddings")
        return _embedding_response(arr, model, encoding_format if _given(encoding_format)
                                   else None)


class _AsyncCompletions:
    def __init__(self, owner: "AsyncCachedOpenAI") -> None:
        self._owner = owner

    async def create(self, **kwargs: Any):
        from openai.types.chat import ChatCompletion
        o = self._owner
        request = _chat_request(kwargs)
        kw = o._call_options(kwargs.get("timeout"))
        if request.get("stream") is True:
            stream = AsyncCachedStream(o._cache.stream(request, **kw), request)
            await stream.start()  # errors from create(), as the SDK raises them
            return stream
        try:
            body = await o._cache.chat(request, **kw)
        except Exception as e:  # noqa: BLE001
            _raise_as_openai(e, "chat/completions")
        return ChatCompletion.model_validate(body)


class AsyncCachedOpenAI(CachedOpenAI):
    """Stands in for ``openai.AsyncOpenAI`` over an ``AsyncAICache`` (built
    from a ``redis.asyncio.Redis``, or passed as ``cache=``)."""

    def __init__(self, redis_client: Any = None, namespace: Any = None, model: Optional[str] = None,
                 *, timeout_ms: Optional[int] = None, tenant: Optional[str] = None,
                 ex: Optional[int] = None, cache: Any = None, fallback: Any = None) -> None:
        if cache is None:
            from .aio import AsyncAICache
            if redis_client is None or namespace is None:
                raise TypeError("AsyncCachedOpenAI needs a redis client and a namespace "
                                "(or cache=)")
            cache = AsyncAICache(redis_client, namespace, model, timeout_ms=timeout_ms,
                                 tenant=tenant)
        super().__init__(cache=cache, timeout_ms=timeout_ms, ex=ex, fallback=fallback)
        self.embeddings = _AsyncEmbeddings(self)
        self.chat = _Chat(self, _AsyncCompletions(self))

    async def close(self) -> None:  # type: ignore[override]
        """The redis client is the caller's; nothing to release here."""

    async def __aenter__(self) -> "AsyncCachedOpenAI":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
