"""EMBCACHE.* against a real redis-server, in RESP2 and RESP3."""
import json

import numpy as np
import pytest
import redis

from conftest import vec
from helpers import DEFAULT_CONFIGS, LOAD_TIME_CONFIGS, entry_key, key_slot

M = b"text-embedding-3-small"


def test_set_then_get_returns_the_exact_fp32_bytes(r, rng):
    v = rng.standard_normal(1536).astype("<f4")
    assert r.execute_command("EMBCACHE.SET", "docs", M, "hello", v.tobytes()) in (b"OK", "OK", True)
    got = r.execute_command("EMBCACHE.GET", "docs", M, "hello")
    assert got == v.tobytes()
    assert np.array_equal(np.frombuffer(got, "<f4"), v)


def test_get_of_a_missing_entry_is_nil(r):
    assert r.execute_command("EMBCACHE.GET", "docs", M, "never stored") is None


def test_json_vectors_are_stored_as_fp32(r):
    r.execute_command("EMBCACHE.SET", "docs", M, "j", "[0.5, -1, 2e-3]")
    assert r.execute_command("EMBCACHE.GET", "docs", M, "j") == vec(0.5, -1, 0.002)


def test_format_json_returns_a_json_array(r):
    v = vec(0.1, -2.5, 1e-30)
    r.execute_command("EMBCACHE.SET", "docs", M, "t", v)
    out = r.execute_command("EMBCACHE.GET", "docs", M, "t", "FORMAT", "JSON")
    assert np.asarray(json.loads(out), dtype="<f4").tobytes() == v
    assert r.execute_command("EMBCACHE.GET", "docs", M, "t", "format", "fp32") == v


def test_mset_and_mget_keep_input_order_with_nils(r):
    r.execute_command("EMBCACHE.MSET", "docs", M, "a", vec(1, 1), "b", vec(2, 2), "c", "[3,3]")
    got = r.execute_command("EMBCACHE.MGET", "docs", M, "c", "missing", "a", "b")
    assert got == [vec(3, 3), None, vec(1, 1), vec(2, 2)]


def test_del_counts_what_it_removed(r):
    r.execute_command("EMBCACHE.MSET", "docs", M, "a", vec(1), "b", vec(2))
    assert r.execute_command("EMBCACHE.DEL", "docs", M, "a", "b", "nope") == 2
    assert r.execute_command("EMBCACHE.MGET", "docs", M, "a", "b") == [None, None]
    assert r.execute_command("EMBCACHE.DEL", "docs", M, "a") == 0


def test_key_names_the_plain_string_that_holds_the_vector(r):
    r.execute_command("EMBCACHE.SET", "tenantA", M, "hello world", vec(1, 2, 3))
    key = r.execute_command("EMBCACHE.KEY", "tenantA", M, "hello world")
    assert key == entry_key(b"tenantA", M, b"hello world")
    assert r.type(key) in (b"string", "string")
    assert r.get(key) == vec(1, 2, 3)
    assert 0 < r.ttl(key) <= 86400 * 1.1


def test_entries_live_in_the_namespace_slot(r):
    for ns in [b"tenantA", b"{shop}:emb", b"a{b", b"x:{u1}:y"]:
        key = r.execute_command("EMBCACHE.KEY", ns, M, "t")
        assert key_slot(key) == key_slot(ns), (ns, key)


def test_namespaces_and_models_are_separate(r):
    r.execute_command("EMBCACHE.SET", "{t}:a", M, "x", vec(1))
    r.execute_command("EMBCACHE.SET", "{t}:b", M, "x", vec(2))
    r.execute_command("EMBCACHE.SET", "{t}:a", b"other-model", "x", vec(3, 3))
    assert r.execute_command("EMBCACHE.GET", "{t}:a", M, "x") == vec(1)
    assert r.execute_command("EMBCACHE.GET", "{t}:b", M, "x") == vec(2)
    assert r.execute_command("EMBCACHE.GET", "{t}:a", b"other-model", "x") == vec(3, 3)


@pytest.mark.parametrize("texts", [
    [b"a\x00b", b"a\x00c", b"a"],
    [b"\xff\xfe", b"\xff\xff"],
    ["一二三".encode(), "一二".encode(), "日本語テキスト".encode()],
    [b"a b", b"a  b", b" a b"],
])
def test_texts_are_binary_safe_and_distinct(r, texts):
    for i, t in enumerate(texts):
        r.execute_command("EMBCACHE.SET", "docs", M, t, vec(i))
    for i, t in enumerate(texts):
        assert r.execute_command("EMBCACHE.GET", "docs", M, t) == vec(i)


def test_field_boundaries_never_collide(r):
    r.execute_command("EMBCACHE.SET", "ns", "a b", "c", vec(1))
    assert r.execute_command("EMBCACHE.GET", "ns", "a", "b c") is None
    assert r.execute_command("EMBCACHE.KEY", "ns", "a b", "c") != r.execute_command(
        "EMBCACHE.KEY", "ns", "a", "b c")


def test_whitespace_normalisation_is_a_config_off_by_default(r):
    r.execute_command("EMBCACHE.SET", "docs", M, "a  b", vec(1))
    assert r.execute_command("EMBCACHE.GET", "docs", M, "a b") is None
    r.config_set("aicache.normalize-whitespace", "yes")
    r.execute_command("EMBCACHE.SET", "docs", M, " a \t b\n", vec(2))
    assert r.execute_command("EMBCACHE.GET", "docs", M, "a b") == vec(2)


def test_dimension_is_pinned_by_the_first_vector(r):
    r.execute_command("EMBCACHE.SET", "docs", M, "a", vec(*range(4)))
    with pytest.raises(redis.ResponseError, match=r"dimension mismatch.*4-dimension.*got 3"):
        r.execute_command("EMBCACHE.SET", "docs", M, "b", vec(1, 2, 3))
    assert r.execute_command("EMBCACHE.GET", "docs", M, "b") is None
    # Another model, or another namespace, pins its own dimension.
    r.execute_command("EMBCACHE.SET", "docs", "m3", "b", vec(1, 2, 3))
    r.execute_command("EMBCACHE.SET", "other", M, "b", vec(1, 2, 3))


def test_fixed_dims_config_rejects_other_sizes(r):
    r.config_set("aicache.fixed-dims", 3)
    with pytest.raises(redis.ResponseError, match="dimension mismatch.*2 dimensions.*fixed-dims is 3"):
        r.execute_command("EMBCACHE.SET", "docs", M, "a", vec(1, 2))
    r.execute_command("EMBCACHE.SET", "docs", M, "a", vec(1, 2, 3))


def test_ex_sets_the_ttl_with_jitter(r):
    r.execute_command("EMBCACHE.SET", "docs", M, "a", vec(1), "EX", 1000)
    key = r.execute_command("EMBCACHE.KEY", "docs", M, "a")
    assert 900_000 - 5_000 <= r.pttl(key) <= 1_100_000


def test_default_ttl_zero_means_no_expiry(r):
    r.config_set("aicache.default-ttl", 0)
    r.execute_command("EMBCACHE.SET", "docs", M, "a", vec(1))
    assert r.ttl(r.execute_command("EMBCACHE.KEY", "docs", M, "a")) == -1


def test_key_prefix_config_moves_new_keys(r):
    r.config_set("aicache.key-prefix", "tenantcache:")
    key = r.execute_command("EMBCACHE.KEY", "docs", M, "a")
    assert key.startswith(b"tenantcache:emb:v1:{docs}:")


def test_command_getkeys_reports_the_namespace(r):
    keys = r.command_getkeys("EMBCACHE.GET", "tenantA:emb", M, "x")
    assert keys in ([b"tenantA:emb"], ["tenantA:emb"])


def test_configs_are_listed_and_validated(r):
    cfg = r.config_get("aicache.*")
    assert {k if isinstance(k, str) else k.decode() for k in cfg} == (
        set(DEFAULT_CONFIGS) | set(LOAD_TIME_CONFIGS))
    got = {(k if isinstance(k, str) else k.decode()): v for k, v in cfg.items()}
    for name, value in {**DEFAULT_CONFIGS, **LOAD_TIME_CONFIGS}.items():
        assert got[name] in (value, value.encode()), name
    for name, bad in [("ttl-jitter-pct", 91), ("default-ttl", -1), ("max-dims", 0),
                      ("key-prefix", "a{b"), ("key-prefix", "a b"), ("max-text-bytes", "x")]:
        with pytest.raises(redis.ResponseError):
            r.config_set(f"aicache.{name}", bad)
    got = {(k if isinstance(k, str) else k.decode()): v for k, v in r.config_get("aicache.*").items()}
    assert got["aicache.ttl-jitter-pct"] in ("10", b"10")
