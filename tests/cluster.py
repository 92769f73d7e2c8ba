"""A loopback Redis Cluster with the module loaded on every node.

Used by tests/test_cluster.py and bench/cluster_failover.py (the Cluster
class), and by `make cluster`:

    .venv/bin/python tests/cluster.py up   [--port 7000] [--masters 3] [--replicas 1]
                                           [--upstream-url URL | --demo-port 8089]
    .venv/bin/python tests/cluster.py down [--port 7000]

`up` stays in the foreground until Ctrl-C (or `down` from another shell).
Node n listens on port+n, its cluster bus on port+n+10000. Without an
upstream URL the demo upstream (tests/fake_upstream.py) is started too.

The cluster is formed with CLUSTER commands rather than `redis-cli --cluster
create`: the server binary under test (REDIS_SERVER, e.g. a Valkey build)
may come without a matching CLI, and every wait is a poll on what the nodes
report, never a fixed sleep.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import MODULE, REDIS_SERVER, ROOT, free_port, read_log, stop_process, wait_for  # noqa: E402

SLOTS = 16384


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def parse_nodes(raw):
    """CLUSTER NODES as {node id: {port, flags, master, epoch, slots, link}}.
    Import/migrate markers ([slot->-id]) are not ranges and are left out."""
    out = {}
    for line in _text(raw).splitlines():
        f = line.split()
        if len(f) < 8:
            continue
        addr = f[1].split("@")[0]
        port = int(addr.rsplit(":", 1)[1]) if ":" in addr and addr.rsplit(":", 1)[1] else 0
        slots = []
        for s in f[8:]:
            if s.startswith("["):
                continue
            lo, _, hi = s.partition("-")
            slots.append((int(lo), int(hi or lo)))
        out[f[0]] = {"port": port, "flags": set(f[2].split(",")), "master": f[3],
                     "epoch": int(f[6]), "slots": sorted(slots), "link": f[7]}
    return out


def info(client, section):
    """INFO section as redis-py parses it (numbers as ints, `slaveN` as dicts)."""
    return client.info(section)


class Node:
    """One redis-server in cluster mode with the module loaded."""

    def __init__(self, port, bus_port, workdir, module_args, extra, env, node_timeout_ms,
                 server=None, module=None):
        self.port, self.bus_port = port, bus_port
        self.dir = os.path.join(workdir, str(port))
        os.makedirs(self.dir, exist_ok=True)
        self.log = os.path.join(self.dir, "redis.log")
        cmd = [server or REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
               "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
               "--cluster-config-file", "nodes.conf",
               "--cluster-node-timeout", str(node_timeout_ms),
               "--dir", self.dir, "--logfile", self.log, "--save", "", "--appendonly", "no",
               # The default 5 s delay before a diskless full sync would be the
               # longest part of forming the cluster and of every failover.
               "--repl-diskless-sync-delay", "0",
               "--loadmodule", module or MODULE, *map(str, module_args), *map(str, extra)]
        full_env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        full_env.update(env or {})
        # Own session: Ctrl-C reaches the CLI, which then stops the nodes in order.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=full_env, start_new_session=True)
        self._client = None

    def client(self, **kw):
        """A plain (non-cluster) client of this node: no retries, so a
        dropped reply shows."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        return redis.Redis(port=self.port, socket_timeout=kw.pop("socket_timeout", 30),
                           retry=Retry(NoBackoff(), 0), **kw)

    @property
    def r(self):
        if self._client is None:
            self._client = self.client(socket_timeout=10)
        return self._client

    def ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"node {self.port} exited with {self.proc.returncode}: "
                                 f"{self.log_text()[-2000:]}")
        try:
            return self.client(socket_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def node_id(self):
        return _text(self.r.execute_command("CLUSTER", "MYID"))

    def nodes(self):
        return parse_nodes(self.r.execute_command("CLUSTER", "NODES"))

    def role(self):
        return _text(self.r.execute_command("ROLE")[0])

    def cluster_info(self):
        return info_text_map(self.r.execute_command("CLUSTER", "INFO"))

    def log_text(self):
        return read_log(self.log)

    def stop(self):
        if self._client is not None:
            self._client.close()
            self._client = None
        stop_process(self.proc)


def info_text_map(raw):
    return dict(line.split(":", 1) for line in _text(raw).splitlines() if ":" in line)


def slot_ranges(masters):
    """16384 slots cut into `masters` contiguous ranges, as redis-cli does."""
    per = SLOTS / masters
    return [(round(i * per), round((i + 1) * per) - 1) for i in range(masters)]


class Cluster:
    """masters x (1 + replicas) nodes on loopback, formed and in sync.

    ports: None picks free ports (tests); an int N uses N, N+1, ... with
    bus ports N+10000, ... (the CLI). Nodes [0, masters) start as masters,
    the rest as replicas, replica i of master i % masters."""

    def __init__(self, masters=3, replicas=1, upstream_url=None, module_args=(), extra=(),
                 env=None, port=None, workdir=None, node_timeout_ms=3000, server=None,
                 module=None):
        self.n_masters = masters
        self.node_timeout_ms = node_timeout_ms
        self._elected = {}  # port -> monotonic time this node last won an election
        total = masters * (1 + replicas)
        self.own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="aicache-cluster-")
        os.makedirs(self.dir, exist_ok=True)
        args = list(module_args)
        if upstream_url:
            args += ["upstream-url", upstream_url]
        self.nodes = []
        try:
            for i in range(total):
                p, bus = (port + i, port + i + 10000) if port else (free_port(), free_port())
                self.nodes.append(Node(p, bus, self.dir, args, extra, env, node_timeout_ms,
                                       server=server, module=module))
            for n in self.nodes:
                wait_for(n.ready, timeout=20, what=f"node {n.port} to answer")
            self._form(masters)
        except BaseException:
            self.stop()
            raise

    # -- forming -----------------------------------------------------------

    def _form(self, masters):
        ms, reps = self.nodes[:masters], self.nodes[masters:]
        ids = {n.port: n.node_id() for n in self.nodes}
        for i, (m, (lo, hi)) in enumerate(zip(ms, slot_ranges(masters))):
            # Distinct epochs up front, so no epoch-collision round is needed.
            m.r.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            m.r.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        first = self.nodes[0]
        for n in self.nodes[1:]:
            first.r.execute_command("CLUSTER", "MEET", "127.0.0.1", n.port, n.bus_port)

        def all_known():
            for n in self.nodes:
                view = n.nodes()
                if set(view) != set(ids.values()):
                    return False
                if any(v["flags"] & {"handshake", "noaddr", "fail", "fail?"} for v in view.values()):
                    return False
            return True
        wait_for(all_known, timeout=30, what="every node to know every other")
        for i, rep in enumerate(reps):
            rep.r.execute_command("CLUSTER", "REPLICATE", ids[ms[i % masters].port])
        self.wait_stable()

    def wait_stable(self, timeout=30):
        """Until every node reports cluster_state:ok, all nodes agree on who
        serves which slots and who replicates whom, and every replica's link
        is up with its offset equal to its master's."""
        wait_for(self.stable, timeout=timeout, what="cluster to be ok, agreed and in sync")

    def stable(self):
        views, epochs = [], set()
        for n in self.live_nodes():
            try:
                ci = n.cluster_info()
                if ci.get("cluster_state") != "ok":
                    return False
                epochs.add(ci.get("cluster_current_epoch"))
                view = n.nodes()
            except redis.RedisError:
                return False
            views.append({k: (("master" if "master" in v["flags"] else "slave"),
                              v["master"], v["epoch"], tuple(v["slots"]))
                          for k, v in view.items() if "fail" not in v["flags"]})
        if any(v != views[0] for v in views[1:]):
            return False
        # After a TAKEOVER (an epoch bump without agreement) the next
        # failover can lose its election to an equal epoch: wait until every
        # node has the same current epoch and masters' epochs are distinct.
        master_epochs = [e for role, _, e, _ in views[0].values() if role == "master"]
        if len(epochs) != 1 or len(set(master_epochs)) != len(master_epochs):
            return False
        covered = sum(hi - lo + 1 for role, _, _, slots in views[0].values() if role == "master"
                      for lo, hi in slots)
        if covered != SLOTS:
            return False
        return all(self._in_sync(rep) for rep in self.replicas())

    def _in_sync(self, rep):
        try:
            ri = info(rep.r, "replication")
            if ri.get("role") != "slave" or ri.get("master_link_status") != "up":
                return False
            if ri.get("master_sync_in_progress") != 0:
                return False
            master = self.by_port(int(ri["master_port"]))
            mi = info(master.r, "replication")
        except (redis.RedisError, KeyError):
            return False
        # The master's view of this replica: online, and at the master's offset.
        return any(isinstance(v, dict) and v.get("port") == rep.port
                   and v.get("state") == "online" and v.get("offset") == mi["master_repl_offset"]
                   for k, v in mi.items() if k.startswith("slave"))

    # -- topology ----------------------------------------------------------

    def live_nodes(self):
        return [n for n in self.nodes if n.proc.poll() is None]

    def by_port(self, port):
        return next(n for n in self.nodes if n.port == port)

    def masters(self):
        return [n for n in self.live_nodes() if n.role() == "master"]

    def replicas(self):
        return [n for n in self.live_nodes() if n.role() == "slave"]

    def master_for_slot(self, slot):
        view = self.live_nodes()[0].nodes()
        for v in view.values():
            if "master" in v["flags"] and any(lo <= slot <= hi for lo, hi in v["slots"]):
                return self.by_port(v["port"])
        raise AssertionError(f"no master serves slot {slot}")

    def replica_of(self, master):
        mid = master.node_id()
        view = master.nodes()
        for v in view.values():
            if v["master"] == mid and "fail" not in v["flags"]:
                return self.by_port(v["port"])
        raise AssertionError(f"node {master.port} has no replica")

    def startup_nodes(self):
        from redis.cluster import ClusterNode
        return [ClusterNode("127.0.0.1", n.port) for n in self.live_nodes()]

    def client(self, **kw):
        from redis.cluster import RedisCluster
        return RedisCluster(startup_nodes=self.startup_nodes(), **kw)

    # -- events ------------------------------------------------------------

    def failover(self, replica, *options, timeout=30, settle=True):
        """CLUSTER FAILOVER on replica; returns (seconds until it reports
        itself master, seconds until the old master reports itself a
        replica and, with settle, the whole cluster is stable again). Under
        a write load offsets never meet: pass settle=False and call
        wait_stable() once the load stops. A failover that does not happen
        (CLUSTER FAILOVER without FORCE gives up after 5 s when the master
        does not answer) fails the wait."""
        old_master = self.by_port(int(info(replica.r, "replication")["master_port"]))
        if "TAKEOVER" not in [o.upper() for o in options]:
            # Redis keeps a replica's election state (votes, epoch) for
            # 4 x cluster-node-timeout; a replica that won an election more
            # recently than that and is asked again "wins" at once with its
            # stale epoch, loses to its master's newer one and turns back
            # (seen on 7.0.15). That is Redis's timer, so wait it out.
            left = self._elected.get(replica.port, -1e9) + 4 * self.node_timeout_ms / 1000 \
                - time.monotonic()
            if left > 0:
                time.sleep(left)
        t0 = time.monotonic()
        replica.r.execute_command("CLUSTER", "FAILOVER", *options)
        wait_for(lambda: replica.role() == "master", timeout=timeout,
                 what=f"node {replica.port} to become master")
        promoted = time.monotonic() - t0
        if "TAKEOVER" not in [o.upper() for o in options]:
            self._elected[replica.port] = time.monotonic()
        wait_for(lambda: old_master.role() == "slave", timeout=timeout,
                 what=f"node {old_master.port} to become a replica")
        if settle:
            self.wait_stable(timeout)
        return promoted, time.monotonic() - t0

    def config_set(self, *pairs):
        for n in self.live_nodes():
            n.r.execute_command("CONFIG", "SET", *pairs)

    def flushall(self):
        for n in self.masters():
            n.r.flushall()
        wait_for(lambda: all(self._in_sync(r) for r in self.replicas()), timeout=30,
                 what="replicas to catch up after FLUSHALL")

    def stop(self):
        for n in self.nodes:
            n.stop()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def describe(self):
        lines = []
        for m in sorted(self.masters(), key=lambda n: n.port):
            slots = next(v["slots"] for v in m.nodes().values() if v["port"] == m.port)
            reps = [str(r.port) for r in self.replicas()
                    if info(r.r, "replication").get("master_port") == m.port]
            rng = " ".join(f"{lo}-{hi}" for lo, hi in slots)
            lines.append(f"  master 127.0.0.1:{m.port}  slots {rng}  replica {', '.join(reps)}")
        return "\n".join(lines)


# -- CLI -------------------------------------------------------------------

def _state_file(port):
    return os.path.join(tempfile.gettempdir(), f"aicache-cluster-{port}.json")


def cmd_up(a):
    state = _state_file(a.port)
    if os.path.exists(state):
        sys.exit(f"{state} exists: a cluster on port {a.port} may be running "
                 f"(`python tests/cluster.py down --port {a.port}`)")
    workdir = a.dir or tempfile.mkdtemp(prefix=f"aicache-cluster-{a.port}-")
    demo = None
    url = a.upstream_url
    if not url:
        demo = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "fake_upstream.py"),
                                 "--port", str(a.demo_port)], start_new_session=True,
                                stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{a.demo_port}/v1"

    def on_signal(_signum, _frame):
        raise KeyboardInterrupt
    # Set explicitly: a shell starting this in the background ignores SIGINT.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    c = None
    try:
        print(f"aicache cluster: starting {a.masters} masters x {1 + a.replicas} nodes "
              f"on ports {a.port}-{a.port + a.masters * (1 + a.replicas) - 1}, "
              f"upstream {url}", flush=True)
        c = Cluster(masters=a.masters, replicas=a.replicas, upstream_url=url, port=a.port,
                    workdir=workdir, env=None if not os.environ.get("OPENAI_API_KEY") else
                    {"OPENAI_API_KEY": os.environ["OPENAI_API_KEY"]})
        with open(state, "w") as f:
            json.dump({"pid": os.getpid(), "dir": workdir,
                       "pids": [n.proc.pid for n in c.nodes] + ([demo.pid] if demo else [])}, f)
        print(c.describe())
        print(f"""aicache cluster: ready (logs in {workdir}). Connect with
  redis-cli -c -p {a.port}
  redis-cli -c -p {a.port} EMBCACHE.FETCH docs text-embedding-3-small 1 'hello' FORMAT JSON
  python: redis.cluster.RedisCluster(host='127.0.0.1', port={a.port})
Ctrl-C stops it.""", flush=True)
        while True:
            dead = [n.port for n in c.nodes if n.proc.poll() is not None]
            if dead:
                print(f"aicache cluster: node(s) {dead} exited; see {workdir}", flush=True)
            if demo and demo.poll() is not None:
                print("aicache cluster: the demo upstream exited", flush=True)
                demo = None
            time.sleep(1)  # a status poll for the person watching, not a sync
    except KeyboardInterrupt:
        print("\naicache cluster: stopping", flush=True)
    finally:
        if c is not None:
            c.stop()
        if demo is not None:
            stop_process(demo)
        if os.path.exists(state):
            os.remove(state)
        if not a.dir and not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def cmd_down(a):
    state = _state_file(a.port)
    try:
        with open(state) as f:
            st = json.load(f)
    except FileNotFoundError:
        sys.exit(f"no cluster recorded on port {a.port} ({state} missing)")
    # The `up` process stops its own children when it gets SIGTERM; the
    # recorded pids are only signalled if it is gone.
    try:
        os.kill(st["pid"], signal.SIGTERM)
        wait_for(lambda: not os.path.exists(state), timeout=30, what="`up` to stop the cluster")
    except ProcessLookupError:
        for pid in st["pids"]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        os.remove(state)
    print(f"aicache cluster on port {a.port}: stopped")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster and stay in the foreground")
    up.add_argument("--port", type=int, default=7000, help="first node's port")
    up.add_argument("--masters", type=int, default=3)
    up.add_argument("--replicas", type=int, default=1, help="replicas per master")
    up.add_argument("--upstream-url", default=os.environ.get("UPSTREAM_URL") or None)
    up.add_argument("--demo-port", type=int, default=8089,
                    help="port of the demo upstream started when no upstream URL is given")
    up.add_argument("--dir", help="work dir (kept); default a temp dir removed at exit")
    up.add_argument("--keep", action="store_true", help="keep the temp work dir and logs")
    down = sub.add_parser("down", help="stop a cluster started by `up`")
    down.add_argument("--port", type=int, default=7000)
    a = ap.parse_args()
    if a.cmd == "up" and a.masters < 3:
        # A failover needs a majority of masters to vote.
        ap.error("--masters must be at least 3")
    (cmd_up if a.cmd == "up" else cmd_down)(a)


if __name__ == "__main__":
    main()
