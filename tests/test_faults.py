"""Every upstream fault reaches every waiter as a clear error, nothing is
stored, the fill's lock is released, and the next call succeeds."""
import json
import threading
import time
from email.utils import formatdate

import pytest
import redis

from conftest import API_KEY
from helpers import Server, info_fields, wait_for
from test_fetch import REQ, expected, fetch, llm

# (kind, fault options, configs, error pattern, upstream calls with retries 2)
EMB_FAULTS = [
    ("status", {"status": 401}, {}, "HTTP 401", 1),
    ("status", {"status": 403}, {}, "HTTP 403", 1),
    ("status", {"status": 404}, {}, "HTTP 404", 1),
    ("status", {"status": 429, "times": 3}, {}, "HTTP 429", 3),
    ("status", {"status": 500, "times": 3}, {}, "HTTP 500", 3),
    ("status", {"status": 502, "times": 3}, {}, "HTTP 502", 3),
    ("status", {"status": 503, "times": 3}, {}, "HTTP 503", 3),
    ("status", {"status": 504, "times": 3}, {}, "HTTP 504", 3),
    ("status", {"status": 301}, {}, "HTTP 301; redirects are not followed", 1),
    ("malformed", {}, {}, "invalid response: body is not valid JSON", 1),
    ("wrong_count", {}, {}, "expected 2 embeddings, got 1", 1),
    ("wrong_dim", {}, {}, "embedding 1 has 7 dimensions, embedding 0 has 8", 1),
    ("nan", {}, {}, "invalid response: body is not valid JSON", 1),
    ("overflow", {}, {}, "non-finite", 1),
    ("oversized", {"bytes": 200_000}, {"aicache.upstream-max-bytes": 100_000}, "larger than aicache.upstream-max-bytes", 1),
    ("slow_drip", {"interval_ms": 50}, {"aicache.upstream-timeout-ms": 300, "aicache.upstream-retries": 0}, "timed out after 300 ms", 1),
    ("reset", {"times": 3}, {}, "connection failed", 3),
]

# Refusals that may name one input: the batch is split until each refused
# input stands alone; those become error elements, nothing is stored.
INPUT_FAULTS = [
    ("status", {"status": 400}, "HTTP 400: injected failure"),
    ("status", {"status": 413}, "HTTP 413"),
    ("status", {"status": 422}, "HTTP 422"),
    ("cjk_error", {}, r"HTTP 400: \?+"),
]


@pytest.mark.parametrize("kind,opts,pattern", INPUT_FAULTS,
                         ids=[f"{k}-{o.get('status', '')}" for k, o, _ in INPUT_FAULTS])
def test_an_input_refusal_splits_the_batch_and_fails_only_those_inputs(f, fserver, upstream, kind,
                                                                        opts, pattern):
    # Three refusals: the pair, then each text alone.
    upstream.fault(kind, times=3, **opts)
    got = fetch(f, "docs", "a", "b")
    assert len(got) == 2 and all(isinstance(g, redis.ResponseError) for g in got), got
    for g in got:
        assert __import__("re").search(pattern, str(g)), g
        assert str(g).isascii() and str(g).isprintable()
    assert upstream.calls() == 3
    assert f.dbsize() == 0, "a failed fill stored something"
    # A refusal that was not about one input: halves are retried and filled.
    upstream.fault(kind, times=1, **opts)
    assert fetch(f, "docs", "c", "d") == [expected("c"), expected("d")]
    assert upstream.calls() == 6 and upstream.stats()["inputs"] == [1, 1]
    assert fserver.alive()


@pytest.mark.parametrize("kind,opts,configs,pattern,calls", EMB_FAULTS,
                         ids=[f"{k}-{o.get('status', '')}" for k, o, *_ in EMB_FAULTS])
def test_embedding_faults(f, fserver, upstream, kind, opts, configs, pattern, calls):
    for k, v in configs.items():
        f.config_set(k, v)
    times = opts.pop("times", 1)
    upstream.fault(kind, times=times, **opts)
    with pytest.raises(redis.ResponseError) as e:
        fetch(f, "docs", "a", "b")
    msg = str(e.value)
    assert __import__("re").search(pattern, msg), msg
    assert msg.isascii() and msg.isprintable() and len(msg) <= 512
    assert upstream.calls() == calls
    assert f.dbsize() == 0, "a failed fill stored something"
    assert info_fields(f)["fills_in_flight"] == 0
    # The fault is gone: the very next call fills normally.
    assert fetch(f, "docs", "a", "b") == [expected("a"), expected("b")]
    assert upstream.calls() == calls + 1
    assert fserver.alive()


@pytest.mark.parametrize("kind", ["length", "error_object", "empty_choices", "malformed"])
def test_uncacheable_chat_answers_are_errors_and_not_stored(f, upstream, kind):
    upstream.fault(kind)
    with pytest.raises(redis.ResponseError, match="invalid response"):
        llm(f, REQ)
    assert f.dbsize() == 0 and upstream.calls() == 1
    assert json.loads(llm(f, REQ))["choices"]
    assert f.dbsize() == 1


def test_every_waiter_of_a_failed_fill_gets_the_error(f, fserver, upstream):
    upstream.latency(300)
    upstream.fault("status", status=400, message="bad things")
    results = [None] * 20
    barrier = threading.Barrier(20)

    def run(i):
        c = fserver.client()
        barrier.wait()
        got = fetch(c, "docs", "same")
        results[i] = [str(g) if isinstance(g, redis.ResponseError) else g for g in got]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert upstream.calls() == 1
    assert all(r == ["upstream returned HTTP 400: bad things"] for r in results), results
    assert fetch(f, "docs", "same") == [expected("same")]


def test_a_retry_after_a_503_succeeds_and_is_counted(f, upstream):
    before = info_fields(f)["upstream_retries"]
    upstream.fault("status", status=503)
    assert fetch(f, "docs", "a") == [expected("a")]
    assert upstream.calls() == 2
    assert info_fields(f)["upstream_retries"] == before + 1


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured(f, upstream, form):
    value = "1" if form == "seconds" else formatdate(time.time() + 2, usegmt=True)
    upstream.fault("status", status=429, retry_after=value)
    t0 = time.monotonic()
    assert fetch(f, "docs", "a") == [expected("a")]
    # Backoff alone would retry within 50 ms; only Retry-After waits this long.
    assert time.monotonic() - t0 >= 0.9
    assert upstream.calls() == 2


def test_a_retry_after_beyond_the_deadline_is_not_waited_for(f, upstream):
    f.config_set("aicache.lease-ms", 1000)
    upstream.fault("status", status=429, retry_after="30", times=3)
    t0 = time.monotonic()
    with pytest.raises(redis.ResponseError, match="HTTP 429"):
        fetch(f, "docs", "a")
    assert upstream.calls() == 1 and time.monotonic() - t0 < 5


def test_the_key_is_sent_but_never_shown(f, fserver, upstream):
    upstream.fault("echo_auth")
    with pytest.raises(redis.ResponseError) as e:
        fetch(f, "docs", "a")
    assert "HTTP 401" in str(e.value)
    assert upstream.stats()["auth"] == [f"Bearer {API_KEY}"]
    secret = API_KEY.encode()
    visible = [
        str(e.value).encode(),
        repr(f.execute_command("CONFIG", "GET", "*")).encode(),
        repr(f.execute_command("MODULE", "LIST")).encode(),
        f.execute_command("INFO", "everything") if isinstance(f.execute_command("INFO", "everything"), bytes)
        else repr(f.execute_command("INFO", "everything")).encode(),
        fserver.log_text().encode(),
    ]
    for text in visible:
        assert secret not in text and b"sk-aicache" not in text


def test_urls_and_key_sources_are_admin_only(f):
    for name in ["upstream-url", "upstream-embeddings-url", "upstream-chat-url", "api-key-env", "api-key-file"]:
        with pytest.raises(redis.ResponseError, match="protected"):
            f.config_set(f"aicache.{name}", "http://evil.example/v1")
    for name in ["workers", "queue-size"]:
        with pytest.raises(redis.ResponseError, match="immutable"):
            f.config_set(f"aicache.{name}", 3)


def test_key_from_a_file_and_credentials_in_urls_are_refused(tmp_path, upstream):
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file-42\n")
    s = Server(module_args=["upstream-url", upstream.url, "api-key-file", key_file],
               env={"OPENAI_API_KEY": "sk-from-env"})
    try:
        upstream.reset()
        fetch(s.client(), "docs", "a")
        assert upstream.stats()["auth"] == ["Bearer sk-from-file-42"]
    finally:
        s.stop()
    for args in (["upstream-url", "http://user:pw@127.0.0.1/v1"], ["upstream-url", "ftp://x"],
                 ["api-key-file", tmp_path / "missing"]):
        with pytest.raises(AssertionError, match="exited"):
            Server(module_args=args)


def test_connection_refused_is_an_error_not_a_hang(tmp_path):
    from helpers import free_port
    s = Server(module_args=["upstream-url", f"http://127.0.0.1:{free_port()}/v1",
                            "upstream-backoff-base-ms", 1])
    try:
        with pytest.raises(redis.ResponseError, match="connection failed"):
            fetch(s.client(), "docs", "a")
        assert info_fields(s.client())["upstream_requests"] == 3
    finally:
        s.stop()


@pytest.fixture
def tiny(upstream):
    """One worker and a one-slot queue, so the queue can be filled."""
    s = Server(module_args=["upstream-url", upstream.url, "workers", 1, "queue-size", 1])
    upstream.reset()
    yield s
    s.stop()


def test_a_full_queue_fails_fast(tiny, upstream):
    upstream.latency(500)
    done = []
    ts = [threading.Thread(target=lambda i=i: done.append(fetch(tiny.client(), "q", f"t{i}")))
          for i in range(2)]
    ts[0].start()
    wait_for(lambda: upstream.calls() == 1, what="worker busy")
    ts[1].start()
    wait_for(lambda: info_fields(tiny.client())["queue_depth"] == 1, what="queue full")
    t0 = time.monotonic()
    with pytest.raises(redis.ResponseError, match=r"queue is full \(aicache.queue-size 1\)"):
        fetch(tiny.client(), "q", "t2")
    assert time.monotonic() - t0 < 0.4, "a full queue must not wait for the upstream"
    for t in ts:
        t.join()
    assert len(done) == 2
    assert info_fields(tiny.client())["queue_full_errors"] == 1


def test_max_fills_bounds_the_registry(f, fserver, upstream):
    f.config_set("aicache.max-fills", 2)
    upstream.latency(300)
    t = threading.Thread(target=lambda: fetch(fserver.client(), "docs", "a", "b"))
    t.start()
    wait_for(lambda: info_fields(f)["fills_in_flight"] == 2, what="fills running")
    with pytest.raises(redis.ResponseError, match="too many fills in flight"):
        fetch(f, "docs", "c")
    # Joining a running fill needs no new slot.
    assert fetch(f, "docs", "a") == [expected("a")]
    t.join()


def test_fail_memory_fails_identical_calls_fast_when_enabled(f, upstream):
    before = info_fields(f)["fail_fast_errors"]
    f.config_set("aicache.fail-memory-ms", 60000)
    upstream.fault("status", status=400, message="bad input")
    [err] = fetch(f, "fm", "a")
    assert isinstance(err, redis.ResponseError) and str(err).endswith("HTTP 400: bad input")
    # "a" alone was refused: it fails fast as an element; "b" is filled.
    got = fetch(f, "fm", "a", "b")
    assert isinstance(got[0], redis.ResponseError), got
    assert str(got[0]).endswith("HTTP 400: bad input (failing fast: the same fill failed within "
                                "aicache.fail-memory-ms)"), got[0]
    assert got[1] == expected("b"), "other entries must not be affected"
    assert upstream.calls() == 2 and upstream.stats()["inputs"] == [1]
    assert info_fields(f)["fail_fast_errors"] == before + 1
    f.config_set("aicache.fail-memory-ms", 0)
    assert fetch(f, "fm", "a") == [expected("a")]
