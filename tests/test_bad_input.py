"""Every bad input gets a clear ERR naming the problem and writes nothing.
The module-scoped server must still answer PING after all of it."""
import numpy as np
import pytest
import redis

from conftest import vec

M = b"m"
GOOD = vec(1, 2)
NAN = np.asarray([1, np.nan], dtype="<f4").tobytes()
INF = np.asarray([np.inf, 1], dtype="<f4").tobytes()

CASES = [
    # (args, error pattern)
    (["EMBCACHE.SET", "ns", M, "t"], "wrong number of arguments"),
    (["EMBCACHE.SET", "ns", M, "t", GOOD, "EX"], "unknown option 'EX'"),
    (["EMBCACHE.SET", "ns", M, "t", GOOD, "EX", 10, "EX"], "wrong number of arguments"),
    (["EMBCACHE.SET", "ns", M, "t", GOOD, "PX", 10], "unknown option 'PX'"),
    (["EMBCACHE.SET", "ns", M, "t", GOOD, "EX", 0], "EX must be a positive integer"),
    (["EMBCACHE.SET", "ns", M, "t", GOOD, "EX", -5], "EX must be a positive integer"),
    (["EMBCACHE.SET", "ns", M, "t", GOOD, "EX", "1.5"], "EX must be a positive integer"),
    (["EMBCACHE.SET", "ns", M, "t", GOOD, "EX", "99999999999"], "EX must be a positive integer"),
    (["EMBCACHE.SET", "ns", M, "t", b"abc"], "3 bytes, not a multiple of 4"),
    (["EMBCACHE.SET", "ns", M, "t", b""], "vector is empty"),
    (["EMBCACHE.SET", "ns", M, "t", "[]"], "vector is empty"),
    (["EMBCACHE.SET", "ns", M, "t", "[1, 2"], "not a JSON array of numbers"),
    (["EMBCACHE.SET", "ns", M, "t", '[1, "a"]'], "not a JSON array of numbers"),
    (["EMBCACHE.SET", "ns", M, "t", "[1, NaN]"], "not a JSON array of numbers"),
    (["EMBCACHE.SET", "ns", M, "t", "[1, 1e39]"], "element 1 is NaN, infinite"),
    (["EMBCACHE.SET", "ns", M, "t", NAN], "element 1 is NaN, infinite"),
    (["EMBCACHE.SET", "ns", M, "t", INF], "element 0 is NaN, infinite"),
    (["EMBCACHE.SET", "ns", M, "t", vec(*range(8193))], "8193 dimensions, more than max-dims 8192"),
    (["EMBCACHE.SET", "ns", M, b"x" * 32769, GOOD], "32769 bytes, more than max-text-bytes"),
    (["EMBCACHE.SET", "ns", M, b"", GOOD], "text must not be empty"),
    (["EMBCACHE.SET", "", M, "t", GOOD], "namespace must not be empty"),
    (["EMBCACHE.SET", "a}b", M, "t", GOOD], "namespace contains '}'"),
    (["EMBCACHE.SET", b"n" * 1025, M, "t", GOOD], "namespace longer than 1024"),
    (["EMBCACHE.SET", "ns", b"", "t", GOOD], "model must be 1 to 256 bytes"),
    (["EMBCACHE.SET", "ns", b"m" * 257, "t", GOOD], "model must be 1 to 256 bytes"),
    (["EMBCACHE.GET", "ns", M], "wrong number of arguments"),
    (["EMBCACHE.GET", "ns", M, "t", "FORMAT"], "unknown option 'FORMAT'"),
    (["EMBCACHE.GET", "ns", M, "t", "FORMAT", "XML"], "unknown option 'XML'"),
    (["EMBCACHE.GET", "ns", M, "t", "FORMAT", "JSON", "x"], "wrong number of arguments"),
    (["EMBCACHE.GET", "ns", M, "t", "FORMAT", "\u4e00\r\n\x00"], r"unknown option '\\xe4\\xb8\\x80\\x0d\\x0a\\x00'"),
    (["EMBCACHE.MSET", "ns", M, "t"], "wrong number of arguments"),
    (["EMBCACHE.MSET", "ns", M, "t", GOOD, "u"], "wrong number of arguments"),
    (["EMBCACHE.MGET", "ns", M], "wrong number of arguments"),
    (["EMBCACHE.MGET", "ns", M, "ok", b""], r"text must not be empty \(text 1\)"),
    (["EMBCACHE.DEL", "ns"], "wrong number of arguments"),
    (["EMBCACHE.KEY", "ns", M], "wrong number of arguments"),
    (["EMBCACHE.KEY", "ns", M, "a", "b"], "wrong number of arguments"),
]


@pytest.mark.parametrize("args,pattern", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_is_a_clear_error_and_writes_nothing(r, args, pattern):
    with pytest.raises(redis.ResponseError, match=pattern) as e:
        r.execute_command(*args)
    assert str(e.value).isascii()
    assert r.dbsize() == 0


def test_mset_is_all_or_nothing(r):
    with pytest.raises(redis.ResponseError, match=r"not a multiple of 4.*\(pair 2\)"):
        r.execute_command("EMBCACHE.MSET", "ns", M, "a", GOOD, "b", GOOD, "c", b"xyz")
    with pytest.raises(redis.ResponseError, match="pair 1 has 3 dimensions, pair 0 has 2"):
        r.execute_command("EMBCACHE.MSET", "ns", M, "a", GOOD, "b", vec(1, 2, 3))
    assert r.dbsize() == 0
    r.execute_command("EMBCACHE.SET", "ns", M, "a", GOOD)
    before = r.dbsize()
    with pytest.raises(redis.ResponseError, match="dimension mismatch"):
        r.execute_command("EMBCACHE.MSET", "ns", M, "b", vec(1, 2, 3), "c", vec(4, 5, 6))
    assert r.dbsize() == before


def test_ten_megabyte_arguments_are_rejected_cleanly(r):
    big = b"\x00" * (10 * 1024 * 1024)
    for args in (["EMBCACHE.SET", "ns", M, big, GOOD], ["EMBCACHE.GET", "ns", M, big],
                 ["EMBCACHE.SET", big, M, "t", GOOD], ["EMBCACHE.SET", "ns", big, "t", GOOD],
                 ["EMBCACHE.SET", "ns", M, "t", big]):
        with pytest.raises(redis.ResponseError):
            r.execute_command(*args)
    assert r.dbsize() == 0


def test_wrong_type_entry_is_reported_not_crashed(r):
    key = r.execute_command("EMBCACHE.KEY", "ns", M, "t")
    r.rpush(key, "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        r.execute_command("EMBCACHE.GET", "ns", M, "t")
    assert r.execute_command("EMBCACHE.MGET", "ns", M, "t") == [None]
    r.set(key, b"abc")
    with pytest.raises(redis.ResponseError, match="not an FP32 vector"):
        r.execute_command("EMBCACHE.GET", "ns", M, "t")


def test_server_still_answers_after_all_bad_input(server):
    assert server.alive()
