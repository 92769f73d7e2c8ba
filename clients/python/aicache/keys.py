"""The module's key derivation, reimplemented in pure Python.

Every function here computes exactly the key the module computes for the same
inputs (``src/model/keys.rs`` and ``src/model/canon.rs``), so an application
can ``GET``, ``TTL`` or ``OBJECT`` an entry, write ACL patterns, or find an
entry's shard, without a round trip. No Redis I/O happens here.

Layout: ``<prefix><kind>:v1:{<tag>}:<hex sha256>``, where the digest is SHA-256
over length-prefixed fields (each field's length as an 8-byte big-endian
integer, then its bytes).

Namespace flush generations: ``EMBCACHE.FLUSH ns [MODEL m]`` and
``LLMCACHE.FLUSH ns`` bump a counter in the namespace's generation hash
(:func:`gen_key`; field ``emb`` for the namespace's embeddings, ``m:<model>``
for one model's, ``llm`` for its chat entries). A non-zero generation appends
three digest fields, ``b"gen"``, the namespace generation and the model
generation (each a u64 big-endian; the model's is 0 for chat), so every old
entry is unreachable at once. With both generations 0 the keys are exactly the
original ones.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, List, Mapping, Optional, Tuple, Union

__all__ = [
    "DEFAULT_PREFIX",
    "TRANSPORT_ONLY",
    "canonical_number",
    "canonical_request",
    "chat_key",
    "collapse_whitespace",
    "compose",
    "digest_fields",
    "EMB_GENERATION_FIELD",
    "LLM_GENERATION_FIELD",
    "model_generation_field",
    "dims_key",
    "embedding_key",
    "gen_key",
    "hash_tag",
    "history_key",
    "request_body",
]

Text = Union[str, bytes]
Request = Union[Mapping[str, Any], str, bytes]

DEFAULT_PREFIX = "aicache:"
MAX_NS_BYTES = 1024
MAX_MODEL_BYTES = 256
# serde_json refuses the 128th level of nesting; a deeper request has no key.
MAX_JSON_DEPTH = 127

TRANSPORT_ONLY = (
    "stream",
    "stream_options",
    "user",
    "store",
    "metadata",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
)
# Absent or null, these mean the API's default, so they key as the default.
DEFAULTS = (
    ("temperature", "1"),
    ("top_p", "1"),
    ("n", "1"),
    ("presence_penalty", "0"),
    ("frequency_penalty", "0"),
)

# Fields of the generation hash (keys.rs).
EMB_GENERATION_FIELD = b"emb"
LLM_GENERATION_FIELD = b"llm"

_U64 = 1 << 64
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def to_bytes(value: Text, what: str = "value") -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


def hash_tag(namespace: Text) -> bytes:
    """The part of the namespace Redis Cluster hashes: the first non-empty
    ``{...}``, else the whole name. Raises ValueError for the namespaces the
    module refuses (empty, over 1024 bytes, a ``}`` outside a tag)."""
    ns = to_bytes(namespace, "namespace")
    if not ns:
        raise ValueError("namespace must not be empty")
    if len(ns) > MAX_NS_BYTES:
        raise ValueError(f"namespace longer than {MAX_NS_BYTES} bytes")
    start = ns.find(b"{")
    if start >= 0:
        end = ns.find(b"}", start + 1)
        if end > start + 1:
            return ns[start + 1:end]
    if b"}" in ns:
        raise ValueError("namespace contains '}' outside a {hash tag}; "
                         "use a namespace such as '{tenant}:emb'")
    return ns


def digest_fields(fields: Iterable[bytes]) -> str:
    """Hex SHA-256 of the length-prefixed fields (injective: moving a field
    boundary always changes the digest)."""
    h = hashlib.sha256()
    for f in fields:
        h.update(len(f).to_bytes(8, "big"))
        h.update(f)
    return h.hexdigest()


def compose(prefix: Text, kind: str, tag: bytes, digest: str) -> bytes:
    return to_bytes(prefix) + kind.encode() + b":v1:{" + tag + b"}:" + digest.encode()


def _u64(n: int, what: str) -> bytes:
    if not 0 <= n < _U64:
        raise ValueError(f"{what} must fit in a u64")
    return n.to_bytes(8, "big")


def _generation_fields(ns_gen: int, model_gen: int) -> List[bytes]:
    if ns_gen == 0 and model_gen == 0:
        return []
    return [b"gen", _u64(ns_gen, "ns_gen"), _u64(model_gen, "model_gen")]


def collapse_whitespace(text: bytes) -> bytes:
    """``aicache.normalize-whitespace``: runs of ASCII whitespace become one
    space and both ends are trimmed. Non-ASCII whitespace stays."""
    # bytes.split() splits on exactly the module's set: space, \t \n \r \v \f.
    return b" ".join(text.split())


def _check_model(model: Text) -> bytes:
    m = to_bytes(model, "model")
    if not m or len(m) > MAX_MODEL_BYTES:
        raise ValueError(f"model must be 1 to {MAX_MODEL_BYTES} bytes")
    return m


def embedding_key(prefix: Text, namespace: Text, model: Text, text: Text,
                  dims: Optional[int] = None, ns_gen: int = 0, model_gen: int = 0,
                  *, normalize_whitespace: bool = False) -> bytes:
    """Key of the embedding of ``text`` (``dims``: the FETCH ``DIMENSIONS``
    option, a different vector and so a different key)."""
    ns, m = to_bytes(namespace, "namespace"), _check_model(model)
    tag = hash_tag(ns)
    t = to_bytes(text, "text")
    if normalize_whitespace:
        t = collapse_whitespace(t)
    if not t:
        raise ValueError("text must not be empty")
    gen = _generation_fields(ns_gen, model_gen)
    if dims is None:
        fields = [b"emb:v1", ns, m, t, *gen]
    else:
        if not 1 <= dims < (1 << 32):
            raise ValueError("dims must be a positive 32-bit integer")
        fields = [b"emb-dims:v1", ns, m, dims.to_bytes(4, "big"), t, *gen]
    return compose(prefix, "emb", tag, digest_fields(fields))


def chat_key(prefix: Text, namespace: Text, request: Request, ns_gen: int = 0) -> bytes:
    """Key of the cached response to a chat-completions request (a dict, or
    its JSON text exactly as it is sent)."""
    ns = to_bytes(namespace, "namespace")
    tag = hash_tag(ns)
    canon = canonical_request(request_body(request))
    fields = [b"llm:v1", ns, canon, *_generation_fields(ns_gen, 0)]
    return compose(prefix, "llm", tag, digest_fields(fields))


def dims_key(prefix: Text, namespace: Text) -> bytes:
    """The hash pinning each model's vector size in the namespace."""
    ns = to_bytes(namespace, "namespace")
    return compose(prefix, "dims", hash_tag(ns), digest_fields([b"dims:v1", ns]))


def gen_key(prefix: Text, namespace: Text) -> bytes:
    """The hash holding the namespace's flush generations (fields ``emb``,
    ``llm`` and ``m:<model>``)."""
    ns = to_bytes(namespace, "namespace")
    return compose(prefix, "gen", hash_tag(ns), digest_fields([b"gen:v1", ns]))


def model_generation_field(model: Text) -> bytes:
    """The generation hash field of one embedding model."""
    return b"m:" + to_bytes(model, "model")


def history_key(prefix: Text, namespace: Text, session_id: Text) -> bytes:
    """A ChatHistory list: not a module key, but laid out like one so it
    shares the namespace's slot and ACL patterns."""
    ns = to_bytes(namespace, "namespace")
    sid = to_bytes(session_id, "session_id")
    return compose(prefix, "hist", hash_tag(ns), digest_fields([b"hist:v1", ns, sid]))


def request_body(request: Request) -> bytes:
    """The bytes sent as a request: JSON text as given, a mapping as compact
    JSON (NaN and infinities refused, as the module would)."""
    if isinstance(request, (str, bytes, bytearray, memoryview)):
        return to_bytes(request)
    if not isinstance(request, Mapping):
        raise TypeError(f"request must be a mapping or JSON text, not {type(request).__name__}")
    return json.dumps(request, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


# ---- canonical request (canon.rs) ----

class _Num(str):
    """A JSON number kept as its source text: its exact value decides the
    key, never a float rounding of it."""


def _strict_i64(text: str) -> Optional[int]:
    try:
        v = int(text)
    except ValueError:
        return None
    return v if _I64_MIN <= v <= _I64_MAX else None


def canonical_number(token: str) -> Optional[str]:
    """The one spelling of a JSON number's exact decimal value (``1``,
    ``1.0``, ``1e0`` and ``10E-1`` are all ``1``; ``0.25`` is ``25e-2``), or
    None where the module refuses it (exponent outside i64)."""
    neg = token.startswith("-")
    rest = token[1:] if neg else token
    cut = min((i for i in (rest.find("e"), rest.find("E")) if i >= 0), default=-1)
    if cut >= 0:
        exp_opt = _strict_i64(rest[cut + 1:])
        if exp_opt is None:
            return None
        mantissa, exp = rest[:cut], exp_opt
    else:
        mantissa, exp = rest, 0
    integer, _, frac = mantissa.partition(".")
    if not integer or not (integer + frac).isdigit() or not (integer + frac).isascii():
        return None
    digits = (integer + frac).lstrip("0")
    significant = digits.rstrip("0")
    if not significant:
        return "0"
    # Checked step by step, as the module does: an intermediate overflow
    # refuses the number even when the final exponent would fit.
    exp -= len(frac)
    if exp < _I64_MIN:
        return None
    exp += len(digits) - len(significant)
    if exp > _I64_MAX:
        return None
    sign = "-" if neg else ""
    if exp >= 0 and len(significant) + exp <= 64:
        return sign + significant + "0" * exp
    return f"{sign}{significant}e{exp}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"request holds {name}, which is not JSON")


def _dump(value: Any, out: List[str], depth: int) -> None:
    if isinstance(value, _Num):
        c = canonical_number(value)
        if c is None:
            raise ValueError("request holds a bad number")
        out.append(c)
    elif isinstance(value, dict):
        if depth >= MAX_JSON_DEPTH:
            raise ValueError("request is nested too deeply")
        out.append("{")
        for i, k in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(json.dumps(k, ensure_ascii=False))
            out.append(":")
            _dump(value[k], out, depth + 1)
        out.append("}")
    elif isinstance(value, list):
        if depth >= MAX_JSON_DEPTH:
            raise ValueError("request is nested too deeply")
        out.append("[")
        for i, x in enumerate(value):
            if i:
                out.append(",")
            _dump(x, out, depth + 1)
        out.append("]")
    else:
        out.append(json.dumps(value, ensure_ascii=False))


def canonical_request(body: Union[str, bytes]) -> bytes:
    """The canonical form of a chat-completions request body (canon.rs):
    keys sorted at every level, compact, numbers in their canonical
    spelling, transport-only fields dropped, sampling defaults filled in.
    Raises ValueError for a request the module refuses to key."""
    raw = to_bytes(body)
    try:
        text = raw.decode("utf-8")
        req = json.loads(text, parse_int=_Num, parse_float=_Num,
                         parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"request is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError("request is nested too deeply") from None
    if not isinstance(req, dict):
        raise ValueError("request must be a JSON object")
    model = req.get("model")
    if not isinstance(model, str) or isinstance(model, _Num) or not model:
        raise ValueError('request needs a non-empty string "model"')
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError('request needs a non-empty array "messages"')
    for f in TRANSPORT_ONLY:
        req.pop(f, None)
    for name, default in DEFAULTS:
        v = req.get(name)
        if v is None:
            req[name] = _Num(default)
        elif not isinstance(v, _Num):
            raise ValueError(f'request field "{name}" must be a number')
    out: List[str] = []
    _dump(req, out, 0)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("request holds a lone surrogate, which is not valid JSON text") from None


def split_generations(values: Tuple[Optional[bytes], ...]) -> Tuple[int, ...]:
    """HMGET replies of a generation hash as integers (absent: 0)."""
    return tuple(int(v) if v is not None else 0 for v in values)
