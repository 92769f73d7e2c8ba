"""Typed replies: a FETCH's per-entry metadata and a THROTTLE decision."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = ["Meta", "Throttle"]


def _int(v: Any) -> int:
    return int(v.decode() if isinstance(v, bytes) else v)


@dataclass(frozen=True)
class Meta:
    """How one FETCH entry was answered (the ``WITHMETA`` option).

    ``status`` is ``"hit"`` (read from the cache), ``"miss"`` (this call
    filled it) or ``"coalesced"`` (joined a fill another call started).
    ``age_ms`` is how old the entry is, None when unknown. ``ttl_ms`` is the
    entry's remaining time to live, None when it never expires or was not
    stored (``stored`` tells which)."""

    status: str
    age_ms: Optional[int]
    ttl_ms: Optional[int]
    stored: bool = True

    @property
    def hit(self) -> bool:
        return self.status == "hit"

    @classmethod
    def from_reply(cls, reply: Sequence[Any]) -> "Meta":
        status, age, ttl = reply[0], _int(reply[1]), _int(reply[2])
        if isinstance(status, bytes):
            status = status.decode()
        return cls(status=str(status), age_ms=None if age < 0 else age,
                   ttl_ms=None if ttl < 0 else ttl, stored=ttl != -2)


@dataclass(frozen=True)
class Throttle:
    """One ``AICACHE.THROTTLE`` decision. ``retry_after_ms`` is None when
    the cost was admitted, and also when it exceeds ``limit`` and so can
    never be admitted."""

    allowed: bool
    limit: int
    remaining: int
    retry_after_ms: Optional[int]
    reset_after_ms: int

    def __bool__(self) -> bool:
        return self.allowed

    @classmethod
    def from_reply(cls, reply: Sequence[Any]) -> "Throttle":
        allowed, limit, remaining, retry, reset = (_int(x) for x in reply)
        return cls(allowed=allowed == 1, limit=limit, remaining=remaining,
                   retry_after_ms=None if retry < 0 else retry, reset_after_ms=reset)
