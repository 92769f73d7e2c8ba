"""LlamaIndex embedding model over aicache.

    from llama_index.core import Settings
    from aicache import AICache
    from aicache.llamaindex import AICacheEmbedding

    Settings.embed_model = AICacheEmbedding(AICache(r, "docs"), model_name="text-embedding-3-small")

Each batch LlamaIndex forms (``embed_batch_size`` texts, 100 by default here
since a batch is one Redis round trip) is one ``EMBCACHE.FETCH``; misses are
filled by the module. Pass ``async_client=AsyncAICache(...)`` for the async
methods to run on the event loop rather than LlamaIndex's default (the sync
method called from the coroutine).
"""
from __future__ import annotations

import inspect
from typing import Any, List, Optional

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import PrivateAttr

__all__ = ["AICacheEmbedding"]


def _is_async(client: Any) -> bool:
    return client is not None and inspect.iscoroutinefunction(getattr(client, "embed", None))


class AICacheEmbedding(BaseEmbedding):
    """``client``: an ``AICache`` (or an ``AsyncAICache``: then only the async
    methods work); ``async_client``: an ``AsyncAICache``. ``model_name``: the
    embedding model (default: the client's). ``dimensions``, ``ex``,
    ``timeout_ms``: passed to every ``embed``."""

    dimensions: Optional[int] = None
    ex: Optional[int] = None
    timeout_ms: Optional[int] = None

    _client: Any = PrivateAttr(default=None)
    _async_client: Any = PrivateAttr(default=None)

    def __init__(self, client: Any = None, *, async_client: Any = None,
                 model_name: Optional[str] = None, embed_batch_size: int = 100,
                 **kwargs: Any) -> None:
        if _is_async(client) and async_client is None:
            client, async_client = None, client
        if client is None and async_client is None:
            raise ValueError("AICacheEmbedding needs an AICache or an AsyncAICache")
        if model_name is None:
            owner = client if client is not None else async_client
            model_name = getattr(owner, "model", None) or "unknown"
        super().__init__(model_name=model_name, embed_batch_size=embed_batch_size, **kwargs)
        self._client = client
        self._async_client = async_client

    @classmethod
    def class_name(cls) -> str:
        return "AICacheEmbedding"

    def _model(self) -> Optional[str]:
        # "unknown" is BaseEmbedding's default name, never a model to ask for.
        return None if self.model_name == "unknown" else self.model_name

    def _kwargs(self) -> dict:
        return {"dimensions": self.dimensions, "ex": self.ex, "timeout_ms": self.timeout_ms}

    def _embed(self, texts: List[str]) -> List[Embedding]:
        if not texts:
            return []
        if self._client is None:
            raise RuntimeError("this AICacheEmbedding has only an async client: use the a* methods")
        return self._client.embed(list(texts), self._model(), **self._kwargs()).tolist()

    async def _aembed(self, texts: List[str]) -> List[Embedding]:
        if not texts:
            return []
        if self._async_client is None:
            return self._embed(texts)
        arr = await self._async_client.embed(list(texts), self._model(), **self._kwargs())
        return arr.tolist()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return self._embed(texts)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return (await self._aembed([query]))[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._aembed([text]))[0]

    async def _aget_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return await self._aembed(texts)
