"""The Python client package (clients/python/aicache) against the real module:
every AICache method, errors provoked for real, and ChatHistory. Keys:
test_client_keys.py; async forms and a cluster smoke test:
test_client_async.py; installing the package: test_client_package.py."""
import json
import threading

import numpy as np
import pytest
import redis

from fake_upstream import chat_answer, vector
from helpers import Server, info_fields, key_slot, wait_for

import aicache
from aicache import (AICache, AICacheError, BatchError, CannotFill, ChatHistory, CredentialsError,
                     DimensionMismatch, InternalError, InvalidRequest, Meta, NotCacheable,
                     QueueExpired, QueueFull, StreamError, TenantRefused, Throttle, Throttled,
                     Timeout, TooManyFills, UpstreamError, UpstreamTimeout)
from aicache.errors import convert, from_message

M = "emb-model"  # 8 dimensions in the fake
REQ = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi \u4e00"}]}


def expected(text, model=M, dims=8):
    return np.asarray(vector(model, text, dims), dtype=np.float32)


def answer(req):
    """What a non-streamed fill of req stores: the module sends stream false."""
    return chat_answer({**req, "stream": False})


def unsupported(e, word):
    """True when the module build predates `word` (command or option)."""
    text, word = str(e).lower(), word.lower()
    return ("unknown command" in text and word in text) or f"unknown option '{word}'" in text


# ---- embeddings ----

def test_embed_fills_then_hits(f, upstream):
    cache = AICache(f, "docs", M)
    got = cache.embed(["hello", "world", "hello"])
    assert got.dtype == np.float32 and got.shape == (3, 8) and got.flags.writeable
    assert np.array_equal(got, np.stack([expected("hello"), expected("world"), expected("hello")]))
    assert upstream.calls() == 1 and upstream.stats()["inputs"] == [2]
    assert np.array_equal(cache.embed(["world"]), got[1:2])
    assert upstream.calls() == 1
    one = cache.embed_one("hello")
    assert one.shape == (8,) and np.array_equal(one, expected("hello"))
    assert np.array_equal(cache.embed_one("x", model="other-d3"), expected("x", "other-d3", 3))
    empty = cache.embed([])
    assert empty.shape == (0, 0) and upstream.calls() == 2
    with pytest.raises(TypeError):
        cache.embed("hello")
    with pytest.raises(ValueError, match="no model"):
        AICache(f, "docs").embed(["x"])


def test_embed_options_reach_the_module(f, upstream):
    cache = AICache(f, "opts", M)
    cache.embed(["n"], nostore=True)
    assert cache.get("n") is None
    cache.embed(["e"], ex=100)
    assert 0 < f.ttl(cache.embedding_key("e")) <= 110
    cache.embed(["e"], refresh=True)
    assert upstream.calls() == 3, "REFRESH must go upstream"
    upstream.latency(1000)
    with pytest.raises(Timeout) as e:
        cache.embed(["slow"], timeout_ms=50)
    assert not isinstance(e.value, UpstreamError)
    with pytest.raises(Timeout):
        AICache(f, "opts", M, timeout_ms=50).embed(["slow2"])


def test_get_set_mget_mset_delete(r):
    cache = AICache(r, "docs", M)
    v = np.array([0.5, -1.25, 3.0], np.float32)
    cache.set("a", v)
    assert np.array_equal(cache.get("a"), v)
    cache.set("b", [1, 2, 3], ex=50)
    assert 0 < r.ttl(cache.embedding_key("b")) <= 55
    cache.set("c", np.array([7, 8, 9], "<f4").tobytes())
    got = cache.mget(["a", "missing", "c"])
    assert np.array_equal(got[0], v) and got[1] is None and np.array_equal(got[2], [7, 8, 9])
    assert cache.mget([]) == []
    cache.mset({"d": [1, 1, 1], "e": np.ones(3)})
    cache.mset([("f", [2, 2, 2]), (b"g\xff", [3, 3, 3])])
    assert np.array_equal(cache.get(b"g\xff"), [3, 3, 3])
    assert cache.delete(["a", "d", "nope"]) == 2 and cache.get("a") is None
    assert cache.delete([]) == 0
    assert cache.dims() == 3 and cache.dims("unpinned") is None
    assert cache.reset_dims() is True and cache.reset_dims() is False and cache.dims() is None
    with pytest.raises(DimensionMismatch):
        cache.mset({"x": [1, 2, 3], "y": [1, 2]})
    cache.set("z", [1, 2, 3, 4])  # no pin any more: 4 dimensions now
    with pytest.raises(DimensionMismatch):
        cache.set("w", [1, 2])
    with pytest.raises(ValueError):
        cache.set("w", [[1, 2], [3, 4]])


def test_vectors_whose_bytes_look_like_json_still_round_trip(r):
    # First byte '[' and last byte ']': the module would read these FP32
    # bytes as JSON text, so the client sends JSON for them.
    v = np.frombuffer(b"[\x00\x00\x3f" + b"\x00\x00\x80\x5d", "<f4").copy()
    assert np.isfinite(v).all()
    cache = AICache(r, "docs", M)
    cache.set("odd", v)
    assert np.array_equal(cache.get("odd"), v)
    cache.mset({"odd2": v})
    assert np.array_equal(cache.mget(["odd2"])[0], v)


def test_replies_are_raw_even_with_decode_responses(fserver, f, upstream):
    c = fserver.client(decode_responses=True)
    cache = AICache(c, "docs", M)
    assert np.array_equal(cache.embed_one("hello"), expected("hello"))
    assert cache.chat(REQ) == answer(REQ)
    assert cache.embedding_key("hello") == f.execute_command("EMBCACHE.KEY", "docs", M, "hello")


def test_with_meta_reports_hits_misses_and_ttls(f, fserver, upstream):
    cache = AICache(f, "meta", M)
    try:
        vectors, metas = cache.embed(["a", "b", "a"], with_meta=True, ex=100)
    except AICacheError as e:
        if unsupported(e, "WITHMETA"):
            pytest.skip("this module build has no WITHMETA")
        raise
    assert np.array_equal(vectors[0], expected("a")) and len(metas) == 3
    assert [m.status for m in metas] == ["miss", "miss", "miss"] and not metas[0].hit
    assert all(m.stored and 0 < m.ttl_ms <= 110_000 for m in metas)
    vectors, metas = cache.embed(["a", "c"], with_meta=True)
    # A hit's age is unknown (entries do not record when they were written).
    assert metas[0].hit and metas[0].age_ms is None and metas[0].ttl_ms > 0
    assert metas[1].status == "miss" and metas[1].age_ms == 0
    one, meta = cache.embed_one("n", nostore=True, with_meta=True)
    assert isinstance(meta, Meta) and not meta.stored and meta.ttl_ms is None
    answer1, meta = cache.chat(REQ, with_meta=True)
    assert answer1 == answer(REQ) and meta.status == "miss"
    answer2, meta = cache.chat(REQ, with_meta=True)
    assert answer2 == answer1 and meta.hit and meta.ttl_ms > 0
    # A call that joins another's fill is "coalesced".
    upstream.latency(1000)
    first = threading.Thread(target=lambda: AICache(fserver.client(), "meta", M).embed(["late"]))
    first.start()
    wait_for(lambda: info_fields(f)["fills_in_flight"] == 1, what="the first fill")
    _, [joined] = cache.embed(["late"], with_meta=True)
    first.join()
    assert joined.status == "coalesced" and not joined.hit


# ---- chat and streams ----

def test_chat_fetch_get_set_delete(f, upstream):
    cache = AICache(f, "chat")
    assert cache.chat(REQ) == answer(REQ)
    assert cache.chat(REQ) == answer(REQ) and upstream.calls() == 1
    assert cache.chat_get(REQ) == answer(REQ)
    assert cache.chat(REQ, refresh=True) == answer(REQ) and upstream.calls() == 2
    other = {**REQ, "seed": 1}
    cache.chat(other, nostore=True)
    assert cache.chat_get(other) is None
    mine = {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "c"},
                                    "finish_reason": "stop"}]}
    cache.chat_set(other, mine, ex=60)
    assert cache.chat_get(json.dumps(other)) == mine
    assert 0 < f.ttl(cache.chat_key(other)) <= 66
    assert cache.chat_delete(other) == 1 and cache.chat_delete(other) == 0
    with pytest.raises(NotCacheable):
        cache.chat_set(other, {"choices": []})
    with pytest.raises(InvalidRequest):
        cache.chat({"messages": [{"role": "user", "content": "no model"}]})
    with pytest.raises(ValueError):
        cache.chat({**REQ, "temperature": float("nan")})


def text_of(chunks):
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_stream_live_then_as_a_hit(f, upstream):
    upstream.stream(chunks=5)
    cache = AICache(f, "chat")
    req = {**REQ, "messages": [{"role": "user", "content": "stream me"}]}
    live = list(cache.stream(req))
    streamed = chat_answer({**req, "stream": True, "stream_options": {"include_usage": True}})
    assert text_of(live) == streamed["choices"][0]["message"]["content"]
    assert len([c for c in live if c["choices"]]) >= 5 and upstream.calls() == 1
    hit = list(cache.stream(req))
    assert upstream.calls() == 1 and text_of(hit) == text_of(live)
    assert hit == list(aicache.completion_to_chunks(cache.chat_get(req)))
    assert live[-1]["usage"] == hit[-1]["usage"]


def test_a_failed_stream_raises_the_specific_error(f, upstream):
    upstream.fault("stream_error_event", after=1)
    cache = AICache(f, "chat")
    with pytest.raises(StreamError) as e:
        list(cache.stream({**REQ, "seed": 9}))
    assert isinstance(e.value, UpstreamError) and e.value.kind == "stream"
    assert isinstance(e.value, AICacheError) and isinstance(e.value, redis.ResponseError)
    upstream.fault("stream_disconnect", after=1)
    with pytest.raises(StreamError) as e:
        list(cache.stream({**REQ, "seed": 10}))
    assert isinstance(e.value, UpstreamError) and e.value.kind == "connect"


# ---- limiter ----

def test_throttle_decisions(r):
    cache = AICache(r, "docs")
    t = cache.throttle("lim:a", 2, 60_000)
    # A window is 64 buckets, the oldest counted whole: up to window/64 more.
    assert t == Throttle(True, 2, 1, None, t.reset_after_ms) and t
    assert 0 < t.reset_after_ms <= 60_000 + 60_000 // 64 + 1
    assert cache.throttle("lim:a", 2, 60_000).remaining == 0
    denied = cache.throttle("lim:a", 2, 60_000)
    assert not denied and 0 < denied.retry_after_ms <= 60_000 + 60_000 // 64 + 1
    never = cache.throttle("lim:b", 2, 1000, cost=3)
    assert not never.allowed and never.retry_after_ms is None
    assert cache.throttle("lim:c", 10, 1000, cost=4).remaining == 6
    with pytest.raises(AICacheError, match="max must be an integer"):
        cache.throttle("lim:d", 0, 1000)


# ---- errors, provoked for real ----

def test_throttled_names_who_refused(f, upstream):
    cache = AICache(f, "thr", M, tenant="team-a")
    f.config_set("aicache.tenant-max-requests", 1)
    cache.embed(["a"])
    with pytest.raises(Throttled) as e:
        cache.embed(["b"])
    assert e.value.who == "tenant" and e.value.tenant == "team-a"
    assert e.value.limit_name == "aicache.tenant-max-requests" and e.value.limit == 1
    assert 0 < e.value.retry_after_ms <= 60_000 + 60_000 // 64 + 1
    assert str(e.value).startswith("THROTTLED retry after")
    f.config_set("aicache.tenant-max-requests", 0)
    f.config_set("aicache.global-max-requests", 1)
    AICache(f, "thr", M).embed(["c"])
    with pytest.raises(Throttled) as e:
        AICache(f, "thr", M).embed(["d"])
    assert e.value.who == "global" and e.value.tenant is None
    f.config_set("aicache.global-max-requests", 0)
    f.config_set("aicache.daily-token-budget", 1000)
    with pytest.raises(Throttled) as e:
        AICache(f, "thr").chat({**REQ, "max_tokens": 5000})
    assert e.value.who == "budget" and e.value.retry_after_ms is None
    assert e.value.limit_name == "aicache.daily-token-budget"
    assert cache.embed(["a"]).shape == (1, 8), "hits are never throttled"


def test_upstream_errors_carry_their_status(f, upstream):
    f.config_set("aicache.upstream-retries", 0)
    cache = AICache(f, "up", M)
    upstream.fault("status", status=503, message="overloaded")
    with pytest.raises(UpstreamError) as e:
        cache.embed(["a", "b"])
    assert e.value.status == 503 and e.value.kind == "http" and "overloaded" in str(e.value)
    upstream.fault("echo_auth")
    with pytest.raises(UpstreamError) as e:
        cache.chat(REQ)
    assert e.value.status == 401
    upstream.fault("malformed")
    with pytest.raises(UpstreamError) as e:
        cache.embed(["c"])
    assert e.value.status is None and e.value.kind == "invalid"
    f.config_set("aicache.upstream-timeout-ms", 300)
    upstream.fault("slow_drip", interval_ms=50)
    with pytest.raises(UpstreamTimeout) as e:
        cache.embed(["d"])
    assert isinstance(e.value, Timeout) and e.value.timeout_ms == 300
    f.config_set("aicache.fail-memory-ms", 60_000)
    upstream.fault("status", status=500)
    with pytest.raises(UpstreamError) as e:
        cache.embed(["e"])
    assert not e.value.failing_fast
    with pytest.raises(UpstreamError) as e:
        cache.embed(["e"])
    assert e.value.failing_fast and e.value.status == 500


def test_inputs_refused_alone_give_a_batch_error(f, upstream):
    upstream.poison("POISON", status=400)
    cache = AICache(f, "batch", M)
    with pytest.raises(BatchError) as e:
        cache.embed(["fine", "POISON pill", "also fine"])
    assert list(e.value.errors) == [1] and e.value.errors[1].status == 400
    assert np.array_equal(e.value.vectors[0], expected("fine")) and e.value.vectors[1] is None
    with pytest.raises(UpstreamError) as one:
        cache.embed_one("POISON again")
    assert one.value.status == 400 and not isinstance(one.value, BatchError)


def test_connection_failures_are_upstream_errors():
    from helpers import free_port
    s = Server(module_args=["upstream-url", f"http://127.0.0.1:{free_port()}/v1",
                            "upstream-retries", 0])
    try:
        with pytest.raises(UpstreamError) as e:
            AICache(s.client(), "c", M).embed(["a"])
        assert e.value.kind == "connect" and e.value.status is None
    finally:
        s.stop()


def test_too_many_fills_and_misses_that_cannot_fill(f, fserver, upstream):
    f.config_set("aicache.max-fills", 1)
    upstream.latency(1000)
    t = threading.Thread(target=lambda: AICache(fserver.client(), "mf", M).embed(["a"]))
    t.start()
    wait_for(lambda: info_fields(f)["fills_in_flight"] == 1, what="a fill running")
    with pytest.raises(TooManyFills):
        AICache(f, "mf", M).embed(["b"])
    t.join()
    pipe = f.pipeline(transaction=True)
    pipe.execute_command("EMBCACHE.FETCH", "mf", M, 1, "c")
    with pytest.raises(redis.ResponseError) as e:
        pipe.execute()
    assert isinstance(convert(e.value), CannotFill) and not convert(e.value).replica


def test_tenant_refused_when_the_namespace_is_the_tenant(f, upstream):
    f.config_set("aicache.tenant-source", "namespace")
    with pytest.raises(TenantRefused):
        AICache(f, "{acme}:docs", M, tenant="someone-else").embed(["a"])
    assert AICache(f, "{acme}:docs", M, tenant="acme").embed(["a"]).shape == (1, 8)


def test_a_full_queue_and_a_job_past_its_lease(upstream):
    s = Server(module_args=["upstream-url", upstream.url, "workers", 1, "queue-size", 1])
    try:
        upstream.reset()
        c = s.client()
        upstream.latency(1000)
        out = {}

        def run(name, text):
            try:
                AICache(s.client(), "q", M).embed([text])
            except AICacheError as e:
                out[name] = e

        busy = threading.Thread(target=run, args=("busy", "a"))
        busy.start()
        wait_for(lambda: upstream.calls() == 1, what="the worker to be busy")
        # The next job's lease (read per call) ends long before the worker is free.
        c.config_set("aicache.lease-ms", 100)
        queued = threading.Thread(target=run, args=("queued", "b"))
        queued.start()
        wait_for(lambda: info_fields(c)["queue_depth"] == 1, what="the queue to fill")
        with pytest.raises(QueueFull) as e:
            AICache(c, "q", M).embed(["c"])
        assert e.value.queue_size == 1
        busy.join()
        queued.join()
        assert "busy" not in out and isinstance(out.get("queued"), QueueExpired), out
        assert out["queued"].waited_ms >= 100
    finally:
        upstream.reset()
        s.stop()


def test_an_unusable_key_file_is_a_credentials_error(tmp_path, upstream):
    key_file = tmp_path / "key"
    key_file.write_text("sk-test-key\n")
    key_file.chmod(0o600)
    s = Server(module_args=["upstream-url", upstream.url, "api-key-file", key_file])
    try:
        key_file.write_text("")  # changed, so re-read, and empty: refused
        with pytest.raises(CredentialsError, match="api-key-file"):
            AICache(s.client(), "k", M).embed(["a"])
    finally:
        s.stop()


def test_a_caught_panic_is_an_internal_error():
    s = Server()  # its own: shared servers must see no panic
    try:
        with pytest.raises(redis.ResponseError) as e:
            s.client().execute_command("AICACHE.DEBUG", "PANIC", "COMMAND")
        assert isinstance(convert(e.value), InternalError)
    finally:
        s.stop()


def test_error_texts_map_to_classes():
    assert isinstance(from_message("ERR aicache is shutting down"), aicache.ShuttingDown)
    replica = from_message("ERR 2 cache miss(es) on a replica; fills run on the master")
    assert isinstance(replica, CannotFill) and replica.replica
    streamed = from_message("ERR upstream returned HTTP 429: slow down", stream=True)
    assert isinstance(streamed, StreamError) and isinstance(streamed, UpstreamError)
    assert streamed.status == 429 and str(streamed) == "upstream returned HTTP 429: slow down"
    assert type(from_message("ERR something new")) is AICacheError
    assert isinstance(convert(redis.ResponseError("x")), AICacheError)
    wrongtype = redis.exceptions.NoPermissionError("no")
    assert convert(wrongtype) is wrongtype


# ---- chat history ----

def test_history_caps_expires_and_stays_in_the_namespace_slot(r):
    h = ChatHistory(r, "{shop}:chat", "session-1", max_messages=3, ttl_s=100)
    assert h.key.startswith(b"aicache:hist:v1:{shop}:")
    assert key_slot(h.key) == key_slot(b"{shop}:chat")
    for i in range(5):
        h.append({"role": "user", "content": f"m{i} \u4e00"})
    assert [m["content"] for m in h.last(10)] == ["m2 \u4e00", "m3 \u4e00", "m4 \u4e00"]
    assert [m["content"] for m in h.last(2)] == ["m3 \u4e00", "m4 \u4e00"]
    assert h.last(0) == [] and len(h) == 3 and h.messages() == h.last(3)
    assert 0 < r.ttl(h.key) <= 100
    r.expire(h.key, 5)
    assert h.extend([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]) == 3
    assert r.ttl(h.key) > 5, "an append renews the session's TTL"
    assert [m["content"] for m in h.messages()] == ["m4 \u4e00", "a", "b"]
    other = ChatHistory(r, "{shop}:chat", "session-2")
    assert other.key != h.key and other.messages() == [] and r.ttl(other.key) == -2
    other.append({"role": "user", "content": "x"})
    assert r.ttl(other.key) == -1, "no ttl_s, no expiry"
    assert h.clear() is True and h.clear() is False and h.messages() == []
    with pytest.raises(TypeError):
        h.append("not a dict")
    with pytest.raises(ValueError):
        ChatHistory(r, "ns", "s", max_messages=0)

