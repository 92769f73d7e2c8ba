"""Kill storm: hundreds of clients blocked in EMBCACHE.FETCH are killed at
once, round after round. Afterwards no client may stay blocked, every fill
must finish and drain (fills_in_flight, queue_depth back to 0), the orphaned
fills must still store the right vectors, and once FLUSHALL has removed those
entries used_memory must come back near where it started (the module
allocates through Redis, so anything it leaks shows in used_memory).

    .venv/bin/python bench/killstorm.py [--rounds 5] [--clients 300] [--quick]

Prints markdown rows like bench/RESULTS.md; exits 1 when the server died,
counters did not return to 0 within --settle seconds, or entries are missing
or wrong.
"""
import argparse
import os
import random
import socket
import struct
import sys
import time

import numpy as np
import redis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import helpers  # noqa: E402
from fake_upstream import vector  # noqa: E402
from helpers import Server, Upstream, info_fields  # noqa: E402

from fills import reply_len, resp  # noqa: E402
from soak import build  # noqa: E402

MODEL = "storm-d256"  # 256-d vectors from the fake, a realistic entry size
NS = "storm"
# INFO aicache counters worth showing as deltas over the whole run.
COUNTERS = ["fills_started", "coalesced_waiters", "upstream_requests", "upstream_retries",
            "queue_full_errors", "fill_capacity_errors", "wait_timeouts", "worker_panics",
            "writes_skipped"]


def expected(text):
    return np.asarray(vector(MODEL, text, 256), dtype="<f4").tobytes()


def read_replies(sock, count):
    """`count` complete RESP2 replies from a blocking socket."""
    buf, out = b"", []
    while len(out) < count:
        n = reply_len(buf) if buf else None
        if n is not None:
            out.append(buf[:n])
            buf = buf[n:]
            continue
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return out


def poll(predicate, timeout):
    """Seconds until predicate() held, or None after timeout. Polls every ms:
    the figure is the settle time, so the polling must not round it up much."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.001)
    return None


def round_texts(rnd, n, unique, shared, pool):
    """Per-client texts: `unique` seen by one client only, plus `shared` drawn
    from a pool of `pool`, so each shared text is wanted by ~n*shared/pool
    clients and most of them join another client's fill."""
    rng = random.Random(rnd)
    shared_pool = [f"r{rnd} shared text {k}" for k in range(pool)]
    out = []
    for i in range(n):
        texts = [f"r{rnd} client {i} own text {k}" for k in range(unique)]
        texts += rng.sample(shared_pool, min(shared, pool))
        rng.shuffle(texts)
        out.append(texts)
    return out


def start_calls(server, ctl, rnd, args):
    """Opens the round's clients, learns their ids, sends their FETCHes and
    waits until all are blocked; returns (sockets, ids, texts, all blocked)."""
    texts = round_texts(rnd, args.clients, args.unique, args.shared, args.shared_pool)
    socks, ids = [], []
    for _ in range(args.clients):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(resp("CLIENT", "ID"))
        socks.append(s)
    for s in socks:
        ids.append(int(read_replies(s, 1)[0][1:-2]))
    for s, t in zip(socks, texts):
        s.sendall(resp("EMBCACHE.FETCH", NS, MODEL, len(t), *t))
    # Every call has texts nobody asked for before, so every call must block.
    t_block = poll(lambda: ctl.info("clients")["blocked_clients"] == args.clients, args.settle)
    return socks, ids, texts, t_block is not None


def check_stored(ctl, texts):
    """(distinct texts, missing entries, wrong entries) for a round's texts."""
    distinct = sorted({t for ts in texts for t in ts})
    got = []
    for start in range(0, len(distinct), 500):
        got += ctl.execute_command("EMBCACHE.MGET", NS, MODEL, *distinct[start:start + 500])
    missing = sum(g is None for g in got)
    wrong = sum(g is not None and g != expected(t) for g, t in zip(got, distinct))
    return len(distinct), missing, wrong


def warm_up(server, ctl, args):
    """The same traffic with every client waiting for its reply: fills the
    upstream connection pool (up to `workers` idle connections, each with
    its buffers) and the module's maps, so used_memory after it is the
    baseline that excludes one-time growth. Returns (wrong replies, wrong entries)."""
    socks, _, texts, _ = start_calls(server, ctl, -1, args)
    wrong = 0
    for s, ts in zip(socks, texts):
        (reply,) = read_replies(s, 1)
        want = b"*%d\r\n" % len(ts) + b"".join(b"$1024\r\n" + expected(t) + b"\r\n" for t in ts)
        wrong += reply != want
        s.close()
    _, missing, bad = check_stored(ctl, texts)
    return wrong, missing + bad


def storm(server, rnd, args, ctl):
    """One round; returns a dict of what it saw."""
    socks, ids, texts, blocked = start_calls(server, ctl, rnd, args)
    out = {"blocked_reached": blocked}
    before_kill = info_fields(ctl)
    out["in_flight_at_kill"] = before_kill["fills_in_flight"]
    out["queued_at_kill"] = before_kill["queue_depth"]

    # Interleave the two ways to die so the module sees both mid-flight.
    order = list(range(args.clients))
    random.Random(rnd + 1000).shuffle(order)
    killer = socket.create_connection(("127.0.0.1", server.port))
    kills = 0
    t_killed = time.monotonic()
    for n, i in enumerate(order):
        if n % 2 == 0:
            # Abortive close: the server reads a RST, not a FIN.
            socks[i].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            socks[i].close()
        else:
            killer.sendall(resp("CLIENT", "KILL", "ID", ids[i]))
            kills += 1
    killed_ok = sum(r == b":1\r\n" for r in read_replies(killer, kills))
    killer.close()
    for s in socks:
        s.close()
    out["killed"] = (args.clients - kills, killed_ok)

    def unblocked():
        # CLIENT LIST ID names the killed clients Redis still holds.
        return (ctl.info("clients")["blocked_clients"] == 0
                and not ctl.execute_command("CLIENT", "LIST", "ID", *ids).strip())

    def drained():
        i = info_fields(ctl)
        return i["fills_in_flight"] == 0 and i["queue_depth"] == 0

    # Both times count from the first kill; both must come within --settle.
    since = lambda: time.monotonic() - t_killed  # noqa: E731
    out["unblocked_s"] = since() if poll(unblocked, args.settle - since()) is not None else None
    out["drained_s"] = since() if poll(drained, args.settle - since()) is not None else None
    # The callers are gone, but their fills must still have stored every text.
    out["distinct"], out["missing"], out["wrong"] = check_stored(ctl, texts)
    return out


def fmt_s(x):
    return "never" if x is None else f"{x * 1000:,.0f} ms"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", help="path of libaicache.so (default: target/release)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=300)
    ap.add_argument("--unique", type=int, default=2, help="texts only one client wants")
    ap.add_argument("--shared", type=int, default=2, help="texts from the shared pool per client")
    ap.add_argument("--shared-pool", type=int, default=10)
    ap.add_argument("--latency-ms", type=int, default=500)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--settle", type=float, default=30.0, help="seconds allowed to return to 0")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 100 clients")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.clients = 2, 100
    if args.module:
        helpers.MODULE = os.path.abspath(args.module)

    up = Upstream()
    server = None
    try:
        up.latency(args.latency_ms)
        server = Server(module_args=["upstream-url", up.url, "workers", args.workers,
                                     "queue-size", 4096],
                        extra=["--maxclients", max(4000, args.clients + 100)])
        res = run(server, up, args)
    finally:
        if server:
            server.stop()
        up.stop()
    print(report(args, res))
    return 0 if res["ok"] else 1


def run(server, up, args):
    ctl = server.client()
    mem = lambda: ctl.info("memory")["used_memory"]  # noqa: E731
    res = {"base_mem": mem(), "rounds": [], "mem_after": []}
    base_info = info_fields(ctl)
    res["warm_wrong"] = warm_up(server, ctl, args)
    ctl.flushall()
    res["warm_mem"] = mem()
    try:
        for rnd in range(args.rounds):
            r = storm(server, rnd, args, ctl)
            ctl.flushall()
            res["mem_after"].append(mem())
            res["rounds"].append(r)
            print(f"round {rnd}: {r}, used_memory {res['mem_after'][-1]:,}", file=sys.stderr)
        end_info = info_fields(ctl)
        res["delta"] = {k: end_info[k] - base_info[k] for k in COUNTERS}
        res["up_calls"] = up.stats()["total_calls"]
    except (ConnectionError, redis.ConnectionError) as e:
        print(f"connection lost: {e!r}", file=sys.stderr)
    res["alive"] = server.proc.poll() is None
    res["panics"] = server.log_text().lower().count("panic")
    rounds = res["rounds"]
    res["ok"] = (res["alive"] and res["panics"] == 0 and len(rounds) == args.rounds
                 and res["warm_wrong"] == (0, 0)
                 and all(r["blocked_reached"] and r["unblocked_s"] is not None
                         and r["drained_s"] is not None and r["missing"] == r["wrong"] == 0
                         and r["killed"][1] == args.clients // 2 for r in rounds)
                 and res["delta"]["worker_panics"] == 0)
    return res


def report(args, res):
    rounds = res["rounds"]
    if not rounds or "delta" not in res:
        return (f"| kill storm | died after {len(rounds)} of {args.rounds} rounds | - | FAIL |\n"
                f"| server alive | {'yes' if res['alive'] else 'NO'} | - | FAIL |")
    d = res["delta"]
    total = lambda k: sum(r[k] for r in rounds)  # noqa: E731
    worst = lambda k: max(float("inf") if r[k] is None else r[k] for r in rounds)  # noqa: E731
    ok = lambda c: "ok" if c else "FAIL"  # noqa: E731
    settled = worst("drained_s") != float("inf") and worst("unblocked_s") != float("inf")
    distinct, missing, wrong = total("distinct"), total("missing"), total("wrong")
    rst = sum(r["killed"][0] for r in rounds)
    kill_ok = sum(r["killed"][1] for r in rounds)
    ideal = -(-args.clients // args.workers) * args.latency_ms / 1000
    last, first = res["mem_after"][-1], res["mem_after"][0]
    drift = (last - first) / max(1, len(rounds) - 1)
    return f"""## Kill storm

Build: {build()}.
Command: `.venv/bin/python bench/killstorm.py --rounds {args.rounds} --clients {args.clients}`.
Upstream: `tests/fake_upstream.py`, {args.latency_ms} ms per call; model `{MODEL}`; module
`workers {args.workers}`. Each client sends `CLIENT ID`, then one `EMBCACHE.FETCH` of
{args.unique} texts of its own and {args.shared} of {args.shared_pool} shared ones; once all are
blocked, half are reset (SO_LINGER 0) and half get `CLIENT KILL ID` from a control connection.
A warm-up round of the same traffic, whose clients wait for their replies, comes first.

| what | measured | baseline | result |
|---|---|---|---|
| clients blocked, then killed | {len(rounds)} x {args.clients}: RST {rst}, `CLIENT KILL` {kill_ok} acknowledged | all blocked each round: {'yes' if all(r['blocked_reached'] for r in rounds) else 'NO'} | {ok(all(r['blocked_reached'] for r in rounds) and kill_ok == len(rounds) * (args.clients // 2))} |
| fills in flight / jobs queued when the kills began, per round | {', '.join(f"{r['in_flight_at_kill']}/{r['queued_at_kill']}" for r in rounds)} | - | (info) |
| slowest return to `blocked_clients` 0, no killed client left in `CLIENT LIST` | {fmt_s(worst('unblocked_s'))} | limit {args.settle:.0f} s | {ok(worst('unblocked_s') != float('inf'))} |
| slowest return to `fills_in_flight` 0 and `queue_depth` 0, from the kills | {fmt_s(worst('drained_s'))} | ceil({args.clients} jobs / {args.workers} workers) x {args.latency_ms} ms = {ideal:.1f} s | {ok(settled)} |
| entries the orphaned fills stored | {distinct - missing:,} of {distinct:,}, {wrong} wrong | every text of every killed call | {ok(missing == 0 and wrong == 0)} |
| warm-up: wrong replies, wrong or missing entries | {res['warm_wrong'][0]}, {res['warm_wrong'][1]} | 0, 0 | {ok(res['warm_wrong'] == (0, 0))} |
| fills started / joined / upstream requests (INFO deltas) / calls the fake saw | {d['fills_started']:,} / {d['coalesced_waiters']:,} / {d['upstream_requests']:,} / {res['up_calls']:,} | warm-up + rounds | (info) |
| queue full, capacity, timeouts, worker panics, writes skipped | {d['queue_full_errors']}, {d['fill_capacity_errors']}, {d['wait_timeouts']}, {d['worker_panics']}, {d['writes_skipped']} | 0 | {ok(d['worker_panics'] == 0)} |
| `used_memory` after the last round's FLUSHALL | {last:,} B | at start {res['base_mem']:,} B; after the warm-up's FLUSHALL {res['warm_mem']:,} B | **{last - res['base_mem']:+,} B** vs start, **{last - res['warm_mem']:+,} B** vs warm-up |
| `used_memory` drift per round after round 1, post-FLUSHALL | {drift:+,.0f} B | round 1: {first:,} B | (leak indicator) |
| server alive at the end; "panic" in its log | {'yes' if res['alive'] else 'NO'}; {res['panics']} | - | {ok(res['alive'] and res['panics'] == 0)} |
"""


if __name__ == "__main__":
    sys.exit(main())
