"""Cluster failover soak: rounds of CLUSTER FAILOVER (plain, FORCE, TAKEOVER)
on the shards of a 3-master, 3-replica loopback cluster, in turn, while raw-socket
clients (FETCH pipelined with ECHO, following MOVED) and redis-py
RedisCluster clients keep fetching from it: half hits, half fresh misses
against a fake upstream with 20-50 ms latency. Every request must get
exactly one reply (a vector, or an error such as MOVED or UNBLOCKED), no
reply may go missing or arrive out of order, and no node may panic.

    .venv/bin/python bench/cluster_failover.py [--rounds 9] [--workers 32]
                                               [--rc-workers 8] [--settle 300]

Prints a markdown section; exits 1 on a lost, hung or misframed reply.
The short version of this runs in tests/test_cluster.py.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from cluster import Cluster  # noqa: E402
from conftest import API_KEY  # noqa: E402
from helpers import REDIS_SERVER, Upstream, info_fields, key_slot  # noqa: E402
from test_cluster import names_per_master, run_failover_load  # noqa: E402

MODES = [(), ("FORCE",), ("TAKEOVER",)]


def run():
    """The section for bench/run.py (markdown)."""
    return soak()[0]


def soak(rounds=9, workers=32, rc_workers=8, settle=300):
    """(markdown, passed)."""
    t0 = time.time()
    up = Upstream()
    c = Cluster(upstream_url=up.url, env={"OPENAI_API_KEY": API_KEY},
                module_args=["upstream-backoff-base-ms", 5, "upstream-backoff-cap-ms", 50])
    rows, totals, problems, examples = [], {}, [], {}
    sent = replies = 0
    promoted, demoted = [], []
    try:
        # One namespace per shard, taken in turn: a node is promoted again
        # only every 2 x shards rounds (see Cluster.failover on why that matters).
        spaces = [names[0] for names in names_per_master(c, "soak", per_master=1).values()]
        for i in range(rounds):
            ns = spaces[i % len(spaces)]
            mode = MODES[(i // len(spaces)) % len(MODES)]
            load, old, new, (t_prom, t_dem) = run_failover_load(
                c, up, ns, workers=workers, rc_workers=rc_workers, settle_requests=settle,
                options=mode)
            c.wait_stable()
            assert c.master_for_slot(key_slot(ns.encode())).port == new.port
            promoted.append(t_prom)
            demoted.append(t_dem)
            problems += load.problems
            sent += load.sent
            replies += load.replies()
            for k, v in load.outcomes.items():
                totals[k] = totals.get(k, 0) + v
            for k, v in load.examples.items():
                examples.setdefault(k, v)
            errors = ", ".join(f"{k} {v}" for k, v in sorted(load.outcomes.items())
                               if k not in ("value", "rc:value")) or "none"
            cmd = " ".join(("CLUSTER", "FAILOVER") + mode)
            rows.append(f"| {i + 1} | {i % len(spaces) + 1} | `{cmd}` | {load.sent:,} | {load.replies():,} | "
                        f"{load.outcomes.get('value', 0) + load.outcomes.get('rc:value', 0):,} | "
                        f"{errors} | {len(load.problems)} | {t_prom * 1e3:.0f} ms | "
                        f"{t_dem * 1e3:.0f} ms |")
        panics = {n.port: (info_fields(n.r)["handler_panics"], info_fields(n.r)["worker_panics"])
                  for n in c.live_nodes()}
        dead = [n.port for n in c.nodes if n.proc.poll() is not None]
    finally:
        c.stop()
        up.stop()
    version = subprocess.run([REDIS_SERVER, "--version"], capture_output=True,
                             text=True).stdout.split()[2]
    ok = not problems and not dead and not any(a or b for a, b in panics.values())
    errs = ", ".join(f"{k} {v}" for k, v in sorted(totals.items())
                     if k not in ("value", "rc:value")) or "none"
    out = f"""## Cluster failover soak

Command: `.venv/bin/python bench/cluster_failover.py` ({rounds} rounds, {workers} raw-socket \
clients + {rc_workers} RedisCluster clients on the shard being failed over, half hits and half \
fresh misses, fake upstream 20-50 ms). Server: {os.path.basename(REDIS_SERVER)} {version}, \
3 masters + 3 replicas on loopback. Each round fails one shard's master over to its replica \
(shards in turn) and runs until {settle} vectors came from the new master. This section took \
{time.time() - t0:.0f} s.
"Errors" are replies, not losses: `MOVED` from the demoted master; for a call blocked on the
master when it turns replica, `UNBLOCKED` (Redis answers it so, then closes the connection) or
`ERR` (the module's fill failing on the demoted node); `rc:` is what redis-py's RedisCluster
raised. "Lost" counts replies that never came, came twice or out of order (each FETCH is
pipelined with an ECHO).

| round | shard | failover | requests | replies | vectors | errors by kind | lost | promoted after | old master replica after |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Total: {sent:,} requests, {replies:,} replies, {len(problems)} lost; errors {errs}.
Promotion (CLUSTER FAILOVER sent until the replica reports `ROLE` master): median \
{statistics.median(promoted) * 1e3:.0f} ms, max {max(promoted) * 1e3:.0f} ms. Old master a replica: \
median {statistics.median(demoted) * 1e3:.0f} ms. Nodes died: {len(dead)}. Panics: \
{sum(a + b for a, b in panics.values())}. **{"PASS" if ok else "FAIL"}**
"""
    if examples:
        out += "\nError texts (first of each kind):\n" + "\n".join(
            f"- {k}: `{v[:150]}`" for k, v in sorted(examples.items())) + "\n"
    if problems:
        out += "\nFirst problems:\n" + "\n".join(f"- {p}" for p in problems[:10]) + "\n"
    return out, ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--rc-workers", type=int, default=8)
    ap.add_argument("--settle", type=int, default=300)
    a = ap.parse_args()
    text, ok = soak(a.rounds, a.workers, a.rc_workers, a.settle)
    print(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
