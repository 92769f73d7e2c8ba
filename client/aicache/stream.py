"""Streamed chat completions through aicache, as OpenAI chunk dicts.

    from aicache import stream_chat
    for chunk in stream_chat(r, "chat", request):      # r: a redis-py client
        print(chunk["choices"][0]["delta"].get("content") or "", end="")

replaces `client.chat.completions.create(**request, stream=True)`: a cached
answer is replayed as chunks, a running generation is joined from its first
chunk, and a miss starts one generation that every identical caller shares.
A failed generation raises StreamError with the module's error text.
"""
import json
import time

__all__ = ["StreamError", "completion_to_chunks", "stream_chat"]


class StreamError(Exception):
    """The generation ended with an error (the text FETCH would reply)."""


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def completion_to_chunks(completion):
    """A chat.completion as the chunks a stream of it would have sent: one
    chunk with each choice's whole message as its delta, then a usage chunk."""
    head = {k: completion[k] for k in ("id", "created", "model", "system_fingerprint",
                                       "service_tier") if k in completion}
    head["object"] = "chat.completion.chunk"
    choices = []
    for c in completion.get("choices", []):
        delta = dict(c.get("message") or {})
        if isinstance(delta.get("tool_calls"), list):
            delta["tool_calls"] = [dict(t, index=i) for i, t in enumerate(delta["tool_calls"])]
        choices.append({"index": c.get("index", 0), "delta": delta,
                        "logprobs": c.get("logprobs"), "finish_reason": c.get("finish_reason")})
    yield dict(head, choices=choices)
    if isinstance(completion.get("usage"), dict):
        yield dict(head, choices=[], usage=completion["usage"])


def stream_chat(r, ns, request, *, block_ms=5000, timeout_s=120.0, nostore=False,
                refresh=False, ex=None, tenant=None):
    """Yields the chat.completion.chunk dicts of `request` (a dict or JSON
    text) through LLMCACHE.STREAM / LLMCACHE.READ on redis-py client `r`.
    Stops after the last chunk; raises StreamError if the generation failed
    and TimeoutError if it has not ended after `timeout_s`."""
    body = request if isinstance(request, (str, bytes)) else json.dumps(request)
    opts = []
    if nostore:
        opts.append("NOSTORE")
    if refresh:
        opts.append("REFRESH")
    if ex is not None:
        opts += ["EX", ex]
    if tenant is not None:
        opts += ["TENANT", tenant]
    kind, value = r.execute_command("LLMCACHE.STREAM", ns, body, *opts)
    if _text(kind) == "hit":
        yield from completion_to_chunks(json.loads(value))
        return
    key, last = value, "0"
    deadline = time.monotonic() + timeout_s
    while True:
        entries = r.execute_command("LLMCACHE.READ", ns, key, last, "BLOCK", block_ms)
        if not entries:
            if time.monotonic() > deadline:
                raise TimeoutError("the generation did not end in time")
            continue
        for entry_id, fields in entries:
            last = _text(entry_id)
            f = {_text(fields[i]): fields[i + 1] for i in range(0, len(fields), 2)}
            if "chunk" in f:
                yield json.loads(f["chunk"])
            elif _text(f.get("end")) == "error":
                raise StreamError(_text(f.get("error", b"ERR the stream failed")))
            else:
                return
