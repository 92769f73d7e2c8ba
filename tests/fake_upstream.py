"""A small OpenAI-compatible upstream for tests, benchmarks and `make run`.

POST /v1/embeddings        deterministic vectors: derived from (model, text),
                           dimension from the model name (`...-d<N>`, else 8)
                           or the request's `dimensions`
POST /v1/chat/completions  a deterministic answer derived from the request; with
                           "stream": true, the same answer as server-sent events
                           (see stream_events)
POST /_fault               JSON: {"kind": ..., "times": n, ...} (see FAULTS)
POST /_latency             JSON: {"ms": n, "jitter_ms": j}: each API call sleeps
                           n + uniform(0, j) ms
POST /_poison              JSON: {"marker": "POISON", "status": 400, "message": "..."}:
                           until /_reset, an embeddings request with any input
                           containing the marker fails as a whole with that status
POST /_stream              JSON: {"chunks": n, "delay_ms": d}: streamed answers come in
                           n content pieces (null: about 8 characters each) and
                           wait d ms before every event after the first
POST /_auth                JSON: {"style": "bearer" | "azure", "key": "..."}: until /_reset,
                           API calls without that credential (Authorization: Bearer, or
                           the api-key header) get 401
POST /_reset               clears faults, poison, latency, stream settings, auth and counters

Azure-style paths are served too: /openai/deployments/<d>/embeddings and
/openai/deployments/<d>/chat/completions, with ?api-version= required.
Each instance has a name (--name, default "fake"): every API answer carries
an X-Upstream header with it, and chat answers a "system_fingerprint" of
"fp_<name>" when the name was given, so a test sees which instance served.
GET  /_stats               counters: calls, streamed calls, inputs per answered call
                           (sizes: per embeddings call, refused ones too), API
                           connections opened, peak concurrency, Authorization
                           headers seen, poisoned answers

Faults are taken from the queue by whichever API call comes next. One that
does not apply to that call (an embeddings fault on a chat call, a stream_*
fault on a non-streamed call, a non-stream chat fault on a streamed call) is
used up and the call is answered normally, so a queue of faults can never
stall on a kind no call consumes. Faults answered before any body is shaped
(status, malformed, reset, ...) apply to streamed calls too.

Run: python3 tests/fake_upstream.py --port 8089
"""

import argparse
import base64
import hashlib
import json
import random
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = {
    "status",  # {"status": 503, "message": "...", "retry_after": "1"}
    "malformed",  # 200 with a truncated JSON body
    "wrong_count",  # one embedding fewer than inputs
    "wrong_dim",  # the last embedding is one dimension short
    "nan",  # a NaN literal in the vector (invalid JSON for strict parsers)
    "overflow",  # 1e39: finite JSON, infinite as FP32
    "oversized",  # {"bytes": n} of valid-looking JSON padding
    "slow_drip",  # body one byte per {"interval_ms": n}
    "reset",  # TCP reset before any response
    "cjk_error",  # 400 with a CJK, CR/LF-laden message
    "echo_auth",  # 401 whose message repeats the Authorization header
    "length",  # chat: finish_reason "length"
    "error_object",  # chat: 200 carrying an "error" object
    "empty_choices",  # chat: 200 with "choices": []
    # Streamed chat calls only. A "content chunk" is one piece of the answer
    # text (or of the tool call's arguments), not the opening role chunk.
    "stream_disconnect",  # {"after": k}: k content chunks, then the connection closes
                          # mid-body: no finish chunk, no [DONE], no end of chunked body
    "stream_error_event",  # {"after": k}: k content chunks, then an `event: error` event
                           # and a clean end of body (no finish chunk; [DONE] only if
                           # {"done": true})
    "stream_no_done",  # the whole stream but the `data: [DONE]` line; clean end of body
    "stream_length",  # the finish chunk says "length" (cut off)
    "stream_tool_calls",  # one tool call, its arguments in pieces, finish "tool_calls"
    "stream_slow_first",  # {"ms": n}: headers at once, then n ms before the first chunk
}

# Stream pieces when /_stream sets no count: a few per answer, like tokens.
STREAM_PIECE_CHARS = 8
# A fixed `created`: answers stay byte-for-byte reproducible across runs.
CREATED = 1700000000

# What OpenAI answers when one input of a batch is too long. Like the real
# message it names no input, so a client cannot tell which text is at fault.
POISON_MESSAGE = ("This model's maximum context length is 8192 tokens, however you requested "
                  "9000 tokens. Please reduce your prompt.")


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.calls = {"embeddings": 0, "chat": 0}
        self.stream_calls = 0  # chat calls with "stream": true, also counted in calls["chat"]
        self.stream_chunks = None  # content pieces per streamed answer; None: by length
        self.stream_delay_ms = 0
        self.inputs = []
        self.connections = 0
        self.active = 0
        self.peak = 0
        self.auth = []
        self.faults = []
        self.latency_ms = 0
        self.jitter_ms = 0
        self.poison = None  # {"marker", "status", "message"} once /_poison is called
        self.poisoned = 0
        self.last_api_reply = 0.0
        self.require = None  # {"style", "key"} once /_auth is called
        self.api_keys = []
        self.paths = []
        self.refused_auth = 0
        self.sizes = []  # inputs of every embeddings call, refused ones too

    def snapshot(self):
        with self.lock:
            return {
                "calls": dict(self.calls),
                "total_calls": sum(self.calls.values()),
                "stream_calls": self.stream_calls,
                "inputs": list(self.inputs),
                "connections": self.connections,
                "peak_concurrency": self.peak,
                "auth": sorted(set(self.auth)),
                "faults_left": len(self.faults),
                "poisoned": self.poisoned,
                "last_api_reply": self.last_api_reply,
                "api_keys": sorted(set(self.api_keys)),
                "paths": list(self.paths),
                "refused_auth": self.refused_auth,
                "sizes": list(self.sizes),
            }

    def next_fault(self):
        with self.lock:
            if not self.faults:
                return None
            f = self.faults[0]
            f["times"] = f.get("times", 1) - 1
            if f["times"] <= 0:
                self.faults.pop(0)
            return f


STATE = State()
NAME = "fake"
NAMED = False


def bow_vector(text, dims):
    """Bag of words: each word adds 1 to one hashed dimension, then the
    vector is normalised. Texts sharing k of their words (no collisions) have
    cosine k / sqrt(len(a) * len(b)), so tests can place pairs just above or
    below a threshold."""
    v = [0.0] * dims
    for w in re.findall(r"[a-z0-9]+", text.lower()):
        h = int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "big")
        v[h % dims] += 1.0
    norm = sum(x * x for x in v) ** 0.5
    if norm == 0:
        v[0] = 1.0
        return v
    return [x / norm for x in v]


def vector(model, text, dims):
    if model.startswith("bow"):
        return bow_vector(text, dims)
    seed = hashlib.sha256(f"{model}\0{text}".encode()).digest()
    out = []
    while len(out) < dims:
        seed = hashlib.sha256(seed).digest()
        out.extend((b - 128) / 128.0 for b in seed)
    return out[:dims]


REAL_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072,
             "text-embedding-ada-002": 1536}


def model_dims(model):
    m = re.search(r"-d(\d+)$", model)
    return int(m.group(1)) if m else REAL_DIMS.get(model, 8)


def chat_digest(req):
    return hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()[:16]


def chat_answer(req):
    """The non-streamed answer. Derived from the request exactly as received,
    so `"stream": true` and `stream_options` change the text too: a streamed
    call's text is chat_answer of the streamed request, not of its
    non-streamed twin."""
    digest = chat_digest(req)
    return {
        "id": "chatcmpl-" + digest,
        "object": "chat.completion",
        "created": CREATED,
        "model": req.get("model", ""),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "answer " + digest},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


def split_pieces(text, count=None):
    """text in count pieces of near-equal length (count None: about
    STREAM_PIECE_CHARS each). More pieces than characters gives empty pieces,
    which real upstreams send too, so a test can ask for a long stream."""
    n = count or max(1, -(-len(text) // STREAM_PIECE_CHARS))
    return [text[i * len(text) // n:(i + 1) * len(text) // n] for i in range(n)]


def stream_events(req, fault=None, count=None):
    """The SSE events of a streamed answer to req, each complete with its
    blank line, and whether the body then ends cleanly (False: the
    connection is to be dropped mid-body).

    Shaped like OpenAI's: a role chunk, content chunks, a finish chunk, with
    stream_options.include_usage a choices-less usage chunk (and "usage":
    null on every other chunk), then `data: [DONE]`. Concatenating the
    content deltas gives chat_answer(req)'s message content exactly."""
    answer = chat_answer(req)
    kind = fault["kind"] if fault else None
    with_usage = bool((req.get("stream_options") or {}).get("include_usage"))

    def chunk(choices, **extra):
        obj = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
               "model": answer["model"], "choices": choices, **extra}
        if with_usage:
            obj.setdefault("usage", None)
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    def delta(d, finish=None):
        return chunk([{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}])

    if kind == "stream_tool_calls":
        digest = chat_digest(req)
        first = {"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_" + digest, "type": "function",
             "function": {"name": "lookup", "arguments": ""}}]}
        pieces = [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]}
                  for p in split_pieces(json.dumps({"query": digest}), count)]
        finish = "tool_calls"
    else:
        first = {"role": "assistant", "content": ""}
        text = answer["choices"][0]["message"]["content"]
        pieces = [{"content": p} for p in split_pieces(text, count)]
        finish = "length" if kind == "stream_length" else "stop"

    events = [delta(first)]
    if kind in ("stream_disconnect", "stream_error_event"):
        events += [delta(p) for p in pieces[:fault.get("after", 0)]]
        if kind == "stream_disconnect":
            return events, False
        error = {"error": {"message": "The server had an error while processing your request.",
                           "type": "server_error"}}
        events.append(b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n")
        if fault.get("done"):
            events.append(b"data: [DONE]\n\n")
        return events, True
    events += [delta(p) for p in pieces]
    events.append(delta({}, finish))
    if with_usage:
        events.append(chunk([], usage=answer["usage"]))
    if kind != "stream_no_done":
        events.append(b"data: [DONE]\n\n")
    return events, True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle on, the body
    # waits for the client's delayed ACK (~40 ms) and skews every timing.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    api_connection = False

    def send_json(self, status, obj=None, raw=None, headers=()):
        body = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("X-Upstream", NAME)
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self):
        if self.path == "/_stats":
            return self.send_json(200, STATE.snapshot())
        self.send_json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = self.read_body()
        if self.path == "/_reset":
            with STATE.lock:
                STATE.reset()
            return self.send_json(200, {"ok": True})
        if self.path == "/_fault":
            f = json.loads(body)
            assert f["kind"] in FAULTS, f
            with STATE.lock:
                STATE.faults.append(f)
            return self.send_json(200, {"ok": True})
        if self.path == "/_latency":
            req = json.loads(body)
            with STATE.lock:
                STATE.latency_ms = req["ms"]
                STATE.jitter_ms = req.get("jitter_ms", 0)
            return self.send_json(200, {"ok": True})
        if self.path == "/_poison":
            req = json.loads(body)
            with STATE.lock:
                STATE.poison = {"marker": req.get("marker", "POISON"),
                                "status": req.get("status", 400),
                                "message": req.get("message") or POISON_MESSAGE}
            return self.send_json(200, {"ok": True})
        if self.path == "/_auth":
            req = json.loads(body)
            assert req["style"] in ("bearer", "azure"), req
            with STATE.lock:
                STATE.require = {"style": req["style"], "key": req["key"]}
            return self.send_json(200, {"ok": True})
        if self.path == "/_stream":
            req = json.loads(body)
            chunks = req.get("chunks")
            assert chunks is None or (isinstance(chunks, int) and chunks >= 1), req
            with STATE.lock:
                STATE.stream_chunks = chunks
                STATE.stream_delay_ms = req.get("delay_ms", 0)
            return self.send_json(200, {"ok": True})
        path, _, query = self.path.partition("?")
        kind = {"/v1/embeddings": "embeddings", "/v1/chat/completions": "chat"}.get(path)
        azure = re.fullmatch(r"/openai/deployments/([A-Za-z0-9._~%-]+)/(embeddings|chat/completions)", path)
        if azure:
            kind = "embeddings" if azure.group(2) == "embeddings" else "chat"
            if not re.search(r"(^|&)api-version=[A-Za-z0-9-]+", query):
                return self.send_json(404, {"error": {"message": "api-version is required"}})
        if kind is None:
            return self.send_json(404, {"error": {"message": "no such endpoint"}})
        with STATE.lock:
            STATE.paths.append(self.path)
            STATE.api_keys.append(self.headers.get("api-key", ""))
            require = STATE.require
        if require and not self.authorized(require):
            with STATE.lock:
                STATE.refused_auth += 1
            return self.send_json(401, {"error": {"message": "Access denied: invalid key"}})
        with STATE.lock:
            # Connections that carried API calls, not test-control requests.
            if not self.api_connection:
                self.api_connection = True
                STATE.connections += 1
            STATE.calls[kind] += 1
            STATE.active += 1
            STATE.peak = max(STATE.peak, STATE.active)
            STATE.auth.append(self.headers.get("Authorization", ""))
            latency = STATE.latency_ms + random.uniform(0, STATE.jitter_ms)
            poison = STATE.poison
        try:
            if latency:
                time.sleep(latency / 1000.0)
            req = json.loads(body)
            streamed = kind == "chat" and isinstance(req, dict) and req.get("stream") is True
            if kind == "embeddings" and isinstance(req, dict):
                inp = req.get("input")
                with STATE.lock:
                    STATE.sizes.append(1 if isinstance(inp, str) else len(inp or []))
            if streamed:
                with STATE.lock:
                    STATE.stream_calls += 1
            # Before the fault queue, so a poisoned request never uses up a
            # fault meant for a healthy one.
            if kind == "embeddings" and poison and self.answer_poisoned(req, poison):
                return
            fault = STATE.next_fault()
            if fault and self.inject(fault):
                return
            if kind == "embeddings":
                self.embeddings(req, fault)
            elif streamed:
                self.stream(req, fault)
            else:
                self.chat(req, fault)
        finally:
            with STATE.lock:
                STATE.active -= 1
                STATE.last_api_reply = time.time()

    def authorized(self, require):
        if require["style"] == "azure":
            return self.headers.get("api-key") == require["key"]
        return self.headers.get("Authorization") == "Bearer " + require["key"]

    def answer_poisoned(self, req, poison):
        """Answers with the poison error when any input holds the marker."""
        inputs = req.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs or []
        if not any(isinstance(t, str) and poison["marker"] in t for t in inputs):
            return False
        with STATE.lock:
            STATE.poisoned += 1
        self.send_json(poison["status"], {"error": {
            "message": poison["message"], "type": "invalid_request_error",
            "param": None, "code": "context_length_exceeded" if poison["status"] == 400 else None}})
        return True

    def inject(self, f):
        """Sends a fault response; False when the fault shapes a normal answer."""
        k = f["kind"]
        if k == "status":
            headers = [("Retry-After", f["retry_after"])] if "retry_after" in f else []
            msg = f.get("message", "injected failure")
            self.send_json(f["status"], {"error": {"message": msg}}, headers=headers)
        elif k == "malformed":
            self.send_json(200, raw=b'{"data": [{"index": 0, "embedding": [0.1,')
        elif k == "oversized":
            pad = "x" * f.get("bytes", 1 << 20)
            self.send_json(200, raw=json.dumps({"data": [], "pad": pad}).encode())
        elif k == "slow_drip":
            raw = json.dumps({"data": []}).encode() + b" " * 200
            self.send_response(200)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            for i in range(len(raw)):
                self.wfile.write(raw[i : i + 1])
                self.wfile.flush()
                time.sleep(f.get("interval_ms", 100) / 1000.0)
        elif k == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif k == "cjk_error":
            msg = "\u8bf7\u6c42\u9519\u8bef\r\n\u4e00 bad request \x00"
            self.send_json(400, {"error": {"message": msg}})
        elif k == "echo_auth":
            auth = self.headers.get("Authorization", "")
            self.send_json(401, {"error": {"message": "Incorrect API key provided: " + auth}})
        else:
            return False
        return True

    def embeddings(self, req, fault):
        inputs = req["input"]
        if isinstance(inputs, str):
            inputs = [inputs]
        with STATE.lock:
            STATE.inputs.append(len(inputs))
        model = req["model"]
        dims = req.get("dimensions") or model_dims(model)
        b64 = req.get("encoding_format") == "base64"
        kind = fault["kind"] if fault else None
        data = []
        for i, text in enumerate(inputs):
            v = vector(model, text, dims)
            if kind == "wrong_dim" and i == len(inputs) - 1:
                v = v[:-1]
            if kind == "overflow":
                v[0] = 1e39
            emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if b64 and kind != "overflow" else v
            data.append({"object": "embedding", "index": i, "embedding": emb})
        if kind == "wrong_count":
            data = data[:-1]
        out = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": len(inputs) * 2, "total_tokens": len(inputs) * 2},
        }
        raw = json.dumps(out).encode()
        if kind == "nan":
            raw = json.dumps({**out, "data": [{"index": 0, "embedding": [0.5]}]}).encode()
            raw = raw.replace(b"0.5", b"NaN")
        self.send_json(200, raw=raw)

    def chat(self, req, fault):
        out = chat_answer(req)
        if NAMED:
            out["system_fingerprint"] = "fp_" + NAME
        kind = fault["kind"] if fault else None
        if kind == "length":
            out["choices"][0]["finish_reason"] = "length"
        elif kind == "error_object":
            out["error"] = {"message": "model overloaded"}
        elif kind == "empty_choices":
            out["choices"] = []
        self.send_json(200, out)

    def stream(self, req, fault):
        """Sends stream_events(req) as one HTTP/1.1 chunk per event, so the
        connection stays reusable after a clean end."""
        kind = fault["kind"] if fault else None
        with STATE.lock:
            count, delay_ms = STATE.stream_chunks, STATE.stream_delay_ms
        events, clean = stream_events(req, fault, count)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        # Headers already out: a client sees the answer start, then stall.
        if kind == "stream_slow_first":
            time.sleep(fault.get("ms", 0) / 1000.0)
        for i, event in enumerate(events):
            if i and delay_ms:
                time.sleep(delay_ms / 1000.0)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        if clean:
            self.wfile.write(b"0\r\n\r\n")
        else:
            # No terminating chunk: the server then closes the socket (FIN,
            # not RST, so the chunks already sent still reach the client).
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8089)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    global NAME, NAMED
    if args.name:
        NAME, NAMED = args.name, True
    srv = Server((args.host, args.port), Handler)
    print(f"fake upstream on http://{args.host}:{args.port}/v1", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
