"""The semantic cache (LLMCACHE.FETCH ... SIMILAR, LLMCACHE.SIMILAR,
LLMCACHE.SET ... VECTOR) against a real redis-server and the fake upstream's
bag-of-words embedding model, whose cosines are known in advance: texts
sharing k words (no hash collisions among the words used here) score
k / sqrt(len(a) * len(b))."""
import json
import math
import os
import shutil
import socket
import struct
import tempfile

import pytest
import redis

from conftest import API_KEY
from fake_upstream import bow_vector
from helpers import Server, info_fields, resp, wait_for
from test_economy import read_until

BOW = "bow-d256"
A = "what is the capital of france"
B = "what is the capital of france please"      # 6 / sqrt(42) = 0.9258 to A
C = "what is the capital of spain"              # 5 / 6 = 0.8333 to A


def cos(a, b):
    va, vb = bow_vector(a, 256), bow_vector(b, 256)
    return sum(x * y for x, y in zip(va, vb))


def req(text, system="be brief", model="gpt-x", **extra):
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs.append({"role": "user", "content": text})
    return json.dumps({"model": model, "messages": msgs, "temperature": 0, **extra})


@pytest.fixture
def s(f):
    """conftest's fill server and client, with the bag-of-words model for
    prompts and no batching window; reset by `f`."""
    f.config_set("aicache.semantic-model", BOW)
    f.config_set("aicache.batch-window-ms", 0)
    f.config_resetstat()
    wait_for(lambda: info_fields(f)["semantic_entries"] == 0, what="an empty index")
    return f


def entries(c):
    return info_fields(c)["semantic_entries"]


def fetch(c, body, *opts, ns="ns"):
    return c.execute_command("LLMCACHE.FETCH", ns, body, *opts)


def meta_fetch(c, body, *opts, ns="ns"):
    value, meta = fetch(c, body, "WITHMETA", *opts, ns=ns)
    return value, meta[0].decode()


def stored(c, text, n, **kw):
    """FETCH SIMILAR of text as a miss that is kept and indexed."""
    value, status = meta_fetch(c, req(text, **kw), "SIMILAR", "0.99")
    assert status == "miss", (text, status)
    wait_for(lambda: entries(c) == n, what=f"{n} indexed entries")
    return value


def test_a_paraphrase_hits_and_a_less_similar_prompt_misses(s, upstream):
    assert abs(cos(A, B) - 6 / math.sqrt(42)) < 1e-6 and abs(cos(A, C) - 5 / 6) < 1e-6
    answer = stored(s, A, 1)
    assert upstream.calls("chat") == 1 and upstream.calls("embeddings") == 1
    # Just above the threshold: B scores 0.9258.
    value, status = meta_fetch(s, req(B), "SIMILAR", "0.92", "NOSTORE")
    assert (value, status) == (answer, "similar")
    # Just below it: a miss that fills (and keeps nothing, NOSTORE).
    value, status = meta_fetch(s, req(B), "SIMILAR", "0.93", "NOSTORE")
    assert status == "miss" and value != answer
    assert upstream.calls("chat") == 2
    # C scores 0.833: a miss at 0.9, filled and indexed.
    value, status = meta_fetch(s, req(C), "SIMILAR", "0.9")
    assert status == "miss" and value != answer
    wait_for(lambda: entries(s) == 2, what="C indexed")
    # The meta names the entry that answered, and its TTL.
    _, meta = fetch(s, req(B), "WITHMETA", "SIMILAR", "0.9", "NOSTORE")
    key = s.execute_command("LLMCACHE.KEY", "ns", req(A))
    assert meta[0] == b"similar" and meta[1] == -1
    assert 0 < meta[2] <= s.pttl(key) + 5
    # Without SIMILAR, FETCH stays exact-only.
    assert meta_fetch(s, req(B), "NOSTORE")[1] == "miss"
    f = info_fields(s)
    assert f["semantic_hits"] == 2 and f["semantic_misses"] == 3
    assert f["semantic_lookups"] == 5


def test_the_configured_threshold_is_the_default(s, upstream):
    answer = stored(s, A, 1)
    s.config_set("aicache.semantic-threshold", "0.95")
    assert meta_fetch(s, req(B), "SIMILAR", "NOSTORE")[1] == "miss"
    s.config_set("aicache.semantic-threshold", "0.9")
    assert meta_fetch(s, req(B), "SIMILAR", "NOSTORE") == (answer, "similar")
    with pytest.raises(redis.ResponseError, match="semantic-threshold must be a number"):
        s.config_set("aicache.semantic-threshold", "1.5")


@pytest.mark.parametrize("variant", [
    {"system": "be verbose"},
    {"model": "gpt-y"},
    {"temperature": 0.5},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"max_tokens": 5},
    {"system": None},
    {"ns": "other"},
    {"db": 1},
])
def test_the_same_words_in_another_context_never_hit(s, fserver, upstream, variant):
    stored(s, A, 1)
    variant = dict(variant)
    ns = variant.pop("ns", "ns")
    db = variant.pop("db", 0)
    kw = {k: v for k, v in variant.items() if k in ("system", "model")}
    extra = {k: v for k, v in variant.items() if k not in ("system", "model")}
    body = req(A, **kw)
    if extra:
        obj = json.loads(body)
        obj.update(extra)
        body = json.dumps(obj)
    c = fserver.client(db=db)
    # Threshold 0: anything of the same context would answer.
    value, meta = c.execute_command("LLMCACHE.FETCH", ns, body, "WITHMETA", "SIMILAR", "0", "NOSTORE")
    assert meta[0] == b"miss", variant
    assert info_fields(s)["semantic_hits"] == 0
    # The control: the same context does answer at threshold 0.
    assert meta_fetch(s, req("tell me about rome"), "SIMILAR", "0", "NOSTORE")[1] == "similar"


def test_similar_lists_scores_keys_and_prompts_best_first(s, upstream):
    for i, t in enumerate([A, C, "how is the weather in paris today"]):
        stored(s, t, i + 1)
    calls = upstream.calls("chat")
    rows = s.execute_command("LLMCACHE.SIMILAR", "ns", req(B), "COUNT", 2)
    assert len(rows) == 2
    assert [r[2].decode() for r in rows] == [A, C]
    for (score, key, prompt) in rows:
        assert abs(float(score) - cos(B, prompt.decode())) < 1e-5
        assert key == s.execute_command("LLMCACHE.KEY", "ns", req(prompt.decode()))
    assert len(s.execute_command("LLMCACHE.SIMILAR", "ns", req(B))) == 3
    assert s.execute_command("LLMCACHE.SIMILAR", "other", req(B)) == []
    assert upstream.calls("chat") == calls, "SIMILAR never fills"
    for bad, why in [(["COUNT", 0], "COUNT must be"), (["COUNT", 101], "COUNT must be"),
                     (["BOGUS", 1], "unknown option")]:
        with pytest.raises(redis.ResponseError, match=why):
            s.execute_command("LLMCACHE.SIMILAR", "ns", req(B), *bad)
    multimodal = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    for body in [multimodal, json.dumps({"model": "m", "messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})]:
        with pytest.raises(redis.ResponseError, match="no final user message"):
            s.execute_command("LLMCACHE.SIMILAR", "ns", body)
        # FETCH serves such requests exact-only.
        assert meta_fetch(s, body, "SIMILAR", "0", "NOSTORE")[1] == "miss"
    assert info_fields(s)["semantic_skipped"] == 2


def test_del_expiry_eviction_of_the_answer_and_flushes_remove_candidates(s, upstream):
    stored(s, A, 1)
    s.execute_command("LLMCACHE.DEL", "ns", req(A))
    wait_for(lambda: entries(s) == 0, what="DEL to reach the index")
    assert meta_fetch(s, req(B), "SIMILAR", "0.5", "NOSTORE")[1] == "miss"
    # The answer alone deleted (as eviction would): the sidecar stays but
    # is no candidate.
    stored(s, A, 1)
    s.delete(s.execute_command("LLMCACHE.KEY", "ns", req(A)))
    wait_for(lambda: entries(s) == 0, what="the answer's DEL to reach the index")
    assert meta_fetch(s, req(B), "SIMILAR", "0.5", "NOSTORE")[1] == "miss"
    # Expiry.
    s.flushall()
    value, status = meta_fetch(s, req(A), "SIMILAR", "0.99", "EX", 1)
    wait_for(lambda: entries(s) == 1, what="A indexed")
    wait_for(lambda: entries(s) == 0, timeout=15, what="expiry to reach the index")
    assert s.dbsize() == 0 or all(b"emb" in k or b"dims" in k for k in s.keys("*"))
    # LLMCACHE.FLUSH of the namespace, and FLUSHALL.
    stored(s, A, 1)
    s.execute_command("LLMCACHE.FLUSH", "ns")
    wait_for(lambda: entries(s) == 0, what="the namespace flush to reach the index")
    assert meta_fetch(s, req(B), "SIMILAR", "0.5", "NOSTORE")[1] == "miss"
    stored(s, A, 1)
    s.flushall()
    wait_for(lambda: entries(s) == 0, what="FLUSHALL to reach the index")


def test_set_with_a_vector_is_found_without_any_upstream_chat(s, upstream):
    answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Paris"},
                                      "finish_reason": "stop"}]})
    vec = struct.pack("<256f", *bow_vector(A, 256))
    assert s.execute_command("LLMCACHE.SET", "ns", req(A), answer, "VECTOR", vec, "EX", 100) == b"OK"
    wait_for(lambda: entries(s) == 1, what="the SET entry indexed")
    key = s.execute_command("LLMCACHE.KEY", "ns", req(A))
    sem = key.replace(b":llm:v1:", b":sem:v1:")
    assert abs(s.pttl(key) - s.pttl(sem)) < 50, "answer and vector share one expiry"
    value, status = meta_fetch(s, req(B), "SIMILAR", "0.9", "NOSTORE")
    assert (value.decode(), status) == (answer, "similar")
    assert upstream.calls("chat") == 0
    for args, why in [(["VECTOR", b"\x00" * 4 * 256], "all zeros"),
                      (["VECTOR", b"abc"], "vector is 3 bytes, not a multiple of 4"),
                      (["VECTOR"], "VECTOR needs a value"),
                      (["VECTOR", vec, "BOGUS", 1], "unknown option")]:
        with pytest.raises(redis.ResponseError, match=why):
            s.execute_command("LLMCACHE.SET", "ns", req(C), answer, *args)
    no_user = json.dumps({"model": "m", "messages": [{"role": "assistant", "content": "x"}]})
    with pytest.raises(redis.ResponseError, match="no final user message"):
        s.execute_command("LLMCACHE.SET", "ns", no_user, answer, "VECTOR", vec)
    assert s.execute_command("LLMCACHE.GET", "ns", req(C)) is None, "refused SETs write nothing"


def test_bad_similar_options_are_refused(s):
    for opts, why in [(["SIMILAR", "1.5"], "SIMILAR threshold must be"),
                      (["SIMILAR", ".x"], "SIMILAR threshold must be")]:
        with pytest.raises(redis.ResponseError, match=why):
            fetch(s, req(A), *opts)
    with pytest.raises(redis.ResponseError, match="SIMILAR is a FETCH option"):
        s.execute_command("LLMCACHE.STREAM", "ns", req(A), "SIMILAR")


def test_a_tenant_acl_cannot_reach_another_tenants_entries(s, fserver, upstream):
    meta_fetch(s, req(A), "SIMILAR", "0.99", ns="{bob}:chat")
    wait_for(lambda: entries(s) == 1, what="bob's entry indexed")
    s.execute_command("ACL", "SETUSER", "alice", "on", ">pw", "resetkeys", "~{alice}:*",
                      "+llmcache.fetch", "+llmcache.similar", "+ping")
    try:
        a = fserver.client(username="alice", password="pw")
        with pytest.raises(redis.ResponseError, match="(?i)noperm|no permissions"):
            a.execute_command("LLMCACHE.SIMILAR", "{bob}:chat", req(B))
        with pytest.raises(redis.ResponseError, match="(?i)noperm|no permissions"):
            a.execute_command("LLMCACHE.FETCH", "{bob}:chat", req(B), "SIMILAR", "0")
        calls = upstream.calls("chat")
        _, meta = a.execute_command("LLMCACHE.FETCH", "{alice}:chat", req(A), "WITHMETA",
                                    "SIMILAR", "0", "NOSTORE")
        # Bob's identical prompt is no candidate: alice's own fill answers.
        assert meta[0] == b"miss" and upstream.calls("chat") == calls + 1
        assert a.execute_command("LLMCACHE.SIMILAR", "{alice}:chat", req(A)) == []
    finally:
        s.execute_command("ACL", "DELUSER", "alice")


def test_a_restart_and_a_replica_answer_semantic_hits(s, fserver, upstream):
    answer = stored(s, A, 1)
    stored(s, C, 2)
    s.execute_command("DEBUG", "RELOAD")
    wait_for(lambda: entries(s) == 2, what="the index rebuilt after DEBUG RELOAD")
    assert meta_fetch(s, req(B), "SIMILAR", "0.9", "NOSTORE") == (answer, "similar")
    # A real restart from the RDB file.
    s.save()
    d = tempfile.mkdtemp(prefix="aicache-sem-restart-")
    shutil.copy(os.path.join(fserver.dir, "dump.rdb"), d)
    fresh = Server(module_args=["upstream-url", upstream.url, "semantic-model", BOW],
                   extra=["--dir", d], env={"OPENAI_API_KEY": API_KEY})
    replica = Server(module_args=["upstream-url", upstream.url, "semantic-model", BOW],
                     extra=["--replicaof", "127.0.0.1", fserver.port],
                     env={"OPENAI_API_KEY": API_KEY})
    try:
        fc = fresh.client()
        wait_for(lambda: info_fields(fc)["semantic_entries"] == 2, what="the index rebuilt at start")
        assert info_fields(fc)["semantic_rebuilds"] >= 1
        assert meta_fetch(fc, req(B), "SIMILAR", "0.9", "NOSTORE") == (answer, "similar")
        rc = replica.client()
        wait_for(lambda: rc.info("replication")["master_link_status"] == "up", what="replica sync")
        wait_for(lambda: info_fields(rc)["semantic_entries"] == 2, what="the replica's index")
        assert meta_fetch(rc, req(B), "SIMILAR", "0.9") == (answer, "similar")
        # Entries written after the sync arrive through replication.
        stored(s, "how is the weather in paris today", 3)
        wait_for(lambda: info_fields(rc)["semantic_entries"] == 3, what="a replicated entry indexed")
        with pytest.raises(redis.ResponseError, match="on a replica"):
            fetch(rc, req("tell me about rome city"), "SIMILAR", "0.99")
    finally:
        fresh.stop()
        replica.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_deadlines_and_killed_clients_racing_semantic_lookups_get_exactly_one_reply(s, fserver, upstream):
    answer = stored(s, A, 1)
    upstream.reset()
    upstream.latency(20)
    outcomes = set()
    for it in range(12):
        socks = [socket.create_connection(("127.0.0.1", fserver.port)) for _ in range(8)]
        gone = socket.create_connection(("127.0.0.1", fserver.port))
        gone.sendall(resp("LLMCACHE.FETCH", "ns", req(f"{B} gone {it}"), "SIMILAR", "0.5"))
        gone.close()
        for i, sk in enumerate(socks):
            # A fresh prompt each time: its embedding call (20 ms) decides.
            # Even callers FETCH, odd ones list with LLMCACHE.SIMILAR.
            body = req(f"{B} round {it} caller {i}")
            cmd = (["LLMCACHE.FETCH", "ns", body, "SIMILAR", "0.5", "NOSTORE"] if i % 2 == 0
                   else ["LLMCACHE.SIMILAR", "ns", body, "COUNT", 1])
            sk.sendall(resp(*cmd, "TIMEOUT", 12 + 3 * i) + resp("ECHO", f"after-{i}"))
        for i, sk in enumerate(socks):
            tail = b"$%d\r\nafter-%d\r\n" % (len(f"after-{i}"), i)
            got = read_until(sk, tail)
            head = got[:-len(tail)]
            if i % 2 == 0:
                hit = head == b"$%d\r\n%s\r\n" % (len(answer), answer)
            else:
                hit = head.startswith(b"*1\r\n*3\r\n$8\r\n0.") and head.endswith(A.encode() + b"\r\n")
            assert hit or head.startswith(b"-ERR timed out"), (it, i, head[:80])
            outcomes.add((i % 2, hit))
        # No late second reply: the next reply on each socket is this PONG.
        for sk in socks:
            sk.sendall(resp("PING"))
        wait_for(lambda: info_fields(s)["fills_in_flight"] == 0, what="lookups to end")
        for sk in socks:
            assert read_until(sk, b"+PONG\r\n") == b"+PONG\r\n"
            sk.close()
    assert outcomes == {(0, True), (0, False), (1, True), (1, False)}, \
        "the race window was not hit from both sides by both commands"
    # Every lookup that ran found A: none filled from the upstream.
    assert upstream.calls("chat") == 0
    assert s.ping() and info_fields(s)["worker_panics"] == 0


def test_a_forged_sidecar_cannot_point_a_lookup_at_another_key(s):
    answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Paris"},
                                      "finish_reason": "stop"}]})
    vec = struct.pack("<256f", *bow_vector(A, 256))
    s.execute_command("LLMCACHE.SET", "ns", req(A), answer, "VECTOR", vec)
    wait_for(lambda: entries(s) == 1, what="indexed")
    key = s.execute_command("LLMCACHE.KEY", "ns", req(A))
    sem = key.replace(b":llm:v1:", b":sem:v1:")
    side = s.get(sem)
    # Re-point the sidecar's answer key at a secret (layout: README).
    klen = int.from_bytes(side[64:68], "big")
    assert side[68:68 + klen] == key
    s.set("secret", "the admin's session")
    forged = side[:64] + len(b"secret").to_bytes(4, "big") + b"secret" + side[68 + klen:]
    s.set(sem, forged)
    wait_for(lambda: info_fields(s)["semantic_index_pending"] == 0, what="the re-read")
    value, status = meta_fetch(s, req(B), "SIMILAR", "0", "NOSTORE")
    assert status == "miss" and b"admin" not in value
    assert s.execute_command("LLMCACHE.SIMILAR", "ns", req(B)) == []
    # The genuine sidecar back: found again.
    s.set(sem, side)
    wait_for(lambda: meta_fetch(s, req(B), "SIMILAR", "0.9", "NOSTORE")[1] == "similar",
             what="the genuine sidecar found")


def test_flushdb_and_swapdb_move_the_index_with_the_data(s, fserver):
    answer = stored(s, A, 1)
    s.execute_command("SWAPDB", 0, 1)
    c1 = fserver.client(db=1)
    wait_for(lambda: info_fields(s)["semantic_rebuilding"] == 0 and entries(s) == 1,
             what="the rebuild after SWAPDB")
    assert meta_fetch(c1, req(B), "SIMILAR", "0.9", "NOSTORE") == (answer, "similar")
    assert meta_fetch(s, req(B), "SIMILAR", "0.9", "NOSTORE")[1] == "miss"
    c1.flushdb()
    wait_for(lambda: entries(s) == 0, what="FLUSHDB to reach the index")


def test_refresh_ahead_keeps_the_vector_as_long_as_the_answer(s):
    meta_fetch(s, req(A), "SIMILAR", "0.99", "EX", 3)
    wait_for(lambda: entries(s) == 1, what="indexed")
    key = s.execute_command("LLMCACHE.KEY", "ns", req(A))
    sem = key.replace(b":llm:v1:", b":sem:v1:")
    first = s.execute_command("PEXPIRETIME", key)
    assert s.execute_command("PEXPIRETIME", sem) == first
    s.config_set("aicache.refresh-ahead-pct", 60)
    wait_for(lambda: s.pttl(key) < 1500, what="the refresh window")
    fetch(s, req(A), "EX", 3)  # a plain hit, late in its TTL: refreshed
    wait_for(lambda: s.execute_command("PEXPIRETIME", key) > first, what="the refresh")
    assert s.execute_command("PEXPIRETIME", sem) == s.execute_command("PEXPIRETIME", key)


def test_a_refill_without_a_vector_keeps_the_sidecar_with_its_answer(s):
    meta_fetch(s, req(A), "SIMILAR", "0.99")
    wait_for(lambda: entries(s) == 1, what="indexed")
    key = s.execute_command("LLMCACHE.KEY", "ns", req(A))
    sem = key.replace(b":llm:v1:", b":sem:v1:")
    s.delete(key)  # as an eviction of the answer alone would
    wait_for(lambda: entries(s) == 0, what="the answer's removal")
    # A plain refill brings the answer back; its vector is a candidate again.
    fetch(s, req(A), "REFRESH")
    wait_for(lambda: entries(s) == 1, what="the sidecar re-indexed")
    assert s.execute_command("PEXPIRETIME", sem) == s.execute_command("PEXPIRETIME", key)
    # An answer kept forever keeps its vector forever too.
    s.config_set("aicache.default-ttl", 0)
    fetch(s, req(A), "REFRESH")
    assert s.pttl(key) == -1 and s.pttl(sem) == -1


def test_a_new_key_prefix_rebuilds_the_index(s):
    stored(s, A, 1)
    before = info_fields(s)["semantic_rebuilds"]
    s.config_set("aicache.key-prefix", "other:")
    wait_for(lambda: info_fields(s)["semantic_rebuilds"] > before and entries(s) == 0,
             what="a rebuild under the new prefix")
    s.config_set("aicache.key-prefix", "aicache:")
    wait_for(lambda: entries(s) == 1, what="a rebuild under the old prefix")
