"""LLMCACHE.STREAM / LLMCACHE.READ (issue 9): one upstream stream per
request, joined by every identical caller, replayable from Redis, stored as
an ordinary entry when it ends well."""
import json
import socket
import threading
import time

import pytest
import redis

from fake_upstream import chat_answer
from helpers import Server, info_fields, resp, wait_for

from aicache import StreamError, completion_to_chunks, stream_chat  # clients/python, see conftest


def request(text="hi", **extra):
    return {"model": "gpt-test", "messages": [{"role": "user", "content": text}], **extra}


def body(req):
    return json.dumps(req)


def as_sent(req):
    """The request as a streamed fill sends it upstream."""
    return dict(req, stream=True, stream_options={"include_usage": True})


def start(c, req, *opts, ns="chat"):
    kind, value = c.execute_command("LLMCACHE.STREAM", ns, body(req), *opts)
    return kind, value


def read_all(c, key, ns="chat", block=5000, last="0"):
    """Every entry of a generation's Stream up to its end entry."""
    out = []
    while True:
        got = c.execute_command("LLMCACHE.READ", ns, key, last, "BLOCK", block)
        assert got is not None, "READ timed out before the stream ended"
        for entry_id, fields in got:
            last = entry_id.decode()
            f = dict(zip(fields[::2], fields[1::2]))
            out.append((last, f))
            if b"end" in f:
                return out


def chunks_of(entries):
    return [f[b"chunk"] for _, f in entries if b"chunk" in f]


def content(entries):
    text = ""
    for raw in chunks_of(entries):
        for ch in json.loads(raw)["choices"]:
            text += ch["delta"].get("content") or ""
    return text


def test_a_miss_streams_every_chunk_then_is_stored_as_a_hit(f, upstream):
    upstream.stream(chunks=6)
    req = request("first")
    kind, key = start(f, req)
    assert kind == b"stream" and key.startswith(b"aicache:stream:v1:{chat}:")
    entries = read_all(f, key)
    end = entries[-1][1]
    assert end[b"end"] == b"finished" and end[b"finish_reason"] == b"stop"
    assert json.loads(end[b"usage"]) == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    want = chat_answer(as_sent(req))
    assert content(entries) == want["choices"][0]["message"]["content"]
    # ids are <start ms>-<n>, n from 1: a reader knows each chunk's place.
    assert [e[0].split("-")[1] for e in entries] == [str(i) for i in range(1, len(entries) + 1)]
    # The assembled entry is what the same answer, not streamed, would store.
    stored = f.execute_command("LLMCACHE.GET", "chat", body(req))
    assert json.loads(stored) == want
    assert start(f, req) == (b"hit", stored)
    assert f.execute_command("LLMCACHE.FETCH", "chat", body(req)) == stored
    assert upstream.stats()["stream_calls"] == 1 and upstream.calls() == 1
    info = info_fields(f)
    assert info["streams_started"] >= 1 and info["tokens_total"] >= 10
    assert 0 < f.pttl(key) <= 60000, "the Stream lingers, then expires"


def test_the_leader_and_50_joiners_read_identical_bytes_from_one_upstream_call(f, upstream):
    # 1 s of stream: 50 joiner threads must all start before it ends, also on
    # a loaded 2-core CI machine (at 10 ms a chunk one arrived late and hit).
    upstream.stream(chunks=40, delay_ms=25)
    req = request("herd")
    _, key = start(f, req)
    results, errors = {}, []
    half = threading.Event()

    def joiner(i):
        try:
            c = redis.Redis(port=f.connection_pool.connection_kwargs["port"])
            if i % 2:
                half.wait(10)
            kind, k = start(c, req)
            assert kind == b"stream", kind
            results[i] = (k, read_all(c, k))
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=joiner, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    wait_for(lambda: f.xlen(key) >= 21, what="half of the chunks")
    half.set()
    leader = read_all(f, key)
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert len(results) == 50
    for k, entries in results.values():
        assert k == key and entries == leader
    assert upstream.stats()["stream_calls"] == 1 and upstream.calls() == 1
    assert info_fields(f)["stream_joins"] >= 50


def test_a_fetch_of_a_request_that_is_streaming_joins_it(f, upstream):
    upstream.stream(chunks=10, delay_ms=20)
    req = request("joined by fetch")
    _, key = start(f, req)
    got = f.execute_command("LLMCACHE.FETCH", "chat", body(req))
    assert json.loads(got) == chat_answer(as_sent(req))
    assert upstream.calls() == 1
    assert read_all(f, key)[-1][1][b"end"] == b"finished"


def test_a_stream_of_a_request_being_fetched_replays_that_fill(f, fserver, upstream):
    upstream.latency(300)
    req = request("fetched first")
    fetched = {}
    t = threading.Thread(target=lambda: fetched.update(v=fserver.client().execute_command(
        "LLMCACHE.FETCH", "chat", body(req))))
    t.start()
    wait_for(lambda: info_fields(f)["fills_in_flight"] == 1, what="the FETCH fill")
    kind, key = start(f, req)
    assert kind == b"stream"
    entries = read_all(f, key)
    t.join(10)
    assert entries[-1][1][b"end"] == b"finished"
    answer = json.loads(fetched["v"])
    assert content(entries) == answer["choices"][0]["message"]["content"]
    assert upstream.calls() == 1


def test_tool_call_deltas_are_assembled_by_index(f, upstream):
    upstream.fault("stream_tool_calls")
    upstream.stream(chunks=5)
    req = request("tools")
    _, key = start(f, req)
    entries = read_all(f, key)
    assert entries[-1][1][b"finish_reason"] == b"tool_calls"
    stored = json.loads(f.execute_command("LLMCACHE.GET", "chat", body(req)))
    call = stored["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "lookup"
    assert json.loads(call["function"]["arguments"])["query"]
    assert call["id"].startswith("call_")


@pytest.mark.parametrize("fault,kw,message", [
    ("stream_disconnect", {"after": 2}, "connection"),
    ("stream_error_event", {"after": 2}, "The server had an error"),
    ("stream_no_done", {}, "without [DONE]"),
])
def test_a_broken_stream_ends_every_reader_with_an_error_and_stores_nothing(
        f, upstream, fault, kw, message):
    upstream.fault(fault, **kw)
    upstream.stream(chunks=5, delay_ms=5)
    req = request(fault)
    _, key = start(f, req)
    entries = read_all(f, key)
    end = entries[-1][1]
    assert end[b"end"] == b"error", end
    assert message.lower() in end[b"error"].decode().lower(), end
    assert f.execute_command("LLMCACHE.GET", "chat", body(req)) is None
    # Chunks had been appended: no retry may repeat them.
    assert upstream.calls() == 1
    upstream.fault(fault, **kw)
    with pytest.raises(StreamError):
        list(stream_chat(f, "chat", req, refresh=True))


def test_a_cut_off_stream_finishes_for_readers_but_is_not_stored(f, upstream):
    upstream.fault("stream_length")
    req = request("cut")
    _, key = start(f, req)
    assert read_all(f, key)[-1][1][b"finish_reason"] == b"length"
    assert f.execute_command("LLMCACHE.GET", "chat", body(req)) is None


def test_a_failure_before_the_first_chunk_is_retried(f, upstream):
    upstream.fault("status", status=503)
    req = request("retried")
    _, key = start(f, req)
    assert read_all(f, key)[-1][1][b"end"] == b"finished"
    assert upstream.calls() == 2


def test_a_stream_over_its_entry_cap_ends_with_an_error(f, upstream):
    f.config_set("aicache.stream-max-entries", 5)
    upstream.stream(chunks=20)
    req = request("long")
    _, key = start(f, req)
    entries = read_all(f, key)
    assert len(entries) <= 5
    assert b"stream-max-entries 5" in entries[-1][1][b"error"]
    assert f.execute_command("LLMCACHE.GET", "chat", body(req)) is None


def test_nostore_streams_keep_nothing_and_do_not_share_with_storing_ones(f, upstream):
    upstream.stream(chunks=5, delay_ms=20)
    req = request("nostore")
    _, k1 = start(f, req, "NOSTORE")
    _, k2 = start(f, req)
    assert k1 != k2
    read_all(f, k1)
    read_all(f, k2)
    assert upstream.calls() == 2
    f.delete(f.execute_command("LLMCACHE.KEY", "chat", body(req)))
    _, k3 = start(f, req, "NOSTORE")
    read_all(f, k3)
    assert f.execute_command("LLMCACHE.GET", "chat", body(req)) is None


def test_the_python_helper_yields_the_same_chunks_for_a_live_stream_and_a_hit(f, upstream):
    req = request("helper")
    live = list(stream_chat(f, "chat", req))
    hit = list(stream_chat(f, "chat", req))
    assert upstream.calls() == 1

    def text(chunks):
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    assert text(live) == text(hit) == chat_answer(as_sent(req))["choices"][0]["message"]["content"]
    assert live[-1]["usage"] == hit[-1]["usage"]
    assert all(c["object"] == "chat.completion.chunk" for c in live + hit)
    stored = json.loads(f.execute_command("LLMCACHE.GET", "chat", body(req)))
    assert list(completion_to_chunks(stored)) == hit


def test_read_refuses_other_namespaces_and_bad_arguments(f, upstream):
    _, key = start(f, request("args"))
    read_all(f, key)
    for args, match in [
        (("other", key, "0"), "not a stream of this namespace"),
        (("{chat}", key, "0"), "not a stream of this namespace"),
        (("chat", b"aicache:llm:v1:{chat}:00", "0"), "not a stream of this namespace"),
        (("chat", key, "x"), "last-id"),
        (("chat", key, "1-x"), "last-id"),
        (("chat", key, "0", "COUNT", "0"), "COUNT"),
        (("chat", key, "0", "BLOCK", "-1"), "BLOCK"),
        (("chat", key, "0", "NOPE", "1"), "COUNT or BLOCK"),
        (("chat", key), "wrong number"),
    ]:
        with pytest.raises(redis.ResponseError, match=match):
            f.execute_command("LLMCACHE.READ", *args)
    got = f.execute_command("LLMCACHE.READ", "chat", key, "0", "COUNT", "2")
    assert len(got) == 2
    # Past the end there is nothing more, at once, even with BLOCK.
    last = read_all(f, key)[-1][0]
    t0 = time.monotonic()
    assert f.execute_command("LLMCACHE.READ", "chat", key, last, "BLOCK", 5000) is None
    assert time.monotonic() - t0 < 4


def test_a_blocked_read_is_woken_by_the_next_chunk(f, fserver, upstream):
    upstream.fault("stream_slow_first", ms=400)
    _, key = start(f, request("wake"))
    c = fserver.client()
    t0 = time.monotonic()
    got = c.execute_command("LLMCACHE.READ", "chat", key, "0", "BLOCK", 10000)
    assert got and time.monotonic() - t0 < 5
    assert info_fields(f)["stream_reads_blocked"] >= 1
    read_all(f, key)


def test_a_blocked_read_racing_its_deadline_gets_exactly_one_reply(f, fserver, upstream):
    """READ BLOCK n while chunks arrive about every n ms: whatever wins, one
    reply, and the pipelined PING after it gets its own."""
    upstream.stream(chunks=150, delay_ms=3)
    _, key = start(f, request("race"))
    s = socket.create_connection(("127.0.0.1", int(fserver.port)))
    s.settimeout(10)
    buf = s.makefile("rb")
    last, replies, ended = "0", 0, False
    for i in range(1000):
        if ended:
            break
        s.sendall(resp("LLMCACHE.READ", "chat", key.decode(), last, "COUNT", "3",
                       "BLOCK", str(1 + i % 4)) + resp("PING"))
        line = buf.readline()
        if line.startswith(b"*"):
            for _ in range(int(line[1:])):
                entry = buf.readline()
                assert entry == b"*2\r\n", entry
                ln = int(buf.readline()[1:])
                last = buf.read(ln + 2)[:-2].decode()
                n = int(buf.readline()[1:])
                fields = []
                for _ in range(n):
                    ln = int(buf.readline()[1:])
                    fields.append(buf.read(ln + 2)[:-2])
                ended = ended or fields[0] == b"end"
        else:
            assert line in (b"*-1\r\n", b"$-1\r\n", b"_\r\n"), line
        replies += 1
        assert buf.readline() == b"+PONG\r\n", "a READ sent two replies or none"
    assert ended and replies > 10
    s.close()


def test_client_unblock_releases_a_blocked_read(f, fserver, upstream):
    upstream.fault("stream_slow_first", ms=3000)
    _, key = start(f, request("unblock"))
    for mode, expect_error in [((), False), (("ERROR",), True)]:
        c = fserver.client()
        cid = c.client_id()
        out = {}

        def run():
            try:
                out["v"] = c.execute_command("LLMCACHE.READ", "chat", key, "0", "BLOCK", 20000)
            except redis.ResponseError as e:
                out["e"] = str(e)

        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: f.info("clients")["blocked_clients"] >= 1, what="READ to block")
        assert f.execute_command("CLIENT", "UNBLOCK", cid, *mode) == 1
        t.join(5)
        assert ("e" in out) == expect_error and out.get("v") is None, out
        assert c.ping()
    read_all(f, key)


def test_killed_readers_leave_nothing_blocked(f, fserver, upstream):
    upstream.fault("stream_slow_first", ms=500)
    _, key = start(f, request("killed"))
    socks = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", int(fserver.port)))
        s.sendall(resp("LLMCACHE.READ", "chat", key.decode(), "0", "BLOCK", "20000"))
        socks.append(s)
    wait_for(lambda: f.info("clients")["blocked_clients"] >= 30, what="readers to block")
    for s in socks:
        s.close()
    wait_for(lambda: f.info("clients")["blocked_clients"] == 0, what="killed readers to go")
    assert read_all(f, key)[-1][1][b"end"] == b"finished"


def test_multi_and_scripts_serve_hits_but_never_start_a_stream(f, upstream):
    req = request("multi")
    p = f.pipeline(transaction=True)
    p.execute_command("LLMCACHE.STREAM", "chat", body(req))
    with pytest.raises(redis.ResponseError, match="MULTI or a script"):
        p.execute()
    with pytest.raises(redis.ResponseError, match="MULTI or a script"):
        f.eval("return redis.call('LLMCACHE.STREAM', 'chat', ARGV[1])", 0, body(req))
    assert upstream.calls() == 0
    _, key = start(f, req)
    read_all(f, key)
    p = f.pipeline(transaction=True)
    p.execute_command("LLMCACHE.STREAM", "chat", body(req))
    p.execute_command("LLMCACHE.READ", "chat", key, "0", "BLOCK", "1000")
    hit, entries = p.execute()
    assert hit[0] == b"hit" and entries[-1][1][0] == b"end"


def test_a_stream_left_without_an_end_is_ended_by_the_next_read(f, upstream):
    _, key = start(f, request("orphan"))
    read_all(f, key)
    orphan = key.rsplit(b":", 1)[0] + b":abc-1"
    f.xadd(orphan, {"chunk": "{}"}, id="5-1")
    got = f.execute_command("LLMCACHE.READ", "chat", orphan, "5-1", "BLOCK", 10000)
    assert got[0][0] == b"5-2" and got[0][1][:2] == [b"end", b"error"]
    assert b"fill is gone" in got[0][1][3]
    assert 0 < f.pttl(orphan) <= 60000
    with pytest.raises(redis.ResponseError, match="no such stream"):
        f.execute_command("LLMCACHE.READ", "chat", key.rsplit(b":", 1)[0] + b":abc-2", "0")


def test_a_stream_expires_after_its_linger(f, upstream):
    f.config_set("aicache.stream-linger-ms", 200)
    _, key = start(f, request("linger"))
    read_all(f, key)
    wait_for(lambda: not f.exists(key), what="the Stream to expire")


def test_a_stream_pays_once_and_joiners_and_hits_never(f, upstream):
    f.config_set("aicache.tenant-max-requests", 1)
    req = request("paid")
    _, key = start(f, req, "TENANT", "t1")
    assert start(f, req, "TENANT", "t1")[1] == key, "a joiner pays nothing"
    read_all(f, key)
    assert start(f, req, "TENANT", "t1")[0] == b"hit"
    with pytest.raises(redis.ResponseError, match="THROTTLED"):
        start(f, request("another"), "TENANT", "t1")
    assert upstream.calls() == 1


def test_a_worker_panic_ends_the_stream_with_an_error(upstream):
    s = Server(module_args=["upstream-url", upstream.url])
    try:
        c = s.client()
        upstream.reset()
        assert c.execute_command("AICACHE.DEBUG", "PANIC", "WORKER") == b"OK"
        _, key = start(c, request("panic"))
        end = read_all(c, key)[-1][1]
        assert end[b"end"] == b"error" and b"abandoned" in end[b"error"]
        assert info_fields(c)["worker_panics"] == 1
        _, key = start(c, request("after panic"))
        assert read_all(c, key)[-1][1][b"end"] == b"finished"
    finally:
        s.stop()


def test_unload_is_refused_while_a_stream_runs(upstream):
    s = Server(module_args=["upstream-url", upstream.url], extra=["--enable-module-command", "yes"])
    try:
        c = s.client()
        upstream.reset()
        upstream.stream(chunks=20, delay_ms=50)
        _, key = start(c, request("unload"))
        with pytest.raises(redis.ResponseError):
            c.execute_command("MODULE", "UNLOAD", "aicache")
        read_all(c, key)
        wait_for(lambda: info_fields(c)["fills_in_flight"] == 0, what="the fill to end")
        assert c.execute_command("MODULE", "UNLOAD", "aicache") in (b"OK", True)
    finally:
        s.stop()


def test_a_replica_holds_the_same_stream_and_serves_it(upstream):
    master = Server(module_args=["upstream-url", upstream.url])
    replica = Server(module_args=["upstream-url", upstream.url],
                     extra=["--replicaof", "127.0.0.1", master.port])
    try:
        m, r = master.client(), replica.client()
        wait_for(lambda: r.info("replication")["master_link_status"] == "up", what="replica link")
        upstream.reset()
        upstream.stream(chunks=30, delay_ms=20)
        req = request("replicated")
        _, key = start(m, req)
        wait_for(lambda: r.exists(key), what="the Stream on the replica")
        assert start(r, req) == (b"stream", key), "the replica names the running Stream"
        on_replica = read_all(r, key)
        assert on_replica == read_all(m, key)
        assert r.execute_command("PEXPIRETIME", key) == m.execute_command("PEXPIRETIME", key)
        wait_for(lambda: start(r, req)[0] == b"hit", what="the entry on the replica")
        with pytest.raises(redis.ResponseError, match="on a replica"):
            start(r, request("never started"))
        assert upstream.calls() == 1
    finally:
        replica.stop()
        master.stop()


def test_an_acl_user_reads_only_its_own_namespaces_streams(f, fserver, upstream):
    f.execute_command("ACL", "SETUSER", "a", "on", ">pw", "~tenantA:*", "+llmcache.read",
                      "+llmcache.stream")
    _, ka = start(f, request("acl"), ns="tenantA:chat")
    _, kb = start(f, request("acl"), ns="tenantB:chat")
    read_all(f, ka, ns="tenantA:chat")
    read_all(f, kb, ns="tenantB:chat")
    a = fserver.client(username="a", password="pw")
    assert read_all(a, ka, ns="tenantA:chat")[-1][1][b"end"] == b"finished"
    with pytest.raises(redis.exceptions.NoPermissionError):
        a.execute_command("LLMCACHE.READ", "tenantB:chat", kb, "0")
    with pytest.raises(redis.ResponseError, match="not a stream of this namespace"):
        a.execute_command("LLMCACHE.READ", "tenantA:chat", kb, "0")
    f.execute_command("ACL", "DELUSER", "a")
