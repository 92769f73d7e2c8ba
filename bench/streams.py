"""Streaming benchmarks (issue 9): one upstream call for a herd of identical
streamed requests, time to first token through the module against the
upstream itself, PING latency while streams run, and Redis memory per
streamed answer while its Stream lingers and after it expires.

    .venv/bin/python bench/streams.py        # prints a markdown section
"""
import http.client
import json
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import Server, Upstream, info_fields, wait_for  # noqa: E402

CHUNKS, DELAY_MS = 200, 10


def req(text):
    return json.dumps({"model": "gpt-bench", "messages": [{"role": "user", "content": text}]})


def read_until(c, key, ns="chat", last="0", want=None):
    """Entries up to the end entry (or `want` chunks); the time each arrived."""
    got = []
    while True:
        entries = c.execute_command("LLMCACHE.READ", ns, key, last, "BLOCK", 10000)
        now = time.perf_counter()
        for entry_id, fields in entries or []:
            last = entry_id.decode()
            got.append((now, fields[0]))
            if fields[0] == b"end" or (want and len(got) >= want):
                return got


def herd(s, up, n=100):
    up.reset()
    up.stream(chunks=CHUNKS, delay_ms=DELAY_MS)
    body = req("herd")
    barrier = threading.Barrier(n)
    ends, keys = [], set()

    def one():
        c = s.client()
        barrier.wait()
        _, key = c.execute_command("LLMCACHE.STREAM", "chat", body)
        keys.add(key)
        ends.append(read_until(c, key)[-1][1])

    ts = [threading.Thread(target=one) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return up.calls(), len(keys), sum(e == b"end" for e in ends)


def direct_ttft(up, text):
    """Time to the first content chunk straight from the upstream."""
    host, port = up.url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port))
    body = json.dumps({"model": "gpt-bench", "messages": [{"role": "user", "content": text}],
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    while True:
        line = resp.fp.readline()
        if line.startswith(b"data: "):
            t = time.perf_counter() - t0
            conn.close()
            return t


def module_ttft(c, text):
    t0 = time.perf_counter()
    _, key = c.execute_command("LLMCACHE.STREAM", "chat", req(text), "NOSTORE")
    first = read_until(c, key, want=1)[0][0]
    read_until(c, key)  # let the fill end before the next sample
    return first - t0


def ttft(s, up, n=30):
    up.reset()
    up.stream(chunks=5, delay_ms=DELAY_MS)
    c = s.client()
    direct, ours = [], []
    for i in range(n):  # interleaved so drift hits both alike
        direct.append(direct_ttft(up, f"ttft direct {i}"))
        ours.append(module_ttft(c, f"ttft module {i}"))
    return statistics.median(ours) * 1e3, statistics.median(direct) * 1e3


def late_joiner(s, up, reps=5):
    """A joiner arriving once 100 chunks are in: time to receive all 100."""
    up.reset()
    up.stream(chunks=CHUNKS, delay_ms=DELAY_MS)
    c, j = s.client(), s.client()
    samples = []
    for i in range(reps):
        body = req(f"late {i}")
        _, key = c.execute_command("LLMCACHE.STREAM", "chat", body, "NOSTORE")
        wait_for(lambda: c.xlen(key) >= 101, timeout=30, what="100 chunks")
        t0 = time.perf_counter()
        _, k2 = j.execute_command("LLMCACHE.STREAM", "chat", body, "NOSTORE")
        got = j.execute_command("LLMCACHE.READ", "chat", k2, "0", "COUNT", 100)
        samples.append(time.perf_counter() - t0)
        assert len(got) == 100 and k2 == key
        read_until(c, key)
    return statistics.median(samples) * 1e3


def ping_p99(port, seconds):
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")
    lat = []
    end = time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        s.sendall(b"PING\r\n")
        f.readline()
        lat.append(time.perf_counter() - t)
        time.sleep(0.001)
    s.close()
    lat.sort()
    return lat[int(len(lat) * 0.99)] * 1e3, len(lat)


def pings_while_streaming(s, up, n=200):
    up.reset()
    base, _ = ping_p99(int(s.port), 2)
    up.stream(chunks=CHUNKS, delay_ms=DELAY_MS)
    c = s.client()
    keys = [c.execute_command("LLMCACHE.STREAM", "chat", req(f"load {i}"), "NOSTORE")[1]
            for i in range(n)]
    wait_for(lambda: info_fields(c)["fills_in_flight"] == n or
             all(c.exists(k) for k in keys[:5]), what="streams to run")
    loaded, samples = ping_p99(int(s.port), 1.5)
    running = info_fields(c)["fills_in_flight"]
    wait_for(lambda: info_fields(c)["fills_in_flight"] == 0, timeout=120, what="streams to end")
    ended = sum(b"end" in c.xrevrange(k, "+", "-", count=1)[0][1] for k in keys)
    return loaded, base, samples, running, ended


def memory(s, up, n=50):
    up.reset()
    up.stream(chunks=CHUNKS, delay_ms=0)
    c = s.client()
    c.config_set("aicache.stream-linger-ms", 3000)
    c.flushall()
    before = c.info("memory")["used_memory"]
    keys = []
    for i in range(n):
        _, key = c.execute_command("LLMCACHE.STREAM", "chat", req(f"mem {i}"), "NOSTORE")
        keys.append(key)
    wait_for(lambda: info_fields(c)["fills_in_flight"] == 0, timeout=60, what="streams to end")
    per_key = statistics.mean(c.memory_usage(k, samples=0) for k in keys)
    lingering = (c.info("memory")["used_memory"] - before) / n
    wait_for(lambda: not any(c.exists(k) for k in keys), timeout=30, what="streams to expire")
    after = (c.info("memory")["used_memory"] - before) / n
    return per_key, lingering, after, c.dbsize()


def run():
    t0 = time.time()
    up = Upstream()
    s = Server(module_args=["upstream-url", up.url, "workers", "256", "queue-size", "1024"])
    try:
        calls, distinct, ended = herd(s, up)
        ours, direct = ttft(s, up)
        late = late_joiner(s, up)
        loaded, base, samples, running, ended200 = pings_while_streaming(s, up)
        per_key, lingering, after, left = memory(s, up)
    finally:
        s.stop()
        up.stop()
    return f"""## Streaming benchmarks (issue 9)

Command: `make bench` (= `.venv/bin/python bench/run.py`, which runs `bench/streams.py`; it
also runs on its own). The fake upstream streams {CHUNKS} chunks {DELAY_MS} ms apart unless a row
says otherwise; module loaded with `workers 256` (a running stream holds a worker).
This section took {time.time() - t0:.0f} s.

| # | what | measured | baseline (same run) | result | target |
|---|------|----------|---------------------|--------|--------|
| 1 | 100 concurrent identical `LLMCACHE.STREAM` + READ to the end | {calls} upstream call(s), {distinct} Stream key(s), {ended}/100 readers saw the end | - | **{calls} call** | 1 |
| 2a | time to first chunk, leader, median of 30 (5 chunks, 10 ms apart) | {ours:.2f} ms (STREAM + READ BLOCK) | straight from the upstream {direct:.2f} ms | **+{ours - direct:.2f} ms** | <= +3 ms |
| 2b | joiner arriving after chunk 100: STREAM + READ of chunks 1-100, median of 5 | {late:.2f} ms | - | **{late:.2f} ms** | <= 5 ms |
| 3 | `PING` p99 (raw socket, {samples} pings) while 200 streams run ({running} fills in flight at the end of the probe; {ended200}/200 Streams ended) | {loaded:.2f} ms | idle server {base:.2f} ms | **{loaded:.2f} ms** | < 2 ms |
| 4a | Redis memory per streamed answer ({CHUNKS} chunks) while its Stream lingers, N = 50 | MEMORY USAGE {per_key:,.0f} B; used_memory delta {lingering:,.0f} B | - | **{per_key:,.0f} B** | (info) |
| 4b | the same after `aicache.stream-linger-ms` (3 s here) | used_memory delta {after:,.0f} B per answer; {left} keys left | - | **{max(after, 0):,.0f} B** | 0 |
"""


if __name__ == "__main__":
    print(run())
