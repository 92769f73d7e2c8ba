"""LangChain adapters over aicache.

    from aicache import AICache
    from aicache.langchain import AICacheEmbeddings, AICacheLLMCache

    emb = AICacheEmbeddings(AICache(r, "docs", "text-embedding-3-small"))
    vectors = emb.embed_documents(["a", "b"])          # list[list[float]]

    set_llm_cache(AICacheLLMCache(AICache(r, "chat")))  # or ChatOpenAI(cache=...)

``AICacheEmbeddings`` sends every batch as one ``EMBCACHE.FETCH``: hits come
from Redis, misses are filled by the module's workers (one upstream call per
text however many processes miss it at once), so no OpenAI client is needed
in the application.

``AICacheLLMCache`` is a LangChain ``BaseCache``. LangChain hands a cache only
two strings, the serialized messages (``prompt``) and a description of the
model and its call parameters (``llm_string``). For ``ChatOpenAI`` the cache
rebuilds the exact chat-completions request that model sends (its own
``_get_request_payload``), so an entry is the same Redis entry a direct
``LLMCACHE.FETCH`` / ``AICache.chat`` of that request uses, in both directions.
For any other model, or when the request cannot be rebuilt (a Pydantic
``response_format``, a Responses-API model, a ``langchain-openai`` without
that method), it uses a synthetic request, documented at
:func:`synthetic_request`, whose key is just as deterministic but is not
shared with non-LangChain callers.

Generations are stored as an OpenAI ``chat.completion`` body (the module
refuses anything else), one choice per generation. An answer cut off by
``finish_reason: "length"`` is not cacheable in the module; ``update`` then
stores nothing, so the next identical call goes to the model again.
"""
from __future__ import annotations

import ast
import asyncio
import hashlib
import inspect
import json
import threading
import time
from collections import OrderedDict
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
from langchain_core.embeddings import Embeddings
from langchain_core.outputs import ChatGeneration, Generation

__all__ = ["AICacheEmbeddings", "AICacheLLMCache", "synthetic_request", "request_for"]

# Class path LangChain serializes ChatOpenAI under (its lc_id).
_CHAT_OPENAI_ID = ["langchain", "chat_models", "openai", "ChatOpenAI"]
# Never sent: the rebuilt model needs some key to construct, not the real one.
_PLACEHOLDER_KEY = "sk-aicache-request-rebuild-only"


def _is_async_client(client: Any) -> bool:
    return client is not None and inspect.iscoroutinefunction(getattr(client, "embed", None)
                                                              or getattr(client, "chat_get", None))


# ---------------------------------------------------------------- embeddings

class AICacheEmbeddings(Embeddings):
    """LangChain ``Embeddings`` served by ``EMBCACHE.FETCH``.

    ``client`` is an ``aicache.AICache`` (or an ``AsyncAICache``, then only the
    async methods work); ``async_client`` an ``AsyncAICache`` that makes
    ``aembed_documents`` / ``aembed_query`` run on the event loop instead of
    a thread. ``model`` overrides the client's model; ``dimensions``, ``ex``
    and ``timeout_ms`` are passed to every call.
    """

    def __init__(self, client: Any = None, *, async_client: Any = None,
                 model: Optional[str] = None, dimensions: Optional[int] = None,
                 ex: Optional[int] = None, timeout_ms: Optional[int] = None) -> None:
        if _is_async_client(client) and async_client is None:
            client, async_client = None, client
        if client is None and async_client is None:
            raise ValueError("AICacheEmbeddings needs an AICache or an AsyncAICache")
        self.client = client
        self.async_client = async_client
        self.model = model
        self.dimensions = dimensions
        self.ex = ex
        self.timeout_ms = timeout_ms

    def _kwargs(self) -> dict:
        return {"dimensions": self.dimensions, "ex": self.ex, "timeout_ms": self.timeout_ms}

    def embed_documents(self, texts: List[str]) -> List[List[float]]:
        texts = list(texts)
        if not texts:
            return []
        if self.client is None:
            raise RuntimeError("this AICacheEmbeddings has only an async client: "
                               "use aembed_documents")
        return self.client.embed(texts, self.model, **self._kwargs()).tolist()

    def embed_query(self, text: str) -> List[float]:
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: List[str]) -> List[List[float]]:
        texts = list(texts)
        if not texts:
            return []
        if self.async_client is None:
            return await super().aembed_documents(texts)
        arr = await self.async_client.embed(texts, self.model, **self._kwargs())
        return arr.tolist()

    async def aembed_query(self, text: str) -> List[float]:
        return (await self.aembed_documents([text]))[0]


# ---------------------------------------------------------------- LLM cache

def _parse_messages(prompt: str):
    """The messages LangChain serialized into ``prompt``, or None when the
    prompt is a plain text (a completion LLM's)."""
    try:
        raw = json.loads(prompt)
    except ValueError:
        return None
    # Only the shape BaseChatModel writes (a list of serialized messages), so
    # a text prompt that happens to be JSON stays a text.
    if not (isinstance(raw, list) and raw and all(
            isinstance(m, dict) and m.get("lc") == 1 and m.get("type") == "constructor"
            for m in raw)):
        return None
    try:
        from langchain_core.messages import convert_to_messages
        return convert_to_messages(raw)
    except Exception:  # noqa: BLE001 - older cores: fall through to loads
        pass
    try:
        from langchain_core.load import loads
        try:
            msgs = loads(prompt, allowed_objects="messages")
        except TypeError:  # a core without allowed_objects
            msgs = loads(prompt)
        return list(msgs)
    except Exception:  # noqa: BLE001
        return None


def _split_llm_string(llm_string: str) -> Tuple[Optional[dict], dict]:
    """(serialized model, call parameters) of a chat model's llm_string, or
    (None, {}) for a shape this module does not know."""
    head, sep, tail = llm_string.rpartition("---")
    if not sep:
        return None, {}
    try:
        model = json.loads(head)
        params = dict(ast.literal_eval(tail)) if tail.strip() else {}
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None, {}
    return (model if isinstance(model, dict) else None), params


def _plain_kwargs(kwargs: dict) -> Optional[dict]:
    """Constructor kwargs with secrets replaced; None if any kwarg is an
    object LangChain could not serialize (the model cannot be rebuilt)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, dict) and v.get("lc") == 1:
            if v.get("type") == "secret":
                out[k] = _PLACEHOLDER_KEY
                continue
            return None
        out[k] = v
    return out


class _ChatOpenAIRebuilder:
    """ChatOpenAI objects rebuilt from llm_strings, kept so a hot prompt does
    not build one per lookup (building one creates HTTP client objects)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.lock = threading.Lock()
        self.models: "OrderedDict[str, Any]" = OrderedDict()

    def get(self, serialized: dict) -> Any:
        if serialized.get("id") != _CHAT_OPENAI_ID:
            return None
        key = json.dumps(serialized, sort_keys=True)
        with self.lock:
            if key in self.models:
                self.models.move_to_end(key)
                return self.models[key]
        model = None
        kwargs = _plain_kwargs(serialized.get("kwargs") or {})
        if kwargs is not None:
            try:
                from langchain_openai import ChatOpenAI
                model = ChatOpenAI(**kwargs)
            except Exception:  # noqa: BLE001 - any failure means "cannot rebuild"
                model = None
        # A failure is remembered too: it would fail the same way next time.
        with self.lock:
            self.models[key] = model
            while len(self.models) > self.size:
                self.models.popitem(last=False)
        return model


_REBUILDER = _ChatOpenAIRebuilder()


def _openai_request(messages, llm_string: str, shared_base_urls: Iterable[str] = ()):
    """(request, model) where request is exactly the chat-completions body the
    ChatOpenAI described by llm_string sends for messages, or (None, None).
    A model with its own base URL shares entries only when that URL is one
    of ``shared_base_urls``: two endpoints may serve one model name with
    different answers, and the request body would not tell them apart."""
    serialized, params = _split_llm_string(llm_string)
    if serialized is None or messages is None:
        return None, None
    model = _REBUILDER.get(serialized)
    if model is None:
        return None, None
    base = getattr(model, "openai_api_base", None)
    if base and base.rstrip("/") not in {u.rstrip("/") for u in shared_base_urls}:
        return None, None
    # ls_* keys are LangChain tracing metadata that never reach the API.
    params = {k: v for k, v in params.items() if not k.startswith("ls_")}
    stop = params.pop("stop", None)
    try:
        payload = model._get_request_payload(messages, stop=stop, **params)
        if model._use_responses_api(payload) or "messages" not in payload:
            return None, None
        # The SDK merges extra_body into the body it sends.
        extra = payload.pop("extra_body", None)
        if isinstance(extra, dict):
            payload.update(extra)
        # The module keys on JSON: a payload that does not survive it exactly
        # (a Pydantic response_format, a tuple) is not what went on the wire.
        body = json.loads(json.dumps(payload, allow_nan=False))
    except Exception:  # noqa: BLE001
        return None, None
    return body, model


def _message_dict(msg) -> dict:
    from langchain_core.messages import convert_to_openai_messages
    return convert_to_openai_messages(msg)


def synthetic_request(prompt: str, llm_string: str, messages=None) -> dict:
    """The request an entry is keyed on when the real one cannot be rebuilt:

        {"model": "langchain/<model class name, or 'llm'>",
         "messages": <the prompt's messages in OpenAI form, or one user
                      message holding the prompt text>,
         "x_langchain_llm": <hex SHA-256 of llm_string>}

    The module keeps unknown fields in the key, so the hash separates models
    and call parameters; it is a hash because llm_string may hold settings
    (endpoints, headers) that need not sit in Redis in clear text."""
    serialized, _ = _split_llm_string(llm_string)
    name = "llm"
    if serialized and isinstance(serialized.get("id"), list) and serialized["id"]:
        name = str(serialized["id"][-1])
    openai_messages = None
    if messages is not None:
        try:
            openai_messages = [_message_dict(m) for m in messages]
            json.dumps(openai_messages, allow_nan=False)
        except Exception:  # noqa: BLE001
            openai_messages = None
    if not openai_messages:
        openai_messages = [{"role": "user", "content": prompt}]
    return {"model": "langchain/" + name, "messages": openai_messages,
            "x_langchain_llm": hashlib.sha256(llm_string.encode("utf-8", "surrogatepass"))
            .hexdigest()}


def request_for(prompt: str, llm_string: str,
                shared_base_urls: Iterable[str] = ()) -> Tuple[dict, Any, bool]:
    """(request, rebuilt ChatOpenAI or None, is_chat) for a cache call."""
    messages = _parse_messages(prompt)
    req, model = _openai_request(messages, llm_string, shared_base_urls)
    if req is None:
        req = synthetic_request(prompt, llm_string, messages)
    return req, model, messages is not None


def _completion_from_generations(request: dict, generations: Sequence[Generation]
                                 ) -> Optional[dict]:
    """A chat.completion body holding the generations, or None when the module
    would refuse it (a choice cut off by length)."""
    choices = []
    first_meta: dict = {}
    usage = None
    for i, gen in enumerate(generations):
        info = dict(gen.generation_info or {})
        if isinstance(gen, ChatGeneration):
            msg = gen.message
            meta = dict(getattr(msg, "response_metadata", None) or {})
            message = _message_dict(msg)
            message["role"] = "assistant"
            message.pop("id", None)
            finish = info.get("finish_reason") or meta.get("finish_reason")
            if usage is None:
                usage = meta.get("token_usage")
                um = getattr(msg, "usage_metadata", None)
                if usage is None and um:
                    usage = {"prompt_tokens": um.get("input_tokens", 0),
                             "completion_tokens": um.get("output_tokens", 0),
                             "total_tokens": um.get("total_tokens", 0)}
            if i == 0:
                first_meta = meta
        else:
            message = {"role": "assistant", "content": gen.text}
            finish = info.get("finish_reason")
        if finish == "length":
            return None
        choice = {"index": i, "message": message, "logprobs": info.get("logprobs"),
                  # OpenAI's types require a reason; a model that gives none stopped.
                  "finish_reason": finish if isinstance(finish, str) else "stop"}
        choices.append(choice)
    if not choices:
        return None
    rid = first_meta.get("id")
    if not isinstance(rid, str) or not rid:
        digest = hashlib.sha256(json.dumps(choices, sort_keys=True, default=str).encode())
        rid = "chatcmpl-aicache-" + digest.hexdigest()[:24]
    body = {"id": rid, "object": "chat.completion",
            # LangChain keeps no creation time; the entry is made now.
            "created": int(first_meta.get("created") or time.time()),
            "model": first_meta.get("model_name") or request.get("model"),
            "choices": choices}
    if first_meta.get("system_fingerprint"):
        body["system_fingerprint"] = first_meta["system_fingerprint"]
    if isinstance(usage, dict):
        body["usage"] = {k: v for k, v in usage.items() if v is not None}
    try:
        json.dumps(body, allow_nan=False)
    except (TypeError, ValueError):
        body = json.loads(json.dumps(body, default=str))
    return body


def _generations_from_completion(body: dict, model: Any, is_chat: bool) -> List[Generation]:
    choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
    if not is_chat:
        return [Generation(text=(c.get("message") or {}).get("content") or "",
                           generation_info={"finish_reason": c.get("finish_reason")})
                for c in choices]
    if model is not None:
        try:
            # The model's own parser: a hit looks exactly like a fresh answer.
            result = model._create_chat_result(body)
            gens = list(result.generations)
            for gen in gens:
                gen.message.response_metadata = {**(gen.generation_info or {}),
                                                 **gen.message.response_metadata}
            if len(gens) == 1 and result.llm_output:
                gens[0].message.response_metadata = {**result.llm_output,
                                                     **gens[0].message.response_metadata}
            return gens
        except Exception:  # noqa: BLE001 - fall back to the generic reading
            pass
    gens = []
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else None
    for c in choices:
        info = {"finish_reason": c.get("finish_reason")}
        if c.get("logprobs") is not None:
            info["logprobs"] = c["logprobs"]
        gens.append(ChatGeneration(message=_ai_message(c.get("message") or {}, body, usage,
                                                       c.get("finish_reason")),
                                   generation_info=info))
    return gens


def _ai_message(raw: dict, body: dict, usage: Optional[dict], finish: Any):
    """An OpenAI assistant message as the AIMessage ChatOpenAI would make."""
    from langchain_core.messages import AIMessage
    from langchain_core.output_parsers.openai_tools import (make_invalid_tool_call,
                                                            parse_tool_call)
    tool_calls, invalid = [], []
    for tc in raw.get("tool_calls") or []:
        try:
            parsed = parse_tool_call(tc, return_id=True)
            if parsed is not None:
                tool_calls.append(parsed)
        except Exception as e:  # noqa: BLE001 - a bad call is reported, not fatal
            invalid.append(make_invalid_tool_call(tc, str(e)))
    extra = {k: raw[k] for k in ("refusal", "function_call", "audio", "tool_calls")
             if raw.get(k) is not None}
    meta = {"finish_reason": finish, "model_name": body.get("model"), "id": body.get("id"),
            "model_provider": "openai"}
    kwargs: dict = {}
    if usage:
        meta["token_usage"] = usage
        kwargs["usage_metadata"] = {"input_tokens": int(usage.get("prompt_tokens") or 0),
                                    "output_tokens": int(usage.get("completion_tokens") or 0),
                                    "total_tokens": int(usage.get("total_tokens") or 0)}
    return AIMessage(content=raw.get("content") or "", tool_calls=tool_calls,
                     invalid_tool_calls=invalid, additional_kwargs=extra,
                     response_metadata=meta, **kwargs)


def _not_cacheable(err: Exception) -> bool:
    """The module's refusal of a response it will not store (canon.rs)."""
    try:
        from .errors import NotCacheable
    except ImportError:  # pragma: no cover
        return "not cached" in str(err)
    return isinstance(err, NotCacheable)


class AICacheLLMCache(BaseCache):
    """LangChain LLM cache in the module's ``LLMCACHE`` entries.

    ``client``: an ``AICache`` (its namespace holds the entries);
    ``async_client``: an ``AsyncAICache`` for ``alookup`` / ``aupdate`` /
    ``aclear`` (without one they run the sync client in a thread, as
    LangChain's default does). ``ex``: TTL of what ``update`` stores
    (default: ``aicache.default-ttl``).

    ``clear()`` runs ``LLMCACHE.FLUSH`` on the namespace (``chat_flush``): every chat entry of
    the namespace becomes unreachable at once, whoever wrote it.

    ``shared_base_urls``: a ``ChatOpenAI`` with its own ``base_url`` shares
    entries with direct ``LLMCACHE.FETCH`` callers only when that URL is
    listed (normally the module's ``aicache.upstream-url``); otherwise its
    entries are keyed on the whole ``llm_string``, base URL included.
    """

    def __init__(self, client: Any = None, *, async_client: Any = None,
                 ex: Optional[int] = None, shared_base_urls: Iterable[str] = ()) -> None:
        if _is_async_client(client) and async_client is None:
            client, async_client = None, client
        if client is None and async_client is None:
            raise ValueError("AICacheLLMCache needs an AICache or an AsyncAICache")
        self.client = client
        self.async_client = async_client
        self.ex = ex
        self.shared_base_urls = tuple(shared_base_urls)

    def _sync(self) -> Any:
        if self.client is None:
            raise RuntimeError("this AICacheLLMCache has only an async client: use the a* methods")
        return self.client

    # -- sync

    def lookup(self, prompt: str, llm_string: str) -> Optional[RETURN_VAL_TYPE]:
        request, model, is_chat = request_for(prompt, llm_string, self.shared_base_urls)
        body = self._sync().chat_get(request)
        return None if body is None else _generations_from_completion(body, model, is_chat)

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        request, _, _ = request_for(prompt, llm_string, self.shared_base_urls)
        body = _completion_from_generations(request, return_val)
        if body is None:
            return
        try:
            self._sync().chat_set(request, body, ex=self.ex)
        except Exception as e:  # noqa: BLE001
            if not _not_cacheable(e):
                raise

    def clear(self, **kwargs: Any) -> None:
        self._sync().chat_flush()

    # -- async

    async def alookup(self, prompt: str, llm_string: str) -> Optional[RETURN_VAL_TYPE]:
        if self.async_client is None:
            return await asyncio.get_running_loop().run_in_executor(
                None, self.lookup, prompt, llm_string)
        request, model, is_chat = request_for(prompt, llm_string, self.shared_base_urls)
        body = await self.async_client.chat_get(request)
        return None if body is None else _generations_from_completion(body, model, is_chat)

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        if self.async_client is None:
            return await asyncio.get_running_loop().run_in_executor(
                None, self.update, prompt, llm_string, return_val)
        request, _, _ = request_for(prompt, llm_string, self.shared_base_urls)
        body = _completion_from_generations(request, return_val)
        if body is None:
            return None
        try:
            await self.async_client.chat_set(request, body, ex=self.ex)
        except Exception as e:  # noqa: BLE001
            if not _not_cacheable(e):
                raise
        return None

    async def aclear(self, **kwargs: Any) -> None:
        if self.async_client is None:
            return await asyncio.get_running_loop().run_in_executor(None, self.clear)
        await self.async_client.chat_flush()
        return None

