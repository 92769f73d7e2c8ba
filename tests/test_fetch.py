"""EMBCACHE.FETCH and LLMCACHE.FETCH against the fake upstream: fills, hits,
partial hits, duplicates, options and the LLM policy."""
import json

import numpy as np
import pytest
import redis

from conftest import vec
from fake_upstream import chat_answer, vector
from helpers import info_fields

M = "emb-model"  # 8 dimensions in the fake
FETCH = "EMBCACHE.FETCH"


def expected(text, model=M, dims=8):
    return np.asarray(vector(model, text, dims), dtype="<f4").tobytes()


def fetch(r, ns, *texts, opts=(), model=M):
    return r.execute_command(FETCH, ns, model, len(texts), *texts, *opts)


def test_a_miss_fills_stores_and_then_hits(f, upstream):
    got = fetch(f, "docs", "hello", "world")
    assert got == [expected("hello"), expected("world")]
    assert upstream.calls("embeddings") == 1 and upstream.stats()["inputs"] == [2]
    assert fetch(f, "docs", "world", "hello") == [expected("world"), expected("hello")]
    assert upstream.calls() == 1, "a hit went upstream"
    assert f.execute_command("EMBCACHE.GET", "docs", M, "hello") == expected("hello")
    info = info_fields(f)
    assert info["hits"] >= 2 and info["misses"] >= 2 and info["tokens_total"] >= 4


def test_partial_hits_send_only_the_missing_texts(f, upstream):
    f.execute_command("EMBCACHE.SET", "docs", M, "b", vec(1, 2, 3, 4, 5, 6, 7, 8))
    got = fetch(f, "docs", "a", "b", "c")
    assert got == [expected("a"), vec(1, 2, 3, 4, 5, 6, 7, 8), expected("c")]
    assert upstream.stats()["inputs"] == [2]


def test_duplicate_texts_in_one_call_are_sent_once(f, upstream):
    got = fetch(f, "docs", "x", "y", "x", "x")
    assert got == [expected("x"), expected("y"), expected("x"), expected("x")]
    assert upstream.stats()["inputs"] == [2]


@pytest.mark.parametrize("texts", [["TIMEOUT", "REFRESH"], ["NOSTORE"], ["FORMAT", "JSON", "EX"]])
def test_texts_equal_to_option_words_are_texts(f, upstream, texts):
    assert fetch(f, "docs", *texts) == [expected(t) for t in texts]
    assert upstream.stats()["inputs"] == [len(set(texts))]


def test_misses_go_up_in_batches_of_batch_size(f, upstream):
    f.config_set("aicache.batch-size", 3)
    texts = [f"t{i}" for i in range(10)]
    assert fetch(f, "docs", *texts) == [expected(t) for t in texts]
    assert sorted(upstream.stats()["inputs"]) == [1, 3, 3, 3]


def test_cjk_and_long_texts_round_trip(f, upstream):
    texts = ["\u4e00\u4e01 \u6f22\u5b57", "e\u0301", "x" * 30000]
    assert fetch(f, "docs", *texts) == [expected(t) for t in texts]


def test_refresh_skips_the_read_and_overwrites(f, upstream):
    f.execute_command("EMBCACHE.SET", "docs", M, "t", vec(*range(8)))
    assert fetch(f, "docs", "t") == [vec(*range(8))]
    assert upstream.calls() == 0
    assert fetch(f, "docs", "t", opts=["REFRESH"]) == [expected("t")]
    assert upstream.calls() == 1
    assert f.execute_command("EMBCACHE.GET", "docs", M, "t") == expected("t")


def test_nostore_fills_without_writing(f, upstream):
    assert fetch(f, "docs", "t", opts=["NOSTORE"]) == [expected("t")]
    assert f.execute_command("EMBCACHE.GET", "docs", M, "t") is None
    assert f.dbsize() == 0


def test_dimensions_is_sent_and_keyed_separately(f, upstream):
    short = fetch(f, "docs", "t", opts=["DIMENSIONS", 4])
    assert short == [expected("t", dims=4)]
    assert fetch(f, "docs", "t") == [expected("t")], "DIMENSIONS must not share the full vector's key"
    assert upstream.calls() == 2
    assert fetch(f, "docs", "t", opts=["DIMENSIONS", 4]) == short and upstream.calls() == 2


def test_format_json(f, upstream):
    (got,) = fetch(f, "docs", "t", opts=["FORMAT", "JSON"])
    assert np.allclose(json.loads(got), vector(M, "t", 8))


def test_base64_and_float_encodings_store_the_same_bytes(f, upstream):
    f.config_set("aicache.upstream-base64", "no")
    floats = fetch(f, "a", "t")
    f.config_set("aicache.upstream-base64", "yes")
    assert fetch(f, "b", "t") == floats == [expected("t")]


def test_fills_carry_ttl_with_jitter_and_ex(f, upstream):
    fetch(f, "docs", *[f"t{i}" for i in range(50)])
    keys = [f.execute_command("EMBCACHE.KEY", "docs", M, f"t{i}") for i in range(50)]
    ttls = [f.pttl(k) / 1000 for k in keys]
    assert all(86400 * 0.9 - 5 <= t <= 86400 * 1.1 for t in ttls) and len(set(ttls)) > 25
    fetch(f, "docs", "ex", opts=["EX", 100])
    assert 85 <= f.ttl(f.execute_command("EMBCACHE.KEY", "docs", M, "ex")) <= 110


def test_the_dimension_pin_applies_to_fills(f, upstream):
    f.execute_command("EMBCACHE.SET", "docs", M, "seed", vec(1, 2, 3))
    with pytest.raises(redis.ResponseError, match="dimension mismatch.*3-dimension.*got 8"):
        fetch(f, "docs", "t")
    assert f.execute_command("EMBCACHE.GET", "docs", M, "t") is None


@pytest.mark.parametrize("args,msg", [
    ([0, "a"], "numtexts must be a positive integer"),
    (["x", "a"], "numtexts must be a positive integer"),
    ([3, "a", "b"], "numtexts is 3 but only 2 texts follow"),
    ([1, "a", "BOGUS"], "unknown option 'BOGUS'"),
    ([1, "a", "TIMEOUT"], "TIMEOUT must be an integer"),
    ([1, "a", "TIMEOUT", 0], "TIMEOUT must be an integer"),
    ([1, "a", "TIMEOUT", "nan"], "TIMEOUT must be an integer"),
    ([1, "a", "DIMENSIONS", 0], "DIMENSIONS must be an integer"),
    ([1, "a", "DIMENSIONS", 100000], "DIMENSIONS must be an integer"),
    ([1, "a", "FORMAT", "XML"], "FORMAT must be FP32 or JSON"),
    ([1, "a", "EX", -1], "EX"),
    ([1, b"\xff\xfe"], "not valid UTF-8"),
    ([1, ""], "text must not be empty"),
    ([2, "a", "\x00"], None),
])
def test_bad_arguments_fail_before_any_upstream_call(f, upstream, args, msg):
    if msg is None:  # NUL is valid UTF-8: it must be fetched, not crash anything
        assert len(f.execute_command(FETCH, "docs", M, *args)) == 2
        return
    with pytest.raises(redis.ResponseError, match=msg):
        f.execute_command(FETCH, "docs", M, *args)
    assert upstream.calls() == 0 and f.dbsize() == 0


def test_wrong_arity(f):
    for args in [[], ["ns"], ["ns", M], ["ns", M, 1]]:
        with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
            f.execute_command(FETCH, *args)


REQ = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi \u4e00"}]}


def answer_for(req):
    return chat_answer({**req, "stream": False})


def llm(r, req, *opts, ns="chat"):
    body = req if isinstance(req, (bytes, str)) else json.dumps(req)
    return r.execute_command("LLMCACHE.FETCH", ns, body, *opts)


def test_llm_fetch_fills_then_hits_for_any_key_order(f, upstream):
    got = json.loads(llm(f, REQ))
    assert got == answer_for(REQ)
    spaced = '{ "messages" : [{"content": "hi \\u4e00", "role": "user"}], "model": "gpt-test" }'
    assert json.loads(llm(f, spaced)) == got
    assert upstream.calls("chat") == 1
    assert json.loads(f.execute_command("LLMCACHE.GET", "chat", json.dumps(REQ))) == got
    info = info_fields(f)
    assert info["tokens_completion"] >= 3 and info["tokens_prompt"] >= 7


def test_llm_fetch_never_streams(f, upstream):
    req = {**REQ, "stream": True, "stream_options": {"include_usage": True}}
    got = json.loads(llm(f, req))
    # The fake derives its answer from what it received: stream false, no options.
    assert got == chat_answer({**REQ, "stream": False})


def test_sampled_requests_are_fetched_but_not_stored_when_disabled(f, upstream):
    f.config_set("aicache.cache-sampled", "no")
    req = {**REQ, "temperature": 0.7}
    assert json.loads(llm(f, req)) == answer_for(req)
    assert f.execute_command("LLMCACHE.GET", "chat", json.dumps(req)) is None
    f.config_set("aicache.cache-sampled", "yes")
    llm(f, req)
    assert f.execute_command("LLMCACHE.GET", "chat", json.dumps(req)) is not None


def test_llm_refresh_and_nostore(f, upstream):
    llm(f, REQ, "NOSTORE")
    assert f.dbsize() == 0
    llm(f, REQ)
    llm(f, REQ, "REFRESH", "EX", 50)
    assert upstream.calls("chat") == 3
    assert 40 <= f.ttl(f.execute_command("LLMCACHE.KEY", "chat", json.dumps(REQ))) <= 55


@pytest.mark.parametrize("body,opts,msg", [
    ("{", [], "not a JSON object|JSON"),
    ("[1]", [], "JSON object"),
    (json.dumps(REQ), ["DIMENSIONS", 4], "unknown option 'DIMENSIONS'"),
    (json.dumps(REQ), ["TIMEOUT", -1], "TIMEOUT must be an integer"),
])
def test_llm_bad_input(f, upstream, body, opts, msg):
    with pytest.raises(redis.ResponseError, match=msg):
        llm(f, body, *opts)
    assert upstream.calls() == 0
