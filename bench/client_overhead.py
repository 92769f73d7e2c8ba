"""Client package overhead (issue 10): `AICache.embed` of 100 cached
1536-d vectors against the raw `execute_command` round trip it wraps, same
server, same connection, interleaved rounds.

    .venv/bin/python bench/client_overhead.py   # prints a markdown section
"""
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "clients", "python"))
from helpers import Server  # noqa: E402

from aicache import AICache  # noqa: E402

M, DIMS, N = "text-embedding-3-small", 1536, 100


def median_s(fn, reps):
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def run(rounds=7, reps=200):
    s = Server()
    try:
        r = s.client()
        rng = np.random.default_rng(3)
        vecs = rng.standard_normal((N, DIMS)).astype("<f4")
        texts = [f"document {i}" for i in range(N)]
        args = []
        for t, v in zip(texts, vecs):
            args += [t, v.tobytes()]
        r.execute_command("EMBCACHE.MSET", "bench", M, *args)
        cache = AICache(r, "bench", model=M)
        assert np.array_equal(cache.embed(texts), vecs)

        def raw():
            return r.execute_command("EMBCACHE.FETCH", "bench", M, N, *texts)

        def raw_numpy():
            # What an app writes by hand to get the same (n, d) array.
            return np.frombuffer(b"".join(raw()), "<f4").reshape(N, DIMS)

        def client():
            return cache.embed(texts)

        assert np.array_equal(raw_numpy(), client())
        res = {"raw": [], "raw+numpy": [], "client": []}
        for _ in range(rounds):
            res["raw"].append(median_s(raw, reps))
            res["raw+numpy"].append(median_s(raw_numpy, reps))
            res["client"].append(median_s(client, reps))
    finally:
        s.stop()
    med = {k: statistics.median(v) * 1e6 for k, v in res.items()}
    return f"""## Client package overhead (issue 10)

`.venv/bin/python bench/client_overhead.py` (also run by `make bench`). `embed()` of {N} cached
{DIMS}-d vectors on one connection, median of {rounds} rounds x {reps} calls, interleaved.

| call | median per call |
|---|---|
| `r.execute_command("EMBCACHE.FETCH", ...)` (list of bytes) | {med['raw']:.0f} us |
| the same + `np.frombuffer(...).reshape(n, d)` by hand | {med['raw+numpy']:.0f} us |
| `AICache(r, ns, model).embed(texts)` | {med['client']:.0f} us |

Client / raw `execute_command`: **{med['client'] / med['raw']:.2f}x** (target <= 1.2x);
client / raw + numpy: {med['client'] / med['raw+numpy']:.2f}x.
"""


if __name__ == "__main__":
    print(run())
