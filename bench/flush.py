"""FLUSH benchmarks (issue 10): how long EMBCACHE.FLUSH stalls the main
thread with 1M entries in the namespace, against the client-side recipe it
replaces (SCAN MATCH + UNLINK) on the same data in the same run; and what
the generation lookup costs a hit once a namespace has been flushed.

    .venv/bin/python bench/flush.py          # prints a markdown section
"""
import os
import socket
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import Server  # noqa: E402

M = "text-embedding-3-small"
DIMS = 8  # small vectors: the figure is about key count, not bytes


def load(r, ns, n, batch=2000):
    v = np.ones(DIMS, "<f4").tobytes()
    p = r.pipeline(transaction=False)
    for start in range(0, n, batch):
        args = []
        for i in range(start, min(n, start + batch)):
            args += [f"text {i}", v]
        p.execute_command("EMBCACHE.MSET", ns, M, *args)
        if len(p) >= 10:
            p.execute()
    p.execute()


def ping_probe(port, stop, gaps):
    """PINGs back to back on a raw socket; the slowest round trips show
    how long the main thread was busy."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while not stop.is_set():
        t = time.perf_counter()
        s.sendall(b"PING\r\n")
        buf = b""
        while not buf.endswith(b"\r\n"):
            buf += s.recv(64)
        gaps.append(time.perf_counter() - t)
    s.close()


def during(port, fn):
    """Runs fn while a PING probe runs; returns (fn seconds, max PING ms)."""
    stop, gaps = threading.Event(), []
    t = threading.Thread(target=ping_probe, args=(port, stop, gaps))
    t.start()
    while len(gaps) < 200:  # the probe is warm
        time.sleep(0.001)
    gaps.clear()
    t0 = time.perf_counter()
    fn()
    took = time.perf_counter() - t0
    stop.set()
    t.join()
    return took, max(gaps) * 1000 if gaps else float("nan")


def scan_unlink(r, match):
    cursor = 0
    while True:
        cursor, keys = r.scan(cursor, match=match, count=1000)
        if keys:
            r.unlink(*keys)
        if cursor == 0:
            return


def hit_rate(r, ns, seconds=2.0):
    """Pipelined EMBCACHE.GET hits per second on one connection."""
    p = r.pipeline(transaction=False)
    for i in range(100):
        p.execute_command("EMBCACHE.GET", ns, M, f"text {i}")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        assert all(x is not None for x in p.execute())
        p = r.pipeline(transaction=False)
        for i in range(100):
            p.execute_command("EMBCACHE.GET", ns, M, f"text {i}")
        n += 100
    return n / (time.perf_counter() - t0)


def run(n=1_000_000):
    s = Server()
    try:
        r = s.client()
        t0 = time.perf_counter()
        load(r, "big", n)
        load_s = time.perf_counter() - t0
        assert r.dbsize() >= n
        flush_s, flush_ping = during(s.port, lambda: r.execute_command("EMBCACHE.FLUSH", "big"))
        assert r.execute_command("EMBCACHE.GET", "big", M, "text 1") is None
        cmdstat = r.info("commandstats").get("cmdstat_embcache.flush", {})
        flush_us = cmdstat.get("usec_per_call", float("nan"))
        # The recipe FLUSH replaces, on the same 1M keys (generation 0 keys
        # still exist; they were only made unreachable).
        scan_s, scan_ping = during(s.port, lambda: scan_unlink(r, "aicache:emb:v1:{big}:*"))
        # A hit before and after the namespace has a generation hash.
        r.flushall()
        load(r, "hot", 100)
        base = [hit_rate(r, "hot") for _ in range(3)]
        r.execute_command("EMBCACHE.FLUSH", "other-ns")  # no effect on "hot"
        r.execute_command("EMBCACHE.FLUSH", "hot", "MODEL", "unused-model")
        load(r, "hot", 100)  # "hot" now has a generation hash; entries rewritten
        flushed = [hit_rate(r, "hot") for _ in range(3)]
    finally:
        s.stop()
    b, f = statistics.median(base), statistics.median(flushed)
    return f"""## FLUSH (issue 10)

`.venv/bin/python bench/flush.py` (also run by `make bench`). {n:,} entries in one
namespace (loaded in {load_s:.0f} s); a raw-socket PING probe runs back to back during each step.

| step | wall time | server time per call | slowest PING during it |
|---|---|---|---|
| `EMBCACHE.FLUSH big` | {flush_s * 1000:.2f} ms | {flush_us:.1f} us | {flush_ping:.2f} ms |
| SCAN MATCH + UNLINK of the same keys (client-side recipe) | {scan_s:.1f} s | - | {scan_ping:.2f} ms |

FLUSH is O(1): it bumps one hash field, so its main-thread time does not grow with
the namespace ({scan_s / flush_s:,.0f}x less wall time than the recipe).

Generation lookup on hits (pipelined `EMBCACHE.GET`, one connection, median of 3 x 2 s):
never-flushed namespace {b:,.0f}/s, flushed namespace (generation hash present) {f:,.0f}/s,
ratio **{f / b:.2f}**.
"""


if __name__ == "__main__":
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
