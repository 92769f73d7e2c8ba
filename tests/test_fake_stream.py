"""The fake upstream's streamed chat answers, read over plain HTTP (no redis,
no module): the module's streaming tests trust these shapes, so they are
checked here on their own."""
import http.client
import json
import time

import pytest

from fake_upstream import chat_answer, chat_digest
from helpers import Upstream

REQ = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi \u4e00"}],
       "stream": True}
USAGE_REQ = {**REQ, "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def fake():
    # Its own process, so settings and faults left here never reach the
    # session's shared upstream.
    u = Upstream()
    yield u
    u.stop()


@pytest.fixture
def up(fake):
    fake.reset()
    yield fake


def connect(up):
    return http.client.HTTPConnection("127.0.0.1", up.port, timeout=10)


def post(conn, req):
    conn.request("POST", "/v1/chat/completions", body=json.dumps(req),
                 headers={"Content-Type": "application/json"})
    return conn.getresponse()


def read_events(resp):
    """([(arrival, event name, data)], whether the body ended cleanly), parsed
    as a client would: lines until a blank one make an event. Read with
    read1, which reports a cut chunked body (readline takes it for an end)."""
    events, name, data, buf = [], None, [], b""
    while True:
        try:
            got = resp.read1(65536)
        except http.client.IncompleteRead:
            return events, False
        if not got:
            return events, True
        buf += got
        *lines, buf = buf.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r").decode()
            if not line:
                if data:
                    events.append((time.monotonic(), name, "\n".join(data)))
                name, data = None, []
            elif line.startswith("event:"):
                name = line[len("event:"):].strip()
            elif line.startswith("data:"):
                value = line[len("data:"):]
                data.append(value[1:] if value.startswith(" ") else value)


def stream(up, req, conn=None):
    conn = conn or connect(up)
    resp = post(conn, req)
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/event-stream"
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.getheader("Content-Length") is None
    events, clean = read_events(resp)
    return events, clean


def chunks(events):
    """The chat.completion.chunk objects, [DONE] and named events left out."""
    return [json.loads(d) for _, name, d in events if name is None and d != "[DONE]"]


def deltas(events):
    return [c["choices"][0] for c in chunks(events) if c["choices"]]


def test_deltas_reassemble_the_answer_then_usage_then_done(up):
    conn = connect(up)
    events, clean = stream(up, USAGE_REQ, conn)
    want = chat_answer(USAGE_REQ)
    assert clean and events[-1][1:] == (None, "[DONE]")
    body = chunks(events)
    for c in body:
        assert (c["id"], c["object"], c["created"], c["model"]) == (
            want["id"], "chat.completion.chunk", want["created"], want["model"])
    ds = deltas(events)
    assert ds[0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(d["delta"].get("content", "") for d in ds)
    assert text == want["choices"][0]["message"]["content"]
    # Default pieces of about 8 characters: several, none longer.
    assert len(ds) - 2 == 3 and all(len(d["delta"].get("content", "")) <= 8 for d in ds)
    assert ds[-1]["delta"] == {} and ds[-1]["finish_reason"] == "stop"
    assert all(d["finish_reason"] is None for d in ds[:-1])
    # The usage chunk is last, choices-less; the others carry "usage": null.
    assert body[-1]["choices"] == [] and body[-1]["usage"] == want["usage"]
    assert all(c["usage"] is None for c in body[:-1])
    # The chunked body ended properly: the same connection serves the next call.
    plain = {**REQ, "stream": False}
    resp = post(conn, plain)
    assert json.loads(resp.read()) == chat_answer(plain)
    stats = up.stats()
    assert stats["calls"]["chat"] == 2 and stats["stream_calls"] == 1
    assert stats["connections"] == 1


def test_without_include_usage_there_is_no_usage_at_all(up):
    events, clean = stream(up, REQ)
    assert clean and events[-1][2] == "[DONE]"
    assert all("usage" not in c for c in chunks(events))
    assert chunks(events)[-1]["choices"][0]["finish_reason"] == "stop"


def test_chunk_count_and_delay_until_reset(up):
    up.stream(chunks=5, delay_ms=40)
    t0 = time.monotonic()
    events, _ = stream(up, USAGE_REQ)
    # Every event after the first waits: role, 5 pieces, finish, usage, [DONE].
    assert len(events) == 9
    assert events[-1][0] - t0 >= 8 * 0.040
    ds = deltas(events)
    assert len(ds) == 7
    assert "".join(d["delta"].get("content", "") for d in ds) == \
        chat_answer(USAGE_REQ)["choices"][0]["message"]["content"]
    # More pieces than characters: empty pieces, the same text.
    up.stream(chunks=40)
    ds = deltas(stream(up, REQ)[0])
    assert len(ds) == 42
    assert "".join(d["delta"].get("content", "") for d in ds) == \
        chat_answer(REQ)["choices"][0]["message"]["content"]
    up.reset()
    assert len(deltas(stream(up, REQ)[0])) == 5  # role, 3 default pieces, finish


def test_disconnect_drops_the_connection_after_k_content_chunks(up):
    up.fault("stream_disconnect", after=2)
    events, clean = stream(up, USAGE_REQ)
    assert not clean
    ds = deltas(events)
    assert len(ds) == 3 and all(d["finish_reason"] is None for d in ds)
    assert all(d != "[DONE]" for _, _, d in events)


@pytest.mark.parametrize("done", [False, True])
def test_error_event_after_k_chunks_ends_the_body_cleanly(up, done):
    up.fault("stream_error_event", after=1, **({"done": True} if done else {}))
    events, clean = stream(up, USAGE_REQ)
    assert clean
    named = [(name, d) for _, name, d in events if name]
    assert len(named) == 1 and named[0][0] == "error"
    assert json.loads(named[0][1])["error"]["type"] == "server_error"
    assert len(deltas(events)) == 2  # role and one piece, no finish chunk
    assert (events[-1][2] == "[DONE]") == done


def test_no_done_sends_everything_else(up):
    up.fault("stream_no_done")
    events, clean = stream(up, USAGE_REQ)
    assert clean and all(d != "[DONE]" for _, _, d in events)
    assert chunks(events)[-1]["usage"] == chat_answer(USAGE_REQ)["usage"]
    assert deltas(events)[-1]["finish_reason"] == "stop"


def test_length_is_the_finish_reason(up):
    up.fault("stream_length")
    events, clean = stream(up, REQ)
    assert clean and events[-1][2] == "[DONE]"
    assert deltas(events)[-1]["finish_reason"] == "length"


def test_tool_call_arguments_come_in_pieces(up):
    up.fault("stream_tool_calls")
    events, clean = stream(up, USAGE_REQ)
    assert clean and events[-1][2] == "[DONE]"
    digest = chat_digest(USAGE_REQ)
    ds = deltas(events)
    assert ds[0]["delta"] == {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_" + digest, "type": "function",
         "function": {"name": "lookup", "arguments": ""}}]}
    middle = [d["delta"] for d in ds[1:-1]]
    assert len(middle) > 1 and all("content" not in d for d in middle)
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in middle)
    assert json.loads(args) == {"query": digest}
    assert ds[-1]["finish_reason"] == "tool_calls"


def test_slow_first_sends_headers_then_waits(up):
    up.fault("stream_slow_first", ms=300)
    t0 = time.monotonic()
    conn = connect(up)
    resp = post(conn, REQ)
    headers_at = time.monotonic()
    events, clean = read_events(resp)
    assert clean and events[-1][2] == "[DONE]"
    assert events[0][0] - t0 >= 0.3
    # Most of the wait falls after the headers (half: room for a busy host).
    assert events[0][0] - headers_at >= 0.15


def test_faults_that_do_not_apply_are_used_up_harmlessly(up):
    up.fault("length")  # a non-stream chat fault on a streamed call
    events, _ = stream(up, REQ)
    assert deltas(events)[-1]["finish_reason"] == "stop"
    up.fault("stream_disconnect", after=0)  # a stream fault on a non-streamed call
    plain = {**REQ, "stream": False}
    resp = post(connect(up), plain)
    assert json.loads(resp.read()) == chat_answer(plain)
    assert up.stats()["faults_left"] == 0


def test_a_status_fault_answers_a_streamed_call_before_any_event(up):
    up.fault("status", status=503, message="busy")
    resp = post(connect(up), REQ)
    assert resp.status == 503 and json.loads(resp.read())["error"]["message"] == "busy"
    assert up.stats()["stream_calls"] == 1
