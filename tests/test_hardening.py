"""Regression tests for defects found in review, written before their fixes.

Each test states the behaviour the fixed module must have (see the README's
"Fills" section and the comment on each test); on the build they were written
against they fail, except where a comment says the test is a guard.
"""
import json
import socket
import threading
import uuid

import pytest
import redis

from conftest import API_KEY
from helpers import Server, info_fields, load_outcome, resp, wait_for
from test_fetch import M, REQ, answer_for, expected, fetch

# --------------------------------------------------------------------------
# Raw RESP2 over a socket. redis-py would hide exactly what these tests look
# for: a reply that never comes, or one reply too many, on one connection.


class RespError(str):
    """An error reply (the text after the '-')."""


class RespReader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            value, self.buf = self.buf[:n], self.buf[n + 2:]
            return value
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise AssertionError(f"not RESP2: {line!r}")


def connect(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(5)
    return s


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex}"


# --------------------------------------------------------------------------
# A1. Exactly one reply per FETCH, also when its TIMEOUT and its fill end at
# about the same moment. The reply and the ECHO sent right behind it on the
# same connection must arrive in that order: a FETCH whose reply is lost
# lets ECHO's reply come first; a FETCH replied to twice puts a second FETCH
# reply where ECHO's should be.

L_MS = 150  # upstream latency: the fill lands a little after L_MS
# TIMEOUTs on both sides of the fill's completion, twice over.
SWEEP = [*range(L_MS - 40, L_MS + 40, 4)] * 2

TIMED_OUT = "ERR timed out waiting"


def one_reply_then_echo(port, command, is_fetch_reply):
    """None when `command` got exactly one acceptable reply before ECHO's,
    else what went wrong."""
    token = unique("echo").encode()
    with connect(port) as s:
        s.sendall(resp(*command) + resp("ECHO", token))
        r = RespReader(s)
        try:
            first = r.read()
            if first == token:
                return "no reply to the FETCH: ECHO's reply came first"
            if not is_fetch_reply(first):
                return f"unexpected FETCH reply {first!r:.120}"
            second = r.read()
        except (socket.timeout, EOFError) as e:
            return f"missing reply: {e!r}"
        if second != token:
            return f"a second FETCH reply {second!r:.120} instead of ECHO's"
    return None


def timed_out(reply):
    return isinstance(reply, RespError) and reply.startswith(TIMED_OUT)


def test_emb_fetch_racing_its_timeout_replies_exactly_once(f, fserver, upstream):
    upstream.latency(L_MS)
    problems = []
    for t in SWEEP:
        text = unique("race")
        want = [expected(text)]  # 32 bytes: the fake's model M has 8 dimensions
        why = one_reply_then_echo(
            fserver.port, ["EMBCACHE.FETCH", "ns", M, 1, text, "TIMEOUT", t],
            lambda rep, want=want: rep == want or timed_out(rep))
        if why:
            problems.append(f"TIMEOUT {t}: {why}")
    assert not problems, f"{len(problems)} of {len(SWEEP)} FETCHes: " + "; ".join(problems[:5])


def test_withmeta_fetch_racing_its_timeout_replies_exactly_once(f, fserver, upstream):
    """WITHMETA reads TTLs when the blocked reply is rendered: the same race,
    with the two-level reply."""
    upstream.latency(L_MS)
    problems = []
    for t in SWEEP:
        text = unique("race-meta")

        def ok(rep, want=[expected(text)]):
            if timed_out(rep):
                return True
            values, metas = rep
            status, age, ttl = metas[0]
            return values == want and (status, age) == (b"miss", 0) and ttl > 0

        why = one_reply_then_echo(
            fserver.port, ["EMBCACHE.FETCH", "ns", M, 1, text, "TIMEOUT", t, "WITHMETA"], ok)
        if why:
            problems.append(f"TIMEOUT {t}: {why}")
    assert not problems, f"{len(problems)} of {len(SWEEP)} FETCHes: " + "; ".join(problems[:5])


def test_llm_fetch_racing_its_timeout_replies_exactly_once(f, fserver, upstream):
    upstream.latency(L_MS)
    problems = []
    for t in SWEEP:
        req = {**REQ, "messages": [{"role": "user", "content": unique("race")}]}

        def ok(rep, req=req):
            return timed_out(rep) or (isinstance(rep, bytes) and json.loads(rep) == answer_for(req))

        why = one_reply_then_echo(
            fserver.port, ["LLMCACHE.FETCH", "chat", json.dumps(req), "TIMEOUT", t], ok)
        if why:
            problems.append(f"TIMEOUT {t}: {why}")
    assert not problems, f"{len(problems)} of {len(SWEEP)} FETCHes: " + "; ".join(problems[:5])


def test_killed_and_timed_out_waiters_leave_nothing_behind(f, fserver, upstream):
    """50 waiters at once, in 25 pairs sharing a fill: one of each pair
    disconnects at once, the other must get exactly one reply. Every fill
    still lands, and no blocked client or fill is left over."""
    upstream.latency(L_MS)
    workers = info_fields(f)["workers"]
    pairs = []
    for k in range(25):
        text = unique("killed")
        # The fills queue behind the workers and land in rounds, at about
        # (k // workers + 1) * L_MS; each pair's TIMEOUT straddles its round
        # so that many of them race their fill's completion.
        t = (k // workers + 1) * L_MS + (k % workers) * 80 // workers - 40
        token = unique("echo").encode()
        kept, killed = connect(fserver.port), connect(fserver.port)
        fetch_cmd = resp("EMBCACHE.FETCH", "ns", M, 1, text, "TIMEOUT", t)
        kept.sendall(fetch_cmd + resp("ECHO", token))
        killed.sendall(fetch_cmd)
        pairs.append((text, t, token, kept, killed))
    for *_, killed in pairs:
        killed.close()
    problems = []
    for text, t, token, kept, _ in pairs:
        r = RespReader(kept)
        try:
            first = r.read()
            second = None if first == token else r.read()
        except (socket.timeout, EOFError) as e:
            first, second = repr(e), None
        finally:
            kept.close()
        if first == token:
            problems.append(f"TIMEOUT {t}: no reply to the FETCH")
        elif not (first == [expected(text)] or timed_out(first)) or second != token:
            problems.append(f"TIMEOUT {t}: replies {first!r:.80} then {second!r:.80}")
    wait_for(lambda: f.info("clients")["blocked_clients"] == 0, what="blocked_clients to drop to 0")
    wait_for(lambda: info_fields(f)["fills_in_flight"] == 0, what="fills_in_flight to drop to 0")
    assert f.ping()
    lost = [text for text, *_ in pairs if f.execute_command("EMBCACHE.GET", "ns", M, text) is None]
    assert not lost, f"{len(lost)} fills were not stored although only their callers left"
    assert not problems, f"{len(problems)} of {len(pairs)} waiters: " + "; ".join(problems[:5])


# --------------------------------------------------------------------------
# A2. CONFIG GET of a string config must not leak. Today every call leaves
# the RedisString built for the reply behind: 32 bytes for key-prefix, 48
# for upstream-url (1.6 and 2.4 MB per 50,000 calls).

@pytest.fixture
def plain():
    """A server of its own: used_memory on a shared one also moves with
    what earlier tests left to be freed."""
    s = Server()
    yield s.client()
    s.stop()


@pytest.mark.parametrize("name", ["aicache.key-prefix", "aicache.upstream-url"])
def test_config_get_of_a_string_config_does_not_leak(plain, name):
    def config_get(times):
        for _ in range(times // 1000):
            p = plain.pipeline(transaction=False)
            for _ in range(1000):
                p.execute_command("CONFIG", "GET", name)
            assert all(p.execute())

    config_get(1000)  # first-use allocations, e.g. the reply buffers, are not a leak
    before = plain.info("memory")["used_memory"]
    config_get(50_000)
    grown = plain.info("memory")["used_memory"] - before
    assert grown < 200_000, f"used_memory grew by {grown} bytes over 50,000 CONFIG GET {name}"


# --------------------------------------------------------------------------
# A3. A JSON vector argument far over max-dims must be refused without
# parsing it into memory. Today serde builds the whole Vec<f64> first (8
# bytes per 2-byte "0,", plus the copy when it doubles) and only then
# checks max-dims.
#
# Measured with the kernel's VmHWM (peak resident set) of a fresh server:
# used_memory_peak is sampled only between commands, so it cannot see an
# allocation made and freed inside one command (measured: the same 2.5x of
# the argument with or without the parse). The argument's own buffers (the
# query buffer, which Redis hands to the module without a copy) are measured
# on a control run with an argument of the same size that is not JSON and is
# refused before any allocation. Measured on the build this was written
# against, relative to one 64 MB argument: control SET 1.0x, JSON SET 5.1x;
# control MSET 2.0x, JSON MSET 6.1x. The fixed parse may add a small
# multiple of max-dims * 8 bytes (64 KB); the slack allowed is half an
# argument, far above that and far below the Vec.

HUGE = 64 << 20


def huge_json():
    return b"[" + b"0," * (HUGE // 2 - 1) + b"0]"


def huge_not_json():
    # Same size, but neither ends with ']' nor is printable: read as FP32
    # bytes and refused at once (not a multiple of 4).
    return huge_json()[:-1] + b"\x01"


def peak_rss(pid):
    with open(f"/proc/{pid}/status") as st:
        for line in st:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def peak_growth(command, vector):
    """(error text, growth of the peak RSS) for `command` run on a fresh server."""
    s = Server()
    try:
        c = s.client()
        args = {"SET": ["EMBCACHE.SET", "ns", "m", "t", vector],
                "MSET": ["EMBCACHE.MSET", "ns", "m", "t1", vector, "t2", vector]}[command]
        before = peak_rss(s.proc.pid)
        with pytest.raises(redis.ResponseError) as e:
            c.execute_command(*args)
        return str(e.value), peak_rss(s.proc.pid) - before
    finally:
        s.stop()


@pytest.mark.parametrize("command", ["SET", "MSET"])
def test_a_huge_json_vector_is_refused_without_parsing_it_whole(command):
    err, growth = peak_growth(command, huge_json())
    assert "max-dims" in err, err
    _, buffers = peak_growth(command, huge_not_json())
    assert growth < buffers + HUGE / 2, (
        f"peak RSS grew by {growth / HUGE:.1f}x the argument, "
        f"the argument buffers alone by {buffers / HUGE:.1f}x")


# --------------------------------------------------------------------------
# A6. The daily budget cannot be overshot by a whole call: a call whose own
# estimate (ceil(bytes / 4) per missing text) is more than the budget left
# is refused. Today only "already spent >= budget" is checked.

@pytest.fixture
def fresh(upstream):
    """A server of its own: tokens spent today live in the server's memory."""
    s = Server(module_args=["upstream-url", upstream.url], env={"OPENAI_API_KEY": API_KEY})
    upstream.reset()
    yield s.client()
    s.stop()


def test_a_call_larger_than_the_budget_left_is_refused(fresh, upstream):
    fresh.config_set("aicache.daily-token-budget", 100)
    # 3 x 200 bytes: 50 tokens each, 150 in all. Each text alone would fit,
    # and nothing is spent yet: only the whole call's estimate is over.
    texts = [c * 200 for c in "abc"]
    with pytest.raises(redis.ResponseError) as e:
        fetch(fresh, "bud", *texts)
    assert str(e.value).startswith("THROTTLED"), str(e.value)
    assert upstream.calls() == 0 and fresh.dbsize() == 0
    # A call that fits is admitted (the fake bills 2 tokens per input).
    assert fetch(fresh, "bud", "y" * 40) == [expected("y" * 40)]
    assert info_fields(fresh)["daily_budget_left"] == 98
    # 396 bytes estimate 99 tokens: one more than is left.
    with pytest.raises(redis.ResponseError, match="^THROTTLED"):
        fetch(fresh, "bud", "z" * 396)
    assert upstream.calls() == 1


# --------------------------------------------------------------------------
# A10. Fills respect maxmemory. Today the only check is at the start of a
# call, so one call (or many admitted together) can write far past it;
# fixed, a fill skips writes that would go over (writes_skipped) and still
# replies with every vector.

MAXMEMORY = 10 << 20
BIG_MODEL = "text-embedding-3-small"  # 1536 dimensions in the fake
BIG_VECTOR = 1536 * 4


@pytest.fixture
def capped(upstream):
    s = Server(module_args=["upstream-url", upstream.url],
               extra=["--maxmemory", "10mb", "--maxmemory-policy", "noeviction"],
               env={"OPENAI_API_KEY": API_KEY})
    upstream.reset()
    yield s
    s.stop()


def used_memory(c):
    return c.info("memory")["used_memory"]


def test_one_big_fetch_stays_within_maxmemory(capped):
    c = capped.client()
    texts = [f"mm-{i}" for i in range(2000)]  # ~12 MB of vectors, more than maxmemory
    got = fetch(c, "mm", *texts, model=BIG_MODEL)
    assert len(got) == 2000 and all(len(v) == BIG_VECTOR for v in got)
    used = used_memory(c)
    assert used <= MAXMEMORY * 1.1, f"used_memory {used} is over maxmemory {MAXMEMORY}"
    assert info_fields(c)["writes_skipped"] > 0
    # Guard (passes today): over maxmemory, hits are still served, and a miss
    # is either refused or answered without being stored. Lowering maxmemory
    # puts the node surely over it.
    stored = [t for t, v in zip(texts, c.execute_command("EMBCACHE.MGET", "mm", BIG_MODEL, *texts))
              if v is not None]
    assert stored, "the first fills, made under maxmemory, must be stored"
    c.config_set("maxmemory", MAXMEMORY // 10)
    filled = dict(zip(texts, got))
    hits = stored[:50]
    assert fetch(c, "mm", *hits, model=BIG_MODEL) == [filled[t] for t in hits]
    try:
        fetch(c, "mm", "not stored", model=BIG_MODEL)
    except redis.ResponseError:
        pass
    assert c.execute_command("EMBCACHE.GET", "mm", BIG_MODEL, "not stored") is None


def test_concurrent_fetches_stay_within_maxmemory(capped, upstream):
    # The upstream is slow enough that all 20 calls are admitted (blocked on
    # their fills) before the first vector lands: no start-of-call check can
    # stop them, only a check at write time.
    upstream.latency(1000)
    results = [None] * 20

    def run(i):
        c = capped.client()
        try:
            results[i] = fetch(c, "cc", *[f"cc-{i}-{j}" for j in range(100)], model=BIG_MODEL)
        except redis.ResponseError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    c = capped.client()
    wait_for(lambda: c.info("clients")["blocked_clients"] == 20, what="all 20 calls to block")
    upstream.latency(0)
    for t in threads:
        t.join()
    for r in results:
        assert isinstance(r, list) and len(r) == 100 and all(len(v) == BIG_VECTOR for v in r), r
    used = used_memory(c)
    assert used <= MAXMEMORY * 1.1, f"used_memory {used} is over maxmemory {MAXMEMORY}"
    assert info_fields(c)["writes_skipped"] > 0


# --------------------------------------------------------------------------
# A13. Counters, load-time validation, upstream error text, fail memory and
# leases.

def test_config_resetstat_resets_the_module_counters(f):
    fetch(f, "rs", "a", "b")
    fetch(f, "rs", "a")
    info = info_fields(f)
    assert info["hits"] > 0 and info["misses"] > 0 and info["upstream_requests"] > 0
    f.execute_command("CONFIG", "RESETSTAT")
    info = info_fields(f)
    counters = ["hits", "misses", "upstream_requests", "fills_started", "tokens_total"]
    assert {k: info[k] for k in counters} == dict.fromkeys(counters, 0)


def test_an_upstream_url_with_an_impossible_port_fails_the_load():
    # upstream-url is PROTECTED, so CONFIG SET cannot try it: the module must
    # refuse the value at load time, and then redis-server exits.
    # The highest valid port loads: the refusal below is about the port.
    assert load_outcome(["upstream-url", "http://127.0.0.1:65535/v1"])[0] == "serving"
    outcome, status = load_outcome(["upstream-url", "http://127.0.0.1:65536/v1"])
    assert outcome == "exited", "redis-server loaded the module with upstream-url port 65536"
    assert status != 0


def test_a_429_carries_the_upstreams_message(f, upstream):
    # Guard: passes on the build this was written against (see the report).
    f.config_set("aicache.upstream-retries", 0)
    upstream.fault("status", times=10, status=429, message="Rate limit reached for requests")
    with pytest.raises(redis.ResponseError) as e:
        fetch(f, "rl", "a")
    msg = str(e.value)
    assert "HTTP 429" in msg and "Rate limit reached" in msg and "(no message)" not in msg, msg


def fail_once(f, upstream, c, text, *opts):
    """A failed fill of `text` in c's DB, remembered by aicache.fail-memory-ms.
    Callers pass a text of their own: the memory outlives FLUSHALL."""
    f.config_set("aicache.fail-memory-ms", 5000)
    f.config_set("aicache.upstream-retries", 0)
    upstream.fault("status", status=500, message="upstream broke")
    with pytest.raises(redis.ResponseError, match="HTTP 500: upstream broke$"):
        fetch(c, "fm", text, opts=list(opts))


def test_a_failed_nostore_fill_does_not_fail_storing_calls_fast(f, upstream):
    # Fail memory uses the single-flight key (entry, DB, NOSTORE): a NOSTORE
    # failure is remembered for NOSTORE calls only. Today it is keyed by the
    # entry alone, so the storing call below fails fast.
    x = unique("nostore")
    fail_once(f, upstream, f, x, "NOSTORE")
    with pytest.raises(redis.ResponseError, match="failing fast"):
        fetch(f, "fm", x, opts=["NOSTORE"])
    assert fetch(f, "fm", x) == [expected(x)]
    assert upstream.calls() == 2


def test_a_failed_fill_in_one_db_does_not_fail_another_db_fast(f, fserver, upstream):
    x = unique("db")
    fail_once(f, upstream, f, x)
    with pytest.raises(redis.ResponseError, match="failing fast"):
        fetch(f, "fm", x)
    db1 = fserver.client(db=1)
    try:
        assert fetch(db1, "fm", x) == [expected(x)]
        assert db1.execute_command("EMBCACHE.GET", "fm", M, x) == expected(x)
    finally:
        db1.flushdb()
        db1.close()
    assert upstream.calls() == 2


def test_a_job_that_waited_past_its_lease_does_not_claim_a_0_ms_timeout(f, fserver, upstream):
    # Every worker (8, fixed at load) is held by a 600 ms call made under the
    # default lease; then calls with a 200 ms lease queue behind them and
    # reach a worker only after their leases have run out. Today those report
    # "upstream timed out after 0 ms", blaming an upstream never called.
    upstream.latency(600)
    # One request per call: micro-batching would merge them.
    f.config_set("aicache.batch-window-ms", 0)
    workers = info_fields(f)["workers"]
    total = workers + 4
    results = [None] * total

    def run(i):
        c = fserver.client()
        try:
            results[i] = fetch(c, "lease", f"lease-{i}", opts=["TIMEOUT", 5000])
        except redis.ResponseError as e:
            results[i] = str(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(total)]
    for t in threads[:workers]:
        t.start()
    wait_for(lambda: upstream.calls() == workers, what="every worker to be calling upstream")
    f.config_set("aicache.lease-ms", 200)
    for t in threads[workers:]:
        t.start()
    wait_for(lambda: info_fields(f)["queue_depth"] == 4, what="4 jobs queued behind the workers")
    for t in threads:
        t.join()
    assert results[:workers] == [[expected(f"lease-{i}")] for i in range(workers)]
    late = results[workers:]
    assert not [r for r in late if isinstance(r, str) and "after 0 ms" in r], late
    assert all(r == [expected(f"lease-{i}")] or isinstance(r, str)
               for i, r in enumerate(late, start=workers)), late


# Review findings, each pinned by a test.

def test_a_refused_or_discarded_resetstat_resets_nothing(upstream):
    s = Server(module_args=["upstream-url", upstream.url], env={"OPENAI_API_KEY": "sk-x"})
    try:
        c = s.client()
        # This connection stays authenticated; new ones need the password.
        c.config_set("requirepass", "pw")
        c.execute_command("EMBCACHE.SET", "rs", "m", "t", "[1,2]")
        c.execute_command("EMBCACHE.FETCH", "rs", "m", 1, "t")
        hits = info_fields(c)["hits"]
        assert hits == 1
        # Unauthenticated: refused with NOAUTH, counters untouched.
        raw = connect(s.port)
        raw.sendall(resp("CONFIG", "RESETSTAT") + resp("PING"))
        assert raw.recv(1024).startswith(b"-NOAUTH")
        # Queued in MULTI, then discarded.
        c.execute_command("MULTI")
        c.execute_command("CONFIG", "RESETSTAT")
        c.execute_command("DISCARD")
        c.ping()
        assert info_fields(c)["hits"] == hits
        c.execute_command("CONFIG", "RESETSTAT")
        assert info_fields(c)["hits"] == 0
    finally:
        s.stop()


@pytest.mark.parametrize("n,ok", [("1e9223372036854775807", True), ("12E9223372036854775806", True),
                                  ("100e9223372036854775806", False), ("1e-9223372036854775808", True)])
def test_extreme_exponents_in_a_request_never_hurt_the_server(f, fserver, n, ok):
    body = '{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":%s}' % n
    if ok:
        assert f.execute_command("LLMCACHE.KEY", "ns", body).startswith(b"aicache:llm:v1:")
    else:
        with pytest.raises(redis.ResponseError, match="bad number"):
            f.execute_command("LLMCACHE.KEY", "ns", body)
    assert fserver.alive()


def test_a_full_cache_under_an_eviction_policy_keeps_storing_fills(upstream):
    s = Server(module_args=["upstream-url", upstream.url],
               extra=["--maxmemory-policy", "allkeys-lru"], env={"OPENAI_API_KEY": "sk-x"})
    try:
        c = s.client()
        c.execute_command("DEBUG", "POPULATE", 20000, "filler", 200)
        limit = c.info("memory")["used_memory"]
        c.config_set("maxmemory", limit)
        # 1536-d entries (text-embedding-3-small in the fake), 40 calls of 10.
        for i in range(40):
            texts = [f"ev-{i}-{j}" for j in range(10)]
            got = c.execute_command("EMBCACHE.FETCH", "ev", "text-embedding-3-small", 10, *texts)
            assert all(len(v) == 6144 for v in got)
        stored = sum(c.exists(c.execute_command("EMBCACHE.KEY", "ev", "text-embedding-3-small",
                                                f"ev-39-{j}")) for j in range(10))
        info = info_fields(c)
        # Before the fix nearly every write at the limit was skipped (395 of
        # 400). Redis's LRU is sampled, so one fresh key may still go.
        assert stored >= 8, (stored, info["writes_skipped"])
        assert info["writes_skipped"] <= 40, info["writes_skipped"]
        assert c.info("memory")["used_memory"] <= limit * 1.15
    finally:
        s.stop()


def test_failure_memory_keeps_a_refused_input_an_error_element(f, upstream):
    f.config_set("aicache.fail-memory-ms", 60000)
    upstream.poison("POISON")
    first = fetch(f, "fmi", "POISON-1", "good-1")
    assert isinstance(first[0], redis.ResponseError) and first[1] == expected("good-1")
    calls = upstream.calls()
    # Remembered as this input's own failure: it fails alone, at once, and
    # the rest of the call is still filled.
    again = fetch(f, "fmi", "POISON-1", "good-2")
    assert isinstance(again[0], redis.ResponseError) and "HTTP 400" in str(again[0])
    assert again[1] == expected("good-2")
    assert upstream.stats()["inputs"][-1:] == [1], "the refused text was sent again"
    assert upstream.calls() == calls + 1
    # Alone, it is answered without blocking or calling upstream at all.
    assert isinstance(fetch(f, "fmi", "POISON-1")[0], redis.ResponseError)
    assert upstream.calls() == calls + 1


def test_a_429_with_a_long_body_still_carries_its_message(f, upstream):
    # A 429 page longer than the 64 KB the module reads used to come back
    # as "(no message)": the start of it is the message.
    f.config_set("aicache.upstream-retries", 0)
    upstream.fault("status", status=429, message="Rate limit reached " + "x" * 100_000)
    with pytest.raises(redis.ResponseError) as e:
        fetch(f, "long429", "a")
    assert "HTTP 429: Rate limit reached xxx" in str(e.value), e.value
    assert "(no message)" not in str(e.value)
    upstream.fault("status", status=503, message="")
    with pytest.raises(redis.ResponseError, match="HTTP 503: Service Unavailable"):
        fetch(f, "long429", "b")


def test_resetstat_is_seen_when_commands_follow_it_at_once_or_exec_runs_it(f, fserver):
    def hits():
        return info_fields(f)["hits"]

    f.execute_command("EMBCACHE.SET", "rs2", "m", "t", "[1,2]")
    f.execute_command("EMBCACHE.FETCH", "rs2", "m", 1, "t")
    assert hits() > 0
    # Pipelined: Redis's command count climbs back within the same turn.
    sock = connect(fserver.port)
    sock.sendall(resp("CONFIG", "RESETSTAT") + resp("PING") * 200)
    want = b"+OK\r\n" + b"+PONG\r\n" * 200
    got = b""
    while len(got) < len(want):
        got += sock.recv(65536)
    assert got == want
    assert hits() == 0
    # Run by EXEC, where the filter only saw EXEC: INFO notices the reset.
    f.execute_command("EMBCACHE.FETCH", "rs2", "m", 1, "t")
    assert hits() == 1
    p = f.pipeline(transaction=True)
    p.execute_command("CONFIG", "RESETSTAT")
    p.execute()
    assert hits() == 0


def test_a_script_serves_hits_whatever_the_tenant_source(f):
    f.config_set("aicache.tenant-source", "user")
    f.execute_command("EMBCACHE.SET", "scr", "m", "t", "[1,2]")
    got = f.eval("return redis.call('EMBCACHE.FETCH', 'scr', 'm', 1, 't')", 1, "scr")
    assert got == [f.execute_command("EMBCACHE.GET", "scr", "m", "t")]
    with pytest.raises(redis.ResponseError, match="script or module call|cannot block"):
        f.eval("return redis.call('EMBCACHE.FETCH', 'scr', 'm', 1, 'miss')", 1, "scr")
