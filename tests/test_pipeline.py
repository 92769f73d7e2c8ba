"""The fill pipeline's guarantees: a panic costs one reply, never the server
(A4); an input the upstream refuses fails alone (A5); tenants taken from the
connection or the namespace (A7); the API key file's lifecycle (A8);
dimension pins (A9); and the key never coming back in any form (A12)."""
import os
import threading

import pytest
import redis

from conftest import API_KEY
from helpers import Server, info_fields, load_outcome, wait_for
from test_fetch import M, expected, fetch


def failure(call):
    """The error text of a FETCH that failed, whether the whole call was
    refused or the error is the reply's one element."""
    try:
        got = call()
    except redis.ResponseError as e:
        return str(e)
    assert len(got) == 1 and isinstance(got[0], redis.ResponseError), got
    return str(got[0])


def throttled(call):
    with pytest.raises(redis.ResponseError) as e:
        call()
    msg = str(e.value)
    assert msg.startswith("THROTTLED"), msg
    return msg


# --------------------------------------------------------------------------
# A4. The panic boundary.

PANIC_REPLY = "internal error in AICACHE.DEBUG: the command was aborted (aicache_handler_panics)"


@pytest.fixture(scope="module")
def pserver(upstream):
    """A server of its own for injected panics: every shared server asserts
    at teardown that nothing panicked in it."""
    s = Server(module_args=["upstream-url", upstream.url], env={"OPENAI_API_KEY": API_KEY})
    yield s
    s.stop()


@pytest.fixture
def pc(pserver, upstream):
    upstream.reset()
    c = pserver.client()
    yield c
    c.close()


def test_a_panicking_command_gets_an_error_and_the_next_pipelined_command_its_own_reply(pc, pserver):
    f, fserver = pc, pserver
    before = info_fields(f)["handler_panics"]
    p = f.pipeline(transaction=False)
    p.execute_command("AICACHE.DEBUG", "PANIC", "COMMAND")
    p.execute_command("ECHO", "after the panic")
    panicked, echoed = p.execute(raise_on_error=False)
    assert isinstance(panicked, redis.ResponseError) and str(panicked) == PANIC_REPLY, panicked
    assert echoed == b"after the panic"
    assert fserver.alive()
    assert info_fields(f)["handler_panics"] == before + 1


def test_a_panic_inside_info_is_counted_and_the_server_stays_up(pc, pserver):
    f, fserver = pc, pserver
    before = info_fields(f)["handler_panics"]
    assert f.execute_command("AICACHE.DEBUG", "PANIC", "INFO") == b"OK"
    f.execute_command("INFO", "aicache")  # returns, with or without the section
    assert fserver.alive()
    assert info_fields(f)["handler_panics"] == before + 1


def test_a_panicking_worker_abandons_its_fill_and_the_next_fill_works(pc, pserver, upstream):
    f, fserver = pc, pserver
    before = info_fields(f)["worker_panics"]
    assert f.execute_command("AICACHE.DEBUG", "PANIC", "WORKER") == b"OK"
    msg = failure(lambda: fetch(f, "wp", "first"))
    assert "abandoned" in msg, msg
    # Counted before the unwinding job releases its waiters.
    assert info_fields(f)["worker_panics"] == before + 1
    assert fetch(f, "wp", "second") == [expected("second")]
    assert fetch(f, "wp", "first") == [expected("first")]
    assert fserver.alive()


def test_aicache_debug_is_refused_when_the_debug_command_is_disabled():
    s = Server(extra=["--enable-debug-command", "no"])  # the later flag wins
    try:
        c = s.client()
        for site in ("COMMAND", "INFO", "WORKER"):
            with pytest.raises(redis.ResponseError, match="AICACHE.DEBUG is disabled"):
                c.execute_command("AICACHE.DEBUG", "PANIC", site)
        assert info_fields(c)["handler_panics"] == 0
        assert s.alive()
    finally:
        s.stop()


@pytest.mark.parametrize("args,msg", [
    (["PANIC", "BOGUS"], "unknown option 'BOGUS'"),
    (["CRASH", "COMMAND"], "unknown option 'CRASH'"),
    (["PANIC"], "wrong number of arguments"),
    (["PANIC", "COMMAND", "NOW"], "wrong number of arguments"),
])
def test_aicache_debug_refuses_a_wrong_subcommand_without_panicking(f, args, msg):
    before = info_fields(f)["handler_panics"]
    with pytest.raises(redis.ResponseError, match=msg):
        f.execute_command("AICACHE.DEBUG", *args)
    assert info_fields(f)["handler_panics"] == before


# --------------------------------------------------------------------------
# A5. Batch isolation: an input the upstream refuses fails alone.

TEXTS = [f"batch text {i}" for i in range(8)]
TEXTS[5] = "batch text 5 POISON"
POISONED = TEXTS[5]
GOOD = [t for t in TEXTS if t != POISONED]


def assert_only_the_poisoned_text_failed(got):
    assert len(got) == 8
    assert isinstance(got[5], redis.ResponseError) and "HTTP 400" in str(got[5]), got[5]
    assert got[:5] + got[6:] == [expected(t) for t in GOOD]


def test_a_poisoned_text_fails_alone_and_the_rest_of_its_batch_is_filled(f, upstream):
    splits = info_fields(f)["batch_splits"]
    upstream.poison("POISON")
    assert_only_the_poisoned_text_failed(fetch(f, "iso", *TEXTS))
    # The whole batch, then two requests per halving: 1 + 2 * log2(8).
    assert upstream.calls() <= 7
    assert f.execute_command("EMBCACHE.GET", "iso", M, POISONED) is None
    assert f.execute_command("EMBCACHE.MGET", "iso", M, *GOOD) == [expected(t) for t in GOOD]
    assert info_fields(f)["batch_splits"] > splits


def test_a_caller_joining_a_poisoned_batch_gets_its_vector_not_the_error(f, fserver, upstream):
    upstream.poison("POISON")
    upstream.latency(300)
    first = []
    t = threading.Thread(target=lambda: first.append(fetch(fserver.client(), "join", *TEXTS)))
    t.start()
    # All 8 entries register at once and TEXTS[6] stays in flight to the end.
    wait_for(lambda: info_fields(f)["fills_in_flight"] > 0, what="the batch's fills to start")
    coalesced = info_fields(f)["coalesced_waiters"]
    # TEXTS[6] shares the poisoned half, so it is settled by the last request.
    assert fetch(f, "join", TEXTS[6]) == [expected(TEXTS[6])]
    t.join()
    assert info_fields(f)["coalesced_waiters"] == coalesced + 1, "the second call did not join"
    assert_only_the_poisoned_text_failed(first[0])
    assert upstream.calls() <= 7


def test_batch_max_tokens_cuts_batches_by_estimated_tokens(f, upstream):
    f.config_set("aicache.batch-max-tokens", 10)
    texts = [f"twenty bytes #{i:02d}".ljust(20, ".") for i in range(6)]
    assert all(len(t) == 20 for t in texts)  # 5 estimated tokens each
    assert fetch(f, "bmt", *texts) == [expected(t) for t in texts]
    assert upstream.stats()["inputs"] == [2, 2, 2]


# --------------------------------------------------------------------------
# A7. aicache.tenant-source: who pays is not the caller's choice.

@pytest.fixture
def alice(f, fserver):
    f.execute_command("ACL", "SETUSER", "alice", "on", ">pw", "~*", "&*", "+@all")
    c = fserver.client(username="alice", password="pw")
    yield c
    c.close()
    f.execute_command("ACL", "DELUSER", "alice")


def test_with_tenant_source_user_the_acl_user_is_the_tenant(f, alice, upstream):
    f.config_set("aicache.tenant-source", "user")
    with pytest.raises(redis.ResponseError, match="TENANT 'bob' is not yours"):
        fetch(alice, "tu", "a", opts=["TENANT", "bob"])
    f.config_set("aicache.tenant-max-requests", 1)
    assert fetch(alice, "tu", "one") == [expected("one")]
    msg = throttled(lambda: fetch(alice, "tu", "two"))
    assert "tenant 'alice'" in msg, msg
    # The default user is a tenant of its own.
    assert fetch(f, "tu", "two") == [expected("two")]
    assert upstream.calls() == 2


def test_with_tenant_source_namespace_the_hash_tag_is_the_tenant(f, upstream):
    f.config_set("aicache.tenant-source", "namespace")
    with pytest.raises(redis.ResponseError, match="TENANT 'x' is not yours"):
        fetch(f, "{t1}:docs", "a", opts=["TENANT", "x"])
    f.config_set("aicache.tenant-max-requests", 1)
    assert fetch(f, "{t1}:docs", "one") == [expected("one")]
    msg = throttled(lambda: fetch(f, "{t1}:other", "two"))
    assert "tenant 't1'" in msg, msg
    assert fetch(f, "{t2}:docs", "two") == [expected("two")]
    assert upstream.calls() == 2


def test_tenant_source_refuses_an_unknown_value(f):
    with pytest.raises(redis.ResponseError):
        f.config_set("aicache.tenant-source", "bogus")
    assert f.config_get("aicache.tenant-source") == {"aicache.tenant-source": "arg"}


# --------------------------------------------------------------------------
# A8. The API key: file lifecycle, clear-text warning, variable names.

def write_key(path, key, mode=0o600):
    path.write_text(key + "\n")
    os.chmod(path, mode)


def test_the_key_file_is_reread_when_it_changes_and_refused_when_unusable(tmp_path, upstream):
    key_file = tmp_path / "openai.key"
    first, second = "sk-file-key-one-1111", "sk-file-key-two-2222"  # same length: mtime tells
    write_key(key_file, first)
    s = Server(module_args=["upstream-url", upstream.url, "api-key-file", key_file])
    try:
        c = s.client()
        upstream.reset()
        assert fetch(c, "kf", "a") == [expected("a")]
        assert upstream.stats()["auth"] == [f"Bearer {first}"]

        # Rotated in place, no CONFIG change.
        mtime = key_file.stat().st_mtime_ns
        write_key(key_file, second)
        os.utime(key_file, ns=(mtime + 2_000_000_000, mtime + 2_000_000_000))
        upstream.reset()
        assert fetch(c, "kf", "b") == [expected("b")]
        assert upstream.stats()["auth"] == [f"Bearer {second}"]

        key_file.unlink()
        msg = failure(lambda: fetch(c, "kf", "c"))
        assert "aicache.api-key-file" in msg and "no request was sent" in msg, msg
        assert upstream.calls() == 1

        write_key(key_file, first, mode=0o666)
        msg = failure(lambda: fetch(c, "kf", "d"))
        assert "writable by everyone" in msg, msg
        assert upstream.calls() == 1

        log = s.log_text()
        assert "API key from file" in log
        assert first not in log and second not in log
    finally:
        s.stop()


def test_a_key_sent_in_clear_text_off_this_machine_is_warned_about(upstream):
    for url, warned in (("http://10.255.255.1:9/v1", True), (upstream.url, False)):
        s = Server(module_args=["upstream-url", url], env={"OPENAI_API_KEY": API_KEY})
        try:
            log = s.log_text()
            assert ("clear text" in log) == warned, (url, log[-2000:])
            assert API_KEY not in log
        finally:
            s.stop()


def test_api_key_env_must_name_a_key_variable(upstream):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["HOME"] = env.get("HOME") or "/root"
    outcome, status = load_outcome(["api-key-env", "HOME"], env)
    assert outcome == "exited" and status != 0, "the module loaded with api-key-env HOME"
    s = Server(module_args=["upstream-url", upstream.url, "api-key-env", "MY_SERVICE_TOKEN"],
               env={"MY_SERVICE_TOKEN": "svc-token-42"})
    try:
        upstream.reset()
        assert fetch(s.client(), "env", "a") == [expected("a")]
        assert upstream.stats()["auth"] == ["Bearer svc-token-42"]
    finally:
        s.stop()


def test_with_no_key_configured_requests_go_without_credentials(upstream):
    s = Server(module_args=["upstream-url", upstream.url])  # Server drops OPENAI_API_KEY
    try:
        upstream.reset()
        assert fetch(s.client(), "nokey", "a") == [expected("a")]
        assert upstream.stats()["auth"] == [""]
    finally:
        s.stop()


# --------------------------------------------------------------------------
# A9. Dimension pins.

SMALL = "text-embedding-3-small"  # 1536 dimensions, in the fake and published


def dims(c, ns, *opts, model=M):
    return c.execute_command("EMBCACHE.DIMS", ns, model, *opts)


def short(text):
    """What the wrong_dim fault answers for a lone text: one dimension short."""
    return expected(text)[:-4]


def test_dims_reads_the_pin_and_reset_removes_it(f, upstream):
    assert dims(f, "pin") is None
    fetch(f, "pin", "a")
    assert dims(f, "pin") == 8
    assert dims(f, "pin", "RESET") == 1
    assert dims(f, "pin") is None
    assert dims(f, "pin", "RESET") == 0
    # The node forgot the pin too: another size may pin the namespace now.
    f.execute_command("EMBCACHE.SET", "pin", M, "other", "[1, 2, 3]")
    assert dims(f, "pin") == 3


def test_a_fill_of_other_than_a_known_models_published_size_is_refused(f, upstream):
    upstream.fault("wrong_dim")
    msg = failure(lambda: fetch(f, "known", "a", model=SMALL))
    assert "published size (aicache.model-dims) is 1536" in msg, msg
    assert f.dbsize() == 0
    assert dims(f, "known", model=SMALL) is None


def test_a_fill_of_other_than_fixed_dims_is_refused(f, upstream):
    f.config_set("aicache.fixed-dims", 8)
    upstream.fault("wrong_dim")
    msg = failure(lambda: fetch(f, "fixed", "a", opts=["NOSTORE"]))
    assert "fixed-dims is 8" in msg, msg


def test_a_model_listed_in_model_dims_is_checked_on_a_fresh_namespace(f, upstream):
    # Without the listing, a lone short answer on a fresh namespace has
    # nothing to be checked against; with it, it is refused and pins nothing.
    with pytest.raises(redis.ResponseError, match="model=dims"):
        f.config_set("aicache.model-dims", "emb-model=0")
    f.config_set("aicache.model-dims", "emb-model=8")
    upstream.fault("wrong_dim")
    msg = failure(lambda: fetch(f, "fresh-listed", "a"))
    assert "(aicache.model-dims) is 8" in msg, msg
    assert f.execute_command("EMBCACHE.DIMS", "fresh-listed", M) is None
    assert f.dbsize() == 0
    assert fetch(f, "fresh-listed", "a") == [expected("a")]
    assert f.execute_command("EMBCACHE.DIMS", "fresh-listed", M) == 8


def test_a_nostore_fill_is_checked_against_the_pin(f, upstream):
    fetch(f, "pinned", "a")
    upstream.fault("wrong_dim")
    msg = failure(lambda: fetch(f, "pinned", "b", opts=["NOSTORE"]))
    assert "dimension mismatch" in msg, msg


def test_an_evicted_pin_is_remembered_and_restored(f, upstream):
    fetch(f, "evicted", "a")
    [pin_key] = list(f.scan_iter(match="aicache:dims:*"))
    f.delete(pin_key)
    assert dims(f, "evicted") is None
    upstream.fault("wrong_dim")
    msg = failure(lambda: fetch(f, "evicted", "b"))
    assert "dimension mismatch" in msg, msg
    assert f.execute_command("EMBCACHE.GET", "evicted", M, "b") is None
    assert fetch(f, "evicted", "c") == [expected("c")]
    assert dims(f, "evicted") == 8


def test_flushall_clears_the_remembered_pins(f, upstream):
    fetch(f, "flushed", "a")
    assert dims(f, "flushed") == 8
    f.flushall()
    upstream.fault("wrong_dim")
    assert fetch(f, "flushed", "b") == [short("b")]
    assert dims(f, "flushed") == 7


@pytest.mark.parametrize("args,msg", [
    (["ns"], "wrong number of arguments"),
    (["ns", M, "RESET", "NOW"], "wrong number of arguments"),
    (["ns", M, "BOGUS"], "unknown option 'BOGUS'"),
])
def test_dims_refuses_wrong_arity_and_bad_options(f, args, msg):
    with pytest.raises(redis.ResponseError, match=msg):
        f.execute_command("EMBCACHE.DIMS", *args)


# --------------------------------------------------------------------------
# A12. Key hygiene: the f fixture's server sends conftest.API_KEY.

def key_pieces(key, length=7):
    return {key[i:i + length] for i in range(len(key) - length + 1)}


def test_a_refused_key_is_reported_without_quoting_it(f, upstream):
    upstream.fault("echo_auth")
    msg = failure(lambda: fetch(f, "k", "a"))
    assert "the API key was refused" in msg, msg
    assert upstream.stats()["auth"] == [f"Bearer {API_KEY}"]
    # "aicache" is in the test key and in the config names the message gives.
    quoted = {p for p in key_pieces(API_KEY) if p.lower() in msg.lower()} - {"aicache"}
    assert not quoted, (quoted, msg)


ECHOES = {
    "upper-cased": API_KEY.upper(),
    "without its prefix": API_KEY.split("-", 1)[1],
    "url-encoded": API_KEY.replace("-", "%2D"),
}


@pytest.mark.parametrize("form", ECHOES)
def test_an_upstream_message_repeating_the_key_in_any_form_is_withheld(f, upstream, form):
    upstream.fault("status", status=400, message=f"invalid request for {ECHOES[form]} here")
    msg = failure(lambda: fetch(f, "k", f"echo {form}"))
    assert "HTTP 400" in msg and "[message withheld: it repeated the API key]" in msg, msg
    for echo in ECHOES.values():
        assert echo.lower() not in msg.lower(), msg
    assert not {p for p in key_pieces(API_KEY) if p.lower() in msg.lower()}, msg


# --------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["+5", " 5"])
def test_timeout_takes_plain_digits_only(f, upstream, value):
    with pytest.raises(redis.ResponseError, match="TIMEOUT must be an integer"):
        fetch(f, "to", "a", opts=["TIMEOUT", value])
    assert upstream.calls() == 0
