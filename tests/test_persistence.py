"""TTL jitter, RDB/AOF reloads, replicas, ACLs and load-time configs."""
import numpy as np
import pytest
import redis

from conftest import vec
from helpers import Server, wait_for

M = b"text-embedding-3-small"


def mset_many(r, ns, n, dims=4, ex=None):
    args = []
    for i in range(n):
        args += [f"text-{i}", np.full(dims, i, dtype="<f4").tobytes()]
    r.execute_command("EMBCACHE.MSET", ns, M, *args)
    keys = [r.execute_command("EMBCACHE.KEY", ns, M, f"text-{i}") for i in range(n)]
    return keys


def expiretimes(r, keys):
    return [r.execute_command("PEXPIRETIME", k) for k in keys]


def test_one_mset_of_1000_spreads_ttls_uniformly(r):
    r.config_set("aicache.default-ttl", 1000)
    keys = mset_many(r, "spread", 1000)
    ttl = np.asarray([r.pttl(k) for k in keys], dtype=float) / 1000.0
    # +/-10% of 1000 s, minus the seconds this test has been running.
    assert ttl.min() >= 900 - 30 and ttl.max() <= 1100
    assert ttl.max() - ttl.min() > 180, "TTLs were not spread across the jitter window"
    counts, _ = np.histogram(ttl, bins=10, range=(900, 1100))
    assert counts.min() >= 50 and counts.max() <= 150, counts
    assert len(set(expiretimes(r, keys))) > 900


def test_zero_jitter_gives_every_entry_the_same_ttl(r):
    r.config_set("aicache.ttl-jitter-pct", 0)
    r.config_set("aicache.default-ttl", 500)
    keys = mset_many(r, "flat", 50)
    at = expiretimes(r, keys)
    assert max(at) - min(at) < 1000


def test_debug_reload_keeps_entries_and_absolute_expiry(r):
    keys = mset_many(r, "reload", 100, dims=8)
    before_values = [r.get(k) for k in keys]
    before_at = expiretimes(r, keys)
    assert r.execute_command("DEBUG", "RELOAD") in (b"OK", "OK", True)
    assert [r.get(k) for k in keys] == before_values
    assert expiretimes(r, keys) == before_at
    assert r.execute_command("EMBCACHE.GET", "reload", M, "text-7") == np.full(8, 7, "<f4").tobytes()
    # The dimension pin survives too.
    with pytest.raises(redis.ResponseError, match="dimension mismatch"):
        r.execute_command("EMBCACHE.SET", "reload", M, "x", vec(1))


def test_aof_replay_keeps_the_masters_absolute_expiry():
    s = Server(extra=["--appendonly", "yes"])
    try:
        r = s.client()
        keys = mset_many(r, "aof", 200)
        r.execute_command("EMBCACHE.SET", "aof", M, "ex", vec(*range(4)), "EX", 5000)
        keys.append(r.execute_command("EMBCACHE.KEY", "aof", M, "ex"))
        before = expiretimes(r, keys)
        values = [r.get(k) for k in keys]
        assert r.execute_command("DEBUG", "LOADAOF") in (b"OK", "OK", True)
        assert expiretimes(r, keys) == before
        assert [r.get(k) for k in keys] == values
    finally:
        s.stop()


@pytest.fixture(scope="module")
def pair():
    master = Server()
    replica = Server()
    rep = replica.client()
    rep.replicaof("127.0.0.1", master.port)
    wait_for(lambda: b"master_link_status:up" in rep.execute_command("INFO", "replication")
             if isinstance(rep.execute_command("INFO", "replication"), bytes)
             else rep.info("replication").get("master_link_status") == "up",
             what="replica link up")
    yield master, replica
    replica.stop()
    master.stop()


def test_replica_holds_identical_values_and_expiry(pair):
    master, replica = pair
    m, rep = master.client(), replica.client()
    keys = mset_many(m, "repl", 300, dims=16)
    m.execute_command("EMBCACHE.SET", "repl", M, "one", np.full(16, 0.5, "<f4").tobytes(), "EX", 777)
    keys.append(m.execute_command("EMBCACHE.KEY", "repl", M, "one"))
    assert m.execute_command("WAIT", 1, 5000) == 1
    assert [rep.get(k) for k in keys] == [m.get(k) for k in keys]
    assert expiretimes(rep, keys) == expiretimes(m, keys)
    assert rep.execute_command("EMBCACHE.GET", "repl", M, "one") == np.full(16, 0.5, "<f4").tobytes()
    # Deletes replicate too, and the replica refuses module writes.
    assert m.execute_command("EMBCACHE.DEL", "repl", M, "one") == 1
    assert m.execute_command("WAIT", 1, 5000) == 1
    assert rep.execute_command("EMBCACHE.GET", "repl", M, "one") is None
    with pytest.raises(redis.exceptions.ReadOnlyError):
        rep.execute_command("EMBCACHE.SET", "repl", M, "x", np.zeros(16, "<f4").tobytes())


def test_acl_key_patterns_apply_to_the_namespace(r):
    r.execute_command("ACL", "SETUSER", "alice", "on", ">pw", "~tenantA:*", "+@all")
    try:
        alice = redis.Redis(port=r.connection_pool.connection_kwargs["port"],
                            username="alice", password="pw")
        alice.execute_command("EMBCACHE.SET", "tenantA:emb", M, "t", vec(1))
        assert alice.execute_command("EMBCACHE.GET", "tenantA:emb", M, "t") == vec(1)
        r.execute_command("EMBCACHE.SET", "tenantB:emb", M, "t", vec(2))
        for args in (["EMBCACHE.GET", "tenantB:emb", M, "t"],
                     ["EMBCACHE.SET", "tenantB:emb", M, "t", vec(9)],
                     ["EMBCACHE.MGET", "tenantB:emb", M, "t"],
                     ["EMBCACHE.DEL", "tenantB:emb", M, "t"]):
            with pytest.raises(redis.exceptions.NoPermissionError):
                alice.execute_command(*args)
        assert r.execute_command("EMBCACHE.GET", "tenantB:emb", M, "t") == vec(2)
        alice.close()
    finally:
        r.execute_command("ACL", "DELUSER", "alice")


def test_configs_can_be_given_at_load_time():
    s = Server(module_args=["default-ttl", 60, "ttl-jitter-pct", 0, "key-prefix", "c1:",
                            "normalize-whitespace", "yes"])
    try:
        r = s.client()
        assert r.config_get("aicache.default-ttl")["aicache.default-ttl"] == "60"
        r.execute_command("EMBCACHE.SET", "ns", M, " a  b ", vec(1))
        key = r.execute_command("EMBCACHE.KEY", "ns", M, "a b")
        assert key.startswith(b"c1:emb:v1:{ns}:")
        assert 59_000 <= r.pttl(key) <= 60_000
    finally:
        s.stop()


@pytest.mark.parametrize("args", [["default-ttl", "abc"], ["ttl-jitter-pct", 95],
                                  ["key-prefix", "bad{prefix"]])
def test_bad_load_time_configs_refuse_to_load(args):
    with pytest.raises(AssertionError, match="exited"):
        Server(module_args=args)
