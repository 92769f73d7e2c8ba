"""aicache.keys and the AICache key helpers against the module's own keys
(EMBCACHE.KEY, LLMCACHE.KEY, what FETCH stores): namespaces, binary texts,
configs, canonical requests (a table and a seeded fuzz), refusals, and the
flush generations."""
import json

import numpy as np
import pytest
import redis

from helpers import key_slot
from test_client import M, REQ, answer, expected, unsupported

from aicache import AICache, AICacheError, InvalidRequest, keys

NAMESPACES = ["docs", "{t}:a", "{t}:b", "a{b", "{a}}", "\u4e00\u4e8c", b"ns\x00\xff"]
TEXTS = ["hello world", "a\x00b", b"\xff\xfe", "\u4e00\u4e8c\u4e09", " padded\t\n text "]


@pytest.mark.parametrize("ns", NAMESPACES, ids=repr)
def test_embedding_keys_match_the_module(r, ns):
    cache = AICache(r, ns, "text-embedding-3-small")
    for text in TEXTS:
        want = r.execute_command("EMBCACHE.KEY", ns, "text-embedding-3-small", text)
        assert cache.embedding_key(text) == want
        assert keys.embedding_key("aicache:", ns, "text-embedding-3-small", text) == want
        assert key_slot(want) == key_slot(ns if isinstance(ns, bytes) else ns.encode())


def test_the_documented_known_answer_holds():
    assert keys.embedding_key("aicache:", "tenantA", "text-embedding-3-small", "hello world") == (
        b"aicache:emb:v1:{tenantA}:62ef2558b98e44fd3d329d210fa5605f308972843443012ec2721736c208aef3")


def test_keys_follow_the_prefix_and_whitespace_configs(r):
    r.config_set("aicache.key-prefix", "app:")
    r.config_set("aicache.normalize-whitespace", "yes")
    cache = AICache(r, "docs", M)  # reads both configs once
    for text in ["  a \t\n b  ", "a b", "x\x0by", "a\u3000b"]:
        assert cache.embedding_key(text) == r.execute_command("EMBCACHE.KEY", "docs", M, text)
    assert cache.embedding_key("a  b").startswith(b"app:emb:v1:{docs}:")
    assert cache.chat_key(REQ) == r.execute_command("LLMCACHE.KEY", "docs", json.dumps(REQ))
    # Constructor values win over the server's configs (and skip CONFIG GET).
    fixed = AICache(r, "docs", M, key_prefix="aicache:", normalize_whitespace=False)
    assert fixed.embedding_key("a  b") == keys.embedding_key("aicache:", "docs", M, "a  b")
    with pytest.raises(ValueError, match="empty"):
        cache.embedding_key(" \t ")


CHAT_BODIES = [
    '{"model":"m","messages":[{"role":"user","content":"hi"}]}',
    '{ "messages" : [ {"content":"hi", "role":"user"} ], "model":"m" }',
    '{"model":"m","messages":[1],"temperature":1.0,"top_p":1,"n":1e0,"presence_penalty":-0,'
    '"frequency_penalty":0.0e5}',
    '{"model":"m","messages":[1],"temperature":null,"stream":true,"stream_options":{"a":1},'
    '"user":"u","store":true,"metadata":{},"service_tier":"auto","safety_identifier":"s",'
    '"prompt_cache_key":"k"}',
    '{"model":"m","messages":[1],"seed":12345678901234567890123}',
    '{"model":"m","messages":[1],"seed":12345678901234567890124}',
    '{"model":"m","messages":[1],"seed":1e16,"x":10000000000000000}',
    '{"model":"m","messages":[1],"a":[0.25,1e-7,0.0000001,-12.50,123.456e3,1e64,10E-1]}',
    '{"model":"m","messages":[1],"a":[1e9223372036854775807,12E9223372036854775806,'
    '1e-9223372036854775808,1.0e9223372036854775807]}',
    '{"model":"m","messages":["\\u00e9\\n\\t\\u0001\\"\\\\/\\u007f\\u2028 \u4e00"]}',
    '{"model":"m","messages":[{"b":1,"a":{"d":[true,false,null],"c":"x"}}],"\u00e9":1,"Z":2}',
    '{"model":"m","messages":[1],"k":1,"k":2}',
    '{"model":"m","messages":[1],"tools":[{"type":"function","function":{"name":"f"}}]}',
    '{"model":"m","messages":' + "[" * 120 + "1" + "]" * 120 + "}",
]


@pytest.mark.parametrize("ns", ["chat", "{t}:x"])
def test_chat_keys_match_the_module(r, ns):
    cache = AICache(r, ns)
    seen = []
    for body in CHAT_BODIES:
        want = r.execute_command("LLMCACHE.KEY", ns, body)
        assert keys.chat_key("aicache:", ns, body) == want, body
        assert cache.chat_key(body) == want, body
        seen.append(want)
    assert seen[0] == seen[1] and seen[2] == seen[3], "spelling and defaults do not matter"
    assert len(set(seen)) == len(CHAT_BODIES) - 2
    # A dict is keyed as the JSON text the client sends for it.
    assert cache.chat_key(REQ) == r.execute_command("LLMCACHE.KEY", ns, json.dumps(REQ))


def random_body(rng):
    """A request whose numbers, strings and keys stress the canonical form."""
    def number():
        sign = rng.choice(["", "-"])
        whole = rng.choice(["0", str(rng.integers(1, 10)) + "".join(
            rng.choice(list("0123456789"), rng.integers(0, 30)))])
        frac = ""
        if rng.random() < .5:
            frac = "." + "".join(rng.choice(list("0009"), rng.integers(1, 25)))
        exp = ""
        if rng.random() < .5:
            digits = rng.choice(["1", "16", "64", "65", "9223372036854775806", "9223372036854775807",
                                 str(rng.integers(0, 400))])
            exp = rng.choice(["e", "E"]) + rng.choice(["", "+", "-"]) + digits
        return sign + whole + frac + exp

    def string():
        chars = ["a", "Z", " ", "/", "\u00e9", "\U0001f600", "\x7f", r"\"", r"\\", r"\n", r"\u0001",
                 r"\u007f", r"\u00e9", r"\u4e00", r"\ud83d\ude00", r"\u2028"]
        return '"' + "".join(rng.choice(chars, rng.integers(0, 8))) + '"'

    fields = [f"{string()}:{number()}" for _ in range(rng.integers(1, 6))]
    values = ",".join(number() if rng.random() < .6 else string() for _ in range(5))
    if rng.random() < .05:
        values += r',"\ud800"'  # a lone surrogate: neither side may key it
    return '{"model":"m","messages":[' + values + "]," + ",".join(fields) + "}"


def test_random_requests_key_like_the_module(r):
    rng = np.random.default_rng(20240601)
    bodies = [random_body(rng) for _ in range(400)]
    pipe = r.pipeline(transaction=False)
    for body in bodies:
        pipe.execute_command("LLMCACHE.KEY", "fuzz", body)
    for body, want in zip(bodies, pipe.execute(raise_on_error=False)):
        if isinstance(want, Exception):
            with pytest.raises(ValueError):
                keys.chat_key("aicache:", "fuzz", body)
        else:
            assert keys.chat_key("aicache:", "fuzz", body) == want, body


BAD_BODIES = [
    "", "[]", "{", '{"messages":[1]}', '{"model":"","messages":[1]}', '{"model":1,"messages":[1]}',
    '{"model":"m","messages":[]}', '{"model":"m","messages":[1],"temperature":"hot"}',
    '{"model":"m","messages":[1],"top_p":true}', '{"model":"m","messages":[NaN]}',
    '{"model":"m","messages":[1e99999999999999999999]}',
    '{"model":"m","messages":[100e9223372036854775806]}',
    '{"model":"m","messages":[1.0e-9223372036854775808]}',
    '{"model":"m","messages":["\\ud800"]}', b'{"model":"m","messages":["\xff"]}',
    '{"model":"m","messages":[1]} x',
    '{"model":"m","messages":' + "[" * 127 + "1" + "]" * 127 + "}",
]


def test_requests_the_module_cannot_key_are_refused_alike(r):
    for body in BAD_BODIES:
        with pytest.raises(InvalidRequest):
            AICache(r, "chat").chat_get(body)
        with pytest.raises(ValueError):
            keys.chat_key("aicache:", "chat", body)


def test_namespaces_the_module_refuses_are_refused_alike(r):
    for ns in ["", "a}b", "{}x", "{}x}", "x" * 1025]:
        with pytest.raises(redis.ResponseError):
            r.execute_command("EMBCACHE.KEY", ns, M, "t")
        with pytest.raises(ValueError):
            AICache(r, ns)


def test_dimension_keys_match_what_a_fetch_stores(f, upstream):
    cache = AICache(f, "docs", M)
    got = cache.embed(["short"], dimensions=4)
    assert got.shape == (1, 4) and np.array_equal(got[0], expected("short", dims=4))
    key = cache.embedding_key("short", dimensions=4)
    assert f.get(key) == expected("short", dims=4).tobytes()
    assert key != cache.embedding_key("short")
    try:
        cache.flush(model=M)
    except AICacheError as e:
        if unsupported(e, "EMBCACHE.FLUSH"):
            pytest.skip("this module build has no EMBCACHE.FLUSH")
        raise
    cache.embed(["short"], dimensions=4)
    flushed = cache.embedding_key("short", dimensions=4)
    assert flushed != key and f.get(flushed) == expected("short", dims=4).tobytes()
    assert upstream.calls() == 2, "after a flush the old entry is not found"


def test_flush_generations_move_every_key(r):
    cache = AICache(r, "{g}:docs", M)
    cache.set("a", [1, 2])
    cache.chat_set(REQ, answer(REQ))
    old_emb, old_llm = cache.embedding_key("a"), cache.chat_key(REQ)
    try:
        assert cache.flush() == 1
    except AICacheError as e:
        if unsupported(e, "EMBCACHE.FLUSH"):
            pytest.skip("this module build has no EMBCACHE.FLUSH")
        raise
    assert cache.get("a") is None and r.exists(old_emb) == 1, "flushed, not deleted"
    new_emb = cache.embedding_key("a")
    assert new_emb != old_emb
    assert new_emb == r.execute_command("EMBCACHE.KEY", "{g}:docs", M, "a")
    assert keys.embedding_key("aicache:", "{g}:docs", M, "a", ns_gen=1) == new_emb
    assert cache.flush(model=M) == 1 and cache.flush(model=M) == 2
    assert cache.embedding_key("a") == r.execute_command("EMBCACHE.KEY", "{g}:docs", M, "a")
    assert cache.embedding_key("a") == keys.embedding_key("aicache:", "{g}:docs", M, "a",
                                                          ns_gen=1, model_gen=2)
    other = cache.embedding_key("a", model="other")
    assert other == r.execute_command("EMBCACHE.KEY", "{g}:docs", "other", "a")
    # Chat entries have their own generation: the embedding flush left them.
    assert cache.chat_key(REQ) == old_llm and cache.chat_get(REQ) == answer(REQ)
    assert cache.chat_flush() == 1
    assert cache.chat_get(REQ) is None
    body = json.dumps(REQ)
    assert cache.chat_key(REQ) == r.execute_command("LLMCACHE.KEY", "{g}:docs", body)
    assert cache.chat_key(REQ) == keys.chat_key("aicache:", "{g}:docs", REQ, ns_gen=1)
    gen = r.hgetall(keys.gen_key("aicache:", "{g}:docs"))
    assert gen == {b"emb": b"1", b"m:" + M.encode(): b"2", b"llm": b"1"}
    assert key_slot(keys.gen_key("aicache:", "{g}:docs")) == key_slot(b"{g}:docs")


