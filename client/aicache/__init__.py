"""Python helpers for the aicache Redis module."""
from .stream import StreamError, completion_to_chunks, stream_chat

__all__ = ["StreamError", "completion_to_chunks", "stream_chat"]
