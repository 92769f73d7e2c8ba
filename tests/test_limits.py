"""AICACHE.THROTTLE and the spend limits FETCH applies to upstream calls."""
import threading
import time

import pytest
import redis

from helpers import Server, info_fields, wait_for
from test_fetch import REQ, expected, fetch, llm

T = "AICACHE.THROTTLE"


def test_throttle_reply_and_window(r):
    assert r.execute_command(T, "rl:a", 3, 1000) == [1, 3, 2, -1, pytest.approx(1000, abs=40)]
    assert r.execute_command(T, "rl:a", 3, 1000, "COST", 2)[:4] == [1, 3, 0, -1]
    allowed, limit, remaining, retry, reset = r.execute_command(T, "rl:a", 3, 1000)
    assert (allowed, limit, remaining) == (0, 3, 0)
    assert 900 <= retry <= 1040 and 900 <= reset <= 1040
    # Over max: it can never fit, and retry_after says so.
    assert r.execute_command(T, "rl:a", 3, 1000, "COST", 4)[:4] == [0, 3, 0, -1]
    assert 900 <= r.pttl("rl:a") <= 1041, "the key must expire with its window"


def test_throttle_frees_room_after_the_window(r):
    assert r.execute_command(T, "rl:w", 2, 100, "COST", 2)[0] == 1
    retry = r.execute_command(T, "rl:w", 2, 100)[3]
    assert 0 < retry <= 110
    wait_for(lambda: r.execute_command(T, "rl:w", 2, 100)[0] == 1, timeout=2, what="room")
    wait_for(lambda: r.exists("rl:w") == 0, timeout=2, what="the key to expire")


def test_throttle_huge_max_and_tiny_windows(r):
    assert r.execute_command(T, "rl:h", 10**9, 1, "COST", 10**9)[:3] == [1, 10**9, 0]
    for _ in range(100):
        assert r.execute_command(T, "rl:big", 10**9, 60000, "COST", 10**6)[0] == 1
    assert r.execute_command(T, "rl:big", 10**9, 60000)[2] == 10**9 - 10**8 - 1


@pytest.mark.parametrize("args,msg", [
    (["rl:x", 0, 1000], "max must be an integer"),
    (["rl:x", -1, 1000], "max must be an integer"),
    (["rl:x", "1.5", 1000], "max must be an integer"),
    (["rl:x", 2**64, 1000], "max must be an integer"),
    (["rl:x", "nan", 1000], "max must be an integer"),
    (["rl:x", 5, 0], "window-ms must be an integer"),
    (["rl:x", 5, "1e3"], "window-ms must be an integer"),
    (["rl:x", 5, 10**15], "window-ms must be an integer"),
    (["rl:x", 5, 1000, "COST", 0], "COST must be an integer"),
    (["rl:x", 5, 1000, "COST", "x\x00"], "COST must be an integer"),
    (["rl:x", 5, 1000, "WEIGHT", 1], "unknown option 'WEIGHT'"),
    (["rl:x", 5, 1000, "COST"], "unknown option 'COST'"),
    (["rl:x", 5], "wrong number of arguments"),
    (["rl:x", 5, 1000, "COST", 1, 2], "wrong number of arguments"),
])
def test_throttle_bad_input_changes_nothing(r, args, msg):
    r.execute_command(T, "rl:x", 5, 1000)
    before = r.get("rl:x")
    with pytest.raises(redis.ResponseError, match=msg):
        r.execute_command(T, *args)
    assert r.get("rl:x") == before


def test_throttle_refuses_foreign_keys(r):
    r.set("plain", "hello")
    with pytest.raises(redis.ResponseError, match="not AICACHE.THROTTLE state"):
        r.execute_command(T, "plain", 5, 1000)
    r.lpush("list", 1)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        r.execute_command(T, "list", 5, 1000)
    assert r.get("plain") == b"hello"


def test_50_clients_never_exceed_max_in_any_window(server):
    """Each decision is bracketed by TIME inside one MULTI, so its server
    time is known to within microseconds; a violation is counted only when
    max + 1 admissions certainly fall inside one window."""
    max_, window_ms, run_s = 7, 200, 1.5
    admitted = []
    lock = threading.Lock()
    stop = time.monotonic() + run_s

    def hammer():
        c = server.client()
        while time.monotonic() < stop:
            p = c.pipeline(transaction=True)
            p.execute_command("TIME")
            p.execute_command(T, "rl:hammer", max_, window_ms)
            p.execute_command("TIME")
            before, decision, after = p.execute()
            if decision[0] == 1:
                us = lambda t: int(t[0]) * 1_000_000 + int(t[1])  # noqa: E731
                with lock:
                    admitted.append((us(before), us(after)))

    threads = [threading.Thread(target=hammer) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    admitted.sort()
    assert len(admitted) >= max_ * run_s * 1000 / window_ms * 0.8, len(admitted)
    w = window_ms * 1000
    for i in range(len(admitted) - max_):
        first_before = admitted[i][0]
        last_after = max(a for _, a in admitted[i:i + max_ + 1])
        assert last_after - first_before >= w, f"{max_ + 1} admissions within one window at {i}"


def test_replica_aof_and_reload_hold_the_masters_exact_state():
    master = Server(extra=["--appendonly", "yes"])
    replica = Server(extra=["--replicaof", "127.0.0.1", master.port])
    try:
        m, rep = master.client(), replica.client()
        wait_for(lambda: rep.info("replication")["master_link_status"] == "up", what="link")
        for i in range(5):
            m.execute_command(T, "rl:rep", 3, 60000)
        assert m.execute_command("WAIT", 1, 5000) == 1
        state = m.get("rl:rep")
        assert state and rep.get("rl:rep") == state
        assert rep.execute_command("PEXPIRETIME", "rl:rep") == m.execute_command("PEXPIRETIME", "rl:rep")
        m.execute_command("DEBUG", "RELOAD")
        assert m.get("rl:rep") == state
        m.execute_command("DEBUG", "LOADAOF")
        assert m.get("rl:rep") == state
        assert m.execute_command(T, "rl:rep", 3, 60000)[0] == 0, "the reloaded state must still be full"
    finally:
        replica.stop()
        master.stop()


@pytest.fixture
def lim(upstream):
    """A fresh server per test: spend windows and the budget live in memory."""
    s = Server(module_args=["upstream-url", upstream.url])
    upstream.reset()
    yield s.client()
    s.stop()


def throttled(fn):
    t0 = time.monotonic()
    with pytest.raises(redis.ResponseError) as e:
        fn()
    assert time.monotonic() - t0 < 0.5, "a throttled call must not wait"
    assert str(e.value).startswith("THROTTLED"), str(e.value)
    return str(e.value)


def test_a_throttled_tenant_gets_retry_after_and_makes_no_call(lim, upstream):
    lim.config_set("aicache.tenant-max-requests", 1)
    assert fetch(lim, "q", "one", opts=["TENANT", "acme"]) == [expected("one")]
    msg = throttled(lambda: fetch(lim, "q", "two", opts=["TENANT", "acme"]))
    assert "tenant 'acme'" in msg and "aicache.tenant-max-requests 1" in msg
    retry = int(msg.split("retry after ")[1].split(" ms")[0])
    assert 55_000 <= retry <= 61_000
    assert upstream.calls() == 1 and lim.info("clients")["blocked_clients"] == 0
    # Hits are free, other tenants and untagged calls have their own room.
    assert fetch(lim, "q", "one", opts=["TENANT", "acme"]) == [expected("one")]
    assert fetch(lim, "q", "two", opts=["TENANT", "other"]) == [expected("two")]
    assert fetch(lim, "q", "three") == [expected("three")]
    llm_msg = throttled(lambda: llm(lim, REQ, "TENANT", "acme"))
    assert "tenant 'acme'" in llm_msg
    assert upstream.calls() == 3 and info_fields(lim)["throttled_tenant"] == 2


def test_joining_a_running_fill_costs_nothing(lim, upstream):
    lim.config_set("aicache.tenant-max-requests", 1)
    upstream.latency(400)
    port = lim.connection_pool.connection_kwargs["port"]
    first = []
    t = threading.Thread(target=lambda: first.append(
        fetch(redis.Redis(port=port), "j", "shared", opts=["TENANT", "payer"])))
    t.start()
    wait_for(lambda: info_fields(lim)["fills_in_flight"] == 1, what="fill")
    # "rider" has one request of room; joining must not use it.
    assert fetch(lim, "j", "shared", opts=["TENANT", "rider"]) == [expected("shared")]
    t.join()
    upstream.latency(0)
    assert fetch(lim, "j", "own", opts=["TENANT", "rider"]) == [expected("own")]
    assert upstream.calls() == 2


def test_tokens_are_estimated_then_settled_with_usage(lim, upstream):
    # The fake reports 2 tokens per input; a 40-byte text is estimated at 10.
    lim.config_set("aicache.tenant-max-tokens", 12)
    fetch(lim, "tok", "x" * 40, opts=["TENANT", "t"])
    # Unsettled, 10 + 10 > 12 would refuse this; settled, 2 + 10 fits.
    fetch(lim, "tok", "y" * 40, opts=["TENANT", "t"])
    throttled(lambda: fetch(lim, "tok", "z" * 40, opts=["TENANT", "t"]))
    assert upstream.calls() == 2


def test_global_limits_cover_every_tenant(lim, upstream):
    lim.config_set("aicache.global-max-requests", 2)
    lim.config_set("aicache.quota-window-ms", 300)
    fetch(lim, "g", "a", opts=["TENANT", "x"])
    fetch(lim, "g", "b", opts=["TENANT", "y"])
    msg = throttled(lambda: fetch(lim, "g", "c"))
    assert "the global limit" in msg and "retry after" in msg
    assert fetch(lim, "g", "a") == [expected("a")]
    def admitted():
        try:
            return fetch(lim, "g", "c") == [expected("c")]
        except redis.ResponseError as e:
            assert str(e).startswith("THROTTLED")
            return False

    wait_for(admitted, timeout=3, what="the window to pass")
    assert info_fields(lim)["throttled_global"] >= 1


def test_the_daily_budget_stops_misses_but_not_hits(lim, upstream):
    lim.config_set("aicache.daily-token-budget", 5)
    for t in ("a", "b", "c"):
        fetch(lim, "bud", t)  # 2 tokens each, settled from usage
    info = info_fields(lim)
    assert info["tokens_spent_today"] == 6 and info["daily_budget_left"] == 0
    msg = throttled(lambda: fetch(lim, "bud", "d"))
    assert "daily token budget" in msg
    assert fetch(lim, "bud", "a", "b") == [expected("a"), expected("b")]
    assert upstream.calls() == 3 and info_fields(lim)["throttled_budget"] == 1
    lim.config_set("aicache.daily-token-budget", 0)
    assert info_fields(lim)["daily_budget_left"] == -1
    fetch(lim, "bud", "d")


def test_failed_calls_refund_their_tokens(lim, upstream):
    lim.config_set("aicache.tenant-max-tokens", 10)
    upstream.fault("status", status=400)
    [err] = fetch(lim, "ref", "x" * 40, opts=["TENANT", "t"])
    assert isinstance(err, redis.ResponseError) and "HTTP 400" in str(err)
    assert fetch(lim, "ref", "y" * 40, opts=["TENANT", "t"]) == [expected("y" * 40)]


def test_tenant_option_is_validated(lim):
    for opts, msg in ((["TENANT"], "TENANT must be 1 to 256 bytes"),
                      (["TENANT", ""], "TENANT must be 1 to 256 bytes"),
                      (["TENANT", "x" * 257], "TENANT must be 1 to 256 bytes")):
        with pytest.raises(redis.ResponseError, match=msg):
            fetch(lim, "v", "a", opts=opts)


def test_huge_max_tokens_cannot_break_the_budget(lim, upstream):
    lim.config_set("aicache.daily-token-budget", 1000)
    huge = {**REQ, "max_tokens": 2**64 - 1}
    # Its own estimate can never fit the budget: refused, nothing sent.
    with pytest.raises(redis.ResponseError, match="THROTTLED this call alone is over the limit"):
        llm(lim, huge)
    assert upstream.calls() == 0
    req = {**REQ, "max_tokens": 100}
    llm(lim, req)  # admitted; settled to the real usage
    info = info_fields(lim)
    assert info["tokens_spent_today"] == 10 and info["daily_budget_left"] == 990
    upstream.fault("status", status=400)
    with pytest.raises(redis.ResponseError, match="HTTP 400"):
        llm(lim, {**req, "seed": 1})
    assert info_fields(lim)["tokens_spent_today"] == 10, "a failed call must be refunded"


def test_a_chat_follower_is_not_charged(lim, upstream):
    lim.config_set("aicache.tenant-max-requests", 1)
    upstream.latency(400)
    port = lim.connection_pool.connection_kwargs["port"]
    t = threading.Thread(target=lambda: llm(redis.Redis(port=port), REQ, "TENANT", "payer"))
    t.start()
    wait_for(lambda: info_fields(lim)["fills_in_flight"] == 1, what="fill")
    llm(lim, REQ, "TENANT", "rider")
    t.join()
    upstream.latency(0)
    llm(lim, {**REQ, "seed": 2}, "TENANT", "rider")
    assert upstream.calls() == 2
