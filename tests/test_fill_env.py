"""Fills in their surroundings: transactions, scripts, replicas, DBs,
reloads, paused writes, MODULE UNLOAD and SHUTDOWN."""
import glob
import json
import threading

import pytest
import redis

from helpers import Server, info_fields, wait_for
from test_fetch import M, REQ, expected, fetch, llm


def test_multi_serves_hits_and_refuses_misses_without_calling_upstream(f, upstream):
    fetch(f, "tx", "hit")
    upstream.reset()
    p = f.pipeline(transaction=True)
    p.execute_command("EMBCACHE.FETCH", "tx", M, 1, "hit")
    p.execute_command("EMBCACHE.FETCH", "tx", M, 1, "miss")
    p.execute_command("LLMCACHE.FETCH", "tx", '{"model":"m","messages":[{"role":"user","content":"x"}]}')
    out = p.execute(raise_on_error=False)
    assert out[0] == [expected("hit")]
    assert "cannot block" in str(out[1]) and "cannot block" in str(out[2])
    assert upstream.calls() == 0 and f.info("clients")["blocked_clients"] == 0


def test_scripts_serve_hits_and_refuse_misses(f, upstream):
    fetch(f, "lua", "hit")
    upstream.reset()
    script = "return redis.call('EMBCACHE.FETCH', KEYS[1], ARGV[1], 1, ARGV[2])"
    assert f.eval(script, 1, "lua", M, "hit") == [expected("hit")]
    with pytest.raises(redis.ResponseError, match="cannot block"):
        f.eval(script, 1, "lua", M, "miss")
    assert upstream.calls() == 0


def test_select_3_then_fetch_stores_in_db_3(f, fserver, upstream):
    c3 = fserver.client(db=3)
    try:
        assert fetch(c3, "db", "t") == [expected("t")]
        assert c3.dbsize() >= 1 and f.dbsize() == 0
        assert c3.execute_command("EMBCACHE.GET", "db", M, "t") == expected("t")
        llm(c3, REQ)
        assert f.dbsize() == 0
    finally:
        c3.flushdb()


def test_fills_coalesce_only_within_one_db(f, fserver, upstream):
    upstream.latency(300)
    c0, c5 = fserver.client(db=0), fserver.client(db=5)
    try:
        out = []
        ts = [threading.Thread(target=lambda c=c: out.append(fetch(c, "dbs", "t"))) for c in (c0, c5)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert out == [[expected("t")]] * 2
        for c in (c0, c5):
            assert c.execute_command("EMBCACHE.GET", "dbs", M, "t") == expected("t")
        # Two fills (one per DB), whether micro-batching sends their inputs
        # in one request or two.
        assert sum(upstream.stats()["inputs"]) == 2
    finally:
        c5.flushdb()


def test_min_replicas_unmet_skips_the_store_but_not_the_reply(f, upstream):
    before = info_fields(f)["writes_skipped"]
    f.config_set("min-replicas-to-write", 1)
    try:
        assert fetch(f, "minrep", "t") == [expected("t")]
        assert json.loads(llm(f, REQ, ns="minrep"))["choices"]
    finally:
        f.config_set("min-replicas-to-write", 0)
    assert f.dbsize() == 0
    assert info_fields(f)["writes_skipped"] == before + 2


def test_debug_reload_keeps_fills_and_their_deadlines(f, upstream):
    fetch(f, "rl", "a", "b")
    llm(f, REQ, ns="rl")
    keys = f.keys("aicache:*")
    before = {k: f.execute_command("PEXPIRETIME", k) for k in keys}
    f.execute_command("DEBUG", "RELOAD")
    assert {k: f.execute_command("PEXPIRETIME", k) for k in keys} == before
    assert fetch(f, "rl", "a", "b") == [expected("a"), expected("b")]
    assert upstream.calls() == 2


def test_paused_writes_skip_the_store_but_not_the_reply(f, fserver, upstream):
    before = info_fields(f)["writes_skipped"]
    f.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
    try:
        assert fetch(fserver.client(), "pause", "t") == [expected("t")]
    finally:
        f.execute_command("CLIENT", "UNPAUSE")
    assert info_fields(f)["writes_skipped"] == before + 1
    assert f.execute_command("EMBCACHE.GET", "pause", M, "t") is None


@pytest.fixture
def pair(upstream):
    master = Server(module_args=["upstream-url", upstream.url])
    replica = Server(module_args=["upstream-url", upstream.url],
                     extra=["--replicaof", "127.0.0.1", master.port])
    yield master, replica
    replica.stop()
    master.stop()


def test_fills_replicate_as_effects_and_replicas_refuse_misses(pair, upstream):
    master, replica = pair
    m, r = master.client(), replica.client()
    wait_for(lambda: r.info("replication")["master_link_status"] == "up", what="replica link")
    upstream.reset()
    fetch(m, "rep", "a", "b")
    llm(m, REQ, ns="rep")
    keys = sorted(m.keys("aicache:*"))
    wait_for(lambda: sorted(r.keys("aicache:*")) == keys, what="fills to replicate")
    for k in keys:
        assert r.dump(k) == m.dump(k)
        assert r.execute_command("PEXPIRETIME", k) == m.execute_command("PEXPIRETIME", k)
    assert fetch(r, "rep", "a", "b") == [expected("a"), expected("b")]
    with pytest.raises(redis.ResponseError, match="on a replica"):
        fetch(r, "rep", "c")
    assert upstream.calls() == 2, "the replica must neither re-fill nor fill misses"


def worker_threads(pid):
    names = []
    for comm in glob.glob(f"/proc/{pid}/task/*/comm"):
        try:
            with open(comm) as fh:
                names.append(fh.read().strip())
        except OSError:
            pass
    return [n for n in names if n.startswith("aicache-")]


def test_module_unload_waits_for_blocked_clients_then_joins_the_pool(upstream):
    # A host name, so lookups go through the resolver threads, which
    # unload must join as well.
    url = upstream.url.replace("127.0.0.1", "localhost")
    s = Server(module_args=["upstream-url", url, "workers", 3],
               extra=["--enable-module-command", "yes"])
    try:
        c = s.client()
        assert sorted(worker_threads(s.proc.pid)) == ["aicache-append", "aicache-batch",
                                                      "aicache-dns0",
                                                      "aicache-dns1", "aicache-semidx",
                                                      "aicache-w0", "aicache-w1", "aicache-w2"]
        upstream.reset()
        upstream.latency(500)
        got = []
        t = threading.Thread(target=lambda: got.append(fetch(s.client(), "u", "x")))
        t.start()
        wait_for(lambda: c.info("clients")["blocked_clients"] == 1, what="blocked client")
        with pytest.raises(redis.ResponseError, match="module has blocked clients"):
            c.execute_command("MODULE", "UNLOAD", "aicache")
        t.join()
        assert got == [[expected("x")]]
        wait_for(lambda: c.info("clients")["blocked_clients"] == 0, what="unblocked")
        # A fill that outlived its caller keeps the module loaded until it ends.
        with pytest.raises(redis.ResponseError, match="TIMEOUT|timed out"):
            fetch(c, "u", "late", opts=["TIMEOUT", 50])
        assert c.info("clients")["blocked_clients"] == 0
        with pytest.raises(redis.ResponseError, match="Error unloading module"):
            c.execute_command("MODULE", "UNLOAD", "aicache")
        wait_for(lambda: info_fields(c)["fills_in_flight"] == 0, what="the late fill")
        assert c.execute_command("MODULE", "UNLOAD", "aicache") in (b"OK", "OK", True)
        assert worker_threads(s.proc.pid) == [], "workers outlived MODULE UNLOAD"
        assert s.alive()
    finally:
        upstream.latency(0)
        s.stop()


def test_shutdown_with_fills_in_flight_exits_promptly(upstream):
    s = Server(module_args=["upstream-url", upstream.url])
    upstream.reset()
    upstream.latency(3000)
    try:
        threads = []
        for i in range(20):
            c = s.client()
            t = threading.Thread(target=lambda c=c, i=i: pytest.raises(
                (redis.ConnectionError, redis.ResponseError), fetch, c, "sd", f"t{i % 5}"))
            t.start()
            threads.append(t)
        wait_for(lambda: s.client().info("clients")["blocked_clients"] == 20, what="blocked")
        try:
            s.client().shutdown(nosave=True)
        except redis.ConnectionError:
            pass
        # Bounded by wait_for's timeout, far below the 3 s upstream latency x retries.
        wait_for(lambda: s.proc.poll() is not None, timeout=5, what="redis-server to exit")
        assert s.proc.returncode == 0
        for t in threads:
            t.join()
    finally:
        upstream.latency(0)
        s.stop()
