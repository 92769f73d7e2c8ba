"""Python client for the aicache Redis module.

    import redis
    from aicache import AICache
    cache = AICache(redis.Redis(), "docs", "text-embedding-3-small")
    vectors = cache.embed(["hello", "world"])        # (2, 1536) float32

See ``clients/python/README.md``. ``aicache.aio`` holds the asyncio forms.
"""
from .client import AICache
from .errors import (AICacheError, BatchError, CannotFill, CredentialsError, DimensionMismatch,
                     InternalError, InvalidRequest, NotCacheable, Overloaded, QueueExpired,
                     QueueFull, ShuttingDown, StreamError, TenantRefused, Throttled, Timeout,
                     TooManyFills, UpstreamError, UpstreamTimeout)
from .history import ChatHistory
from .results import Meta, Throttle
from .stream import astream_chat, completion_to_chunks, stream_chat

__version__ = "0.1.0"

__all__ = [
    "AICache",
    "AICacheError",
    "BatchError",
    "CannotFill",
    "ChatHistory",
    "CredentialsError",
    "DimensionMismatch",
    "InternalError",
    "InvalidRequest",
    "Meta",
    "NotCacheable",
    "Overloaded",
    "QueueExpired",
    "QueueFull",
    "ShuttingDown",
    "StreamError",
    "TenantRefused",
    "Throttle",
    "Throttled",
    "Timeout",
    "TooManyFills",
    "UpstreamError",
    "UpstreamTimeout",
    "astream_chat",
    "completion_to_chunks",
    "stream_chat",
]
