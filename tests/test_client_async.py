"""aicache.aio (AsyncAICache, AsyncChatHistory) on redis.asyncio against the
real module, and a two-node cluster smoke test of both clients; the sync
client's own tests are in test_client.py."""
import asyncio
import json

import numpy as np
import pytest
import redis
import redis.asyncio

from fake_upstream import chat_answer, vector
from helpers import Server, free_port, info_fields, key_slot, wait_for

from aicache import (AICacheError, BatchError, InvalidRequest, Meta, StreamError, Throttle,
                     Throttled, Timeout, UpstreamError, completion_to_chunks, keys)
from aicache.aio import AsyncAICache, AsyncChatHistory
from aicache.stream import astream_chat

M = "emb-model"
REQ = {"model": "gpt-test", "messages": [{"role": "user", "content": "async \u4e00"}]}


def expected(text, model=M, dims=8):
    return np.asarray(vector(model, text, dims), dtype=np.float32)


def answer(req):
    return chat_answer({**req, "stream": False})


def run(coro_fn, port, protocol=2, **kw):
    """Runs coro_fn(client) on a fresh asyncio client, closed afterwards."""
    async def main():
        c = redis.asyncio.Redis(port=port, protocol=protocol, socket_timeout=30, **kw)
        try:
            return await coro_fn(c)
        finally:
            await c.aclose()
    return asyncio.run(main())


@pytest.mark.parametrize("protocol", [2, 3])
def test_async_embeddings(f, fserver, upstream, protocol):
    async def body(c):
        cache = AsyncAICache(c, "docs", M)
        got = await cache.embed(["a", "b", "a"])
        assert got.shape == (3, 8) and got.dtype == np.float32
        assert np.array_equal(got, np.stack([expected("a"), expected("b"), expected("a")]))
        assert np.array_equal(await cache.embed_one("b"), expected("b"))
        assert (await cache.embed([])).shape == (0, 0)
        await cache.set("v", [1, 2, 3, 4, 5, 6, 7, 8], ex=60)
        assert np.array_equal(await cache.get("v"), np.arange(1, 9))
        assert await cache.get("nope") is None
        await cache.mset({"w": np.ones(8)})
        await cache.mset([("x", np.zeros(8))])
        got = await cache.mget(["w", "missing", "x"])
        assert np.array_equal(got[0], np.ones(8)) and got[1] is None
        assert await cache.delete(["w", "x", "missing"]) == 2
        assert await cache.dims() == 8
        key = await cache.embedding_key("a")
        assert key == await c.execute_command("EMBCACHE.KEY", "docs", M, "a")
        assert await c.exists(key) == 1
        assert 0 < await c.ttl(await cache.embedding_key("v")) <= 66
        return upstream.calls()

    assert run(body, fserver.port, protocol) == 1


def test_async_calls_share_one_fill(f, fserver, upstream):
    upstream.latency(1000)

    async def body(c):
        cache = AsyncAICache(c, "sf", M)
        results = await asyncio.gather(*(cache.embed(["same", "texts"]) for _ in range(20)))
        for r in results:
            assert np.array_equal(r, np.stack([expected("same"), expected("texts")]))

    # One pool, many connections: the 20 calls really are concurrent.
    run(body, fserver.port, max_connections=32)
    assert upstream.calls() == 1
    assert info_fields(f)["coalesced_waiters"] >= 1


def test_async_with_meta_and_flush(f, fserver, upstream):
    async def body(c):
        cache = AsyncAICache(c, "meta", M)
        try:
            vectors, metas = await cache.embed(["a", "b"], with_meta=True)
        except AICacheError as e:
            if "unknown option 'withmeta'" in str(e).lower():
                pytest.skip("this module build has no WITHMETA")
            raise
        assert [m.status for m in metas] == ["miss", "miss"] and metas[0].age_ms == 0
        one, meta = await cache.embed_one("a", with_meta=True)
        assert np.array_equal(one, vectors[0]) and meta == Meta("hit", None, meta.ttl_ms)
        got, meta = await cache.chat(REQ, with_meta=True)
        assert got == answer(REQ) and not meta.hit
        got, meta = await cache.chat(REQ, with_meta=True)
        assert meta.hit
        old = await cache.embedding_key("a")
        assert await cache.flush() == 1
        assert await cache.get("a") is None and await c.exists(old) == 1
        assert await cache.embedding_key("a") == await c.execute_command(
            "EMBCACHE.KEY", "meta", M, "a")
        assert await cache.chat_flush() == 1 and await cache.chat_get(REQ) is None

    run(body, fserver.port)


def test_async_chat_and_streams(f, fserver, upstream):
    upstream.stream(chunks=4)
    req = {**REQ, "messages": [{"role": "user", "content": "stream async"}]}

    async def body(c):
        cache = AsyncAICache(c, "chat")
        assert await cache.chat(REQ) == answer(REQ)
        assert await cache.chat_get(REQ) == answer(REQ)
        assert await cache.chat_key(REQ) == await c.execute_command(
            "LLMCACHE.KEY", "chat", json.dumps(REQ))
        mine = {"choices": [{"message": {"content": "m"}, "finish_reason": "stop"}]}
        await cache.chat_set({**REQ, "seed": 1}, mine, ex=30)
        assert await cache.chat_get({**REQ, "seed": 1}) == mine
        assert await cache.chat_delete({**REQ, "seed": 1}) == 1
        with pytest.raises(InvalidRequest):
            await cache.chat({"model": "m"})
        live = [chunk async for chunk in cache.stream(req)]
        hit = [chunk async for chunk in astream_chat(c, "chat", req)]
        return live, hit, await cache.chat_get(req)

    live, hit, stored = run(body, fserver.port)
    want = chat_answer({**req, "stream": True, "stream_options": {"include_usage": True}})

    def text(chunks):
        return "".join(x["choices"][0]["delta"].get("content") or "" for x in chunks if x["choices"])

    assert text(live) == text(hit) == want["choices"][0]["message"]["content"]
    assert hit == list(completion_to_chunks(stored))
    assert upstream.calls() == 2, "one chat fill and one streamed generation"


def test_async_errors(f, fserver, upstream):
    f.config_set("aicache.upstream-retries", 0)

    async def body(c):
        cache = AsyncAICache(c, "err", M)
        upstream.fault("status", status=429, message="slow down")
        with pytest.raises(UpstreamError) as e:
            await cache.embed(["a"])
        assert e.value.status == 429
        upstream.poison("POISON")
        with pytest.raises(BatchError) as e:
            await cache.embed(["POISON", "b"])
        assert list(e.value.errors) == [0] and np.array_equal(e.value.vectors[1], expected("b"))
        f.config_set("aicache.global-max-requests", 1)
        await cache.embed(["c"])  # the window's one request
        with pytest.raises(Throttled) as e:
            await cache.embed(["d"])
        assert e.value.who == "global" and e.value.retry_after_ms > 0
        upstream.fault("stream_error_event", after=0)
        f.config_set("aicache.global-max-requests", 0)
        with pytest.raises(StreamError) as e:
            [x async for x in cache.stream({**REQ, "seed": 5})]
        assert isinstance(e.value, UpstreamError)
        upstream.latency(1000)
        with pytest.raises(Timeout):
            await AsyncAICache(c, "err", M, timeout_ms=50).embed(["slow"])

    run(body, fserver.port)


def test_async_throttle(r, server):
    async def body(c):
        cache = AsyncAICache(c, "t")
        first = await cache.throttle("alim", 1, 10_000)
        second = await cache.throttle("alim", 1, 10_000)
        return first, second

    first, second = run(body, server.port)
    assert isinstance(first, Throttle) and first.allowed and first.remaining == 0
    assert not second.allowed and second.retry_after_ms > 0


def test_async_history(r, server):
    async def body(c):
        h = AsyncChatHistory(c, "{room}:chat", "s1", max_messages=2, ttl_s=50)
        for i in range(4):
            await h.append({"role": "user", "content": f"m{i}"})
        assert [m["content"] for m in await h.messages()] == ["m2", "m3"]
        assert [m["content"] for m in await h.last(1)] == ["m3"]
        assert await h.length() == 2 and 0 < await c.ttl(h.key) <= 50
        assert await h.extend([{"role": "assistant", "content": "a"}]) == 2
        assert await h.clear() is True and await h.messages() == []
        return h.key

    key = run(body, server.port)
    assert key_slot(key) == key_slot(b"{room}:chat")
    assert key == keys.history_key("aicache:", "{room}:chat", "s1")


def test_async_decode_responses_client_still_gets_raw_vectors(f, fserver, upstream):
    async def body(c):
        cache = AsyncAICache(c, "dec", M)
        return await cache.embed_one("z"), await cache.chat(REQ)

    vec, chat = run(body, fserver.port, decode_responses=True)
    assert np.array_equal(vec, expected("z")) and chat == answer(REQ)


def test_cluster_smoke_sync_and_async(upstream):
    """Both clients on redis-py's cluster clients: every command reaches the
    shard of its namespace (CONFIG GET too), on either half of the slots."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    from aicache import AICache, ChatHistory

    # An explicit bus port: the default (port + 10000) overflows for high ports.
    bus = [free_port(), free_port()]
    nodes = [Server(module_args=["upstream-url", upstream.url],
                    extra=["--cluster-enabled", "yes", "--cluster-port", p]) for p in bus]
    try:
        a, b = (n.client() for n in nodes)
        a.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 8191)
        b.execute_command("CLUSTER", "ADDSLOTSRANGE", 8192, 16383)
        a.execute_command("CLUSTER", "MEET", "127.0.0.1", nodes[1].port, bus[1])
        wait_for(lambda: all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")
                             for c in (a, b)), timeout=30, what="the cluster to form")
        upstream.reset()
        low, high = "ns2", "ns0"
        assert key_slot(low.encode()) < 8192 <= key_slot(high.encode())
        rc = RedisCluster(host="127.0.0.1", port=nodes[0].port)
        req = {**REQ, "seed": 3}
        for ns, owner in ((low, a), (high, b)):
            cache = AICache(rc, ns, M)
            assert np.array_equal(cache.embed(["x"])[0], expected("x"))
            key = cache.embedding_key("x")
            assert owner.exists(key) == 1, "the entry lives on the namespace's shard"
            assert cache.chat(req) == answer(req) and owner.exists(cache.chat_key(req)) == 1
            assert len(list(cache.stream(req))) == 2, "a hit replays as two chunks"
            assert cache.throttle("{%s}:lim" % ns, 1, 1000).allowed
            h = ChatHistory(rc, ns, "s", max_messages=1)
            h.append({"n": 1})
            h.append({"n": 2})
            assert h.messages() == [{"n": 2}] and owner.exists(h.key) == 1
        rc.close()

        async def body():
            arc = AsyncRedisCluster(host="127.0.0.1", port=nodes[1].port)
            try:
                for ns, owner in ((low, a), (high, b)):
                    cache = AsyncAICache(arc, ns, M)
                    assert np.array_equal(await cache.embed_one("y"), expected("y"))
                    assert owner.exists(await cache.embedding_key("y")) == 1
                    assert [c async for c in cache.stream(req)][-1]["usage"]["total_tokens"] == 10
                    h = AsyncChatHistory(arc, ns, "s2", max_messages=1)
                    await h.append({"n": 3})
                    assert await h.messages() == [{"n": 3}]
            finally:
                await arc.aclose()

        asyncio.run(body())
        assert upstream.calls() == 6, "per namespace: two embeddings fills, one chat fill"
    finally:
        for n in nodes:
            n.stop()
