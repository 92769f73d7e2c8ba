"""Upstream economy: routes to several providers, Azure auth, failover, the
chat fallback model, circuit breaking, refresh-ahead and cross-client
micro-batching, against real fake upstreams (one process each)."""
import json
import os
import socket
import stat
import tempfile
import time

import pytest
import redis

from conftest import reset_configs
from helpers import Server, Upstream, info_fields, read_log, resp, wait_for
from test_fetch import M, expected
from test_singleflight import run_all

AZ_KEY = "az-test-key-9f8e7d6c5b4a39281706"
BETA_KEY = "beta-route-secret-0a1b2c3d4e5f6789"
GLOBAL_KEY = "sk-global-economy-key-0123456789ab"


@pytest.fixture(scope="module")
def ups():
    us = {n: Upstream(name=n) for n in ("alpha", "beta", "gamma")}
    yield us
    for u in us.values():
        u.stop()


@pytest.fixture(scope="module")
def key_file():
    d = tempfile.mkdtemp(prefix="aicache-route-key-")
    p = os.path.join(d, "beta.key")
    with open(p, "w") as fh:
        fh.write(BETA_KEY + "\n")
    os.chmod(p, stat.S_IRUSR | stat.S_IWUSR)
    return p


@pytest.fixture(scope="module")
def eserver(ups):
    s = Server(module_args=["upstream-url", ups["alpha"].url],
               extra=["--enable-protected-configs", "yes"],
               env={"OPENAI_API_KEY": GLOBAL_KEY, "AZURE_TEST_API_KEY": AZ_KEY})
    yield s
    alive = s.proc.poll() is None
    s.stop()
    assert alive, "redis-server died during the economy tests"


@pytest.fixture
def e(eserver, ups):
    c = eserver.client()
    wait_for(lambda: info_fields(c)["fills_in_flight"] == 0, what="previous fills to finish")
    c.flushall()
    for u in ups.values():
        u.reset()
    c.config_set("aicache.upstream-backoff-base-ms", 5)
    c.config_set("aicache.upstream-backoff-cap-ms", 20)
    c.config_resetstat()
    yield c
    reset_configs(c)
    for i in range(1, 9):
        c.config_set(f"aicache.route-{i}", "")
    c.close()


def route(c, slot, **fields):
    text = ";".join(f"{k.replace('_', '-')}={v}" for k, v in fields.items())
    c.config_set(f"aicache.route-{slot}", text)


def emb(c, model, *texts, opts=()):
    return c.execute_command("EMBCACHE.FETCH", "ns", model, len(texts), *texts, *opts)


def chat_req(model, text="hello"):
    return json.dumps({"model": model, "messages": [{"role": "user", "content": text}]})


def test_requests_follow_the_route_of_their_model(e, ups):
    route(e, 1, name="beta", models="beta-*,chat-beta", url=ups["beta"].url, auth="none")
    assert emb(e, "beta-emb", "x") == [expected("x", "beta-emb")]
    assert emb(e, M, "x") == [expected("x")]
    assert (ups["beta"].calls("embeddings"), ups["alpha"].calls("embeddings")) == (1, 1)
    answer = json.loads(e.execute_command("LLMCACHE.FETCH", "ns", chat_req("chat-beta")))
    assert answer["system_fingerprint"] == "fp_beta"
    # The default route keeps the legacy key; an auth=none route gets none.
    assert ups["beta"].stats()["auth"] == [""]
    assert ups["alpha"].stats()["auth"] == ["Bearer " + GLOBAL_KEY]
    info = info_fields(e)
    assert info["endpoint_beta_requests"] == 2 and info["endpoint_default_requests"] == 1


def test_azure_routes_send_the_api_key_header_version_and_deployment(e, ups):
    gamma = ups["gamma"]
    gamma.require_auth("azure", AZ_KEY)
    route(e, 1, name="az", models="az-*", url=gamma.base, auth="azure",
          api_version="2024-06-01", key_env="AZURE_TEST_API_KEY",
          deployments="az-chat:prod-chat")
    answer = json.loads(e.execute_command("LLMCACHE.FETCH", "ns", chat_req("az-chat")))
    assert answer["system_fingerprint"] == "fp_gamma"
    assert emb(e, "az-emb", "t") == [expected("t", "az-emb")]
    st = gamma.stats()
    assert st["paths"] == [
        "/openai/deployments/prod-chat/chat/completions?api-version=2024-06-01",
        "/openai/deployments/az-emb/embeddings?api-version=2024-06-01"]
    assert st["api_keys"] == [AZ_KEY] and st["auth"] == [""], "api-key header only"
    # A wrong key is refused upstream and never echoed.
    gamma.require_auth("azure", "another-key")
    with pytest.raises(redis.ResponseError, match="HTTP 401") as err:
        emb(e, "az-emb", "u")
    assert AZ_KEY not in str(err.value)


def test_failover_tries_endpoints_in_order_once_retries_are_spent(e, ups):
    e.config_set("aicache.upstream-retries", 1)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    route(e, 1, name="primary", models="fo-*", url=dead, auth="none", fallback="second,third")
    route(e, 2, name="second", url=ups["beta"].url, auth="none")
    route(e, 3, name="third", url=ups["gamma"].url, auth="none")
    ups["beta"].fault("status", times=2, status=503, message="down")
    answer = json.loads(e.execute_command("LLMCACHE.FETCH", "ns", chat_req("fo-chat")))
    assert answer["system_fingerprint"] == "fp_gamma"
    assert ups["beta"].calls("chat") == 2, "the second endpoint's retry was spent first"
    info = info_fields(e)
    assert info["failovers"] == 2
    assert info["endpoint_primary_errors"] == 2 and info["endpoint_third_errors"] == 0
    # A 400 names the request, not the endpoint: no failover.
    route(e, 1, name="primary", models="fo-*", url=ups["beta"].url, auth="none", fallback="third")
    ups["beta"].fault("status", status=400, message="bad request")
    with pytest.raises(redis.ResponseError, match="HTTP 400"):
        e.execute_command("LLMCACHE.FETCH", "ns", chat_req("fo-chat", "other"))
    assert ups["gamma"].calls("chat") == 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_fallback_model_answers_marked_and_is_never_stored_under_the_original(e, ups):
    e.config_set("aicache.upstream-retries", 0)
    route(e, 1, name="big", models="gpt-big", url=ups["beta"].url, auth="none",
          fallback_model="gpt-small")
    route(e, 2, name="small", models="gpt-small", url=ups["gamma"].url, auth="none")
    ups["beta"].fault("status", status=429, message="rate limited")
    body, meta = e.execute_command("LLMCACHE.FETCH", "ns", chat_req("gpt-big"), "WITHMETA")
    answer = json.loads(body)
    assert answer["model"] == "gpt-small" and answer["system_fingerprint"] == "fp_gamma"
    assert meta[0] == b"fallback" and meta[2] > 0
    assert e.execute_command("LLMCACHE.GET", "ns", chat_req("gpt-big")) is None
    assert e.execute_command("LLMCACHE.GET", "ns", chat_req("gpt-small")) == body
    assert info_fields(e)["chat_fallbacks"] == 1
    # The model back: the original is asked, answered and stored again.
    body2 = e.execute_command("LLMCACHE.FETCH", "ns", chat_req("gpt-big"))
    assert json.loads(body2)["system_fingerprint"] == "fp_beta"
    assert e.execute_command("LLMCACHE.GET", "ns", chat_req("gpt-big")) == body2
    # Embeddings never change model: a 429 is the caller's error.
    route(e, 1, name="big", models="gpt-big,emb-big", url=ups["beta"].url, auth="none",
          fallback_model="gpt-small")
    ups["beta"].fault("status", status=429, message="rate limited")
    with pytest.raises(redis.ResponseError, match="HTTP 429"):
        emb(e, "emb-big", "v")
    assert ups["gamma"].calls("embeddings") == 0


def test_the_breaker_opens_fails_fast_probes_and_closes(e, ups):
    e.config_set("aicache.upstream-retries", 0)
    e.config_set("aicache.breaker-failures", 3)
    e.config_set("aicache.breaker-cooldown-ms", 400)
    route(e, 1, name="flaky", models="fl-*", url=ups["beta"].url, auth="none")
    beta = ups["beta"]
    beta.fault("status", times=3, status=503, message="down")
    for i in range(3):
        with pytest.raises(redis.ResponseError, match="HTTP 503"):
            emb(e, "fl-m", f"t{i}")
    assert info_fields(e)["endpoint_flaky_state"] == "open"
    with pytest.raises(redis.ResponseError, match="circuit is open"):
        emb(e, "fl-m", "fast")
    assert beta.calls("embeddings") == 3, "an open circuit sends nothing"
    wait_for(lambda: info_fields(e)["endpoint_flaky_state"] == "half_open", what="half-open")
    beta.fault("status", status=503, message="still down")
    with pytest.raises(redis.ResponseError, match="HTTP 503"):
        emb(e, "fl-m", "probe1")
    assert info_fields(e)["endpoint_flaky_state"] == "open", "a failed probe re-opens"
    wait_for(lambda: info_fields(e)["endpoint_flaky_state"] == "half_open", what="half-open")
    assert emb(e, "fl-m", "probe2") == [expected("probe2", "fl-m")]
    info = info_fields(e)
    assert info["endpoint_flaky_state"] == "closed" and info["endpoint_flaky_opened"] == 2
    assert info["endpoint_flaky_open"] == 0


def test_refresh_ahead_keeps_a_read_entry_alive_with_one_call_per_period(e, ups):
    e.config_set("aicache.refresh-ahead-pct", 50)
    e.config_set("aicache.ttl-jitter-pct", 0)
    alpha = ups["alpha"]
    assert emb(e, M, "cold", opts=("EX", 1)) == [expected("cold")]
    start = time.monotonic()
    statuses = []
    while time.monotonic() - start < 3.5:
        got, meta = emb(e, M, "hot", opts=("EX", 1, "WITHMETA"))
        assert got == [expected("hot")]
        statuses.append(meta[0][0])
        time.sleep(0.02)
    assert statuses[0] == b"miss" and set(statuses[1:]) == {b"hit"}, "a miss after warm-up"
    wait_for(lambda: info_fields(e)["fills_in_flight"] == 0, what="the last refresh")
    calls = alpha.calls("embeddings")
    # hot: 1 fill, then one refresh per ~0.5 s (the last half of a 1 s TTL)
    # over 3.5 s; cold: 1 fill, never refreshed.
    assert 2 + 3 <= calls <= 2 + 8, calls
    assert info_fields(e)["refreshes_started"] == calls - 2
    assert e.pttl(e.execute_command("EMBCACHE.KEY", "ns", M, "hot")) > 0
    assert e.exists(e.execute_command("EMBCACHE.KEY", "ns", M, "cold")) == 0, "unread: expired"


def test_misses_from_many_clients_share_one_request(e, eserver, ups):
    e.config_set("aicache.batch-window-ms", 200)
    n = 40
    socks = [socket.create_connection(("127.0.0.1", eserver.port)) for _ in range(n)]
    try:
        wire = [resp("EMBCACHE.FETCH", "ns", M, 1, f"mb-{i}") + resp("PING") for i in range(n)]
        for s, w in zip(socks, wire):
            s.sendall(w)
        for i, s in enumerate(socks):
            s.settimeout(10)
            want = b"*1\r\n$32\r\n" + expected(f"mb-{i}") + b"\r\n+PONG\r\n"
            got = b""
            while len(got) < len(want):
                got += s.recv(4096)
            assert got == want, f"client {i}"
    finally:
        for s in socks:
            s.close()
    st = ups["alpha"].stats()
    assert st["total_calls"] == 1 and st["inputs"] == [n]
    info = info_fields(e)
    assert info["batched_requests"] == 1 and info["batched_calls"] == n


def test_a_bad_input_is_isolated_and_the_other_callers_get_their_vectors(e, ups):
    e.config_set("aicache.batch-window-ms", 300)
    alpha = ups["alpha"]
    alpha.poison("POISON")
    texts = [f"iso-{i}" for i in range(7)] + ["iso-POISON"]
    port = e.connection_pool.connection_kwargs["port"]
    out = run_all(len(texts), lambda i: emb(redis.Redis(port=port), M, texts[i]))
    for t, got in zip(texts, out):
        if "POISON" in t:
            # Its own input was refused: an error element, as for any FETCH.
            [err] = got
            assert isinstance(err, redis.ResponseError) and "HTTP 400" in str(err)
        else:
            assert got == [expected(t)], t
    st = alpha.stats()
    assert st["sizes"][0] == 8, "one batch across the callers first"
    assert sum(st["inputs"]) == 7 and st["poisoned"] >= 1
    assert st["total_calls"] <= 1 + 2 * 3, "ceil(log2 8) halvings at most"


def test_a_route_caps_its_concurrent_requests(e, ups):
    e.config_set("aicache.batch-window-ms", 0)
    route(e, 1, name="narrow", models="nr-*", url=ups["beta"].url, auth="none",
          max_concurrency=1)
    ups["beta"].latency(60)
    port = e.connection_pool.connection_kwargs["port"]
    out = run_all(5, lambda i: emb(redis.Redis(port=port), "nr-m", f"c{i}"))
    assert out == [[expected(f"c{i}", "nr-m")] for i in range(5)]
    assert ups["beta"].stats()["peak_concurrency"] == 1


def test_bad_routes_are_refused_and_change_nothing(e):
    before = e.config_get("aicache.route-1")
    for text, why in [
        ("name=x;url=ftp://h;auth=none", "must start with http"),
        ("name=x;url=http://h;auth=bearer", "needs key-env"),
        ("name=x;url=http://h;auth=bearer;key-env=HOME", "upper-case variable"),
        ("name=x;url=http://h;auth=bearer;key-file=/no/such", "cannot be read"),
        ("name=x;url=http://u:p@h;auth=none", "credentials"),
        ("name=x;url=http://h;auth=none;oops=1", "unknown route field"),
    ]:
        with pytest.raises(redis.ResponseError, match=why):
            e.config_set("aicache.route-1", text)
        assert e.config_get("aicache.route-1") == before


def test_no_route_key_is_visible_anywhere(e, eserver, ups, key_file):
    beta = ups["beta"]
    beta.require_auth("bearer", BETA_KEY)
    route(e, 1, name="filekey", models="fk-*", url=beta.url, auth="bearer", key_file=key_file)
    route(e, 2, name="az", models="az-*", url=ups["gamma"].base, auth="azure",
          api_version="2024-06-01", key_env="AZURE_TEST_API_KEY")
    assert emb(e, "fk-m", "k") == [expected("k", "fk-m")]
    beta.fault("echo_auth")
    with pytest.raises(redis.ResponseError) as err:
        emb(e, "fk-m", "echo")
    texts = [str(err.value), repr(e.config_get("*")), repr(e.execute_command("MODULE", "LIST")),
             repr(e.info("everything")), read_log(eserver.log),
             repr(e.execute_command("CONFIG", "GET", "aicache.route-*"))]
    for secret in (BETA_KEY, AZ_KEY, GLOBAL_KEY):
        for t in texts:
            assert secret not in t
            assert secret.split("-", 1)[1] not in t
    assert "route filekey: API key source file" in read_log(eserver.log)


def read_until(sock, tail, limit=10.0):
    sock.settimeout(limit)
    got = b""
    while not got.endswith(tail):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {got!r}")
        got += chunk
    return got


def test_deadlines_and_killed_clients_racing_batched_fills_get_exactly_one_reply(e, eserver, ups):
    e.config_set("aicache.batch-window-ms", 30)
    ups["alpha"].latency(20)
    outcomes = set()
    for it in range(15):
        socks = [socket.create_connection(("127.0.0.1", eserver.port)) for _ in range(10)]
        gone = socket.create_connection(("127.0.0.1", eserver.port))
        gone.sendall(resp("EMBCACHE.FETCH", "race", M, 1, f"gone-{it}"))
        gone.close()  # killed while its text waits in the batch
        for i, s in enumerate(socks):
            s.sendall(resp("EMBCACHE.FETCH", "race", M, 1, f"race-{it}-{i}", "TIMEOUT", 35 + 3 * i)
                      + resp("ECHO", f"after-{i}"))
        for i, s in enumerate(socks):
            tail = b"$%d\r\nafter-%d\r\n" % (len(f"after-{i}"), i)
            got = read_until(s, tail)
            head = got[:-len(tail)]
            vector = b"*1\r\n$32\r\n" + expected(f"race-{it}-{i}") + b"\r\n"
            assert head == vector or head.startswith(b"-ERR timed out"), (it, i, head[:80])
            outcomes.add(head == vector)
            s.close()
    assert outcomes == {True, False}, "the race window was not hit from both sides"
    wait_for(lambda: info_fields(e)["fills_in_flight"] == 0, what="fills to end")
    assert e.ping() and info_fields(e)["worker_panics"] == 0
