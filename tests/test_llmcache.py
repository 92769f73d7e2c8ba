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
    (["chat", j(REQ), j(RESP), "EX"], "EX needs a value"),
    (["chat", j(REQ), j(RESP), "PX", 5], "unknown option 'PX'; expected EX or VECTOR"),
    (["chat", j(REQ), j(RESP), "VECTOR", "[0, 0]"], "VECTOR must not be all zeros"),
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
    # Transport fields dropped, defaults filled in, keys sorted, numbers in
    # their canonical spelling (0.25 is 25e-2), text kept as UTF-8.
    canon = ('{"frequency_penalty":0,"messages":'
             + j(msgs, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
             + ',"model":"gpt-4o-mini","n":1,"presence_penalty":0,"temperature":25e-2,"top_p":1}'
             ).encode()
    assert readme_canonical(j(req).encode()) == canon
    enc = b"".join(len(f).to_bytes(8, "big") + f for f in (b"llm:v1", b"chat", canon))
    want = b"aicache:llm:v1:{chat}:" + hashlib.sha256(enc).hexdigest().encode()
    assert r.execute_command("LLMCACHE.KEY", "chat", j(req)) == want


# The README's recipe for the canonical request, copied here so a change on
# either side fails this test.
def readme_canonical(body: bytes) -> bytes:
    import json
    from decimal import Decimal

    class Num(str):
        pass

    def canon_number(tok):
        sign, digits, exp = Decimal(tok).as_tuple()
        ds = "".join(map(str, digits)).lstrip("0")
        sig = ds.rstrip("0")
        if not sig:
            return "0"
        exp += len(ds) - len(sig)
        s = "-" if sign else ""
        if exp >= 0 and len(sig) + exp <= 64:
            return s + sig + "0" * exp
        return f"{s}{sig}e{exp}"

    req = json.loads(body, parse_int=Num, parse_float=Num)
    for f in ("stream", "stream_options", "user", "store", "metadata", "service_tier",
              "safety_identifier", "prompt_cache_key"):
        req.pop(f, None)
    for f, d in (("temperature", "1"), ("top_p", "1"), ("n", "1"),
                 ("presence_penalty", "0"), ("frequency_penalty", "0")):
        if req.get(f) is None:
            req[f] = Num(d)

    def dump(v):
        if isinstance(v, Num):
            return canon_number(v)
        if isinstance(v, dict):
            return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + dump(v[k])
                                  for k in sorted(v)) + "}"
        if isinstance(v, list):
            return "[" + ",".join(map(dump, v)) + "]"
        return json.dumps(v, ensure_ascii=False)

    return dump(req).encode()


def readme_llm_key(ns: bytes, body: bytes, prefix=b"aicache:") -> bytes:
    import hashlib
    enc = b"".join(len(f).to_bytes(8, "big") + f for f in (b"llm:v1", ns, readme_canonical(body)))
    return prefix + b"llm:v1:{" + ns + b"}:" + hashlib.sha256(enc).hexdigest().encode()


NUMBER_CASES = ["0", "-0", "1", "1.0", "1e0", "10E-1", "0.1", "1e-7", "0.0000001", "-12.50",
                "123.456e3", "1e16", "10000000000000000", "9007199254740993",
                "12345678901234567890123", "12345678901234567890124", "1e64", "1e65",
                "1e400", "2.5E+2", "-1e-400"]


def test_the_readme_recipe_agrees_with_the_module_on_number_edge_cases(r):
    keys = {}
    for n in NUMBER_CASES:
        body = ('{"model":"m","messages":[{"role":"user","content":"\u4e00\\n"}],'
                f'"seed":{n},"temperature":{n}}}').encode()
        got = r.execute_command("LLMCACHE.KEY", "ns", body)
        assert got == readme_llm_key(b"ns", body), n
        keys[n] = got
    # Equal values share a key; values the upstream can tell apart do not.
    for a, b in (("1", "1.0"), ("1", "10E-1"), ("0", "-0"), ("1e16", "10000000000000000"),
                 ("1e-7", "0.0000001")):
        assert keys[a] == keys[b], (a, b)
    assert keys["12345678901234567890123"] != keys["12345678901234567890124"]
    assert keys["9007199254740993"] != keys["1e16"]
    assert len({keys[n] for n in ("0.1", "1e-7", "1", "1e64", "1e65", "1e400")}) == 6
