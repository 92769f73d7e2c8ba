"""EMBCACHE.FLUSH / LLMCACHE.FLUSH (namespace generations), FETCH ... WITHMETA
and the operator figures in INFO (per-family hits, tokens saved, fill latency
histogram, streams running)."""
import json
import socket
import threading

import numpy as np
import pytest
import redis

from conftest import vec
from fake_upstream import chat_answer
from helpers import info_fields, wait_for
from test_persistence import pair  # noqa: F401  (fixture: master + replica)

M = "emb-model"  # 8 dimensions in the fake
REQ = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def emb_fetch(c, ns, *texts, opts=()):
    return c.execute_command("EMBCACHE.FETCH", ns, M, len(texts), *texts, *opts)


def chat(c, ns, req=REQ, opts=()):
    return c.execute_command("LLMCACHE.FETCH", ns, json.dumps(req), *opts)


def s(x):
    return x.decode() if isinstance(x, bytes) else x


# --- FLUSH -------------------------------------------------------------------

def test_flush_hides_every_entry_of_the_namespace_or_model_at_once(r):
    args = []
    for i in range(2000):
        args += [f"t{i}", vec(i, 1)]
    r.execute_command("EMBCACHE.MSET", "docs", "A", *args)
    r.execute_command("EMBCACHE.MSET", "docs", "B", "t1", vec(7, 7))
    r.execute_command("EMBCACHE.MSET", "{docs}:other", "A", "t1", vec(9, 9))
    r.execute_command("LLMCACHE.SET", "docs", json.dumps(REQ), json.dumps(chat_answer(REQ)))
    old_key = r.execute_command("EMBCACHE.KEY", "docs", "A", "t1")
    keys_before = r.dbsize()

    assert r.execute_command("EMBCACHE.FLUSH", "docs", "MODEL", "A") == 1
    assert r.execute_command("EMBCACHE.MGET", "docs", "A", "t0", "t1", "t1999") == [None] * 3
    # Other models, the chat entries and a namespace sharing the tag stay.
    assert r.execute_command("EMBCACHE.GET", "docs", "B", "t1") == vec(7, 7)
    assert r.execute_command("EMBCACHE.GET", "{docs}:other", "A", "t1") == vec(9, 9)
    assert r.execute_command("LLMCACHE.GET", "docs", json.dumps(REQ)) is not None
    # Nothing was deleted: the old entries expire in their own time.
    assert r.dbsize() == keys_before + 1  # + the generation hash
    assert r.pttl(old_key) > 0
    new_key = r.execute_command("EMBCACHE.KEY", "docs", "A", "t1")
    assert new_key != old_key and new_key.startswith(b"aicache:emb:v1:{docs}:")

    # Writes after the flush live at the new generation.
    r.execute_command("EMBCACHE.SET", "docs", "A", "t1", vec(3, 3))
    assert r.execute_command("EMBCACHE.GET", "docs", "A", "t1") == vec(3, 3)
    assert r.exists(new_key) == 1

    assert r.execute_command("EMBCACHE.FLUSH", "docs") == 1
    assert r.execute_command("EMBCACHE.GET", "docs", "B", "t1") is None
    assert r.execute_command("EMBCACHE.GET", "docs", "A", "t1") is None
    assert r.execute_command("LLMCACHE.GET", "docs", json.dumps(REQ)) is not None
    assert r.execute_command("LLMCACHE.FLUSH", "docs") == 1
    assert r.execute_command("LLMCACHE.GET", "docs", json.dumps(REQ)) is None
    assert r.execute_command("LLMCACHE.FLUSH", "docs") == 2
    assert r.execute_command("EMBCACHE.GET", "{docs}:other", "A", "t1") == vec(9, 9)


def test_flush_keeps_the_dimension_pin(r):
    r.execute_command("EMBCACHE.SET", "docs", "A", "t", vec(1, 2))
    r.execute_command("EMBCACHE.FLUSH", "docs")
    with pytest.raises(redis.ResponseError, match="dimension mismatch"):
        r.execute_command("EMBCACHE.SET", "docs", "A", "t", vec(1, 2, 3))
    assert r.execute_command("EMBCACHE.DIMS", "docs", "A", "RESET") == 1
    r.execute_command("EMBCACHE.SET", "docs", "A", "t", vec(1, 2, 3))


@pytest.mark.parametrize("args, match", [
    (["EMBCACHE.FLUSH"], "wrong number"),
    (["EMBCACHE.FLUSH", "docs", "MODEL"], "MODEL needs a model name"),
    (["EMBCACHE.FLUSH", "docs", "WHAT", "m"], "unknown option"),
    (["EMBCACHE.FLUSH", "docs", "MODEL", "m", "x"], "wrong number"),
    (["EMBCACHE.FLUSH", "", ], "namespace must not be empty"),
    (["EMBCACHE.FLUSH", "docs", "MODEL", ""], "model must be"),
    (["LLMCACHE.FLUSH"], "wrong number"),
    (["LLMCACHE.FLUSH", "docs", "x"], "wrong number"),
])
def test_flush_argument_errors_change_nothing(r, args, match):
    r.execute_command("EMBCACHE.SET", "docs", "m", "t", vec(1))
    with pytest.raises(redis.ResponseError, match=match):
        r.execute_command(*args)
    assert r.execute_command("EMBCACHE.GET", "docs", "m", "t") == vec(1)
    assert r.dbsize() == 2  # the entry and its dimension pin


def test_a_generation_hash_of_another_type_is_an_error_not_a_silent_reset(r):
    gen_key = None
    r.execute_command("EMBCACHE.FLUSH", "docs")
    for k in r.keys("aicache:gen:*"):
        gen_key = k
    assert gen_key is not None
    r.delete(gen_key)
    r.set(gen_key, "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        r.execute_command("EMBCACHE.GET", "docs", "m", "t")


def test_a_fetch_after_a_flush_fills_again(f, upstream):
    assert emb_fetch(f, "docs", "hello")[0] is not None
    assert chat(f, "chat") is not None
    assert upstream.calls() == 2
    emb_fetch(f, "docs", "hello")
    chat(f, "chat")
    assert upstream.calls() == 2
    f.execute_command("EMBCACHE.FLUSH", "docs", "MODEL", M)
    f.execute_command("LLMCACHE.FLUSH", "chat")
    emb_fetch(f, "docs", "hello")
    chat(f, "chat")
    assert upstream.calls() == 4
    emb_fetch(f, "docs", "hello")
    assert upstream.calls() == 4


def test_flush_replicates_and_survives_a_reload(pair):  # noqa: F811
    master, replica = pair
    m, rep = master.client(), replica.client()
    m.flushall()
    m.execute_command("EMBCACHE.SET", "fl", M, "t", vec(1, 2))
    m.execute_command("LLMCACHE.SET", "fl", json.dumps(REQ), json.dumps(chat_answer(REQ)))
    assert m.execute_command("WAIT", 1, 5000) == 1
    assert rep.execute_command("EMBCACHE.GET", "fl", M, "t") == vec(1, 2)
    m.execute_command("EMBCACHE.FLUSH", "fl")
    m.execute_command("LLMCACHE.FLUSH", "fl")
    assert m.execute_command("WAIT", 1, 5000) == 1
    assert rep.execute_command("EMBCACHE.GET", "fl", M, "t") is None
    assert rep.execute_command("LLMCACHE.GET", "fl", json.dumps(REQ)) is None
    assert rep.execute_command("EMBCACHE.KEY", "fl", M, "t") == \
        m.execute_command("EMBCACHE.KEY", "fl", M, "t")
    assert m.execute_command("DEBUG", "RELOAD") in (b"OK", "OK", True)
    assert m.execute_command("EMBCACHE.GET", "fl", M, "t") is None
    m.execute_command("EMBCACHE.SET", "fl", M, "t", vec(5, 6))
    assert m.execute_command("EMBCACHE.GET", "fl", M, "t") == vec(5, 6)


# --- WITHMETA ----------------------------------------------------------------

def meta(triple):
    status, age, ttl = triple
    return s(status), age, ttl


def test_withmeta_reports_miss_then_hit_with_the_remaining_ttl(f, upstream):
    plain = emb_fetch(f, "docs", "a")
    f.execute_command("EMBCACHE.DEL", "docs", M, "a")
    values, metas = emb_fetch(f, "docs", "a", "b", "a", opts=["EX", "100", "WITHMETA"])
    assert values == [plain[0], emb_fetch(f, "docs", "b")[0], plain[0]]
    assert [meta(m)[:2] for m in metas] == [("miss", 0)] * 3
    assert all(89_000 < m[2] <= 110_000 for m in metas)  # EX 100 +/- 10% jitter
    values2, metas2 = emb_fetch(f, "docs", "a", "c", opts=["WITHMETA", "FORMAT", "JSON"])
    assert json.loads(values2[0]) == np.frombuffer(plain[0], "<f4").tolist()
    assert meta(metas2[0])[:2] == ("hit", -1) and 0 < metas2[0][2] <= 110_000
    assert meta(metas2[1])[:2] == ("miss", 0) and metas2[1][2] > 110_000  # default TTL
    # NOSTORE keeps nothing: no TTL to report. A hit under NOSTORE still has one.
    _, m3 = emb_fetch(f, "docs", "a", "zz", opts=["NOSTORE", "WITHMETA"])
    assert meta(m3[0])[0] == "hit" and m3[0][2] > 0
    assert meta(m3[1]) == ("miss", 0, -2)


def test_withmeta_on_chat_and_no_expiry(f, upstream):
    f.config_set("aicache.default-ttl", 0)
    body, m = chat(f, "chat", opts=["WITHMETA"])
    assert json.loads(body) == chat_answer({**REQ, "stream": False})
    assert meta(m) == ("miss", 0, -1)
    body2, m2 = chat(f, "chat", opts=["WITHMETA"])
    assert body2 == body and meta(m2) == ("hit", -1, -1)
    assert chat(f, "chat") == body, "without WITHMETA the reply is unchanged"
    with pytest.raises(redis.ResponseError, match="WITHMETA is a FETCH option"):
        f.execute_command("LLMCACHE.STREAM", "chat", json.dumps(REQ), "WITHMETA")


def test_withmeta_tells_a_joined_fill_from_the_one_that_started_it(f, upstream, fserver):
    upstream._post("/_latency", {"ms": 300})
    results = {}

    def run(name):
        c = fserver.client()
        results[name] = emb_fetch(c, "docs", "shared", opts=["WITHMETA"])

    first = threading.Thread(target=run, args=("first",))
    first.start()
    wait_for(lambda: info_fields(f)["fills_in_flight"] == 1, what="the first fill to start")
    second = threading.Thread(target=run, args=("second",))
    second.start()
    wait_for(lambda: info_fields(f)["coalesced_waiters"] == 1, what="the second call to join")
    first.join()
    second.join()
    assert upstream.calls() == 1
    assert meta(results["first"][1][0])[:2] == ("miss", 0)
    assert meta(results["second"][1][0])[:2] == ("coalesced", 0)
    assert results["first"][0] == results["second"][0]


def test_withmeta_marks_a_refused_input_as_not_stored(f, upstream):
    upstream._post("/_poison", {"marker": "POISON", "status": 400, "message": "bad input"})
    values, metas = emb_fetch(f, "docs", "ok", "POISON here", opts=["WITHMETA"])
    assert isinstance(values[1], redis.ResponseError)
    assert meta(metas[0])[0] == "miss" and metas[0][2] > 0
    assert meta(metas[1]) == ("miss", 0, -2)


def test_withmeta_replies_raw_on_a_raw_socket(fserver, f):
    """The WITHMETA reply is well-formed RESP: a pipelined PING after it
    gets its own PONG."""
    f.execute_command("EMBCACHE.SET", "docs", M, "x", vec(*range(8)))
    sock = socket.create_connection(("127.0.0.1", fserver.port))
    try:
        def cmd(*a):
            out = b"*%d\r\n" % len(a)
            for x in a:
                x = x.encode() if isinstance(x, str) else x
                out += b"$%d\r\n%s\r\n" % (len(x), x)
            return out
        sock.sendall(cmd("EMBCACHE.FETCH", "docs", M, "1", "x", "WITHMETA") + cmd("PING"))
        buf = b""
        while not buf.endswith(b"+PONG\r\n"):
            chunk = sock.recv(65536)
            assert chunk, "connection closed"
            buf += chunk
        assert buf.startswith(b"*2\r\n*1\r\n$32\r\n")
        assert b"*1\r\n*3\r\n$3\r\nhit\r\n:-1\r\n:" in buf
    finally:
        sock.close()


# --- INFO --------------------------------------------------------------------

def test_info_counts_hits_per_family_and_the_tokens_they_saved(f, upstream):
    f.execute_command("CONFIG", "RESETSTAT")
    emb_fetch(f, "docs", "abcdefgh", "x")            # 2 misses
    emb_fetch(f, "docs", "abcdefgh", "abcdefgh")     # 2 hits: 2 tokens each
    body = chat(f, "chat")                            # 1 miss
    chat(f, "chat")                                   # 1 hit
    total = json.loads(body)["usage"]["total_tokens"]
    # A call refused as a whole (a miss inside MULTI) served nothing.
    p = f.pipeline(transaction=True)
    p.execute_command("EMBCACHE.FETCH", "docs", M, 2, "abcdefgh", "new text")
    p.execute_command("LLMCACHE.FETCH", "chat", json.dumps({**REQ, "n": 2}))
    with pytest.raises(redis.ResponseError, match="cannot block"):
        p.execute()
    i = info_fields(f)
    assert (i["emb_hits"], i["emb_misses"], i["llm_hits"], i["llm_misses"]) == (2, 2, 1, 1)
    assert i["hits"] == 3 and i["misses"] == 3
    assert i["tokens_saved"] == 2 + 2 + total
    # One fill per upstream request, each in one latency bucket.
    assert i["fill_latency_count"] == i["upstream_requests"] == 2
    buckets = sorted((k, v) for k, v in i.items() if k.startswith("fill_latency_le_"))
    counts = [v for k, v in buckets]
    assert i["fill_latency_le_inf"] == 2 and all(c <= 2 for c in counts)


def test_tokens_saved_trusts_only_the_top_level_usage_and_stays_bounded(f):
    f.execute_command("CONFIG", "RESETSTAT")
    answer = {**chat_answer(REQ), "usage": {"total_tokens": 2**64 - 1}}
    answer["choices"][0]["message"]["content"] = '"usage": {"total_tokens": 5}'
    f.execute_command("LLMCACHE.SET", "chat", json.dumps(REQ), json.dumps(answer))
    for _ in range(3):
        chat(f, "chat")
    assert info_fields(f)["tokens_saved"] == 3 * 2**32


def test_info_latency_buckets_place_a_slow_fill(f, upstream):
    f.execute_command("CONFIG", "RESETSTAT")
    upstream._post("/_latency", {"ms": 120})
    emb_fetch(f, "docs", "slow")
    i = info_fields(f)
    assert i["fill_latency_le_100"] == 0 and i["fill_latency_le_250"] == 1
    assert i["fill_latency_sum_ms"] >= 120


def test_info_counts_coalesced_tokens_as_saved(f, upstream, fserver):
    f.execute_command("CONFIG", "RESETSTAT")
    upstream._post("/_latency", {"ms": 300})
    t = threading.Thread(target=lambda: emb_fetch(fserver.client(), "docs", "12345678"))
    t.start()
    wait_for(lambda: info_fields(f)["fills_in_flight"] == 1, what="the fill to start")
    emb_fetch(f, "docs", "12345678")
    t.join()
    i = info_fields(f)
    assert i["coalesced_waiters"] == 1 and i["tokens_saved"] == 2
    assert upstream.calls() == 1


def test_info_shows_streams_running(f, upstream):
    upstream._post("/_stream", {"chunks": 20, "delay_ms": 20})
    kind, key = f.execute_command("LLMCACHE.STREAM", "chat", json.dumps(REQ))
    assert kind == b"stream"
    wait_for(lambda: info_fields(f)["streams_running"] == 1, what="the stream to run")
    wait_for(lambda: info_fields(f)["streams_running"] == 0, what="the stream to end")
    assert f.execute_command("LLMCACHE.GET", "chat", json.dumps(REQ)) is not None
