"""Issue 11 benchmarks: cross-client micro-batching (a simultaneous herd of
distinct misses; a Zipf replay in bursts) and refresh-ahead over many TTL
periods. Same raw-socket epoll client as fills.py."""
import math
import os
import sys
import time

import numpy as np
import redis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from fills import Conns, pct  # noqa: E402
from helpers import Server, Upstream, info_fields, resp, wait_for  # noqa: E402

MODEL = "bench-d256"


def server(up, window_ms, workers=256, extra_args=()):
    return Server(module_args=["upstream-url", up.url, "workers", workers, "queue-size", 8192,
                               "batch-window-ms", window_ms, *extra_args],
                  extra=["--maxclients", 4000])


# 8-dimension vectors: the fake's own per-input work stays negligible, so
# latencies show the module and the 50 ms upstream, not Python hashing.
HERD_MODEL = "herd-d8"


def sequential_fetches(up, texts_per_fetch, runs, latency_ms=50):
    """p50 of `runs` FETCHes of `texts_per_fetch` new texts, one at a time,
    batching off: the uncontended baselines."""
    s = server(up, 0)
    try:
        up.reset()
        up.latency(latency_ms)
        c = s.client()
        took = []
        for r in range(runs):
            texts = [f"seq {texts_per_fetch} {r} {i}" for i in range(texts_per_fetch)]
            t = time.perf_counter()
            c.execute_command("EMBCACHE.FETCH", "seq", HERD_MODEL, len(texts), *texts)
            took.append((time.perf_counter() - t) * 1000)
        return pct(took, 50)
    finally:
        s.stop()


def herd_distinct(up, window_ms, n=200, latency_ms=50):
    """n clients each FETCH one distinct text at the same moment."""
    s = server(up, window_ms)
    try:
        up.reset()
        up.latency(latency_ms)
        conns = Conns(s.port, n)
        payloads = [resp("EMBCACHE.FETCH", "herd", HERD_MODEL, 1, f"distinct text {i}")
                    for i in range(n)]
        sent = [0.0] * n
        for i in range(n):
            conns.send(i, payloads[i])
            sent[i] = time.time()
        took = [0.0] * n

        def done(i, t):
            took[i] = (t - sent[i]) * 1000

        conns.wait_replies(n, done)
        conns.close()
        # The first client's batch cannot go before the 100th client's FETCH
        # is sent: this loop's own spread is part of every latency above.
        spread = (sent[99] - sent[0]) * 1000
        return up.calls("embeddings"), pct(took, 50), pct(took, 99), spread
    finally:
        s.stop()


def zipf_replay(up, window_ms, fetches=100_000, texts=20_000, clients=64, burst=4,
                batch_size=100, latency_ms=20, seed=11):
    """`fetches` single-text FETCHes drawn from Zipf(1.1) over `texts`
    texts, replayed as fast as the server answers by `clients` clients that
    each keep a burst of `burst` FETCHes in flight (one per connection of
    its pool): a connection sends its next FETCH when its last one is
    answered. A connection blocked on a miss takes no other command, so the
    pool is what lets one client have several misses in a batch window."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, texts + 1)
    p = 1.0 / ranks ** 1.1
    draws = rng.choice(texts, size=fetches, p=p / p.sum())
    s = server(up, window_ms, workers=64)
    try:
        up.reset()
        up.latency(latency_ms)
        n = clients * burst
        conns = Conns(s.port, n)
        nxt = 0

        def send_next(i):
            nonlocal nxt
            if nxt < fetches:
                conns.send(i, resp("EMBCACHE.FETCH", "zipf", MODEL, 1, f"text {draws[nxt]}"))
                nxt += 1

        def on_reply(i, _t):
            send_next(i)

        t0 = time.monotonic()
        for i in range(n):
            send_next(i)
        conns.wait_replies(fetches, on_reply, timeout=600)
        elapsed = time.monotonic() - t0
        conns.close()
        info = info_fields(s.client())
        unique = info["fills_started"]
        requests = up.calls("embeddings")
        return unique, requests, math.ceil(unique / batch_size), elapsed
    finally:
        s.stop()


def refresh_ahead(up, keys=1000, ttl=3, pct_ahead=30, periods=10, cycle_s=0.15):
    """Steady reads of `keys` hot keys (each read every `cycle_s`) for
    `periods` TTLs, WITHMETA, counting misses after the first pass."""
    s = Server(module_args=["upstream-url", up.url, "refresh-ahead-pct", pct_ahead,
                            "default-ttl", ttl, "ttl-jitter-pct", 10])
    try:
        up.reset()
        up.latency(20)
        c = s.client()
        texts = [f"hot {i}" for i in range(keys)]

        def read_all():
            """Each key once, 100 per FETCH: a miss costs one batched fill,
            not one blocked round trip per key."""
            misses = 0
            for start in range(0, keys, 100):
                chunk = texts[start:start + 100]
                _, metas = c.execute_command("EMBCACHE.FETCH", "hot", MODEL, len(chunk), *chunk,
                                             "WITHMETA")
                misses += sum(m[0] == b"miss" for m in metas)
            return misses

        warm = read_all()
        calls_after_warmup = up.calls("embeddings")
        misses, rounds = 0, 0
        end = time.monotonic() + periods * ttl
        while time.monotonic() < end:
            began = time.monotonic()
            misses += read_all()
            rounds += 1
            time.sleep(max(0.0, cycle_s - (time.monotonic() - began)))
        wait_for(lambda: info_fields(c)["fills_in_flight"] == 0, what="refreshes to end")
        info = info_fields(c)
        refresh_calls = up.calls("embeddings") - calls_after_warmup
        return (warm, misses, rounds * keys, refresh_calls, info["refreshes_started"],
                info["refreshes_skipped"])
    finally:
        s.stop()


def run():
    up = Upstream()
    try:
        lone = sequential_fetches(up, 1, 20)  # one miss alone
        big = sequential_fetches(up, 100, 10)  # the request a full batch makes
        off = herd_distinct(up, 0)
        on = herd_distinct(up, 5)
        zipf = {w: zipf_replay(up, w) for w in (5, 25, 100, 250)}
        warm, misses, reads, refresh_calls, started, skipped = refresh_ahead(up)
    finally:
        up.stop()
    zrows = "\n".join(
        f"| 2{'abcd'[k]} | same, `batch-window-ms {w}` | {z[1]:,} / {z[2]:,} ({z[0]:,} unique) "
        f"in {z[3]:.1f} s | | **{z[1] / z[2]:.2f}x** |" for k, (w, z) in enumerate(zipf.items()))
    return f"""## Upstream economy benchmarks (issue 11)

Command: `make bench` (bench/economy.py, from bench/run.py). Fake upstream in its own
process; module defaults unless named. Date: {time.strftime('%Y-%m-%d')}.

| # | what | measured | baseline (same run) | target |
|---|------|----------|---------------------|--------|
| 1 | 200 clients FETCH one distinct text each at the same moment, 50 ms upstream, 256 workers: upstream requests | **{on[0]}** with `batch-window-ms 5` | {off[0]} with it off (0) | <= 4 vs 200 |
| 1b | same: p50 / p99 FETCH latency (send to reply, kernel timestamps) | {on[1]:.1f} / {on[2]:.1f} ms batched | the request a full batch makes, one FETCH of 100 texts, batching off: p50 {big:.1f} ms | p50 added **{on[1] - big:+.1f} ms** <= window + 2 ms |
| 1c | same: how long this client took to send the first 100 FETCHes (a batch waits for its 100th) | {on[3]:.1f} ms | | p50 added less this: **{on[1] - big - on[3]:+.1f} ms** |
| 1d | same, other baselines | | one miss alone, batching off: p50 {lone:.1f} ms (added {on[1] - lone:+.1f} ms); the herd unbatched: {off[1]:.1f} / {off[2]:.1f} ms | (info) |
| 2 | Zipf(1.1) replay: 100,000 single-text FETCHes over 20,000 texts, 64 clients x 4 in flight each, 20 ms upstream, `batch-size 100`: upstream requests / ceil(unique misses / 100), by window | | | <= 1.2x |
{zrows}
| 3 | refresh-ahead 30%: 1,000 hot keys, TTL 3 s +/-10% jitter, each read every 150 ms for 10 TTL periods | **{misses}** misses in {reads:,} reads after warm-up ({warm} warm-up misses) | | 0 |
| 3b | same: background refreshes | {refresh_calls:,} upstream requests, {started:,} entries refreshed, {skipped} skipped | 1,000 entries x ~{10 * 3 / 2.1:.0f} refresh periods | (info) |
"""


if __name__ == "__main__":
    print(run())
