"""The module in a Redis Cluster: 3 masters + 3 replicas on loopback
(tests/cluster.py), driven through redis-py's RedisCluster and raw sockets.

A namespace is the commands' declared key and every key it uses carries its
hash tag, so a namespace lives on one shard: these tests check that routing,
what is per node (fills, spend windows), replicas serving reads, and a
CLUSTER FAILOVER under a FETCH load where every request must get exactly one
reply."""
import json
import socket
import threading
import uuid

import numpy as np
import pytest
import redis

from cluster import Cluster
from conftest import API_KEY, FILL_CONFIGS
from fake_upstream import chat_answer, vector
from helpers import DEFAULT_CONFIGS, info_fields, key_slot, resp, wait_for
from test_hardening import RespError, RespReader

M = "emb-model"  # 8 dimensions in the fake


def expected(text, model=M, dims=8):
    return np.asarray(vector(model, text, dims), dtype="<f4").tobytes()


def req(content):
    return {"model": "gpt-test", "messages": [{"role": "user", "content": content}]}


@pytest.fixture(scope="module")
def cluster(upstream):
    c = Cluster(upstream_url=upstream.url, env={"OPENAI_API_KEY": API_KEY},
                extra=["--enable-debug-command", "yes"])
    yield c
    dead = [n.port for n in c.nodes if n.proc.poll() is not None]
    panics = {}
    if not dead:
        for n in c.nodes:
            i = info_fields(n.r)
            if (i["handler_panics"], i["worker_panics"]) != (0, 0):
                panics[n.port] = (i["handler_panics"], i["worker_panics"])
    c.stop()
    assert not dead, f"node(s) {dead} died during the cluster tests"
    assert not panics, f"a command or worker panicked: {panics}"


@pytest.fixture
def rc(cluster, upstream):
    wait_for(lambda: all(info_fields(n.r)["fills_in_flight"] == 0 for n in cluster.masters()),
             what="previous fills to finish")
    cluster.flushall()
    upstream.reset()
    cluster.config_set(*[x for kv in FILL_CONFIGS.items() for x in kv])
    c = cluster.client(socket_timeout=30)
    yield c
    c.close()
    cluster.config_set(*[x for kv in DEFAULT_CONFIGS.items() for x in kv])


def names_per_master(cluster, prefix, per_master=2):
    """{master port: [names]}: names chosen so each master owns per_master."""
    owners = {m.port: [] for m in cluster.masters()}
    i = 0
    while any(len(v) < per_master for v in owners.values()):
        name = f"{prefix}-{i}"
        names = owners[cluster.master_for_slot(key_slot(name.encode())).port]
        if len(names) < per_master:
            names.append(name)
        i += 1
    return owners


def fills_started(cluster):
    return {n.port: info_fields(n.r)["fills_started"] for n in cluster.live_nodes()}


def test_namespaces_spread_over_shards_and_keep_their_entries_in_their_slot(cluster, rc, upstream):
    owners = names_per_master(cluster, "tenant")
    assert len(owners) == 3
    for port, names in owners.items():
        for ns in names:
            rc.execute_command("EMBCACHE.SET", ns, M, "set-text", expected("set-text"))
            assert rc.execute_command("EMBCACHE.FETCH", ns, M, 1, "fetched") == [expected("fetched")]
            slot = key_slot(ns.encode())
            assert rc.execute_command("CLUSTER", "KEYSLOT", ns) == slot
            keys = [rc.execute_command("EMBCACHE.KEY", ns, M, t) for t in ("set-text", "fetched")]
            assert {rc.execute_command("CLUSTER", "KEYSLOT", k) for k in keys} == {slot}
            owner = cluster.by_port(port)
            # Read on the node itself: the entry really lives on the owner...
            assert [owner.r.get(k) for k in keys] == [expected("set-text"), expected("fetched")]
            in_slot = set(owner.r.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100))
            assert set(keys) <= in_slot
            # ...the pin hash too (same tag), and no other master holds anything of it.
            assert any(k.startswith(b"aicache:dims:v1:") for k in in_slot)
            for other in cluster.masters():
                if other.port != port:
                    assert other.r.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0


def test_fetch_misses_fill_on_the_owning_master_and_then_hit(cluster, rc, upstream):
    owners = names_per_master(cluster, "tenant", per_master=1)
    before = fills_started(cluster)
    for port, (ns,) in owners.items():
        assert rc.execute_command("EMBCACHE.FETCH", ns, M, 2, "a", "b") == [expected("a"),
                                                                            expected("b")]
        body = json.dumps(req(f"hello from {ns}"))
        assert json.loads(rc.execute_command("LLMCACHE.FETCH", ns, body)) == chat_answer(
            {**req(f"hello from {ns}"), "stream": False})
    assert upstream.calls("embeddings") == 3 and upstream.calls("chat") == 3
    after = fills_started(cluster)
    # Each master filled its own namespace's misses; no replica filled anything.
    for n in cluster.live_nodes():
        assert (after[n.port] > before[n.port]) == (n.port in owners), n.port
    for port, (ns,) in owners.items():
        assert rc.execute_command("EMBCACHE.FETCH", ns, M, 2, "b", "a") == [expected("b"),
                                                                            expected("a")]
        assert rc.execute_command("LLMCACHE.FETCH", ns, json.dumps(req(f"hello from {ns}")))
    assert upstream.calls() == 6, "a hit went upstream"


def test_concurrent_identical_fetches_through_the_cluster_make_one_call(cluster, rc, upstream):
    upstream.latency(200)
    results, errors = [], []

    def one():
        c = cluster.client(socket_timeout=30)
        try:
            results.append(c.execute_command("EMBCACHE.FETCH", "herd", M, 1, "same text"))
        except Exception as e:  # noqa: BLE001 - every outcome is recorded and asserted
            errors.append(e)
        finally:
            c.close()
    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [[expected("same text")]] * 20
    assert upstream.calls("embeddings") == 1


def test_throttle_is_routed_by_its_key(cluster, rc):
    for port, (k,) in names_per_master(cluster, "rl:user", per_master=1).items():
        got = [rc.execute_command("AICACHE.THROTTLE", k, 2, 60000)[0] for _ in range(3)]
        assert got == [1, 1, 0], k
        owner = cluster.by_port(port)
        assert owner.r.exists(k) == 1
        # The limiter state replicates like any string: the replica holds the same bytes.
        assert owner.r.execute_command("WAIT", 1, 5000) == 1
        rep = cluster.replica_of(owner).client()
        rep.execute_command("READONLY")
        assert rep.get(k) == owner.r.get(k)
        rep.close()


def test_a_replica_serves_reads_after_readonly_and_never_fills(cluster, rc, upstream):
    ns = "replica-reads"
    rc.execute_command("EMBCACHE.FETCH", ns, M, 1, "cached")
    body = json.dumps(req("cached chat"))
    rc.execute_command("LLMCACHE.FETCH", ns, body)
    owner = cluster.master_for_slot(key_slot(ns.encode()))
    assert owner.r.execute_command("WAIT", 1, 5000) == 1
    calls = upstream.calls()
    rep = cluster.replica_of(owner).client()
    try:
        with pytest.raises(redis.exceptions.MovedError):
            rep.execute_command("EMBCACHE.GET", ns, M, "cached")
        assert rep.execute_command("READONLY") in (b"OK", True)
        assert rep.execute_command("EMBCACHE.GET", ns, M, "cached") == expected("cached")
        assert rep.execute_command("EMBCACHE.FETCH", ns, M, 1, "cached") == [expected("cached")]
        assert rep.execute_command("LLMCACHE.FETCH", ns, body) == rc.execute_command(
            "LLMCACHE.GET", ns, body)
        with pytest.raises(redis.ResponseError, match="replica; fills run on the master"):
            rep.execute_command("EMBCACHE.FETCH", ns, M, 1, "not cached")
        # READONLY covers reads only: a write is sent to the master.
        with pytest.raises(redis.exceptions.MovedError):
            rep.execute_command("EMBCACHE.SET", ns, M, "w", expected("w"))
    finally:
        rep.close()
    assert upstream.calls() == calls, "a replica went upstream"


def test_global_spend_limits_are_per_master(cluster, rc, upstream):
    owners = names_per_master(cluster, "tenant", per_master=1)
    (a,), (b,) = list(owners.values())[:2]
    cluster.config_set("aicache.global-max-requests", 1)
    assert rc.execute_command("EMBCACHE.FETCH", a, M, 1, "first") == [expected("first")]
    with pytest.raises(redis.ResponseError, match="^THROTTLED"):
        rc.execute_command("EMBCACHE.FETCH", a, M, 1, "second")
    # Another master has its own window: the same global limit admits it again.
    assert rc.execute_command("EMBCACHE.FETCH", b, M, 1, "second") == [expected("second")]
    assert upstream.calls() == 2


# --------------------------------------------------------------------------
# CLUSTER FAILOVER under a FETCH load, on raw sockets: redis-py's cluster
# client resends on a dropped connection, which would hide a lost reply.
# Each FETCH is pipelined with an ECHO, so a missing or extra reply shows as
# a wrong ECHO.

class Load:
    """Workers sending FETCH + ECHO to whichever node owns the namespace,
    following MOVED, until stopped, and a few threads doing the same through
    RedisCluster, as an application would. Counts every request and its
    outcome."""

    def __init__(self, port, ns, workers, hot, cluster=None, rc_workers=0):
        self.ns, self.hot, self.cluster = ns, hot, cluster
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.outcomes = {}  # kind -> count
        self.examples = {}  # kind -> the first error text of that kind
        self.problems = []  # lost, hung or misframed replies, with detail
        self.values_on = {}  # port -> values received from that node
        self.threads = [threading.Thread(target=self.run, args=(i, port)) for i in range(workers)]
        self.threads += [threading.Thread(target=self.rc_run, args=(i,)) for i in range(rc_workers)]

    def count(self, kind, port=None, text=None):
        with self.lock:
            self.outcomes[kind] = self.outcomes.get(kind, 0) + 1
            if text is not None:
                self.examples.setdefault(kind, text)
            if kind == "value":
                self.values_on[port] = self.values_on.get(port, 0) + 1

    def run(self, wid, port):
        sock = reader = None
        n = 0
        while not self.stop.is_set():
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port))
                # Far above any fill here: only a reply that never comes reaches it.
                sock.settimeout(30)
                reader = RespReader(sock)
            n += 1
            text = self.hot[n % len(self.hot)] if n % 2 else f"fresh-{wid}-{n}-{uuid.uuid4().hex}"
            token = f"echo-{wid}-{n}"
            sock.sendall(resp("EMBCACHE.FETCH", self.ns, M, 1, text, "TIMEOUT", 20000)
                         + resp("ECHO", token))
            with self.lock:
                self.sent += 1
            try:
                reply = reader.read()
            except socket.timeout:
                self.problems.append(f"worker {wid}: no reply to FETCH {text!r} on {port}")
                return
            except (EOFError, ConnectionError) as e:
                self.problems.append(f"worker {wid}: connection lost before the FETCH reply "
                                     f"on {port}: {e!r}")
                sock.close()
                sock = None
                continue
            closing = False
            if isinstance(reply, RespError):
                kind = reply.split(" ", 1)[0]
                self.count(kind, text=str(reply))
                if kind == "MOVED":
                    port = int(reply.rsplit(":", 1)[1])
                elif kind == "UNBLOCKED":
                    # Redis answers blocked clients so when a master turns
                    # replica, then closes their connections.
                    closing = True
            elif reply == [expected(text)]:
                self.count("value", port)
            else:
                self.problems.append(f"worker {wid}: wrong FETCH reply {reply!r:.100}")
            try:
                echo = reader.read()
                if echo != token.encode():
                    self.problems.append(f"worker {wid}: expected ECHO {token}, got {echo!r:.100}")
            except socket.timeout:
                self.problems.append(f"worker {wid}: no ECHO reply on {port}")
                return
            except (EOFError, ConnectionError):
                if not closing:
                    self.problems.append(f"worker {wid}: connection closed after {reply!r:.60}")
                closing = True
            if closing or isinstance(reply, RespError) and reply.startswith("MOVED"):
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def rc_run(self, wid):
        """What redis-py's cluster client makes of the failover: each call
        returns or raises; it follows MOVED and reconnects by itself."""
        c = self.cluster.client(socket_timeout=30)
        n = 0
        while not self.stop.is_set():
            n += 1
            text = self.hot[n % len(self.hot)] if n % 2 else f"rc-{wid}-{n}-{uuid.uuid4().hex}"
            with self.lock:
                self.sent += 1
            try:
                got = c.execute_command("EMBCACHE.FETCH", self.ns, M, 1, text, "TIMEOUT", 20000)
            except redis.exceptions.TimeoutError:
                self.problems.append(f"rc worker {wid}: FETCH {text!r} timed out")
                break
            except redis.RedisError as e:
                self.count(f"rc:{type(e).__name__}", text=str(e))
                continue
            if got == [expected(text)]:
                self.count("rc:value")
            else:
                self.problems.append(f"rc worker {wid}: wrong FETCH reply {got!r:.100}")
        c.close()

    def replies(self):
        with self.lock:
            return sum(self.outcomes.values())


def run_failover_load(cluster, upstream, ns, workers=16, rc_workers=4, settle_requests=100,
                      options=()):
    """Starts the load on ns's shard, fails its master over to its replica
    (CLUSTER FAILOVER *options) mid-load, runs on until settle_requests more
    values came from the new master, then stops. Returns (load, old master,
    new master, (seconds to promotion, seconds until the old master is a
    replica))."""
    old = cluster.master_for_slot(key_slot(ns.encode()))
    new = cluster.replica_of(old)
    hot = [f"hot-{i}" for i in range(8)]
    c = cluster.client()
    c.execute_command("EMBCACHE.FETCH", ns, M, len(hot), *hot)
    c.close()
    upstream.latency(20, jitter_ms=30)  # keeps fills in flight when the roles change
    load = Load(old.port, ns, workers, hot, cluster, rc_workers)
    for t in load.threads:
        t.start()
    try:
        wait_for(lambda: load.values_on.get(old.port, 0) >= 100 or load.problems, timeout=30,
                 what="the load to get going")
        times = cluster.failover(new, *options, settle=False)
        wait_for(lambda: load.values_on.get(new.port, 0) >= settle_requests or load.problems,
                 timeout=30, what="the load to reach the new master")
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(60)
    assert not any(t.is_alive() for t in load.threads), "a worker hung"
    upstream.latency(0)
    return load, old, new, times


def test_cluster_failover_under_fetch_load_answers_every_request_once(cluster, rc, upstream):
    ns = "failover"
    load, old, new, _ = run_failover_load(cluster, upstream, ns)
    assert not load.problems, load.problems[:5]
    assert load.replies() == load.sent, (load.sent, load.outcomes)
    # Values came from both sides of the failover; the demoted master sent
    # every later call on with MOVED.
    assert load.values_on.get(old.port, 0) >= 100 and load.values_on.get(new.port, 0) >= 100
    assert load.outcomes.get("MOVED", 0) >= 1
    # A call blocked on the old master when it turns replica gets one
    # error: Redis 7.0/8.2 and Valkey 8.1 answer `UNBLOCKED ...` themselves;
    # Valkey 9.1 leaves the call to the module, whose fill then fails there
    # with `ERR ...` (its pin read is refused as a non-local key).
    # Either way at most one per raw connection, which then reconnects.
    assert load.outcomes.get("UNBLOCKED", 0) + load.outcomes.get("ERR", 0) <= 16
    assert load.outcomes.get("rc:value", 0) >= 1
    assert set(load.outcomes) <= {"value", "MOVED", "UNBLOCKED", "ERR", "rc:value",
                                  "rc:ResponseError", "rc:ConnectionError"}, load.examples
    for text in load.examples.values():
        assert text.isprintable() and text.isascii(), text
    # The old master's module let go of every call it had blocked.
    wait_for(lambda: info_fields(old.r)["fills_in_flight"] == 0
             and old.r.info("clients")["blocked_clients"] == 0,
             what="the demoted master to drop its fills and blocked clients")
    cluster.wait_stable()
    assert cluster.master_for_slot(key_slot(ns.encode())).port == new.port

    # The new master fills a fresh miss, stores it, and it replicates to the
    # old master, now its replica.
    calls = upstream.calls("embeddings")
    assert rc.execute_command("EMBCACHE.FETCH", ns, M, 1, "after failover") == [
        expected("after failover")]
    assert upstream.calls("embeddings") == calls + 1
    key = rc.execute_command("EMBCACHE.KEY", ns, M, "after failover")
    assert new.r.get(key) == expected("after failover")
    assert new.r.execute_command("WAIT", 1, 5000) == 1
    demoted = old.client()
    demoted.execute_command("READONLY")
    assert demoted.get(key) == expected("after failover")
    demoted.close()
    assert info_fields(new.r)["fills_in_flight"] == 0


def import_client():
    """AICache from clients/python (conftest puts it on sys.path), or None
    while it is not written yet."""
    try:
        from aicache.client import AICache
    except ImportError:
        return None
    return AICache


def test_python_client_works_on_the_cluster(cluster, rc, upstream):
    AICache = import_client()
    if AICache is None:
        pytest.skip("clients/python/aicache/client.py (AICache) is not importable yet")
    owners = names_per_master(cluster, "tenant", per_master=1)
    for port, (ns,) in owners.items():
        cache = AICache(rc, ns, M)
        got = cache.embed(["one", "two"])
        assert got.shape == (2, 8)
        assert got.astype("<f4").tobytes() == expected("one") + expected("two")
        assert cache.chat(req(f"client {ns}")) == chat_answer(
            {**req(f"client {ns}"), "stream": False})
        # Filled and stored on the namespace's own master.
        owner = cluster.by_port(port)
        assert owner.r.get(rc.execute_command("EMBCACHE.KEY", ns, M, "one")) == expected("one")
    assert upstream.calls() == 6
    for port, (ns,) in owners.items():
        AICache(rc, ns, M).embed(["two", "one"])
        AICache(rc, ns, M).chat(req(f"client {ns}"))
    assert upstream.calls() == 6, "the client's second calls went upstream"
