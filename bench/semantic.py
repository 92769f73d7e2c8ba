"""Issue 12 benchmarks: the semantic cache. Entries are stored with
`LLMCACHE.SET ... VECTOR` (1536-d random unit vectors, one context), query
prompts have their embeddings cached, so every figure is the module's own
lookup path: queue, shortlist, exact scoring against the sidecars, reply.

    .venv/bin/python bench/semantic.py      # prints the markdown section
"""
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from fills import pct  # noqa: E402
from helpers import Server, info_fields, wait_for  # noqa: E402

DIMS = 1536
MODEL = "text-embedding-3-small"
NS = "sem"
ANSWER = json.dumps({"id": "x", "object": "chat.completion", "model": "gpt-x", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "An answer of a typical length. " * 8},
     "finish_reason": "stop"}], "usage": {"prompt_tokens": 20, "completion_tokens": 60,
                                          "total_tokens": 80}})


def req(text):
    return json.dumps({"model": "gpt-x", "temperature": 0, "messages": [
        {"role": "system", "content": "You answer questions about our product."},
        {"role": "user", "content": text}]})


def units(rng, n):
    v = rng.standard_normal((n, DIMS)).astype("<f4")
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def populate(c, start, vecs, with_vector=True, ns=NS):
    p = c.pipeline(transaction=False)
    for i, v in enumerate(vecs):
        args = ["LLMCACHE.SET", ns, req(f"stored question {start + i}"), ANSWER, "EX", 86400]
        if with_vector:
            args += ["VECTOR", v.astype("<f4").tobytes()]
        p.execute_command(*args)
        if i % 500 == 499:
            p.execute()
    p.execute()


def queries(c, rng, stored, n, tag):
    """n prompts whose cached embeddings are near stored entries (cosine
    about 0.95): each FETCH SIMILAR 0.9 is a hit."""
    picks = rng.integers(0, len(stored), n)
    noise = units(rng, n) * 0.33
    q = stored[picks] + noise
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    texts = [f"query {tag} {i}" for i in range(n)]
    p = c.pipeline(transaction=False)
    for t, v in zip(texts, q):
        p.execute_command("EMBCACHE.SET", NS, MODEL, t, v.astype("<f4").tobytes())
    p.execute()
    return texts


def latencies(c, texts, *opts):
    out = []
    for t in texts:
        s = time.perf_counter()
        r = c.execute_command("LLMCACHE.FETCH", NS, req(t), *opts)
        out.append((time.perf_counter() - s) * 1000)
        assert r is not None
    return out


def _lookups(port, texts, k, workers, stop):
    import redis
    c = redis.Redis(port=port)
    i = k
    while not stop.is_set():
        c.execute_command("LLMCACHE.FETCH", NS, req(texts[i % len(texts)]), "SIMILAR", "0.9")
        i += workers


def ping_during(s, c, texts, workers):
    """PING p50/p99 on its own connection while `workers` other processes
    run back-to-back lookups (processes: a Python thread would put its own
    GIL into the PING times), and the lookups/s they reached."""
    import multiprocessing as mp
    stop = mp.Event()
    procs = [mp.Process(target=_lookups, args=(s.port, texts, k, workers, stop))
             for k in range(workers)]
    before = info_fields(c)["semantic_lookups"]
    for p in procs:
        p.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    pings = []
    for _ in range(3000):
        t1 = time.perf_counter()
        c.ping()
        pings.append((time.perf_counter() - t1) * 1000)
    rate = (info_fields(c)["semantic_lookups"] - before) / (time.perf_counter() - t0 + 0.5)
    stop.set()
    for p in procs:
        p.join()
    return pct(pings, 50), pct(pings, 99), rate


def idle_ping(c, n=2000):
    pings = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.ping()
        pings.append((time.perf_counter() - t0) * 1000)
    return pct(pings, 50), pct(pings, 99)


def bytes_per_entry(rng, n=10_000):
    s = Server(extra=["--maxmemory-policy", "noeviction"])
    try:
        c = s.client()
        vecs = units(rng, n)
        base = c.info("memory")["used_memory"]
        populate(c, 0, vecs, with_vector=False, ns="exact")
        exact = (c.info("memory")["used_memory"] - base) / n
        c.flushall()
        base = c.info("memory")["used_memory"]
        populate(c, 0, vecs, with_vector=True, ns="exact")
        wait_for(lambda: info_fields(c)["semantic_entries"] == n, timeout=60, what="indexed")
        both = (c.info("memory")["used_memory"] - base) / n
        index = info_fields(c)["semantic_index_bytes"] / n
        return exact, both, index
    finally:
        s.stop()


def run():
    rng = np.random.default_rng(12)
    rows = []
    s = Server(extra=["--maxmemory-policy", "noeviction"])
    try:
        c = s.client()
        stored = np.zeros((0, DIMS), dtype="<f4")
        for n in (10_000, 100_000):
            add = units(rng, n - len(stored))
            t0 = time.perf_counter()
            populate(c, len(stored), add)
            stored = np.vstack([stored, add])
            wait_for(lambda: info_fields(c)["semantic_entries"] == n, timeout=300, what="indexed")
            load_s = time.perf_counter() - t0
            texts = queries(c, rng, stored, 400, f"n{n}")
            latencies(c, texts[:50], "SIMILAR", "0.9", "NOSTORE")  # warm-up
            hit = latencies(c, texts[50:], "SIMILAR", "0.9", "NOSTORE")
            lst = []
            for t in texts[50:150]:
                t1 = time.perf_counter()
                c.execute_command("LLMCACHE.SIMILAR", NS, req(t), "COUNT", 10)
                lst.append((time.perf_counter() - t1) * 1000)
            # Baseline: the same request's exact hit (main thread, no search).
            exact = []
            r0 = req("stored question 7")
            for _ in range(350):
                t1 = time.perf_counter()
                c.execute_command("LLMCACHE.FETCH", NS, r0)
                exact.append((time.perf_counter() - t1) * 1000)
            f = info_fields(c)
            assert f["semantic_hits"] >= 350, f["semantic_hits"]
            idle = idle_ping(c)
            busy = [ping_during(s, c, texts, w) for w in (1, 2)]
            rows.append((n, load_s, hit, lst, exact, idle, busy))
        # Rebuild after restart (DEBUG RELOAD: RDB save and load) at 100k.
        before = info_fields(c)["semantic_rebuilds"]
        t0 = time.perf_counter()
        c.execute_command("DEBUG", "RELOAD")
        reload_s = time.perf_counter() - t0

        def rebuilt():
            f = info_fields(c)
            return (f["semantic_rebuilds"] > before and f["semantic_rebuilding"] == 0
                    and f["semantic_entries"] == len(stored))
        wait_for(rebuilt, timeout=600, what="the index rebuilt")
        ready_s = time.perf_counter() - t0
        rebuild_ms = info_fields(c)["semantic_rebuild_ms"]
        after = latencies(c, queries(c, rng, stored, 100, "after"), "SIMILAR", "0.9", "NOSTORE")
    finally:
        s.stop()
    exact_b, both_b, index_b = bytes_per_entry(rng)
    out = ["## Semantic cache benchmarks (issue 12)", "",
           "Command: `make bench` (section from `.venv/bin/python bench/semantic.py`). "
           f"Machine: {os.cpu_count()} cores. One context, 1536-d random unit vectors stored with "
           "`LLMCACHE.SET ... VECTOR`; each query's embedding is cached and lies at cosine ~0.95 "
           "from one stored entry, so every `FETCH ... SIMILAR 0.9` is a hit. One client, "
           "sequential round trips; the baseline is the exact hit of the same server.", "",
           "| entries | FETCH SIMILAR hit p50 / p99 | SIMILAR COUNT 10 p50 / p99 | exact hit p50 / p99 (baseline) | PING p50 / p99 idle | PING p50 / p99 during 1 client's back-to-back lookups | same, 2 clients | load (SET VECTOR + index) |",
           "|---|---|---|---|---|---|---|---|"]
    for n, load_s, hit, lst, exact, idle, busy in rows:
        out.append(f"| {n:,} | {pct(hit, 50):.2f} / **{pct(hit, 99):.2f} ms** | "
                   f"{pct(lst, 50):.2f} / {pct(lst, 99):.2f} ms | "
                   f"{pct(exact, 50):.3f} / {pct(exact, 99):.3f} ms | "
                   f"{idle[0]:.3f} / {idle[1]:.3f} ms | "
                   + " | ".join(f"{b[0]:.3f} / **{b[1]:.3f} ms** ({b[2]:,.0f} lookups/s)"
                                for b in busy)
                   + f" | {load_s:.1f} s |")
    out += ["",
            f"- Memory per entry (N = 10,000, used_memory delta / N, answer of {len(ANSWER)} B): "
            f"exact entry alone **{exact_b:,.0f} B**; with its 1536-d sidecar **{both_b:,.0f} B** "
            f"(**{both_b / exact_b:.1f}x**), of which the in-memory index is {index_b:,.0f} B "
            "(one sign bit per dimension, the key and map slots).",
            f"- Rebuild after restart at {len(stored):,} entries (`DEBUG RELOAD`): the reload itself "
            f"took {reload_s:.1f} s; the index was complete {ready_s:.1f} s after the reload began "
            f"(module's own `semantic_rebuild_ms` {rebuild_ms:,} ms). Hit p50 / p99 right after: "
            f"{pct(after, 50):.2f} / {pct(after, 99):.2f} ms.",
            "- Targets: lookup p99 <= 20 ms at 100k off the main thread; PING p99 < 2 ms during "
            "lookups.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(run())
