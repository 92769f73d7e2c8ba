"""Flaky-upstream soak: many clients FETCH for a while against a fake upstream
that is slow, jittery and keeps failing in every way it knows. No reply may
carry a wrong vector or answer, and no stored entry may hold one.

    .venv/bin/python bench/soak.py [--seconds 60] [--clients 60] [--quick]

Every vector the fake returns is a function of (model, text), every answer a
function of the request, so each reply and each entry left in Redis is
checked against fake_upstream.vector / chat_answer. Prints markdown rows like
bench/RESULTS.md; exits 1 on any wrong reply or entry, or a dead server.
"""
import argparse
import collections
import hashlib
import json
import os
import random
import re
import select
import socket
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import helpers  # noqa: E402
from fake_upstream import chat_answer, vector  # noqa: E402
from helpers import Server, Upstream, info_fields, wait_for  # noqa: E402

from fills import resp  # noqa: E402

MODEL = "emb-model"  # 8-d vectors in the fake
DIMS = 8
CHAT_NS = "soakchat"
POISON = "POISON"
# (weight, kind, options); `times` > 1 makes retryable faults outlast retries.
FAULTS = [
    (3, "status", {"status": 500}), (2, "status", {"status": 500, "times": 3}),
    (3, "status", {"status": 503}),
    (2, "status", {"status": 429, "message": "Rate limit reached for requests"}),
    (1, "status", {"status": 429, "message": "Rate limit reached", "retry_after": "1"}),
    (2, "status", {"status": 400, "message": "Invalid input"}),
    (2, "malformed", {}), (2, "wrong_count", {}), (4, "wrong_dim", {}), (2, "nan", {}),
    (2, "overflow", {}), (2, "reset", {}), (1, "cjk_error", {}),
    (2, "length", {}), (2, "error_object", {}), (2, "empty_choices", {}),
]
COUNTERS = ["hits", "misses", "coalesced_waiters", "fills_started", "upstream_requests",
            "upstream_retries", "wait_timeouts", "worker_panics", "writes_skipped",
            "queue_full_errors"]


class Error(str):
    """A RESP error reply."""


def parse(buf, pos=0):
    """(value, end) of the first complete RESP2 reply at pos, or None."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, head = buf[pos:pos + 1], buf[pos + 1:end]
    if kind == b"+":
        return head, end + 2
    if kind == b"-":
        return Error(head.decode(errors="replace")), end + 2
    if kind == b":":
        return int(head), end + 2
    if kind == b"$":
        n = int(head)
        if n < 0:
            return None, end + 2
        if len(buf) < end + 2 + n + 2:
            return None
        return buf[end + 2:end + 2 + n], end + 4 + n
    if kind == b"*":
        items, p = [], end + 2
        for _ in range(max(int(head), 0)):
            got = parse(buf, p)
            if got is None:
                return None
            items.append(got[0])
            p = got[1]
        return items, p
    raise ValueError(f"bad reply {buf[pos:pos + 20]!r}")


def error_class(msg):
    """An error's first words with counts blanked, so classes aggregate
    ("expected 2 embeddings" and "expected 3 embeddings" are one class)."""
    words = " ".join(msg.split()[:6])
    return re.sub(r"(?<!HTTP )\b\d+\b", "N", words)


class Workload:
    """The text and request pools, their expected results, and call makers."""

    def __init__(self, args):
        rng = random.Random(args.seed)
        words = ["cache", "vector", "redis", "\u6f22\u5b57", "caf\u00e9", "fill", "lease", "batch"]
        self.texts = [f"doc {i}: " + " ".join(rng.choices(words, k=rng.randint(1, 12)))
                      for i in range(args.pool)]
        # Texts that read like options must still be texts (numtexts counts them).
        self.texts[:5] = ["TIMEOUT", "NOSTORE", "REFRESH", "DIMENSIONS", "EX"]
        # Texts the fake refuses (/_poison) wherever they sit in a batch: each
        # must come back as an error element, the texts beside it as vectors.
        self.poisoned = set()
        if args.poison_share > 0:
            step = max(1, round(1 / args.poison_share))
            for i in range(step // 2, len(self.texts), step):
                self.texts[i] += f" {POISON}"
                self.poisoned.add(self.texts[i])
        self.expected = {t: np.asarray(vector(MODEL, t, DIMS), dtype="<f4").tobytes()
                         for t in self.texts}
        self.namespaces = [f"soak{i}" for i in range(args.namespaces)]
        # Each request has its own canonical form: spellings that canonicalise
        # alike would share an entry while the fake answers each differently.
        self.requests = [{"model": "gpt-soak", "max_tokens": 16 + i % 3,
                          "messages": [{"role": "user", "content": f"question {i} \u4e00"}]}
                         for i in range(args.requests)]
        # The module sends the request as given plus "stream": false.
        self.answers = [chat_answer({**r, "stream": False}) for r in self.requests]
        self.llm_share = args.llm_share
        # A namespace's first fill pins its dimension, so a few calls go to a
        # namespace nobody used before; the rest share a handful of old ones.
        self.fresh_share = args.fresh_ns_share
        self.fresh = []  # (namespace, text) of every fresh-namespace call

    def _text(self, rng):
        # Squared uniform: a hot head many clients want at once (joins), a
        # long tail of rarer texts (misses).
        return self.texts[int(len(self.texts) * rng.random() ** 2)]

    @staticmethod
    def _common_opts(rng):
        opts = []
        if rng.random() < 0.1:
            opts += ["NOSTORE"]
        if rng.random() < 0.1:
            opts += ["TIMEOUT", rng.choice([20, 100, 500, 2000])]
        if rng.random() < 0.05:
            opts += ["REFRESH"]
        if rng.random() < 0.2:
            # Short TTLs keep entries expiring, so misses go on all run long.
            opts += ["EX", rng.randint(1, 5)]
        return opts

    def call(self, rng):
        """(payload, what) for one random call."""
        if rng.random() < self.llm_share:
            i = rng.randrange(len(self.requests))
            opts = self._common_opts(rng)
            return (resp("LLMCACHE.FETCH", CHAT_NS, json.dumps(self.requests[i]), *opts),
                    ("llm", i, opts))
        ns = rng.choice(self.namespaces)
        texts = [self._text(rng) for _ in range(rng.choice([1, 1, 1, 2, 3, 5, 8]))]
        if rng.random() < self.fresh_share:
            ns = f"fresh{len(self.fresh)}"
            self.fresh += [(ns, t) for t in texts]
        opts = self._common_opts(rng)
        if rng.random() < 0.1:
            opts += ["DIMENSIONS", DIMS]
        return resp("EMBCACHE.FETCH", ns, MODEL, len(texts), *texts, *opts), ("emb", ns, texts, opts)

    def check(self, what, reply):
        """(class of wrongness or None, error classes of the reply's elements).
        An array may carry an error in place of a vector (an input the
        upstream refused); every other element must be the text's vector."""
        if what[0] == "llm":
            try:
                right = json.loads(reply) == self.answers[what[1]]
            except (TypeError, ValueError):
                return "llm reply not JSON", []
            return (None if right else "llm wrong answer"), []
        _, _, texts, opts = what
        if not isinstance(reply, list) or len(reply) != len(texts):
            return "emb wrong shape", []
        elem_errors = []
        for t, v in zip(texts, reply):
            if isinstance(v, Error):
                elem_errors.append(("poisoned: " if t in self.poisoned else "") + error_class(v))
                continue
            if t in self.poisoned:
                return "emb vector for a poisoned text", elem_errors
            if v == self.expected[t]:
                continue
            if not isinstance(v, bytes) or len(v) != 4 * DIMS:
                # The known wrong_dim defect: a one-input batch cut to 7-d is
                # self-consistent, so with no pin yet (a fresh namespace) or
                # no pin check (NOSTORE) nothing tells it from a right one.
                if what[1].startswith("fresh"):
                    return "emb wrong size (first fill of a fresh namespace)", elem_errors
                return ("emb wrong size (NOSTORE)" if "NOSTORE" in opts
                        else "emb wrong size (stored)"), elem_errors
            return "emb wrong value", elem_errors
        return None, elem_errors


def inject_faults(up, stop, every_ms, rng, injected):
    """Keeps a few faults queued in the fake for as long as the soak runs."""
    weights = [w for w, _, _ in FAULTS]
    while not stop.wait(every_ms / 1000):
        try:
            if up.stats()["faults_left"] >= 3:
                continue
            _, kind, opts = rng.choices(FAULTS, weights)[0]
            opts = dict(opts)
            up.fault(kind, times=opts.pop("times", 1), **opts)
            injected[kind + (f" {opts['status']}" if "status" in opts else "")] += 1
        except OSError:
            return


def run_clients(port, work, args, rng):
    """C connections, one call outstanding on each, for --seconds."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.clients)]
    ep = select.epoll()
    by_fd = {}
    for i, s in enumerate(socks):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ep.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = i
    res = {"calls": collections.Counter(), "ok": 0, "partial": 0, "errors": collections.Counter(),
           "elem_errors": collections.Counter(),
           "wrong": collections.Counter(), "wrong_samples": [], "ms": []}
    outstanding, bufs, sent_at, what = 0, [b""] * len(socks), [0.0] * len(socks), [None] * len(socks)

    def send(i):
        nonlocal outstanding
        payload, what[i] = work.call(rng)
        sent_at[i] = time.monotonic()
        socks[i].sendall(payload)
        res["calls"][what[i][0]] += 1
        outstanding += 1

    end = time.monotonic() + args.seconds
    for i in range(len(socks)):
        send(i)
    # After --seconds no new call starts; the last ones may wait out retries.
    drain_deadline = end + 90
    while outstanding and time.monotonic() < drain_deadline:
        for fd, _ in ep.poll(1.0):
            i = by_fd[fd]
            chunk = socks[i].recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"connection {i} closed by the server")
            bufs[i] += chunk
            got = parse(bufs[i])
            if got is None:
                continue
            reply, n = got
            bufs[i] = bufs[i][n:]
            outstanding -= 1
            if isinstance(reply, Error):
                res["errors"][error_class(reply)] += 1
            else:
                bad, elem_errors = work.check(what[i], reply)
                res["elem_errors"].update(elem_errors)
                if bad is None and elem_errors:
                    res["partial"] += 1
                elif bad is None:
                    res["ok"] += 1
                    res["ms"].append((time.monotonic() - sent_at[i]) * 1000)
                else:
                    res["wrong"][bad] += 1
                    if len(res["wrong_samples"]) < 5:
                        sizes = [len(v) if isinstance(v, bytes) else v for v in reply] \
                            if isinstance(reply, list) else len(reply or b"")
                        res["wrong_samples"].append((bad, what[i], sizes))
            if time.monotonic() < end:
                send(i)
    res["unanswered"] = outstanding
    for s in socks:
        s.close()
    return res


def dims_entry_key(ns, text):
    """The key of a DIMENSIONS fill. EMBCACHE.KEY has no DIMENSIONS option, so
    this follows src/model/keys.rs (embedding_key_dims); a mismatch would
    show up as unknown keys in the scan, not as a silent pass."""
    fields = (b"emb-dims:v1", ns.encode(), MODEL.encode(), DIMS.to_bytes(4, "big"), text.encode())
    enc = b"".join(len(f).to_bytes(8, "big") + f for f in fields)
    return b"aicache:emb:v1:{" + ns.encode() + b"}:" + hashlib.sha256(enc).hexdigest().encode()


def key_map(ctl, pairs, requests=()):
    """Entry key -> (kind, text or request index, namespace), from
    EMBCACHE.KEY and LLMCACHE.KEY: the module names its keys, the stored
    values are then checked against the fake's functions."""
    out, jobs = {}, []
    p = ctl.pipeline(transaction=False)
    for ns, t in pairs:
        p.execute_command("EMBCACHE.KEY", ns, MODEL, t)
        jobs.append(("emb", t, ns))
        out[dims_entry_key(ns, t)] = ("emb", t, ns)
    for i, r in enumerate(requests):
        p.execute_command("LLMCACHE.KEY", CHAT_NS, json.dumps(r))
        jobs.append(("llm", i, CHAT_NS))
    out.update(zip(p.execute(), jobs))
    return out


def scan_entries(ctl, work, keys):
    """Checks every aicache:* entry left in the DB against its expectation."""
    out = {"entries": 0, "wrong": collections.Counter(), "unknown": 0, "expired": 0,
           "pins": {}, "samples": []}
    names = [k for k in ctl.scan_iter(match="aicache:*", count=1000) if b":dims:v1:" not in k]
    for start in range(0, len(names), 500):
        batch = names[start:start + 500]
        for key, value in zip(batch, ctl.mget(batch)):
            if value is None:
                out["expired"] += 1  # an EX entry that lapsed since SCAN saw it
                continue
            job = keys.get(key)
            if job is None:
                out["unknown"] += 1
                continue
            out["entries"] += 1
            if job[0] == "emb":
                if job[1] in work.poisoned:
                    bad = "poisoned text stored"
                elif value == work.expected[job[1]]:
                    continue
                elif len(value) != 4 * DIMS:
                    fresh = " (fresh namespace)" if job[2].startswith("fresh") else ""
                    bad = "wrong size" + fresh
                else:
                    bad = "wrong value"
            else:
                try:
                    if json.loads(value) == work.answers[job[1]]:
                        continue
                    bad = "llm wrong answer"
                except ValueError:
                    bad = "llm entry not JSON"
            out["wrong"][bad] += 1
            if len(out["samples"]) < 5:
                out["samples"].append((bad, key, job, len(value)))
    for key in ctl.scan_iter(match="aicache:dims:v1:*", count=1000):
        ns = key.split(b"{", 1)[1].split(b"}", 1)[0].decode()
        out["pins"][ns] = {k.decode(): int(v) for k, v in ctl.hgetall(key).items()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", help="path of libaicache.so (default: target/release)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=60)
    ap.add_argument("--pool", type=int, default=2000, help="distinct texts")
    ap.add_argument("--requests", type=int, default=300, help="distinct chat requests")
    ap.add_argument("--namespaces", type=int, default=4)
    ap.add_argument("--llm-share", type=float, default=0.25)
    ap.add_argument("--latency-ms", type=int, default=20)
    ap.add_argument("--jitter-ms", type=int, default=80)
    ap.add_argument("--fault-every-ms", type=float, default=50,
                    help="how often the injector tops the fault queue up to 3")
    ap.add_argument("--poison-share", type=float, default=0.01,
                    help="share of the texts the fake always refuses with HTTP 400")
    ap.add_argument("--fresh-ns-share", type=float, default=0.1,
                    help="share of EMBCACHE calls sent to a namespace never used before")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model-dims", default="emb-model=8",
                    help="aicache.model-dims for the run; '' leaves the 8-d model unlisted, so a "
                         "lone short answer may pin a fresh namespace")
    ap.add_argument("--quick", action="store_true", help="10 s, 20 clients")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.clients = 10, 20
    if args.module:
        helpers.MODULE = os.path.abspath(args.module)

    work = Workload(args)
    up = Upstream()
    server = None
    stop = threading.Event()
    try:
        up.latency(args.latency_ms, jitter_ms=args.jitter_ms)
        if work.poisoned:
            up.poison(POISON)
        server = Server(module_args=["upstream-url", up.url])
        ctl = server.client()
        # Quick retries, so a retried fault costs milliseconds, not seconds.
        ctl.config_set("aicache.upstream-backoff-base-ms", 20)
        ctl.config_set("aicache.upstream-backoff-cap-ms", 500)
        ctl.config_set("aicache.model-dims", args.model_dims)
        base_mem = ctl.info("memory")["used_memory"]
        keys = key_map(ctl, [(ns, t) for ns in work.namespaces for t in work.texts],
                       work.requests)
        base = info_fields(ctl)
        injected = collections.Counter()
        injector = threading.Thread(target=inject_faults, daemon=True,
                                    args=(up, stop, args.fault_every_ms,
                                          random.Random(args.seed + 1), injected))
        injector.start()
        res = {"alive": True}
        try:
            res.update(run_clients(server.port, work, args, random.Random(args.seed + 2)))
        except ConnectionError as e:
            res["died"] = repr(e)
        stop.set()
        injector.join()
        res["alive"] = server.proc.poll() is None
        if res["alive"]:
            res["settled"] = _settle(ctl)
            keys.update(key_map(ctl, work.fresh))
            res["scan"] = scan_entries(ctl, work, keys)
            end = info_fields(ctl)
            res["delta"] = {k: end[k] - base[k] for k in COUNTERS}
            res["used_memory"] = ctl.info("memory")["used_memory"]
            ctl.flushall()
            res["mem_flushed"], res["mem_start"] = ctl.info("memory")["used_memory"], base_mem
            res["panics"] = server.log_text().lower().count("panic")
        res["upstream"] = up.stats()
        res["injected"] = injected
    finally:
        stop.set()
        if server:
            server.stop()
        up.stop()
    print(report(args, res, work))
    ok = (res["alive"] and "died" not in res and not res["wrong"] and not res["scan"]["wrong"]
          and res["scan"]["unknown"] == 0 and res["settled"] and res["panics"] == 0
          and res["unanswered"] == 0 and res["delta"]["worker_panics"] == 0)
    return 0 if ok else 1


def _settle(ctl):
    """True once no client is blocked and no fill is running or queued."""
    def idle():
        i = info_fields(ctl)
        return (ctl.info("clients")["blocked_clients"] == 0
                and i["fills_in_flight"] == 0 and i["queue_depth"] == 0)
    try:
        return bool(wait_for(idle, timeout=30, what="fills to drain"))
    except AssertionError:
        return False


def build():
    """Which module this run loaded: the .so changes as others rebuild it."""
    st = os.stat(helpers.MODULE)
    head = os.popen(f"git -C {helpers.ROOT} rev-parse --short HEAD 2>/dev/null").read().strip()
    return (f"`{os.path.relpath(helpers.MODULE, helpers.ROOT)}` built "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(st.st_mtime))} UTC, git HEAD {head or '?'}")


def report(args, res, work):
    if not res["alive"] or "died" in res:
        return f"| server alive | **NO** ({res.get('died', 'process exited')}) | - | FAIL |"
    scan, d, st = res["scan"], res["delta"], res["upstream"]
    calls = sum(res["calls"].values())
    errors = sum(res["errors"].values())
    wrong = sum(res["wrong"].values())
    ms = sorted(res["ms"]) or [0.0]
    p = lambda q: ms[min(len(ms) - 1, int(q * (len(ms) - 1)))]  # noqa: E731
    bad_pins = {ns: m for ns, m in scan["pins"].items() if any(v != DIMS for v in m.values())}
    ok = lambda c: "ok" if c else "FAIL"  # noqa: E731
    rows = [
        f"| FETCH calls ({res['calls']['emb']:,} EMBCACHE, {res['calls']['llm']:,} LLMCACHE) over {args.seconds:.0f} s | {calls:,} ({calls / args.seconds:,.0f}/s) | - | (info) |",
        f"| replies: right / right with error elements / error / wrong / never answered | {res['ok']:,} / {res['partial']:,} / {errors:,} / **{wrong}** / {res['unanswered']} | wrong 0, unanswered 0 | {ok(wrong == 0 and res['unanswered'] == 0)} |",
    ]
    rows += [f"| wrong replies: {k} | {v:,} | 0 | FAIL |" for k, v in res["wrong"].most_common()]
    rows += [f"| right replies: latency p50 / p99 / max | {p(0.5):.1f} / {p(0.99):.1f} / {ms[-1]:.1f} ms | upstream {args.latency_ms} + 0..{args.jitter_ms} ms | (info) |"]
    rows += [f"| error replies: `{k}` | {v:,} | - | (info) |" for k, v in res["errors"].most_common(14)]
    rows += [f"| error elements in array replies: `{k}` | {v:,} | - | (info) |"
             for k, v in res["elem_errors"].most_common(8)]
    if len(res["errors"]) > 14:
        rest = sum(v for _, v in res["errors"].most_common()[14:])
        rows.append(f"| error replies: {len(res['errors']) - 14} other classes | {rest:,} | - | (info) |")
    rows += [
        f"| stored entries checked after the run (SCAN) / wrong | {scan['entries']:,} / **{sum(scan['wrong'].values())}** | 0 wrong | {ok(not scan['wrong'])} |",
    ]
    rows += [f"| wrong stored entries: {k} | {v:,} | 0 | FAIL |" for k, v in scan["wrong"].most_common()]
    rows += [
        f"| keys not in the key map / lapsed during the scan | {scan['unknown']} / {scan['expired']} | 0 / - | {ok(scan['unknown'] == 0)} |",
        f"| namespaces pinned to another dimension than {DIMS} | {len(bad_pins)} of {len(scan['pins'])}{': ' + json.dumps(dict(list(bad_pins.items())[:5])) if bad_pins else ''} | 0 | {'FAIL (known defect)' if bad_pins else 'ok'} |",
        f"| upstream calls the fake saw (embeddings / chat) | {st['total_calls']:,} ({st['calls']['embeddings']:,} / {st['calls']['chat']:,}), peak {st['peak_concurrency']} at once | INFO upstream_requests {d['upstream_requests']:,}, retries {d['upstream_retries']:,} | (info) |",
        f"| faults injected | {sum(res['injected'].values()):,}: " + ", ".join(f"{k} {v}" for k, v in sorted(res["injected"].items())) + " | - | (info) |",
        f"| hits / misses / joined / fills started (INFO deltas) | {d['hits']:,} / {d['misses']:,} / {d['coalesced_waiters']:,} / {d['fills_started']:,} | - | (info) |",
        f"| wait timeouts / queue full / worker panics / writes skipped | {d['wait_timeouts']:,} / {d['queue_full_errors']} / {d['worker_panics']} / {d['writes_skipped']} | panics 0 | {ok(d['worker_panics'] == 0)} |",
        f"| blocked clients, fills in flight, queue back to 0 within 30 s | {'yes' if res['settled'] else 'NO'} | - | {ok(res['settled'])} |",
        f"| server alive at the end; \"panic\" in its log | yes; {res['panics']} | - | {ok(res['panics'] == 0)} |",
        f"| `used_memory` at the end; after FLUSHALL | {res['used_memory']:,} B; {res['mem_flushed']:,} B | at start {res['mem_start']:,} B | (info) |",
    ]
    samples = [f"- reply {s}" for s in res["wrong_samples"]] + [f"- entry {s}" for s in scan["samples"]]
    return f"""## Flaky-upstream soak

Build: {build()}.
Command: `.venv/bin/python bench/soak.py --seconds {args.seconds:g} --clients {args.clients}`.
Upstream: `tests/fake_upstream.py`, {args.latency_ms} ms + uniform(0, {args.jitter_ms}) ms per call, a
fault queued whenever fewer than 3 wait (checked every {args.fault_every_ms:g} ms). {args.clients} raw-socket
clients, one call outstanding each; {args.pool:,} texts (hot head) over {args.namespaces} namespaces (and
{args.fresh_ns_share:.0%} of EMBCACHE calls to a namespace of their own, {len({ns for ns, _ in work.fresh})} in all), model
`{MODEL}` ({DIMS}-d), {args.requests} chat requests ({args.llm_share:.0%} of calls); options NOSTORE, TIMEOUT,
REFRESH, EX 1-5 and DIMENSIONS {DIMS} now and then; {len(work.poisoned)} texts carry `{POISON}`, which
the fake refuses with HTTP 400 in any batch. Backoff base 20 ms, cap 500 ms.

| what | measured | baseline | result |
|---|---|---|---|
""" + "\n".join(rows) + ("\n\nFirst wrong items:\n" + "\n".join(samples) if samples else "") + "\n"


if __name__ == "__main__":
    sys.exit(main())
