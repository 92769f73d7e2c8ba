"""AICache: the module's commands for one namespace on a redis-py client."""
from __future__ import annotations

from typing import (Any, Dict, Iterable, Iterator, List, Literal, Mapping, Optional, Tuple, Union,
                    overload)

from ._core import Core, Pairs, Vector, VectorLike
from ._io import Op, T, executor, iterate, run
from .keys import Request, Text
from .results import Meta, Throttle

__all__ = ["AICache", "Meta", "Throttle"]


class AICache(Core):
    """The aicache commands bound to one namespace.

    ``redis_client`` is a ``redis.Redis`` or ``redis.cluster.RedisCluster``
    (any ``decode_responses``: replies are never decoded by redis-py). In a
    cluster every command routes by its first key, the namespace, and every
    key the module writes for the namespace carries its hash tag, so it all
    lands on one shard.

    ``model`` is the default embedding model. ``timeout_ms`` and ``tenant``
    are sent with every FETCH and STREAM (``TIMEOUT`` / ``TENANT``). FETCH
    blocks until its fills end, up to ``TIMEOUT`` (default
    ``aicache.wait-timeout-ms``, 60 s): give the redis client a
    ``socket_timeout`` above it, or None.

    The key helpers need ``aicache.key-prefix`` and
    ``aicache.normalize-whitespace``: pass them as ``key_prefix`` /
    ``normalize_whitespace``, or they are read once with ``CONFIG GET`` (which
    needs the ``@admin`` ACL category).
    """

    def __init__(self, redis_client: Any, namespace: Text, model: Optional[Text] = None, *,
                 timeout_ms: Optional[int] = None, tenant: Optional[Text] = None,
                 key_prefix: Optional[str] = None,
                 normalize_whitespace: Optional[bool] = None) -> None:
        super().__init__(namespace, model, timeout_ms=timeout_ms, tenant=tenant,
                         key_prefix=key_prefix, normalize_whitespace=normalize_whitespace)
        self.redis = redis_client
        self._execute = executor(redis_client)

    def _run(self, op: "Op[T]") -> T:
        return run(self._execute, op)

    # ---- embeddings ----

    @overload
    def embed(self, texts: Iterable[Text], model: Optional[Text] = None, *,
              dimensions: Optional[int] = None, refresh: bool = False,
              nostore: bool = False, ex: Optional[int] = None,
              timeout_ms: Optional[int] = None,
              with_meta: Literal[False] = False) -> Vector: ...

    @overload
    def embed(self, texts: Iterable[Text], model: Optional[Text] = None, *,
              dimensions: Optional[int] = None, refresh: bool = False,
              nostore: bool = False, ex: Optional[int] = None,
              timeout_ms: Optional[int] = None,
              with_meta: Literal[True]) -> Tuple[Vector, List[Meta]]: ...

    def embed(self, texts: Iterable[Text], model: Optional[Text] = None, *,
              dimensions: Optional[int] = None, refresh: bool = False, nostore: bool = False,
              ex: Optional[int] = None, timeout_ms: Optional[int] = None,
              with_meta: bool = False) -> Union[Vector, Tuple[Vector, List[Meta]]]:
        """The embeddings of ``texts`` as an (n, d) float32 array, from the
        cache or filled from the upstream (``EMBCACHE.FETCH``). An empty list
        gives a (0, 0) array without a round trip. If the upstream refuses
        some texts on their own, raises BatchError holding the others'
        vectors. ``with_meta``: also a Meta per text."""
        return self._run(self.op_embed(texts, model, dimensions=dimensions, refresh=refresh,
                                       nostore=nostore, ex=ex, timeout_ms=timeout_ms,
                                       with_meta=with_meta))

    @overload
    def embed_one(self, text: Text, model: Optional[Text] = None, *,
                  dimensions: Optional[int] = None, refresh: bool = False,
                  nostore: bool = False, ex: Optional[int] = None,
                  timeout_ms: Optional[int] = None,
                  with_meta: Literal[False] = False) -> Vector: ...

    @overload
    def embed_one(self, text: Text, model: Optional[Text] = None, *,
                  dimensions: Optional[int] = None, refresh: bool = False,
                  nostore: bool = False, ex: Optional[int] = None,
                  timeout_ms: Optional[int] = None,
                  with_meta: Literal[True]) -> Tuple[Vector, Meta]: ...

    def embed_one(self, text: Text, model: Optional[Text] = None, *,
                  dimensions: Optional[int] = None, refresh: bool = False,
                  nostore: bool = False, ex: Optional[int] = None,
                  timeout_ms: Optional[int] = None,
                  with_meta: bool = False) -> Union[Vector, Tuple[Vector, Meta]]:
        """One text's embedding, shape (d,); its own error when refused."""
        return self._run(self.op_embed_one(text, model, dimensions=dimensions, refresh=refresh,
                                           nostore=nostore, ex=ex, timeout_ms=timeout_ms,
                                           with_meta=with_meta))

    def get(self, text: Text, model: Optional[Text] = None) -> Optional[Vector]:
        """The cached vector, or None (never calls the upstream)."""
        return self._run(self.op_get(text, model))

    def set(self, text: Text, vector: VectorLike, model: Optional[Text] = None,
            ex: Optional[int] = None) -> None:
        """Stores a vector (array, list of floats, or FP32 bytes)."""
        self._run(self.op_set(text, vector, model, ex))

    def mget(self, texts: Iterable[Text], model: Optional[Text] = None) -> List[Optional[Vector]]:
        return self._run(self.op_mget(texts, model))

    def mset(self, pairs_or_mapping: Pairs, model: Optional[Text] = None) -> None:
        """Stores every pair, or none if any is invalid."""
        self._run(self.op_mset(pairs_or_mapping, model))

    def delete(self, texts: Iterable[Text], model: Optional[Text] = None) -> int:
        """Deletes entries; returns how many existed."""
        return self._run(self.op_delete(texts, model))

    def dims(self, model: Optional[Text] = None) -> Optional[int]:
        """The vector size pinned for the model in this namespace, or None."""
        return self._run(self.op_dims(model))

    def reset_dims(self, model: Optional[Text] = None) -> bool:
        """Removes the model's pin; True if there was one."""
        return self._run(self.op_reset_dims(model))

    def flush(self, *, model: Optional[Text] = None) -> int:
        """Makes every embedding of the namespace (or of ``model`` only)
        unreachable at once (``EMBCACHE.FLUSH``); returns the new generation."""
        return self._run(self.op_flush(model))

    def embedding_key(self, text: Text, model: Optional[Text] = None,
                      dimensions: Optional[int] = None) -> bytes:
        """The Redis key of an embedding, as the module derives it."""
        return self._run(self.op_embedding_key(text, model, dimensions))

    # ---- chat ----

    @overload
    def chat(self, request: Request, *, refresh: bool = False, nostore: bool = False,
             ex: Optional[int] = None, timeout_ms: Optional[int] = None,
             with_meta: Literal[False] = False) -> Dict[str, Any]: ...

    @overload
    def chat(self, request: Request, *, refresh: bool = False, nostore: bool = False,
             ex: Optional[int] = None, timeout_ms: Optional[int] = None,
             with_meta: Literal[True]) -> Tuple[Dict[str, Any], Meta]: ...

    def chat(self, request: Request, *, refresh: bool = False, nostore: bool = False,
             ex: Optional[int] = None, timeout_ms: Optional[int] = None,
             with_meta: bool = False) -> Union[Dict[str, Any], Tuple[Dict[str, Any], Meta]]:
        """The chat.completion for ``request`` (an OpenAI request dict), from
        the cache or the upstream (``LLMCACHE.FETCH``)."""
        return self._run(self.op_chat(request, refresh=refresh, nostore=nostore, ex=ex,
                                      timeout_ms=timeout_ms, with_meta=with_meta))

    def chat_get(self, request: Request) -> Optional[Dict[str, Any]]:
        return self._run(self.op_chat_get(request))

    def chat_set(self, request: Request, response: Union[Mapping[str, Any], str, bytes],
                 ex: Optional[int] = None) -> None:
        """Stores a response; the module refuses ones that are not cacheable."""
        self._run(self.op_chat_set(request, response, ex))

    def chat_delete(self, request: Request) -> int:
        return self._run(self.op_chat_delete(request))

    def chat_flush(self) -> int:
        """Makes every chat entry of the namespace unreachable at once."""
        return self._run(self.op_chat_flush())

    def chat_key(self, request: Request) -> bytes:
        """The Redis key of a chat entry, as the module derives it."""
        return self._run(self.op_chat_key(request))

    def stream(self, request: Request, *, refresh: bool = False, nostore: bool = False,
               ex: Optional[int] = None, timeout_ms: Optional[int] = None, block_ms: int = 5000,
               timeout_s: float = 120.0) -> Iterator[Dict[str, Any]]:
        """The answer as OpenAI ``chat.completion.chunk`` dicts: a hit
        replayed, or a generation read while it runs, shared by every
        identical caller. Raises StreamError if the generation fails."""
        return iterate(self._execute, self.op_stream(
            request, refresh=refresh, nostore=nostore, ex=ex, timeout_ms=timeout_ms,
            block_ms=block_ms, timeout_s=timeout_s))

    # ---- limiter ----

    def throttle(self, key: Text, max: int, window_ms: int, cost: int = 1) -> Throttle:
        """``AICACHE.THROTTLE``: admits ``cost`` if it fits under ``max`` in
        the sliding window, and records it. ``key`` is used as is."""
        return self._run(self.op_throttle(key, max, window_ms, cost))
