"""The module behind Redis Sentinel: one master and one replica with the
module, one sentinel (without it: `redis-server --sentinel`), fast failover
settings. A client following the master through redis-py's Sentinel keeps
fetching while the master is killed, put to sleep (DEBUG SLEEP) or failed
over on request (SENTINEL FAILOVER): every call must return a vector or
raise a clear error, and the client must end up on the new master, where
FETCH fills and hits."""
import os
import socket
import tempfile
import threading
import uuid

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from conftest import API_KEY, FILL_CONFIGS
from fake_upstream import vector
from helpers import REDIS_SERVER, Server, free_port, info_fields, read_log, resp, stop_process, wait_for

M = "emb-model"  # 8 dimensions in the fake
NAME = "aicache"


def expected(text):
    return np.asarray(vector(M, text, 8), dtype="<f4").tobytes()


class SentinelProc:
    """redis-server --sentinel, watching one master with quorum 1."""

    def __init__(self, master_port):
        import subprocess
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="aicache-sentinel-")
        self.log = os.path.join(self.dir, "sentinel.log")
        conf = os.path.join(self.dir, "sentinel.conf")
        with open(conf, "w") as f:
            f.write(f"""port {self.port}
bind 127.0.0.1
dir {self.dir}
logfile {self.log}
sentinel monitor {NAME} 127.0.0.1 {master_port} 1
sentinel down-after-milliseconds {NAME} 500
sentinel failover-timeout {NAME} 3000
sentinel parallel-syncs {NAME} 1
""")
        self.proc = subprocess.Popen([REDIS_SERVER, conf, "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._ready, what="sentinel")
        self.r = redis.Redis(port=self.port, socket_timeout=5, decode_responses=True)

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"sentinel exited: {self.log_text()[-2000:]}")
        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def master_port(self):
        addr = self.r.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", NAME)
        return int(addr[1]) if addr else None

    def knows_replica(self, port):
        reps = self.r.execute_command("SENTINEL", "REPLICAS", NAME)
        for rep in reps:
            d = rep if isinstance(rep, dict) else dict(zip(rep[::2], rep[1::2]))
            if int(d["port"]) == port and "s_down" not in d["flags"] \
                    and d.get("master-link-status") == "ok":
                return True
        return False

    def log_text(self):
        return read_log(self.log)

    def stop(self):
        import shutil
        self.r.close()
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def topology(upstream):
    upstream.reset()
    args = ["upstream-url", upstream.url, "upstream-backoff-base-ms",
            FILL_CONFIGS["aicache.upstream-backoff-base-ms"], "upstream-backoff-cap-ms",
            FILL_CONFIGS["aicache.upstream-backoff-cap-ms"]]
    env = {"OPENAI_API_KEY": API_KEY}
    master = Server(module_args=args, env=env, extra=["--repl-diskless-sync-delay", 0])
    replica = Server(module_args=args, env=env, extra=["--repl-diskless-sync-delay", 0])
    sentinel = None
    try:
        replica.client().replicaof("127.0.0.1", master.port)
        wait_for(lambda: replica.client().info("replication")["master_link_status"] == "up",
                 what="replica link up")
        sentinel = SentinelProc(master.port)
        # A failover needs a replica the sentinel has seen and found healthy.
        wait_for(lambda: sentinel.knows_replica(replica.port), timeout=20,
                 what="sentinel to discover the replica")
        yield master, replica, sentinel
    finally:
        for n in (master, replica):
            if n.proc.poll() is None:
                i = info_fields(n.client())
                assert (i["handler_panics"], i["worker_panics"]) == (0, 0), n.port
        if sentinel:
            sentinel.stop()
        replica.stop()
        master.stop()


class FetchLoop:
    """One thread fetching through Sentinel.master_for until stopped: every
    call's outcome recorded, a hang (socket timeout) is a problem."""

    def __init__(self, sentinel_port):
        # No retries inside redis-py: each call's own outcome is what counts.
        self.client = Sentinel([("127.0.0.1", sentinel_port)], socket_timeout=5).master_for(
            NAME, socket_timeout=30, retry=Retry(NoBackoff(), 0))
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.calls = 0
        self.outcomes = {}
        self.problems = []
        self.hot = [f"hot-{i}" for i in range(4)]
        self.thread = threading.Thread(target=self.run)

    def count(self, kind):
        with self.lock:
            self.outcomes[kind] = self.outcomes.get(kind, 0) + 1

    def values(self):
        with self.lock:
            return self.outcomes.get("value", 0)

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            text = self.hot[n % len(self.hot)] if n % 2 else f"fresh-{n}-{uuid.uuid4().hex}"
            with self.lock:
                self.calls += 1
            try:
                got = self.client.execute_command("EMBCACHE.FETCH", "docs", M, 1, text,
                                                  "TIMEOUT", 20000)
            except redis.exceptions.TimeoutError as e:
                self.problems.append(f"call {n} hung: {e}")
                return
            except redis.RedisError as e:
                self.count(f"{type(e).__name__}")
                # A client's pause before retrying a refused call, not a sync.
                self.stop.wait(0.01)
                continue
            if got == [expected(text)]:
                self.count("value")
            else:
                self.problems.append(f"call {n}: wrong reply {got!r:.100}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the FETCH loop hung"


def served(node):
    """FETCH inputs this node has answered, hits and misses."""
    try:
        i = info_fields(node.client())
    except redis.RedisError:
        return -1
    return i["hits"] + i["misses"]


def debug_sleep(node, seconds):
    """DEBUG SLEEP on a connection of its own, not waiting for the reply."""
    s = socket.create_connection(("127.0.0.1", node.port))
    s.sendall(resp("DEBUG", "SLEEP", seconds))
    return s


@pytest.mark.parametrize("how", ["kill", "debug-sleep", "sentinel-failover"])
def test_fetch_follows_the_master_through_a_sentinel_failover(topology, upstream, how):
    master, replica, sentinel = topology
    upstream.latency(5, jitter_ms=10)
    sleeper = None
    with FetchLoop(sentinel.port) as loop:
        wait_for(lambda: loop.values() >= 50 or loop.problems, what="the loop to get going")
        before = served(replica)
        if how == "kill":
            master.proc.kill()
            master.proc.wait()
        elif how == "debug-sleep":
            sleeper = debug_sleep(master, 3)
        else:
            assert sentinel.r.execute_command("SENTINEL", "FAILOVER", NAME) in ("OK", True)
        wait_for(lambda: sentinel.master_port() == replica.port, timeout=30,
                 what="sentinel to promote the replica")
        wait_for(lambda: replica.client().info("replication")["role"] == "master",
                 what="the replica to take the master role")
        # The loop reaches the new master on its own: its FETCHes show up
        # there (the old master, where alive, is turned into a replica by the
        # sentinel and its clients are disconnected).
        wait_for(lambda: served(replica) - before >= 100 or loop.problems, timeout=60,
                 what="the loop's FETCHes to reach the new master")
        values_at_switch = loop.values()
        wait_for(lambda: loop.values() >= values_at_switch + 20 or loop.problems,
                 what="more values from the new master")
    if sleeper:
        sleeper.close()
    assert not loop.problems, loop.problems[:5]
    assert sum(loop.outcomes.values()) == loop.calls, (loop.calls, loop.outcomes)
    # Only errors a client can act on: the connection dropped or refused
    # while the master changed, a miss refused on the demoted master.
    assert set(loop.outcomes) <= {"value", "ConnectionError", "MasterNotFoundError",
                                  "ResponseError"}, loop.outcomes
    if how == "kill":
        assert loop.outcomes.get("ConnectionError", 0) + loop.outcomes.get(
            "MasterNotFoundError", 0) >= 1

    # The client fills a fresh miss on the new master, then hits.
    c = loop.client
    calls = upstream.calls("embeddings")
    text = f"after-{how}"
    assert c.execute_command("EMBCACHE.FETCH", "docs", M, 1, text) == [expected(text)]
    assert upstream.calls("embeddings") == calls + 1
    assert c.execute_command("EMBCACHE.FETCH", "docs", M, 1, text) == [expected(text)]
    assert upstream.calls("embeddings") == calls + 1
    key = c.execute_command("EMBCACHE.KEY", "docs", M, text)
    assert replica.client().get(key) == expected(text)
    assert info_fields(replica.client())["fills_started"] >= 1
    if how != "kill":
        # The old master now replicates the new one and holds the entry too.
        wait_for(lambda: master.client().info("replication").get("master_link_status") == "up",
                 timeout=30, what="the old master to replicate the new one")
        assert replica.client().execute_command("WAIT", 1, 5000) == 1
        # Polled: the sentinel may still re-point the old master (a second
        # full sync), which empties it for a moment after WAIT was acked.
        def on_old_master():
            try:
                return master.client().get(key) == expected(text)
            except redis.exceptions.BusyLoadingError:
                return False

        wait_for(on_old_master, timeout=30, what="the entry on the old master")
