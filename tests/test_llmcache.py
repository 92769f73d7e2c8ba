"""LLMCACHE.GET/SET/DEL/KEY: canonical request keys and cacheable responses."""
import hashlib
import json

import pytest
import redis

REQ = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is Redis?"}],
       "temperature": 0}
RESP = {"id": "c1", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "A database."},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def j(x, **kw):
    return json.dumps(x, **kw)


def test_set_then_get_returns_the_stored_bytes(r):
    body = j(RESP)
    assert r.execute_command("LLMCACHE.SET", "chat", j(REQ), body) in (b"OK", "OK", True)
    assert r.execute_command("LLMCACHE.GET", "chat", j(REQ)) == body.encode()


def test_key_ignores_whitespace_key_order_and_transport_fields(r):
    r.execute_command("LLMCACHE.SET", "chat", j(REQ), j(RESP))
    same = {"temperature": 0.0, "stream": True, "user": "u-42",
            "stream_options": {"include_usage": True},
            "messages": [{"content": "What is Redis?", "role": "user"}], "model": "gpt-4o-mini"}
    assert r.execute_command("LLMCACHE.GET", "chat", j(same, indent=4)) == j(RESP).encode()


@pytest.mark.parametrize("change", [{"temperature": 0.7}, {"seed": 1}, {"max_tokens": 5},
                                    {"model": "gpt-4o"}, {"stop": ["."]}, {"n": 2},
                                    {"response_format": {"type": "json_object"}}])
def test_output_affecting_fields_change_the_key(r, change):
    r.execute_command("LLMCACHE.SET", "chat", j(REQ), j(RESP))
    assert r.execute_command("LLMCACHE.GET", "chat", j({**REQ, **change})) is None


def test_absent_temperature_means_one(r):
    base = {k: v for k, v in REQ.items() if k != "temperature"}
    r.execute_command("LLMCACHE.SET", "chat", j(base), j(RESP))
    assert r.execute_command("LLMCACHE.GET", "chat", j({**base, "temperature": 1})) is not None


def test_key_is_in_the_namespace_slot_and_del_removes_it(r):
    key = r.execute_command("LLMCACHE.KEY", "{tenantA}:chat", j(REQ))
    assert key.startswith(b"aicache:llm:v1:{tenantA}:") and len(key.split(b":")[-1]) == 64
    r.execute_command("LLMCACHE.SET", "{tenantA}:chat", j(REQ), j(RESP), "EX", 100)
    assert 80 <= r.ttl(key) <= 110
    assert r.execute_command("LLMCACHE.DEL", "{tenantA}:chat", j(REQ)) == 1
    assert r.execute_command("LLMCACHE.GET", "{tenantA}:chat", j(REQ)) is None


def test_sampled_requests_can_be_kept_out_of_the_cache(r):
    r.config_set("aicache.cache-sampled", "no")
    hot = {**REQ, "temperature": 0.8}
    with pytest.raises(redis.ResponseError, match="temperature > 0"):
        r.execute_command("LLMCACHE.SET", "chat", j(hot), j(RESP))
    r.execute_command("LLMCACHE.SET", "chat", j(REQ), j(RESP))
    assert r.dbsize() == 1


CUT = {**RESP, "choices": [{"index": 0, "message": {"content": "A"}, "finish_reason": "length"}]}


@pytest.mark.parametrize("args,pattern", [
    (["chat", j(REQ)], "wrong number of arguments"),
    (["chat", j(REQ), j(RESP), "EX"], "unknown option 'EX'"),
    (["chat", j(REQ), j(RESP), "EX", 0], "EX must be a positive integer"),
    (["chat", "{not json", j(RESP)], "request is not valid JSON"),
    (["chat", "[1]", j(RESP)], "request must be a JSON object"),
    (["chat", j({"messages": REQ["messages"]}), j(RESP)], 'needs a non-empty string "model"'),
    (["chat", j({**REQ, "messages": []}), j(RESP)], 'needs a non-empty array "messages"'),
    (["chat", j({**REQ, "temperature": "hot"}), j(RESP)], '"temperature" must be a number'),
    (["chat", j(REQ), "not json"], "response is not valid JSON"),
    (["chat", j(REQ), j({"error": {"message": "rate limited \u4e00"}})], "error object"),
    (["chat", j(REQ), j({**RESP, "choices": []})], "no choices"),
    (["chat", j(REQ), j(CUT)], "finish_reason length"),
    (["chat", j(REQ), j({**RESP, "choices": [{"finish_reason": "stop"}]})], "has no message"),
    (["a}b", j(REQ), j(RESP)], "namespace contains"),
])
def test_bad_llm_input_is_rejected_and_nothing_is_stored(r, args, pattern):
    with pytest.raises(redis.ResponseError, match=pattern) as e:
        r.execute_command("LLMCACHE.SET", *args)
    assert str(e.value).isascii()
    assert r.dbsize() == 0


def test_size_limits_apply_to_requests_and_responses(r):
    r.config_set("aicache.max-request-bytes", 100)
    big = {**REQ, "messages": [{"role": "user", "content": "x" * 200}]}
    with pytest.raises(redis.ResponseError, match="more than max-request-bytes 100"):
        r.execute_command("LLMCACHE.GET", "chat", j(big))
    r.config_set("aicache.max-request-bytes", 1 << 20)
    r.config_set("aicache.max-response-bytes", 50)
    with pytest.raises(redis.ResponseError, match="more than max-response-bytes 50"):
        r.execute_command("LLMCACHE.SET", "chat", j(REQ), j(RESP))
    assert r.dbsize() == 0


def test_llm_key_matches_the_documented_recipe(r):
    msgs = [{"role": "user", "content": "Redis 是什么? \u0000 tab\t"}]
    req = {"model": "gpt-4o-mini", "messages": msgs, "temperature": 0.25, "stream": True}
    canon = j({"frequency_penalty": 0, "messages": msgs, "model": "gpt-4o-mini",
               "n": 1, "presence_penalty": 0, "temperature": 0.25, "top_p": 1},
              separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    enc = b"".join(len(f).to_bytes(8, "big") + f for f in (b"llm:v1", b"chat", canon))
    want = b"aicache:llm:v1:{chat}:" + hashlib.sha256(enc).hexdigest().encode()
    assert r.execute_command("LLMCACHE.KEY", "chat", j(req)) == want
