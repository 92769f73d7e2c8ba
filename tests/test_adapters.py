"""Framework adapters of the Python client (clients/python/aicache):
LangChain embeddings and LLM cache, LlamaIndex embeddings, and the OpenAI-SDK
facade, each run with the real library against a real redis-server with the
module and the fake upstream. conftest.py puts clients/python on sys.path."""
import asyncio
import base64
import json

import numpy as np
import pytest
import redis
import redis.asyncio

from fake_upstream import vector
from helpers import free_port

M = "emb-model"  # 8 dimensions in the fake
CHAT_MODEL = "gpt-4o-mini"


def expected(text, model=M, dims=8):
    """The fake upstream's vector as float32, as Python floats."""
    return np.asarray(vector(model, text, dims), dtype="<f4").tolist()


def module_vector(r, ns, text, model=M):
    raw = r.execute_command("EMBCACHE.GET", ns, model, text)
    return None if raw is None else np.frombuffer(raw, "<f4").tolist()


def dead_redis():
    """A client of a port nobody listens on: any command on it fails, so a
    method that succeeds did not use it."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    return redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


def sync_cache(r, ns, model=M):
    from aicache import AICache
    return AICache(r, ns, model)


def async_cache(port, ns, model=M):
    from aicache.aio import AsyncAICache
    return AsyncAICache(redis.asyncio.Redis(port=port), ns, model)


async def aclose(cache):
    await cache.redis.aclose()


def llm_entries(r):
    return sorted(k for k in r.keys("aicache:llm:*") if not k.endswith(b":stream"))


# ------------------------------------------------------------- LangChain

def test_langchain_embeddings_are_the_upstream_vectors_and_module_entries(f, upstream):
    pytest.importorskip("langchain_core")
    from langchain_core.embeddings import Embeddings

    from aicache.langchain import AICacheEmbeddings
    emb = AICacheEmbeddings(sync_cache(f, "lc"))
    assert isinstance(emb, Embeddings)
    got = emb.embed_documents(["alpha", "beta", "alpha"])
    assert got == [expected("alpha"), expected("beta"), expected("alpha")]
    assert all(type(x) is float for row in got for x in row)
    assert upstream.calls("embeddings") == 1 and upstream.stats()["inputs"] == [2]
    assert module_vector(f, "lc", "alpha") == expected("alpha")
    assert module_vector(f, "lc", "beta") == expected("beta")
    # Everything is cached now: neither method goes upstream again.
    assert emb.embed_query("beta") == expected("beta")
    assert emb.embed_documents(["beta", "alpha"]) == [expected("beta"), expected("alpha")]
    assert emb.embed_documents([]) == []
    assert upstream.calls() == 1


def test_langchain_embeddings_pass_model_and_dimensions(f, upstream):
    pytest.importorskip("langchain_core")
    from aicache.langchain import AICacheEmbeddings
    emb = AICacheEmbeddings(sync_cache(f, "lc", model=None), model="other-model", dimensions=5)
    assert emb.embed_query("x") == expected("x", model="other-model", dims=5)
    assert upstream.calls("embeddings") == 1


def test_langchain_async_embeddings_use_the_async_client(f, fserver, upstream):
    pytest.importorskip("langchain_core")
    from aicache.langchain import AICacheEmbeddings
    f.execute_command("EMBCACHE.SET", "lc", M, "cached", np.ones(8, "<f4").tobytes())

    async def go():
        acache = async_cache(fserver.port, "lc")
        # The sync client cannot reach any server: only the async one can
        # have answered.
        emb = AICacheEmbeddings(sync_cache(dead_redis(), "lc"), async_client=acache)
        try:
            docs = await emb.aembed_documents(["cached", "fresh"])
            query = await emb.aembed_query("fresh")
        finally:
            await aclose(acache)
        with pytest.raises(redis.ConnectionError):
            emb.embed_query("fresh")
        return docs, query

    docs, query = asyncio.run(go())
    assert docs == [[1.0] * 8, expected("fresh")]
    assert query == expected("fresh")
    assert upstream.calls("embeddings") == 1


def test_langchain_async_embeddings_without_async_client_use_the_sync_one(f, upstream):
    pytest.importorskip("langchain_core")
    from aicache.langchain import AICacheEmbeddings
    emb = AICacheEmbeddings(sync_cache(f, "lc"))
    assert asyncio.run(emb.aembed_documents(["t"])) == [expected("t")]
    assert module_vector(f, "lc", "t") == expected("t")


def llm_cache(f, upstream):
    """The LLM cache for ChatOpenAIs on the fake upstream, which is the
    module's upstream too, so its entries are shared with FETCH callers."""
    from aicache.langchain import AICacheLLMCache
    return AICacheLLMCache(sync_cache(f, "chat"), shared_base_urls=[upstream.url])


def chat_openai(upstream, cache, **kw):
    lc_openai = pytest.importorskip("langchain_openai")
    return lc_openai.ChatOpenAI(model=CHAT_MODEL, base_url=upstream.url, api_key="sk-unused",
                                temperature=0, max_retries=0, cache=cache, **kw)


def content_of(body):
    return body["choices"][0]["message"]["content"]


def test_langchain_chatopenai_second_call_is_served_by_the_module(f, upstream):
    pytest.importorskip("langchain_core")
    from langchain_core.messages import HumanMessage, SystemMessage

    from aicache.langchain import AICacheLLMCache
    llm = chat_openai(upstream, llm_cache(f, upstream))
    msgs = [SystemMessage("be brief"), HumanMessage("what is redis?")]
    first = llm.invoke(msgs)
    assert first.content.startswith("answer ")
    assert upstream.calls("chat") == 1
    assert len(llm_entries(f)) == 1
    second = llm.invoke(msgs)
    assert upstream.calls("chat") == 1, "the identical call went upstream"
    assert second.content == first.content
    assert second.usage_metadata["total_tokens"] == 10
    assert second.response_metadata["finish_reason"] == "stop"
    # Other parameters are another entry.
    third = llm.invoke(msgs, temperature=0.5)
    assert upstream.calls("chat") == 2
    assert third.content != first.content


def test_langchain_chatopenai_entries_are_shared_with_direct_fetch(f, upstream):
    """The cache keys an entry on the request ChatOpenAI sends, so a direct
    LLMCACHE.FETCH of that request (written by hand here, as another app
    would write it) hits what LangChain stored, and LangChain hits what a
    FETCH stored."""
    pytest.importorskip("langchain_core")
    from langchain_core.messages import HumanMessage, SystemMessage

    from aicache.langchain import AICacheLLMCache
    llm = chat_openai(upstream, llm_cache(f, upstream), seed=7)
    answer = llm.invoke([SystemMessage("be brief"), HumanMessage("one")]).content
    assert upstream.calls("chat") == 1
    by_hand = {"model": CHAT_MODEL, "temperature": 0, "seed": 7,
               "messages": [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "one"}]}
    got = json.loads(f.execute_command("LLMCACHE.FETCH", "chat", json.dumps(by_hand)))
    assert upstream.calls("chat") == 1, "FETCH missed the entry LangChain stored"
    assert content_of(got) == answer

    # The other way round: a FETCH fills, then LangChain reads it.
    by_hand["messages"][1]["content"] = "two"
    filled = json.loads(f.execute_command("LLMCACHE.FETCH", "chat", json.dumps(by_hand)))
    assert upstream.calls("chat") == 2
    again = llm.invoke([SystemMessage("be brief"), HumanMessage("two")])
    assert upstream.calls("chat") == 2, "LangChain missed the entry FETCH stored"
    assert again.content == content_of(filled)
    assert again.usage_metadata["total_tokens"] == filled["usage"]["total_tokens"]


def test_langchain_tool_calls_round_trip(f, upstream):
    pytest.importorskip("langchain_core")
    from aicache.langchain import AICacheLLMCache
    tool = {"type": "function", "function": {
        "name": "lookup", "description": "look up",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}
    call = {"id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": '{"query": "q"}'}}
    body = {"id": "chatcmpl-tools", "object": "chat.completion", "created": 1, "model": CHAT_MODEL,
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                         "message": {"role": "assistant", "content": None,
                                     "tool_calls": [call]}}]}
    request = {"model": CHAT_MODEL, "temperature": 0, "tools": [tool],
               "messages": [{"role": "user", "content": "find q"}]}
    f.execute_command("LLMCACHE.SET", "chat", json.dumps(request), json.dumps(body))
    llm = chat_openai(upstream, llm_cache(f, upstream)).bind_tools([tool])
    msg = llm.invoke("find q")
    assert upstream.calls("chat") == 0, "bind_tools' request did not map to the stored one"
    assert msg.tool_calls == [{"name": "lookup", "args": {"query": "q"}, "id": "call_1",
                               "type": "tool_call"}]


def test_langchain_chatopenai_cut_off_answers_are_not_cached(f, upstream):
    pytest.importorskip("langchain_core")
    from aicache.langchain import AICacheLLMCache
    llm = chat_openai(upstream, llm_cache(f, upstream))
    upstream.fault("length")
    cut = llm.invoke("long story")
    assert cut.response_metadata["finish_reason"] == "length"
    assert llm_entries(f) == []
    llm.invoke("long story")
    assert upstream.calls("chat") == 2
    assert len(llm_entries(f)) == 1


def test_langchain_global_cache_and_clear(f, upstream):
    pytest.importorskip("langchain_core")
    from langchain_core.globals import get_llm_cache, set_llm_cache

    from aicache.langchain import AICacheLLMCache
    cache = AICacheLLMCache(sync_cache(f, "chat"))
    before = get_llm_cache()
    set_llm_cache(cache)
    try:
        llm = chat_openai(upstream, None)
        a = llm.invoke("hello").content
        assert llm.invoke("hello").content == a
        assert upstream.calls("chat") == 1
        cache.clear()
        assert llm.invoke("hello").content == a  # the fake is deterministic
        assert upstream.calls("chat") == 2, "clear() left the entry readable"
    finally:
        set_llm_cache(before)


def test_langchain_async_cache_reads_what_sync_stored(f, fserver, upstream):
    pytest.importorskip("langchain_core")
    from aicache.langchain import AICacheLLMCache

    async def go():
        acache = async_cache(fserver.port, "chat")
        cache = AICacheLLMCache(sync_cache(dead_redis(), "chat"), async_client=acache,
                                shared_base_urls=[upstream.url])
        llm = chat_openai(upstream, cache)
        try:
            a = (await llm.ainvoke("async hello")).content
            b = (await llm.ainvoke("async hello")).content
            await cache.aclear()
            c = (await llm.ainvoke("async hello")).content
        finally:
            await aclose(acache)
        return a, b, c

    a, b, c = asyncio.run(go())
    assert a == b == c
    assert upstream.calls("chat") == 2  # first call, then the one after aclear
    # The sync path reads the same entry.
    sync_llm = chat_openai(upstream, AICacheLLMCache(sync_cache(f, "chat"),
                                                     shared_base_urls=[upstream.url]))
    assert sync_llm.invoke("async hello").content == a
    assert upstream.calls("chat") == 2


def test_langchain_cache_with_a_model_that_answers_differently_each_time(f):
    """A model with no OpenAI request to rebuild: the synthetic request still
    serves the second identical call from the module."""
    pytest.importorskip("langchain_core")
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.language_models.fake import FakeListLLM

    from aicache.langchain import AICacheLLMCache
    cache = AICacheLLMCache(sync_cache(f, "chat"))
    chat = FakeListChatModel(responses=["first", "second", "third"], cache=cache)
    assert chat.invoke("q").content == "first"
    assert chat.invoke("q").content == "first"
    assert chat.invoke("other q").content == "second"
    assert len(llm_entries(f)) == 2
    # The stored entry is a valid chat.completion the module accepted.
    bodies = [json.loads(f.get(k)) for k in llm_entries(f)]
    assert sorted(content_of(b) for b in bodies) == ["first", "second"]

    text_llm = FakeListLLM(responses=["one", "two"], cache=cache)
    assert text_llm.invoke("prompt") == "one"
    assert text_llm.invoke("prompt") == "one"
    assert text_llm.invoke("prompt 2") == "two"


# ------------------------------------------------------------- LlamaIndex

def test_llamaindex_embedding_vectors_and_no_second_call(f, upstream):
    pytest.importorskip("llama_index.core")
    from llama_index.core.base.embeddings.base import BaseEmbedding

    from aicache.llamaindex import AICacheEmbedding
    emb = AICacheEmbedding(sync_cache(f, "li"))
    assert isinstance(emb, BaseEmbedding) and emb.model_name == M
    texts = [f"node {i}" for i in range(7)]
    assert emb.get_text_embedding_batch(texts) == [expected(t) for t in texts]
    assert emb.get_text_embedding("node 3") == expected("node 3")
    assert emb.get_query_embedding("node 5") == expected("node 5")
    assert upstream.calls("embeddings") == 1 and upstream.stats()["inputs"] == [7]
    assert [module_vector(f, "li", t) for t in texts] == [expected(t) for t in texts]


def test_llamaindex_async_uses_the_async_client(fserver, f, upstream):
    pytest.importorskip("llama_index.core")
    from aicache.llamaindex import AICacheEmbedding

    # The module would merge the adapter's concurrent batches into one
    # upstream request (micro-batching); this test is about the adapter's cut.
    f.config_set("aicache.batch-window-ms", 0)

    async def go():
        acache = async_cache(fserver.port, "li")
        emb = AICacheEmbedding(sync_cache(dead_redis(), "li"), async_client=acache,
                               embed_batch_size=3)
        try:
            batch = await emb.aget_text_embedding_batch(["a", "b", "c", "d"])
            one = await emb.aget_text_embedding("e")
            query = await emb.aget_query_embedding("a")
        finally:
            await aclose(acache)
        with pytest.raises(redis.ConnectionError):
            emb.get_query_embedding("a")
        return batch, one, query

    batch, one, query = asyncio.run(go())
    assert batch == [expected(t) for t in "abcd"]
    assert one == expected("e") and query == expected("a")
    assert sorted(upstream.stats()["inputs"]) == [1, 1, 3]


# ------------------------------------------------------------- OpenAI SDK facade

def test_openai_facade_embeddings_are_sdk_types(f, upstream):
    openai = pytest.importorskip("openai")
    from openai.types import CreateEmbeddingResponse, Embedding

    from aicache.openai_compat import CachedOpenAI
    client = CachedOpenAI(f, "oa")
    resp = client.embeddings.create(model=M, input=["x", "y"])
    assert isinstance(resp, CreateEmbeddingResponse)
    assert all(isinstance(d, Embedding) for d in resp.data)
    assert [d.index for d in resp.data] == [0, 1]
    assert [d.embedding for d in resp.data] == [expected("x"), expected("y")]
    assert resp.model == M and resp.object == "list"
    assert (resp.usage.prompt_tokens, resp.usage.total_tokens) == (0, 0)
    assert module_vector(f, "oa", "x") == expected("x")
    assert upstream.calls("embeddings") == 1

    one = client.embeddings.create(model=M, input="y", encoding_format="base64",
                                   user="someone", dimensions=openai.NOT_GIVEN)
    assert len(one.data) == 1
    assert np.frombuffer(base64.b64decode(one.data[0].embedding), "<f4").tolist() == expected("y")
    assert upstream.calls("embeddings") == 1, "a cached text went upstream"
    with pytest.raises(TypeError):
        client.embeddings.create(model=M, input=[[1, 2, 3]])

    # The real SDK, asking the fake itself, gives the same objects.
    real = openai.OpenAI(base_url=upstream.url, api_key="sk-unused", max_retries=0)
    real_resp = real.embeddings.create(model=M, input=["x", "y"])
    assert type(real_resp) is type(resp)
    assert [d.embedding for d in real_resp.data] == [d.embedding for d in resp.data]
    real_one = real.embeddings.create(model=M, input="y", encoding_format="base64")
    assert real_one.data[0].embedding == one.data[0].embedding


def test_openai_facade_chat_is_a_sdk_chat_completion(f, upstream):
    pytest.importorskip("openai")
    from openai.types.chat import ChatCompletion, ChatCompletionMessage

    from aicache.openai_compat import CachedOpenAI

    def app(client, question):  # written for openai.OpenAI, unchanged
        r = client.chat.completions.create(model=CHAT_MODEL, temperature=0,
                                           messages=[{"role": "user", "content": question}])
        return r, r.choices[0].message.content

    cached = CachedOpenAI(f, "oa")
    resp, text = app(cached, "hi")
    assert isinstance(resp, ChatCompletion)
    assert isinstance(resp.choices[0].message, ChatCompletionMessage)
    assert resp.usage.total_tokens == 10 and resp.choices[0].finish_reason == "stop"
    stored = json.loads(f.execute_command(
        "LLMCACHE.GET", "oa",
        json.dumps({"model": CHAT_MODEL, "temperature": 0,
                    "messages": [{"role": "user", "content": "hi"}]})))
    assert content_of(stored) == text
    assert app(cached, "hi")[1] == text
    assert upstream.calls("chat") == 1

    # The real SDK against the fake gets the same type and shape.
    import openai
    real = openai.OpenAI(base_url=upstream.url, api_key="sk-unused", max_retries=0)
    real_resp, _ = app(real, "hi")
    assert type(real_resp) is type(resp)
    assert set(real_resp.model_dump()) == set(resp.model_dump())

    # A message object from a reply can be sent back, as with the SDK.
    follow = cached.chat.completions.create(
        model=CHAT_MODEL, temperature=0, extra_body={"seed": 1},
        messages=[{"role": "user", "content": "hi"}, resp.choices[0].message,
                  {"role": "user", "content": "more"}])
    assert isinstance(follow, ChatCompletion)
    req = {"model": CHAT_MODEL, "temperature": 0, "seed": 1,
           "messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": text},
                        {"role": "user", "content": "more"}]}
    assert f.execute_command("LLMCACHE.GET", "oa", json.dumps(req)) is not None


def stream_text(chunks):
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_openai_facade_stream_then_plain_agree(f, upstream):
    pytest.importorskip("openai")
    from openai.types.chat import ChatCompletionChunk

    from aicache.openai_compat import CachedOpenAI
    client = CachedOpenAI(f, "oa")
    req = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "stream me"}]}
    with client.chat.completions.create(**req, stream=True) as stream:
        chunks = list(stream)
    assert chunks and all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert all(c.choices for c in chunks), "a usage-only chunk reached a caller who did not ask"
    assert chunks[-1].choices[0].finish_reason == "stop"
    plain = client.chat.completions.create(**req)
    assert stream_text(chunks) == plain.choices[0].message.content
    assert upstream.calls("chat") == 1, "the streamed answer was not stored for plain calls"


def test_openai_facade_plain_then_stream_agree_with_usage(f, upstream):
    pytest.importorskip("openai")
    from aicache.openai_compat import CachedOpenAI
    client = CachedOpenAI(f, "oa")
    req = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "plain first"}]}
    plain = client.chat.completions.create(**req)
    chunks = list(client.chat.completions.create(
        **req, stream=True, stream_options={"include_usage": True}))
    assert stream_text(chunks) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert upstream.calls("chat") == 1


def test_openai_facade_errors_are_sdk_exceptions(f, upstream):
    openai = pytest.importorskip("openai")
    from aicache.errors import AICacheError
    from aicache.openai_compat import CachedOpenAI
    client = CachedOpenAI(f, "oa")
    upstream.fault("status", status=401)
    with pytest.raises(openai.AuthenticationError) as ei:
        client.chat.completions.create(model=CHAT_MODEL,
                                       messages=[{"role": "user", "content": "denied"}])
    assert ei.value.status_code == 401 and isinstance(ei.value, openai.APIStatusError)
    assert isinstance(ei.value.__cause__, AICacheError)

    f.config_set("aicache.global-max-requests", 1)
    client.embeddings.create(model=M, input="uses the one request")
    with pytest.raises(openai.RateLimitError) as ei:
        client.embeddings.create(model=M, input="over the limit")
    assert int(ei.value.response.headers["retry-after-ms"]) > 0
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT_MODEL, messages=[])


def test_openai_facade_raises_like_the_sdk_for_bad_inputs_and_refused_streams(f, upstream,
                                                                             fserver):
    openai = pytest.importorskip("openai")
    from aicache.openai_compat import AsyncCachedOpenAI, CachedOpenAI
    client = CachedOpenAI(f, "oa")
    upstream._post("/_poison", {"marker": "POISON", "status": 400, "message": "bad input"})
    for inp in ("POISON z", ["fine", "POISON z"]):
        with pytest.raises(openai.BadRequestError) as ei:
            client.embeddings.create(model=M, input=inp)
        assert ei.value.status_code == 400
    # A refused stream raises from create(), before any iteration.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=CHAT_MODEL, messages=[], stream=True)

    async def go():
        r = redis.asyncio.Redis(port=fserver.port)
        try:
            with pytest.raises(openai.BadRequestError):
                await AsyncCachedOpenAI(r, "oa").chat.completions.create(
                    model=CHAT_MODEL, messages=[], stream=True)
        finally:
            await r.aclose()
    asyncio.run(go())
    # A stream that starts still yields every chunk, the first included.
    req = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "eager"}]}
    with client.chat.completions.create(**req, stream=True) as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == client.chat.completions.create(**req).choices[0].message.content


def test_openai_facade_with_options_stays_cached(f, upstream):
    pytest.importorskip("openai")
    from aicache.openai_compat import CachedOpenAI

    class Fallback:
        def with_options(self, **kw):
            raise AssertionError("with_options reached the fallback client")

    with CachedOpenAI(f, "oa", fallback=Fallback()) as client:
        tuned = client.with_options(timeout=5, max_retries=3)
        assert isinstance(tuned, CachedOpenAI) and tuned._timeout_ms == 5000
        tuned.embeddings.create(model=M, input="opt")
        client.embeddings.create(model=M, input="opt")
        assert upstream.calls() == 1
        with pytest.raises(AttributeError, match="bypass the cache"):
            client.with_raw_response


def test_openai_facade_forwards_other_endpoints_to_the_fallback(f):
    pytest.importorskip("openai")
    from aicache.openai_compat import CachedOpenAI

    class Files:
        def list(self):
            return ["file-1"]

    class Fallback:
        files = Files()

    assert CachedOpenAI(f, "oa", fallback=Fallback()).files.list() == ["file-1"]
    with pytest.raises(AttributeError):
        CachedOpenAI(f, "oa").files


def test_async_openai_facade(fserver, f, upstream):
    pytest.importorskip("openai")
    from openai.types import CreateEmbeddingResponse
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from aicache.openai_compat import AsyncCachedOpenAI

    async def go():
        r = redis.asyncio.Redis(port=fserver.port)
        client = AsyncCachedOpenAI(r, "oa")
        try:
            emb = await client.embeddings.create(model=M, input=["p", "q"])
            req = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "async"}]}
            stream = await client.chat.completions.create(**req, stream=True)
            chunks = [c async for c in stream]
            plain = await client.chat.completions.create(**req)
        finally:
            await r.aclose()
        return emb, chunks, plain

    emb, chunks, plain = asyncio.run(go())
    assert isinstance(emb, CreateEmbeddingResponse)
    assert [d.embedding for d in emb.data] == [expected("p"), expected("q")]
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert isinstance(plain, ChatCompletion)
    assert stream_text(chunks) == plain.choices[0].message.content
    assert upstream.calls("chat") == 1 and upstream.calls("embeddings") == 1


def test_chat_openai_on_another_base_url_never_reads_the_shared_entry(f, upstream):
    """Two endpoints may serve one model name: only a listed base URL shares
    entries keyed on the bare request."""
    pytest.importorskip("langchain_core")
    cache = llm_cache(f, upstream)
    shared = chat_openai(upstream, cache)
    other_url = upstream.url.replace("127.0.0.1", "localhost")
    lc_openai = pytest.importorskip("langchain_openai")
    other = lc_openai.ChatOpenAI(model=CHAT_MODEL, base_url=other_url, api_key="sk-unused",
                                 temperature=0, max_retries=0, cache=cache)
    shared.invoke("which endpoint?")
    assert upstream.calls("chat") == 1
    other.invoke("which endpoint?")
    assert upstream.calls("chat") == 2, "the other endpoint was answered from the shared entry"
    other.invoke("which endpoint?")
    shared.invoke("which endpoint?")
    assert upstream.calls("chat") == 2, "each endpoint's own entry must hit"
