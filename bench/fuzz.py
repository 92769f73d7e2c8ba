"""Random-argument fuzzer for the aicache module.

K raw-socket clients (half on RESP3) send random module commands with
valid-looking, option and hostile arguments, while a chaos thread injects
upstream faults, varies upstream latency and checks the server stays up.

Each command is pipelined with `ECHO <token>` in the same write: the second
reply must be that token, which proves the command got exactly one reply, in
order. Error replies must be non-empty printable ASCII; no reply may carry the
API key.

Run: .venv/bin/python bench/fuzz.py --seconds 60 [--seed S] [--clients K]
A client's commands depend only on seed + client index, so a failure is
reported as (seed, client, command number) plus the command's arguments.
"""
import argparse
import collections
import hashlib
import json
import os
import random
import re
import socket
import struct
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import helpers  # noqa: E402
from fake_upstream import FAULTS  # noqa: E402
from helpers import DEFAULT_CONFIGS, Server, Upstream, info_fields, wait_for  # noqa: E402

API_KEY = "sk-fuzz-dummy-key-0123456789abcdef"
# Loaded with the module and restored every 5 s, so a random CONFIG SET
# (fixed-dims 7, a budget of 1 token) shapes a stretch of the run, not all of it.
FUZZ_CONFIGS = {"aicache.wait-timeout-ms": "2000", "aicache.lease-ms": "10000",
                "aicache.upstream-backoff-base-ms": "5", "aicache.upstream-backoff-cap-ms": "50"}
BASE_CONFIGS = {**DEFAULT_CONFIGS, **FUZZ_CONFIGS}

# ---------------------------------------------------------------- RESP ----


def encode(args):
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class Err(bytes):
    """`-` or `!` reply."""


class Push(list):
    """Out-of-band RESP3 push: the reply to no command."""


class ProtocolError(Exception):
    pass


# A simple string becomes str: by type, never taken for the ECHO token (bytes).
SCALARS = {b"+": lambda s: s.decode("latin-1"), b"-": Err, b":": int, b"(": int, b",": float,
           b"#": lambda s: {b"t": True, b"f": False}[s], b"_": lambda s: None}


class Conn:
    """One raw connection with a RESP2/RESP3 reply parser."""

    def __init__(self, port, resp3, timeout):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf, self.pos = bytearray(), 0
        if resp3:
            self.sock.sendall(encode([b"HELLO", b"3"]))
            if isinstance(self.read(), Err):
                raise ProtocolError("HELLO 3 refused")

    def read(self):
        while isinstance(v := self._value(), Push):
            pass
        return v

    def _more(self):
        del self.buf[:self.pos]
        self.pos = 0
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def _line(self):
        while (i := self.buf.find(b"\r\n", self.pos)) < 0:
            self._more()
        line, self.pos = bytes(self.buf[self.pos:i]), i + 2
        return line

    def _blob(self, n):
        while len(self.buf) - self.pos < n + 2:
            self._more()
        end = self.pos + n
        if self.buf[end:end + 2] != b"\r\n":
            raise ProtocolError(f"blob of {n} bytes not followed by CRLF")
        data, self.pos = bytes(self.buf[self.pos:end]), end + 2
        return data

    def _value(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        try:
            if t in SCALARS:
                return SCALARS[t](rest)
            n = int(rest)
        except (ValueError, KeyError):
            raise ProtocolError(f"bad reply line {line[:60]!r}") from None
        if n < 0 and t in (b"$", b"*"):  # RESP2 nulls
            return None
        if t in (b"$", b"!", b"="):
            blob = self._blob(n)
            return Err(blob) if t == b"!" else blob[4:] if t == b"=" else blob  # drop "txt:"
        if t in (b"*", b"~", b">"):
            items = [self._value() for _ in range(n)]
            return Push(items) if t == b">" else items
        if t == b"%":
            return [(self._value(), self._value()) for _ in range(n)]
        if t == b"|":  # attributes annotate the reply that follows them
            [self._value() for _ in range(2 * n)]
            return self._value()
        raise ProtocolError(f"unknown reply type {line[:60]!r}")


def walk(v):
    """Every scalar of a reply, nested aggregates included."""
    if isinstance(v, (list, tuple)):
        for x in v:
            yield from walk(x)
    else:
        yield v


# ------------------------------------------------------- random values ----

class Big(bytes):
    """A long argument that keeps its recipe: reports stay short and exact."""

    def __new__(cls, unit, n):
        obj = super().__new__(cls, unit * n)
        obj.recipe = f"{unit!r} * {n}"
        return obj


def show(arg):
    if isinstance(arg, Big):
        return arg.recipe
    if len(arg) <= 300:
        return repr(arg)
    return f"<{len(arg)} bytes, sha256 {hashlib.sha256(arg).hexdigest()[:16]}, {arg[:100]!r}...>"


CJK = "向量缓存测试".encode()
HOSTILE = [b"", b"\x00", b"a\x00b", b"\xff\xfe\xfd", b"\xc3\x28", b"\xed\xa0\x80", CJK, "🙂".encode(),
           b"\r\n", b"x\r\n*1\r\n$4\r\nPING\r\n", b"-ERR fake\r\n", b"{", b"}", b"{}", b"[", b"]", b"[]",
           b"null", b"nan", b"inf", b"-1", b"-0", b"18446744073709551616", b"1e308", b" ", b"\t\n"]
BAD_NUMBERS = [b"", b"-1", b"0", b"-0", b"nan", b"NaN", b"inf", b"-inf", b"1.5", b"1e3", b"0x10", b" 5",
               b"5 ", b"+5", b"abc", "五".encode(), b"5\x00", b"18446744073709551616",
               b"18446744073709551615", b"9223372036854775808", b"99999999999999999999999"]
# JSON number literals: integral floats, -0, overflow, precision loss.
NUM_LITERALS = ["0", "-0", "1", "1.0", "0.7", "2", "-1", "1e308", "-1e308", "1e999", "1e-320",
                "12345678901234567890123", "1E2", "9007199254740993", "-0.0"]
NAMESPACES = [b"ns1", b"ns2", b"{t}:x", b"{t}:y", b"tenantA:emb", "命名空间".encode()]
MODELS = [b"emb-model", b"m-d16", b"m-d4", b"m-d1", b"m-d3", b"text-embedding-3-small"]
OPTION_WORDS = [b"TIMEOUT", b"REFRESH", b"NOSTORE", b"DIMENSIONS", b"FORMAT", b"JSON", b"FP32",
                b"EX", b"TENANT", b"COST", b"RESET"]
CHAT_VALUES = NUM_LITERALS * 2 + ['"u1"', '"\\u4f60"', '"\\u0000\\r\\n"', "true", "null", '[1,"x"]',
                                   '{"k":-0}', "[1e308,-0,1E2]", "[12345678901234567890123]"]
CHAT_FIELDS = ["temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "seed", "stream",
               "user", "metadata", "stop", "presence_penalty", "logprobs", "x_extra", "字段"]
# Valid ranges the fuzzer draws from; narrower than the module's where a large
# value would let a fill outlive the reply timeout (lease, timeouts, backoff).
CONFIG_RANGES = {
    "default-ttl": (0, 100000), "ttl-jitter-pct": (0, 90), "max-text-bytes": (1, 2 << 20),
    "max-dims": (1, 65536), "fixed-dims": (0, 32), "max-request-bytes": (1, 4 << 20),
    "max-response-bytes": (1, 8 << 20), "max-fills": (1, 100000), "batch-size": (1, 2048),
    "lease-ms": (100, 10000), "wait-timeout-ms": (1, 3000), "fail-memory-ms": (0, 5000),
    "quota-window-ms": (1, 60000), "tenant-max-requests": (0, 1000), "tenant-max-tokens": (0, 100000),
    "global-max-requests": (0, 1000), "global-max-tokens": (0, 10 ** 6), "daily-token-budget": (0, 10 ** 7),
    "upstream-connect-timeout-ms": (1, 5000), "upstream-timeout-ms": (1, 5000),
    "upstream-max-bytes": (1024, 64 << 20), "upstream-retries": (0, 10),
    "upstream-backoff-base-ms": (1, 100), "upstream-backoff-cap-ms": (1, 200),
    "workers": (1, 16), "queue-size": (1, 4096),  # load-time only: CONFIG SET must refuse them
}
BOOL_CONFIGS = ["normalize-whitespace", "cache-sampled", "upstream-base64"]


class Gen:
    """Random arguments for one client; deterministic given its seed."""

    def __init__(self, rng):
        self.r, self.hot = rng, False

    def chance(self, p):
        return self.r.random() < p

    def pick(self, xs):
        return self.r.choice(xs)

    def case(self, word):
        # Command names and options are case-insensitive: mix the case.
        return bytes(c ^ 0x20 if 97 <= c | 0x20 <= 122 and self.chance(0.3) else c for c in word)

    def long(self):
        n = 10 << 20 if self.chance(0.02) else self.r.randrange(1, 1 << 20)
        unit = self.pick([b"x", b"\x00", "字".encode(), b"\xff", b"ab\r\n", b"[1,", b"0.5,"])
        return Big(unit, max(1, n // len(unit)))

    def hostile(self):
        return self.long() if self.chance(0.03) else self.pick(HOSTILE)

    def num(self, lo, hi):
        if self.chance(0.85):
            return b"%d" % self.r.randint(lo, hi)
        return self.pick(BAD_NUMBERS + [b"%d" % (hi + 1), b"%d" % (lo - 1)])

    def timeout(self):
        # Mostly near the upstream latency (0-300 ms): waits that expire
        # while their fill completes.
        r = self.r.random()
        if r < 0.85:
            return b"%d" % (self.r.randint(1, 400) if r < 0.7 else self.r.randint(400, 5000))
        return self.pick(BAD_NUMBERS + [b"86400000", b"86400001"])

    def text(self):
        r = self.r.random()
        if self.hot and r < 0.9:
            return b"h%d" % self.r.randrange(3)
        if r < 0.93:  # a small pool, for hits and shared fills; option words are still texts
            return (b"t%d" % self.r.randrange(40) if r < 0.75 else self.pick(OPTION_WORDS) if r < 0.85
                    else ("文本%d" % self.r.randrange(10)).encode())
        return self.hostile()

    def vector(self, model):
        r = self.r
        m = re.search(rb"-d(\d+)$", model)
        dims = int(m.group(1)) if m else 1536 if model.startswith(b"text-embedding") else 8
        if self.chance(0.1):
            dims = r.randint(1, 20)
        elif self.chance(0.01):
            dims = r.randint(8000, 70000)
        xs = [r.uniform(-1, 1) for _ in range(dims)]
        if self.chance(0.5):
            items = [repr(round(x, r.randrange(1, 9))) for x in xs]
            if self.chance(0.15):
                items[r.randrange(dims)] = self.pick(NUM_LITERALS + ["NaN", "1e39", '"a"', "null", "", "[1]"])
            return ("[" + ",".join(items) + "]").encode()
        raw = bytearray(struct.pack(f"<{dims}f", *xs))
        if self.chance(0.1):  # NaN, +inf, -inf
            i = 4 * r.randrange(dims)
            raw[i:i + 4] = self.pick([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"])
        return bytes(raw[:-1] if self.chance(0.05) else raw)

    def request(self):
        if self.chance(0.08):
            return self.pick([b"{", b"[]", b"not json", b'{"model":"m"}', b'{"model":"","messages":[1]}',
                              b'{"model":"m","messages":[]}', b'{"model":"m","messages":[{}]} x',
                              b'{"model":"m","model":"n","messages":[{"role":"user"}]}', self.hostile()])
        content = self.pick(["hi", "hello", "你好", "t1", "\u0000", "a\r\nb"])
        fields = [("model", json.dumps(self.pick(["m", "gpt-4o-mini", "模型"]))),
                  ("messages", json.dumps([{"role": "user", "content": content}]))]
        fields += [(self.pick(CHAT_FIELDS), self.pick(CHAT_VALUES)) for _ in range(self.r.randrange(4))]
        self.r.shuffle(fields)  # key order and whitespace must not matter
        sep = self.pick([",", ", ", " ,\n "])
        return ("{" + sep.join(json.dumps(k) + ":" + v for k, v in fields) + "}").encode()

    def response(self):
        if self.chance(0.08):
            return self.pick([b"{}", b"[]", b"nope", b'{"choices":[]}', b'{"choices":[{"finish_reason":"stop"}]}',
                              b'{"error":{"message":"x"},"choices":[]}', self.hostile()])
        content = self.pick(["ok", "答案", "", "a\u0000b"]) if self.chance(0.99) else "y" * (1 << 20)
        choice = {"index": 0, "message": {"role": "assistant", "content": content},
                  "finish_reason": self.pick(["stop", "stop", "stop", "tool_calls", "length", None])}
        out = {"id": "r1", "object": "chat.completion", "choices": [choice]}
        if self.chance(0.05):
            out["error"] = {"message": "overloaded"}
        return json.dumps(out, ensure_ascii=self.chance(0.5)).encode()

    def fetch_options(self, vectors):
        # Hot entries stored with EX 1-2 expire soon and are filled again.
        values = {b"TIMEOUT": self.timeout, b"EX": lambda: self.num(1, 2 if self.hot else 3600),
                  b"DIMENSIONS": lambda: self.num(1, 32),
                  b"TENANT": lambda: self.pick([b"tenant0", b"tenant1", b"tenant2"] * 3 + [b"", b"t" * 257, CJK]),
                  b"FORMAT": lambda: self.case(self.pick([b"JSON", b"FP32", b"JSON", b"FP32", b"XML", b""]))}
        words = OPTION_WORDS if self.chance(0.1) else (
            [b"TIMEOUT", b"REFRESH", b"NOSTORE", b"EX", b"TENANT"] + [b"DIMENSIONS", b"FORMAT"] * vectors)
        out = []
        for w in [self.pick(words) for _ in range(self.pick((0, 1, 1, 2, 3)))]:
            out += [self.case(w)] + ([values[w]()] if w in values else [])
        return out

    def config(self):
        out = [b"CONFIG", b"SET"]
        for _ in range(2 if self.chance(0.1) else 1):
            name = self.pick(list(CONFIG_RANGES) + BOOL_CONFIGS + ["key-prefix"])
            if name in CONFIG_RANGES:
                value = self.num(*CONFIG_RANGES[name])
            elif name in BOOL_CONFIGS:
                value = self.pick([b"yes", b"no", b"YES", b"No", b"1", b"0", b"maybe", b""])
            else:
                value = self.pick([b"aicache:", b"fz:", b"x", b"a{b", b"with space", b"", b"p" * 65, CJK, b"ok\r\n"])
            out += [b"aicache." + name.encode(), value]
        return out

    def command(self):
        """(kind, args): a valid-looking skeleton, then maybe mutated."""
        r, kind = self.r, self.r.choices(COMMANDS, WEIGHTS)[0]
        if kind in ("CONFIG", "SELECT", "FLUSHDB"):
            return kind, {"CONFIG": self.config, "SELECT": lambda: [b"SELECT", self.num(0, 3)],
                          "FLUSHDB": lambda: [b"FLUSHDB"] + [b"ASYNC"] * r.randrange(2)}[kind]()
        # A few hot entries that every client wants at once: calls join
        # running fills, and waits expire while others still wait.
        self.hot = self.chance(0.2)
        ns = b"hot" if self.hot else self.pick(NAMESPACES) if self.chance(0.95) else self.hostile()
        m = b"m-d4" if self.hot else self.pick(MODELS) if self.chance(0.95) else self.hostile()
        ex = [self.case(b"EX"), self.num(1, 3600)] * self.chance(0.3)
        n = r.randint(1, 8) if self.chance(0.97) else r.randint(50, 250)
        count = b"%d" % n if self.chance(0.9) else self.pick(BAD_NUMBERS + [b"%d" % (n + 1), b"%d" % (n - 1)])
        args = {
            "EMBCACHE.SET": lambda: [ns, m, self.text(), self.vector(m)] + ex,
            "EMBCACHE.MSET": lambda: [ns, m] + [x for _ in range(r.randint(1, 6))
                                                for x in (self.text(), self.vector(m))],
            "EMBCACHE.GET": lambda: [ns, m, self.text()]
            + [b"FORMAT", self.pick([b"JSON", b"fp32", b"XML"])] * self.chance(0.4),
            "EMBCACHE.MGET": lambda: [ns, m] + [self.text() for _ in range(n)],
            "EMBCACHE.DEL": lambda: [ns, m] + [self.text() for _ in range(n)],
            "EMBCACHE.KEY": lambda: [ns, m, self.text()],
            "EMBCACHE.FETCH": lambda: [ns, m, count] + [self.text() for _ in range(n)] + self.fetch_options(True),
            "LLMCACHE.SET": lambda: [ns, self.request(), self.response()] + ex,
            "LLMCACHE.GET": lambda: [ns, self.request()],
            "LLMCACHE.DEL": lambda: [ns, self.request()],
            "LLMCACHE.KEY": lambda: [ns, self.request()],
            "LLMCACHE.FETCH": lambda: [ns, self.request()] + self.fetch_options(False),
            "AICACHE.THROTTLE": lambda: [b"thr:%d" % r.randrange(8), self.num(1, 100), self.num(1, 5000)]
            + [self.case(b"COST"), self.num(1, 120)] * self.chance(0.3),
        }[kind]()
        args = [self.case(kind.encode())] + args
        mutation = r.random()
        if mutation < 0.06:  # wrong arity
            args = args[:r.randrange(1, len(args))]
        elif mutation < 0.10:  # stray trailing words
            args += [self.case(self.pick(OPTION_WORDS)) if self.chance(0.5) else self.hostile()
                     for _ in range(r.randint(1, 3))]
        elif mutation < 0.22:
            args[r.randrange(1, len(args))] = self.hostile()
        if len(args) > 1 and self.chance(0.01):
            args[r.randrange(1, len(args))] = self.long()
        return kind, args


COMMANDS, WEIGHTS = zip(*{
    "EMBCACHE.SET": 10, "EMBCACHE.MSET": 6, "EMBCACHE.GET": 10, "EMBCACHE.MGET": 6, "EMBCACHE.DEL": 4,
    "EMBCACHE.KEY": 3, "EMBCACHE.FETCH": 20, "LLMCACHE.SET": 6, "LLMCACHE.GET": 6, "LLMCACHE.DEL": 3,
    "LLMCACHE.KEY": 3, "LLMCACHE.FETCH": 15, "AICACHE.THROTTLE": 8, "CONFIG": 0.03, "SELECT": 0.1,
    "FLUSHDB": 0.05}.items())

# ------------------------------------------------------------- clients ----

PRINTABLE = re.compile(rb"[\x20-\x7e]+")
# After these the connection's replies can no longer be matched to commands.
DESYNC = {"lost reply", "out of order", "missing reply", "disconnect", "protocol", "fuzzer error"}
ORDER = ("lost reply", "out of order", "missing reply")


def has_timeout(args):
    return any(a.upper() == b"TIMEOUT" for a in args[3:])


def short(v):
    r = repr(v)
    return r if len(r) <= 300 else f"{r[:300]}... ({len(r)} chars)"


class Client(threading.Thread):
    """One raw connection sending random commands, each followed by ECHO."""

    def __init__(self, idx, seed, port, reply_timeout, stop):
        super().__init__(daemon=True, name=f"fuzz-client-{idx}")
        self.idx, self.port, self.reply_timeout, self.stop = idx, port, reply_timeout, stop
        self.gen, self.resp3 = Gen(random.Random(seed + idx)), idx % 2 == 1
        self.conn, self.seq, self.failures = None, 0, []
        self.sent, self.errors, self.error_texts = (collections.Counter() for _ in range(3))

    def run(self):
        while not self.stop.is_set():
            # Drawn before connecting, so the sequence depends on the seed alone.
            kind, args = self.gen.command()
            self.seq += 1
            try:
                if self.conn is None:
                    self.conn = Conn(self.port, self.resp3, self.reply_timeout)
            except (OSError, ProtocolError) as e:
                self.fail("disconnect", kind, [], f"cannot connect: {e!r}")
                self.stop.wait(0.5)  # the chaos thread decides whether the server is gone
                continue
            self.sent[kind] += 1
            try:
                self.exchange(kind, args)
            except socket.timeout:
                self.fail("missing reply", kind, args, f"no reply within {self.reply_timeout} s")
            except (OSError, ProtocolError) as e:
                self.fail("protocol" if isinstance(e, ProtocolError) else "disconnect", kind, args, repr(e))
            except Exception:  # a fuzzer bug must fail the run, not end a thread quietly
                self.fail("fuzzer error", kind, args, traceback.format_exc())
        if self.conn:
            self.conn.sock.close()

    def exchange(self, kind, args):
        token = b"fuzz-echo:%d:%d" % (self.idx, self.seq)
        self.conn.sock.sendall(encode(args) + encode([b"ECHO", token]))
        first = self.conn.read()
        if type(first) is bytes and first == token:
            # Tell a lost reply from a late one: does anything still come?
            self.conn.sock.settimeout(1.0)
            try:
                late = f"then, late: {short(self.conn.read())}"
            except socket.timeout:
                late = "nothing followed within 1 s"
            return self.fail("lost reply", kind, args, "the ECHO reply came first; " + late)
        self.check(kind, args, first)
        second = self.conn.read()
        if not (type(second) is bytes and second == token):
            self.fail("out of order", kind, args, f"expected {token!r}, got {short(second)}")

    def check(self, kind, args, reply):
        if isinstance(reply, Err):
            self.errors[kind] += 1
            self.error_texts[f"{kind}: " + re.sub(rb"\d+", b"N", reply[:60]).decode("ascii", "replace")] += 1
        for v in walk(reply):
            if isinstance(v, Err) and not PRINTABLE.fullmatch(v):
                self.fail("bad error text", kind, args, short(v))
            if isinstance(v, bytes) and API_KEY.encode() in v:
                self.fail("api key leak", kind, args, short(v))

    def fail(self, what, kind, args, detail):
        if len(self.failures) < 100:
            self.failures.append({"what": what, "client": self.idx, "seq": self.seq, "kind": kind,
                                  "resp": 3 if self.resp3 else 2, "args": args, "detail": detail,
                                  "fetch_timeout": kind.endswith("FETCH") and has_timeout(args)})
        if what in DESYNC and self.conn:
            self.conn.sock.close()
            self.conn = None


# --------------------------------------------------------------- chaos ----

def random_fault(rng):
    kind, kw = rng.choice(sorted(FAULTS)), {"times": rng.randint(1, 4)}
    if kind == "status":
        kw["status"] = rng.choice([429, 500, 502, 503, 504, 400, 401, 404, 422])
        kw["message"] = rng.choice(["injected", "", "上游错误\r\n\x00", "key sk-proj-abcdefghijklmnop leaked",
                                    API_KEY, "x" * 5000, "\u202e\x1b[31mred"])
        if rng.random() < 0.3:
            kw["retry_after"] = rng.choice(["0", "1", "abc", "-5", "Wed, 21 Oct 2015 07:28:00 GMT"])
    elif kind == "oversized":
        kw["bytes"] = rng.choice([1000, 100_000, 2 << 20])
    elif kind == "slow_drip":
        kw["interval_ms"] = 1  # a ~200 ms body: slow, but no stall
    return kind, kw


class Chaos(threading.Thread):
    """Upstream faults and latency, config resets, and the liveness watch."""

    def __init__(self, seed, server, upstream, stop):
        super().__init__(daemon=True, name="fuzz-chaos")
        self.rng, self.server, self.upstream, self.stop = random.Random(seed - 1), server, upstream, stop
        self.faults, self.pings, self.problems, self.dead = collections.Counter(), 0, [], None
        self.warnings = []  # trouble driving the fake upstream: not the module's fault

    def run(self):
        import redis
        admin = redis.Redis(port=self.server.port, socket_timeout=10)
        tick = pending = 0
        while not self.stop.wait(0.2):
            tick += 1
            try:
                # Faults queue up in the fake until calls consume them: keep a
                # few pending. Its stats grow with every call, so read them rarely.
                if tick % 5 == 0:
                    pending = self.upstream.stats()["faults_left"]
                if pending < 16:
                    kind, kw = random_fault(self.rng)
                    self.upstream.fault(kind, **kw)
                    self.faults[kind] += 1
                    pending += 1
                if tick % 10 == 0:
                    self.upstream.latency(self.rng.choice([0, 0, 1, 10, 50, 100, 200, 300]))
            except OSError as e:
                self.warnings.append(f"upstream control: {e!r}")
            if tick % 10:
                continue
            if self.server.proc.poll() is not None:
                self.dead = f"redis-server exited with {self.server.proc.returncode}"
                self.stop.set()
                return
            try:
                admin.ping()
                self.pings += 1
                if tick % 25 == 0:
                    admin.execute_command("CONFIG", "SET", *[x for kv in BASE_CONFIGS.items() for x in kv])
            except redis.RedisError as e:
                self.problems.append(f"PING/CONFIG SET failed at {tick / 5:.0f} s: {e!r}")


# ---------------------------------------------------------------- main ----

def report(seed, elapsed, clients, chaos, server, upstream_calls):
    """Prints the summary; returns why the run failed (empty: passed)."""
    import redis
    sent, errors, texts = (sum((getattr(c, a) for c in clients), collections.Counter())
                           for a in ("sent", "errors", "error_texts"))
    failures = [f for c in clients for f in c.failures]
    by_what, total = collections.Counter(f["what"] for f in failures), sum(sent.values())
    print(f"\n== aicache fuzz summary: seed {seed}, {len(clients)} clients, {elapsed:.1f} s ==")
    print(f"commands sent: {total} ({total / max(elapsed, 1e-9):.0f}/s), error replies: {sum(errors.values())}")
    for kind, n in sorted(sent.items()):
        print(f"  {kind:18} {n:8} sent {errors[kind]:8} errors")
    print("most frequent errors:\n" + "\n".join(f"  {n:7}  {t}" for t, n in texts.most_common(25)))
    print(f"upstream: {upstream_calls} API calls; faults injected: {dict(sorted(chaos.faults.items()))}")
    print("".join(f"warning: {w}\n" for w in chaos.warnings[:5]), end="")
    reasons, alive = [], server.proc.poll() is None
    admin = redis.Redis(port=server.port, socket_timeout=10)
    try:
        pong = alive and admin.ping()
    except redis.RedisError:
        pong = False
    print(f"server alive: {alive}, final PING: {'ok' if pong else 'FAILED'}, periodic PINGs ok: {chaos.pings}")
    if not pong:
        reasons.append(chaos.dead or "no PING reply at the end")
    else:
        t0, drained = time.monotonic(), "NOT DRAINED in 60 s"
        try:
            wait_for(lambda: sum(info_fields(admin)[k] for k in ("fills_in_flight", "queue_depth")) == 0,
                     timeout=60, what="fills to drain")
            drained = f"{time.monotonic() - t0:.1f} s"
        except AssertionError:
            reasons.append("fills did not drain")
        f, memory = info_fields(admin), admin.info("memory")
        print(f"after drain ({drained}): "
              f"fills_in_flight={f['fills_in_flight']} queue_depth={f['queue_depth']} "
              f"blocked_clients={admin.info('clients')['blocked_clients']}")
        print("INFO aicache: " + ", ".join(f"{k}={f[k]}" for k in (
            "hits", "misses", "coalesced_waiters", "fills_started", "upstream_requests", "upstream_retries",
            "wait_timeouts", "queue_full_errors", "fill_capacity_errors", "worker_panics", "writes_skipped")))
        print(f"used_memory: {memory['used_memory']} ({memory['used_memory_human']})")
        reasons += [f"{f['worker_panics']} worker panics"] * bool(f["worker_panics"])
    order = [f for f in failures if f["what"] in ORDER]
    print(f"order violations: {by_what['lost reply'] + by_what['out of order']} (lost reply "
          f"{by_what['lost reply']}, out of order {by_what['out of order']}); missing replies: "
          f"{by_what['missing reply']}; of these, on a FETCH with TIMEOUT: "
          f"{sum(f['fetch_timeout'] for f in order)}")
    print(f"non-printable/empty errors: {by_what['bad error text']}, API key leaks: {by_what['api key leak']}, "
          f"disconnects: {by_what['disconnect']}, protocol errors: {by_what['protocol']}, "
          f"fuzzer errors: {by_what['fuzzer error']}")
    reasons += [f"{n} x {what}" for what, n in by_what.items()] + chaos.problems
    for f in failures[:20]:
        print(f"\nFAILURE {f['what']}: seed {seed}, client {f['client']} (RESP{f['resp']}), command "
              f"#{f['seq']}{' [FETCH with TIMEOUT]' if f['fetch_timeout'] else ''}\n"
              f"  args: [{', '.join(show(a) for a in f['args'])}]\n  {f['detail']}")
    return reasons


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--module", default=helpers.MODULE)
    ap.add_argument("--redis-server", default=helpers.REDIS_SERVER)
    ap.add_argument("--reply-timeout", type=float, default=30.0,
                    help="seconds a reply may take; well above any wait the fuzzer allows")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"aicache fuzz: seed={seed} clients={args.clients} seconds={args.seconds:g} module={args.module}",
          flush=True)
    helpers.MODULE, helpers.REDIS_SERVER = os.path.abspath(args.module), args.redis_server  # read by Server()
    upstream, server = Upstream(), None
    try:
        module_args = ["upstream-url", upstream.url] + [x for k, v in FUZZ_CONFIGS.items()
                                                        for x in (k[len("aicache."):], v)]
        # A memory ceiling with eviction: entries pile up over a long run.
        server = Server(module_args=module_args, env={"OPENAI_API_KEY": API_KEY},
                        extra=["--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"])
        stop = threading.Event()
        clients = [Client(i, seed, server.port, args.reply_timeout, stop) for i in range(args.clients)]
        chaos = Chaos(seed, server, upstream, stop)
        t0 = time.monotonic()
        for t in (chaos, *clients):
            t.start()
        while (left := t0 + args.seconds - time.monotonic()) > 0 and not stop.wait(min(10.0, left)):
            n, bad = (sum(x) for x in zip(*((sum(c.sent.values()), len(c.failures)) for c in clients)))
            print(f"  {time.monotonic() - t0:5.0f} s: {n} commands, {bad} failures", flush=True)
        stop.set()
        elapsed = time.monotonic() - t0
        for t in (*clients, chaos):
            t.join(args.reply_timeout + 15)
        hung = [c.idx for c in clients if c.is_alive()]
        upstream_calls = upstream.calls()
        upstream.reset()  # no faults or latency left: remaining fills finish at once
        reasons = report(seed, elapsed, clients, chaos, server, upstream_calls)
        reasons += [f"clients {hung} still waiting after the run"] * bool(hung)
        if reasons:
            print("\nFAIL: " + "; ".join(reasons), flush=True)
            print("---- redis log tail ----\n" + "\n".join(server.log_text().splitlines()[-60:]),
                  file=sys.stderr)
            return 1
        print("\nPASS")
        return 0
    finally:
        if server:
            server.stop()
        upstream.stop()


if __name__ == "__main__":
    sys.exit(main())
