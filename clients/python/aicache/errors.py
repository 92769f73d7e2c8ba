"""Exceptions for the module's error replies.

Every class derives from :class:`AICacheError`, itself a
``redis.exceptions.ResponseError``, so code that already catches
``ResponseError`` keeps working. The class and its fields are read from the
error text the module sends (the texts are part of its documented interface:
``THROTTLED retry after 120 ms: ...``, ``ERR upstream returned HTTP 429: ...``).

Like redis-py, ``str(e)`` drops the leading ``ERR `` but keeps any other code
(``THROTTLED ...``).
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Optional, Tuple, Type

from redis.exceptions import ResponseError

__all__ = [
    "AICacheError",
    "BatchError",
    "CannotFill",
    "CredentialsError",
    "DimensionMismatch",
    "InternalError",
    "InvalidRequest",
    "NotCacheable",
    "Overloaded",
    "QueueExpired",
    "QueueFull",
    "ShuttingDown",
    "StreamError",
    "TenantRefused",
    "Throttled",
    "Timeout",
    "TooManyFills",
    "UpstreamError",
    "UpstreamTimeout",
    "from_message",
    "convert",
]

_FAILING_FAST = " (failing fast: the same fill failed within aicache.fail-memory-ms)"
# redis-py prefixes an error inside a pipeline with the command that failed.
_PIPELINE = re.compile(r"Command # \d+ \(.*?\) of pipeline caused error: ", re.S)


class AICacheError(ResponseError):
    """An error reply of the aicache module."""

    #: The same fill failed moments ago and ``aicache.fail-memory-ms``
    #: answered this call with that failure without calling upstream.
    failing_fast: bool

    def __init__(self, message: str = "", *, failing_fast: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.failing_fast = failing_fast


class Throttled(AICacheError):
    """A spend limit refused the call before it went upstream.

    ``who`` is ``"tenant"`` (a tenant's limit, or the tenant table is full),
    ``"global"`` or ``"budget"`` (the daily token budget). ``retry_after_ms``
    is None when this call alone is over the limit and can never fit."""

    def __init__(self, message: str = "", *, retry_after_ms: Optional[int] = None,
                 who: str = "global", limit_name: Optional[str] = None,
                 limit: Optional[int] = None, tenant: Optional[str] = None,
                 failing_fast: bool = False) -> None:
        super().__init__(message, failing_fast=failing_fast)
        self.retry_after_ms = retry_after_ms
        self.who = who
        #: The config that refused, e.g. ``aicache.tenant-max-requests``.
        self.limit_name = limit_name
        self.limit = limit
        #: The tenant id as the module printed it (non-printable bytes escaped).
        self.tenant = tenant


class UpstreamError(AICacheError):
    """The upstream API failed the fill.

    ``status`` is the HTTP status when the upstream answered with one, else
    None. ``kind`` is ``"http"``, ``"connect"``, ``"timeout"``,
    ``"invalid"`` (an answer that failed validation), ``"too_large"``,
    ``"request"`` or ``"stream"`` (a streamed generation broke off)."""

    def __init__(self, message: str = "", *, status: Optional[int] = None,
                 kind: str = "http", failing_fast: bool = False) -> None:
        super().__init__(message, failing_fast=failing_fast)
        self.status = status
        self.kind = kind


class Timeout(AICacheError):
    """The call's wait ran out (its ``TIMEOUT`` or ``aicache.wait-timeout-ms``).
    The fill goes on and is stored; a later call gets it."""


class UpstreamTimeout(UpstreamError, Timeout):
    """One upstream attempt ran past ``aicache.upstream-timeout-ms``."""

    def __init__(self, message: str = "", *, timeout_ms: Optional[int] = None,
                 failing_fast: bool = False) -> None:
        super().__init__(message, status=None, kind="timeout", failing_fast=failing_fast)
        self.timeout_ms = timeout_ms


class Overloaded(AICacheError):
    """The module refused to start a fill now; retry later."""


class QueueFull(Overloaded):
    """The upstream job queue (``aicache.queue-size``) is full."""

    def __init__(self, message: str = "", *, queue_size: Optional[int] = None,
                 failing_fast: bool = False) -> None:
        super().__init__(message, failing_fast=failing_fast)
        self.queue_size = queue_size


class TooManyFills(Overloaded):
    """``aicache.max-fills`` entries are being filled already."""


class QueueExpired(Overloaded):
    """The job waited in the queue past its lease and was never sent."""

    def __init__(self, message: str = "", *, waited_ms: Optional[int] = None,
                 failing_fast: bool = False) -> None:
        super().__init__(message, failing_fast=failing_fast)
        self.waited_ms = waited_ms


class CannotFill(AICacheError):
    """A miss where no fill may start: inside MULTI or a script, or on a
    replica. Hits are still served there."""

    def __init__(self, message: str = "", *, replica: bool = False,
                 failing_fast: bool = False) -> None:
        super().__init__(message, failing_fast=failing_fast)
        self.replica = replica


class DimensionMismatch(AICacheError):
    """A vector's size disagrees with the namespace's pin or ``fixed-dims``."""


class CredentialsError(AICacheError):
    """``aicache.api-key-file`` is set but unusable; nothing was sent."""


class TenantRefused(AICacheError):
    """``aicache.tenant-source`` decides the tenant and the call named another."""


class InvalidRequest(AICacheError):
    """The chat request cannot be keyed (bad JSON, no model or messages, ...)."""


class NotCacheable(AICacheError):
    """A response (or a sampled request) that the module refuses to store."""


class ShuttingDown(AICacheError):
    """The module is unloading or the server is shutting down."""


class InternalError(AICacheError):
    """A bug in the module, caught and answered instead of crashing Redis."""


class StreamError(AICacheError):
    """A streamed generation ended with an error entry. Raised as a class
    that also derives from the specific error (an upstream failure is both a
    StreamError and an UpstreamError)."""


class BatchError(AICacheError):
    """``embed`` of several texts where the upstream refused some of them on
    their own. ``errors`` maps each failed input's index to its error;
    ``vectors`` holds every other input's vector (None where failed)."""

    def __init__(self, message: str = "", *, errors: Optional[Dict[int, AICacheError]] = None,
                 vectors: Optional[List[object]] = None) -> None:
        super().__init__(message)
        self.errors: Dict[int, AICacheError] = errors or {}
        self.vectors: List[object] = vectors or []


_Parser = Callable[["re.Match[str]", str, bool], AICacheError]


def _throttled(m: "re.Match[str]", text: str, ff: bool) -> AICacheError:
    who_text = m.group("who")
    tenant = None
    if who_text.startswith("tenant '"):
        who, tenant = "tenant", who_text[len("tenant '"):-1]
    elif who_text.startswith("the tenant table"):
        who = "tenant"
    elif "budget" in who_text:
        who = "budget"
    else:
        who = "global"
    retry = m.group("retry")
    return Throttled(text, retry_after_ms=int(retry) if retry is not None else None, who=who,
                     limit_name=m.group("name"), limit=int(m.group("limit")), tenant=tenant,
                     failing_fast=ff)


def _upstream(kind: str) -> _Parser:
    def parse(m: "re.Match[str]", text: str, ff: bool) -> AICacheError:
        return UpstreamError(text, status=None, kind=kind, failing_fast=ff)
    return parse


def _simple(cls: Type[AICacheError]) -> _Parser:
    def parse(m: "re.Match[str]", text: str, ff: bool) -> AICacheError:
        return cls(text, failing_fast=ff)
    return parse


# First match wins; each pattern is matched against the text without "ERR ".
_RULES: List[Tuple["re.Pattern[str]", _Parser]] = [
    (re.compile(r"THROTTLED (?:retry after (?P<retry>\d+) ms|this call alone is over the limit): "
                r"(?P<who>.*) is at (?P<name>.+) (?P<limit>\d+); no upstream call was made"),
     _throttled),
    (re.compile(r"upstream returned HTTP (?P<status>\d{3})"),
     lambda m, t, ff: UpstreamError(t, status=int(m.group("status")), kind="http",
                                    failing_fast=ff)),
    (re.compile(r"upstream timed out after (?P<ms>\d+) ms"),
     lambda m, t, ff: UpstreamTimeout(t, timeout_ms=int(m.group("ms")), failing_fast=ff)),
    (re.compile(r"upstream connection failed"), _upstream("connect")),
    (re.compile(r"upstream response is larger than"), _upstream("too_large")),
    (re.compile(r"upstream returned an invalid response"), _upstream("invalid")),
    (re.compile(r"upstream request could not be built"), _upstream("request")),
    (re.compile(r"upstream stream failed"), _upstream("stream")),
    (re.compile(r"cannot use the API key from aicache\.api-key-file"), _simple(CredentialsError)),
    (re.compile(r"timed out waiting for the upstream fill"), _simple(Timeout)),
    (re.compile(r"upstream queue is full \(aicache\.queue-size (?P<n>\d+)\)"),
     lambda m, t, ff: QueueFull(t, queue_size=int(m.group("n")), failing_fast=ff)),
    (re.compile(r"too many fills in flight"), _simple(TooManyFills)),
    (re.compile(r"fill not started: it waited (?P<ms>\d+) ms in the queue"),
     lambda m, t, ff: QueueExpired(t, waited_ms=int(m.group("ms")), failing_fast=ff)),
    (re.compile(r"(?:\d+ cache miss\(es\)|cache miss)(?P<rest>.*)"),
     lambda m, t, ff: CannotFill(t, replica="replica" in m.group("rest"), failing_fast=ff)),
    (re.compile(r"dimension mismatch"), _simple(DimensionMismatch)),
    (re.compile(r"aicache is shutting down|aicache worker pool is not running"),
     _simple(ShuttingDown)),
    (re.compile(r"internal error"), _simple(InternalError)),
    (re.compile(r"TENANT '.*' is not yours|aicache\.tenant-source is user but"),
     _simple(TenantRefused)),
    (re.compile(r"(?:request|response) .*not cached|response "), _simple(NotCacheable)),
    (re.compile(r"request "), _simple(InvalidRequest)),
]

_stream_variants: Dict[Type[AICacheError], Type[AICacheError]] = {}


def _in_stream(cls: Type[AICacheError]) -> Type[AICacheError]:
    if issubclass(cls, StreamError):
        return cls
    if cls is AICacheError:
        return StreamError
    variant = _stream_variants.get(cls)
    if variant is None:
        variant = type("Stream" + cls.__name__, (StreamError, cls),
                       {"__module__": __name__, "__doc__": cls.__doc__})
        _stream_variants[cls] = variant
    return variant


def from_message(text: str, *, stream: bool = False) -> AICacheError:
    """The exception for one error text, with or without its ``ERR``
    prefix. ``stream``: the text came from a Stream's end entry, and the
    result is also a :class:`StreamError`."""
    in_pipeline = _PIPELINE.match(text)
    if in_pipeline:
        text = text[in_pipeline.end():]
    body = text[4:] if text.startswith("ERR ") else text
    ff = body.endswith(_FAILING_FAST)
    core = body[: -len(_FAILING_FAST)] if ff else body
    err: AICacheError = AICacheError(body, failing_fast=ff)
    for pattern, parse in _RULES:
        m = pattern.match(core)
        if m:
            err = parse(m, body, ff)
            break
    if stream:
        variant = _in_stream(type(err))
        if type(err) is not variant:
            err.__class__ = variant
    return err


def convert(error: BaseException) -> BaseException:
    """A redis-py ``ResponseError`` as its aicache exception (the original
    stays reachable as ``__cause__``); any other exception unchanged."""
    if isinstance(error, AICacheError) or not isinstance(error, ResponseError):
        return error
    if type(error) is not ResponseError:
        # redis-py already picked a specific class (NOPERM, WRONGTYPE, ...).
        return error
    out = from_message(str(error))
    out.__cause__ = error
    return out
