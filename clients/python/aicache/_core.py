"""Command building and reply parsing shared by AICache and AsyncAICache.

Each ``op_*`` method returns an operation (see ``_io.py``): a generator that
yields the commands to run and turns their replies into the result. The sync
and async clients differ only in the driver that runs it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import (Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union)

import numpy as np
import numpy.typing as npt

from . import keys
from ._io import Call, Op, StreamOp, Tx
from .errors import AICacheError, BatchError, convert
from .keys import Request, Text, request_body
from .results import Meta, Throttle
from .stream import stream_op, stream_options

Vector = npt.NDArray[np.float32]
VectorLike = Union[Vector, Sequence[float], bytes]
Pairs = Union[Mapping[Text, VectorLike], Iterable[Tuple[Text, VectorLike]]]

_F32 = np.dtype("<f4")


@dataclass(frozen=True)
class KeySettings:
    """The two configs that shape entry keys."""

    prefix: str
    normalize_whitespace: bool


def _plural(texts: Iterable[Text], what: str = "texts") -> List[Text]:
    # A bare string is iterable too; taking it as a list of characters would
    # silently embed one character per row.
    if isinstance(texts, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be a list of texts; use the *_one form for a single text")
    return list(texts)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def vector_arg(vector: VectorLike) -> bytes:
    """A vector as the module reads it: FP32 bytes, or JSON text in the rare
    case the bytes would look like JSON to the module (a first byte ``[``
    and a last byte ``]``, or all printable)."""
    if isinstance(vector, (bytes, bytearray, memoryview)):
        raw = bytes(vector)
        if len(raw) % 4:
            raise ValueError("FP32 vector bytes must be a multiple of 4 long")
        arr = np.frombuffer(raw, _F32)
    else:
        arr = np.asarray(vector, dtype=_F32)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"a vector must be 1-dimensional and non-empty, got shape {arr.shape}")
    raw = arr.tobytes()
    # Mirrors codec.rs looks_like_json (Rust's ASCII whitespace has no \v).
    if raw[:1] == b"[" and (raw[-1:] == b"]" or all(32 < b < 127 or b in b" \t\n\r\x0c"
                                                       for b in raw)):
        return json.dumps([float(x) for x in arr]).encode()
    return raw


def decode_vector(raw: bytes) -> Vector:
    # A writable copy: frombuffer over bytes is read-only.
    return np.frombuffer(raw, _F32).astype(np.float32, copy=True)


def _stack(raws: Sequence[bytes]) -> Vector:
    if not raws:
        return np.zeros((0, 0), np.float32)
    d = len(raws[0]) // 4
    # One joined copy into a bytearray (writable, so no second copy) is
    # several times faster than filling the rows one by one.
    size = 4 * d
    other = next((len(r) for r in raws if len(r) != size), None)
    if other is not None:
        raise AICacheError(f"vectors of different sizes in one reply ({d} and {other // 4})")
    buf = bytearray().join(raws)
    out: Vector = np.frombuffer(buf, _F32).reshape(len(raws), d)
    if out.dtype != np.float32:  # big-endian host: native order for callers
        out = out.astype(np.float32)
    return out


def parse_vectors(items: Sequence[Any]) -> Vector:
    """A FETCH reply (FP32 bytes, or error elements for inputs the upstream
    refused on their own) as an (n, d) array, or BatchError."""
    failed = {i: convert(x) for i, x in enumerate(items) if isinstance(x, Exception)}
    if failed:
        errs = {i: e if isinstance(e, AICacheError) else AICacheError(str(e))
                for i, e in failed.items()}
        first = errs[min(errs)]
        vectors: List[object] = [None if i in errs else decode_vector(x)
                                 for i, x in enumerate(items)]
        raise BatchError(f"{len(errs)} of {len(items)} texts failed: {first}", errors=errs,
                         vectors=vectors)
    return _stack(items)


def parse_json(raw: Any) -> Any:
    return json.loads(raw)


def _config_value(reply: Any, name: str) -> Optional[str]:
    if isinstance(reply, dict):
        for k, v in reply.items():
            if _text(k) == name:
                return _text(v)
        return None
    flat = list(reply or [])
    for i in range(0, len(flat) - 1, 2):
        if _text(flat[i]) == name:
            return _text(flat[i + 1])
    return None


class Core:
    """State and operations of one client bound to one namespace."""

    def __init__(self, namespace: Text, model: Optional[Text] = None, *,
                 timeout_ms: Optional[int] = None, tenant: Optional[Text] = None,
                 key_prefix: Optional[str] = None,
                 normalize_whitespace: Optional[bool] = None) -> None:
        keys.hash_tag(namespace)  # refuse a namespace the module would refuse
        self.namespace: Text = namespace
        self.model: Optional[Text] = model
        self.timeout_ms = timeout_ms
        self.tenant = tenant
        self._prefix_arg = key_prefix
        self._normalize_arg = normalize_whitespace
        self._settings: Optional[KeySettings] = None
        if key_prefix is not None and normalize_whitespace is not None:
            self._settings = KeySettings(key_prefix, normalize_whitespace)

    # ---- helpers ----

    def _model(self, model: Optional[Text]) -> Text:
        m = model if model is not None else self.model
        if m is None:
            raise ValueError("no model: pass model= here or to the constructor")
        return m

    def _fetch_opts(self, *, refresh: bool, nostore: bool, ex: Optional[int],
                    timeout_ms: Optional[int]) -> List[Any]:
        t = timeout_ms if timeout_ms is not None else self.timeout_ms
        return stream_options(nostore=nostore, refresh=refresh, ex=ex, timeout_ms=t,
                              tenant=self.tenant)

    def op_settings(self) -> "Op[KeySettings]":
        """The key-shaping configs: constructor values, else read once with
        CONFIG GET."""
        if self._settings is None:
            reply = yield Call(("CONFIG", "GET", "aicache.key-prefix",
                                "aicache.normalize-whitespace"), route=self.namespace)
            prefix = self._prefix_arg
            if prefix is None:
                prefix = _config_value(reply, "aicache.key-prefix")
            normalize = self._normalize_arg
            if normalize is None:
                normalize = _config_value(reply, "aicache.normalize-whitespace") == "yes"
            if prefix is None:
                raise AICacheError("CONFIG GET aicache.key-prefix found nothing: "
                                   "is the module loaded?")
            self._settings = KeySettings(prefix, normalize)
        return self._settings

    def op_generations(self, prefix: str, fields: Sequence[bytes]) -> "Op[Tuple[int, ...]]":
        reply = yield Call(("HMGET", keys.gen_key(prefix, self.namespace), *fields))
        return tuple(int(v) if v is not None else 0 for v in reply)

    # ---- embeddings ----

    def op_embed(self, texts: Iterable[Text], model: Optional[Text], *,
                 dimensions: Optional[int], refresh: bool, nostore: bool, ex: Optional[int],
                 timeout_ms: Optional[int], with_meta: bool
                 ) -> "Op[Union[Vector, Tuple[Vector, List[Meta]]]]":
        items = _plural(texts)
        m = self._model(model)
        if not items:
            empty = np.zeros((0, 0), np.float32)
            return (empty, []) if with_meta else empty
        opts = self._fetch_opts(refresh=refresh, nostore=nostore, ex=ex, timeout_ms=timeout_ms)
        if dimensions is not None:
            opts += ["DIMENSIONS", int(dimensions)]
        if with_meta:
            opts.append("WITHMETA")
        reply = yield Call(("EMBCACHE.FETCH", self.namespace, m, len(items), *items,
                            "FORMAT", "FP32", *opts))
        if not with_meta:
            return parse_vectors(reply)
        vectors, metas = reply
        return parse_vectors(vectors), [Meta.from_reply(x) for x in metas]

    def op_embed_one(self, text: Text, model: Optional[Text], **kw: Any
                     ) -> "Op[Union[Vector, Tuple[Vector, Meta]]]":
        if not isinstance(text, (str, bytes, bytearray, memoryview)):
            raise TypeError("text must be str or bytes")
        try:
            got = yield from self.op_embed([text], model, **kw)
        except BatchError as e:
            raise e.errors[0] from None
        if isinstance(got, tuple):
            vectors, metas = got
            first: Vector = vectors[0]
            return first, metas[0]
        only: Vector = got[0]
        return only

    def op_get(self, text: Text, model: Optional[Text]) -> "Op[Optional[Vector]]":
        raw = yield Call(("EMBCACHE.GET", self.namespace, self._model(model), text))
        return None if raw is None else decode_vector(raw)

    def op_set(self, text: Text, vector: VectorLike, model: Optional[Text],
               ex: Optional[int]) -> "Op[None]":
        args: Tuple[Any, ...] = ("EMBCACHE.SET", self.namespace, self._model(model), text,
                                 vector_arg(vector))
        if ex is not None:
            args += ("EX", int(ex))
        yield Call(args)

    def op_mget(self, texts: Iterable[Text], model: Optional[Text]) -> "Op[List[Optional[Vector]]]":
        items = _plural(texts)
        if not items:
            return []
        reply = yield Call(("EMBCACHE.MGET", self.namespace, self._model(model), *items))
        return [None if r is None else decode_vector(r) for r in reply]

    def op_mset(self, pairs: Pairs, model: Optional[Text]) -> "Op[None]":
        seq = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
        if not seq:
            return
        flat: List[Any] = []
        for text, vector in seq:
            flat += [text, vector_arg(vector)]
        yield Call(("EMBCACHE.MSET", self.namespace, self._model(model), *flat))

    def op_delete(self, texts: Iterable[Text], model: Optional[Text]) -> "Op[int]":
        items = _plural(texts)
        if not items:
            return 0
        n = yield Call(("EMBCACHE.DEL", self.namespace, self._model(model), *items))
        return int(n)

    def op_dims(self, model: Optional[Text]) -> "Op[Optional[int]]":
        reply = yield Call(("EMBCACHE.DIMS", self.namespace, self._model(model)))
        return None if reply is None else int(reply)

    def op_reset_dims(self, model: Optional[Text]) -> "Op[bool]":
        reply = yield Call(("EMBCACHE.DIMS", self.namespace, self._model(model), "RESET"))
        return bool(reply)

    def op_flush(self, model: Optional[Text]) -> "Op[int]":
        args: Tuple[Any, ...] = ("EMBCACHE.FLUSH", self.namespace)
        if model is not None:
            args += ("MODEL", model)
        return int((yield Call(args)))

    def op_embedding_key(self, text: Text, model: Optional[Text],
                         dimensions: Optional[int]) -> "Op[bytes]":
        m = self._model(model)
        s = yield from self.op_settings()
        ns_gen, model_gen = yield from self.op_generations(
            s.prefix, [keys.EMB_GENERATION_FIELD, keys.model_generation_field(m)])
        return keys.embedding_key(s.prefix, self.namespace, m, text, dimensions, ns_gen, model_gen,
                                  normalize_whitespace=s.normalize_whitespace)

    # ---- chat ----

    def op_chat(self, request: Request, *, refresh: bool, nostore: bool, ex: Optional[int],
                timeout_ms: Optional[int], with_meta: bool
                ) -> "Op[Union[Dict[str, Any], Tuple[Dict[str, Any], Meta]]]":
        opts = self._fetch_opts(refresh=refresh, nostore=nostore, ex=ex, timeout_ms=timeout_ms)
        if with_meta:
            opts.append("WITHMETA")
        reply = yield Call(("LLMCACHE.FETCH", self.namespace, request_body(request), *opts))
        if not with_meta:
            completion: Dict[str, Any] = parse_json(reply)
            return completion
        answer, meta = reply
        completion = parse_json(answer)
        return completion, Meta.from_reply(meta)

    def op_chat_get(self, request: Request) -> "Op[Optional[Dict[str, Any]]]":
        raw = yield Call(("LLMCACHE.GET", self.namespace, request_body(request)))
        return None if raw is None else parse_json(raw)

    def op_chat_set(self, request: Request, response: Union[Mapping[str, Any], str, bytes],
                    ex: Optional[int]) -> "Op[None]":
        args: Tuple[Any, ...] = ("LLMCACHE.SET", self.namespace, request_body(request),
                                 request_body(response))
        if ex is not None:
            args += ("EX", int(ex))
        yield Call(args)

    def op_chat_delete(self, request: Request) -> "Op[int]":
        return int((yield Call(("LLMCACHE.DEL", self.namespace, request_body(request)))))

    def op_chat_flush(self) -> "Op[int]":
        return int((yield Call(("LLMCACHE.FLUSH", self.namespace))))

    def op_chat_key(self, request: Request) -> "Op[bytes]":
        s = yield from self.op_settings()
        (ns_gen,) = yield from self.op_generations(s.prefix, [keys.LLM_GENERATION_FIELD])
        return keys.chat_key(s.prefix, self.namespace, request, ns_gen)

    def op_stream(self, request: Request, *, refresh: bool, nostore: bool, ex: Optional[int],
                  timeout_ms: Optional[int], block_ms: int, timeout_s: float) -> StreamOp:
        opts = self._fetch_opts(refresh=refresh, nostore=nostore, ex=ex, timeout_ms=timeout_ms)
        return stream_op(self.namespace, request_body(request), opts, block_ms=block_ms,
                         timeout_s=timeout_s)

    # ---- limiter ----

    @staticmethod
    def op_throttle(key: Text, max: int, window_ms: int, cost: int) -> "Op[Throttle]":
        args: Tuple[Any, ...] = ("AICACHE.THROTTLE", key, int(max), int(window_ms))
        if cost != 1:
            args += ("COST", int(cost))
        return Throttle.from_reply((yield Call(args)))


def history_append(key: bytes, messages: Sequence[Mapping[str, Any]], max_messages: int,
                   ttl_s: Optional[int]) -> "Op[int]":
    """RPUSH, trim to the cap and refresh the TTL in one transaction, so a
    reader never sees the list over its cap or without its expiry."""
    if not messages:
        return 0
    calls: List[Tuple[Any, ...]] = [
        ("RPUSH", key, *(json.dumps(dict(m), ensure_ascii=False, allow_nan=False)
                         for m in messages)),
        ("LTRIM", key, -max_messages, -1),
    ]
    if ttl_s is not None:
        calls.append(("EXPIRE", key, int(ttl_s)))
    replies = yield Tx(tuple(calls))
    return min(int(replies[0]), max_messages)


def history_last(key: bytes, n: Optional[int]) -> "Op[List[Dict[str, Any]]]":
    if n is not None and n <= 0:
        return []
    start = 0 if n is None else -n
    raw = yield Call(("LRANGE", key, start, -1))
    return [json.loads(x) for x in raw]


def history_clear(key: bytes) -> "Op[int]":
    return int((yield Call(("DEL", key))))


def history_len(key: bytes) -> "Op[int]":
    return int((yield Call(("LLEN", key))))
