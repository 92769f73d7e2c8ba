"""Single-flight: identical misses from many clients share one upstream
call; blocked clients get exactly one reply whatever happens to them."""
import socket
import threading
import time

import pytest
import redis

from helpers import info_fields, resp, wait_for
from test_fetch import M, REQ, expected, fetch, llm


def run_all(n, fn):
    """Runs fn(i) on n threads released together; returns results or errors."""
    out = [None] * n
    barrier = threading.Barrier(n)

    def go(i):
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as e:  # the assertion below shows which
            out[i] = e

    ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def test_200_identical_concurrent_misses_make_one_upstream_call(f, fserver, upstream):
    upstream.latency(300)
    before = info_fields(f)["coalesced_waiters"]
    clients = [fserver.client() for _ in range(200)]
    out = run_all(200, lambda i: fetch(clients[i], "herd", "same text"))
    assert out == [[expected("same text")]] * 200
    assert upstream.calls() == 1
    assert info_fields(f)["coalesced_waiters"] - before >= 150
    llm_out = run_all(50, lambda i: llm(clients[i], REQ))
    assert len(set(llm_out)) == 1 and isinstance(llm_out[0], bytes)
    assert upstream.calls("chat") == 1


def test_overlapping_batches_send_each_text_once(f, fserver, upstream):
    upstream.latency(200)
    sets = [["a", "b", "c"], ["b", "c", "d"], ["d", "e", "a"], ["e"]]
    clients = [fserver.client() for _ in sets]
    out = run_all(len(sets), lambda i: fetch(clients[i], "ov", *sets[i]))
    for texts, got in zip(sets, out):
        assert got == [expected(t) for t in texts]
    assert sum(upstream.stats()["inputs"]) == 5


def test_a_waiter_times_out_and_the_fill_still_lands(f, upstream):
    upstream.latency(800)
    before = info_fields(f)["wait_timeouts"]
    with pytest.raises(redis.ResponseError, match="timed out waiting for the upstream fill"):
        fetch(f, "to", "slow", opts=["TIMEOUT", 100])
    assert info_fields(f)["wait_timeouts"] == before + 1
    wait_for(lambda: f.execute_command("EMBCACHE.GET", "to", M, "slow"), what="the fill to be stored")
    assert upstream.calls() == 1
    f.config_set("aicache.wait-timeout-ms", 50)
    upstream.latency(500)
    with pytest.raises(redis.ResponseError, match="timed out"):
        fetch(f, "to", "slow2")


def test_client_unblock_cannot_take_the_reply_from_the_module(f, fserver, upstream):
    # On Redis 7.0 an unblock from outside can race the fill's own answer
    # and leave the client with none, so FETCH does not accept CLIENT
    # UNBLOCK: the module's deadline (TIMEOUT) is what ends a wait.
    upstream.latency(500)
    c = fserver.client()
    cid = c.client_id()
    got = []
    t = threading.Thread(target=lambda: got.append(fetch(c, "ub", "x")))
    t.start()
    wait_for(lambda: info_fields(f)["fills_in_flight"] == 1, what="fill")
    wait_for(lambda: f.info("clients")["blocked_clients"] == 1, what="client to be blocked")
    assert f.client_unblock(cid) is False
    assert f.client_unblock(cid, error=True) is False
    t.join()
    assert got == [[expected("x")]]
    assert c.ping()


def test_the_fill_survives_the_client_that_started_it(f, fserver, upstream):
    upstream.latency(500)
    starter = socket.create_connection(("127.0.0.1", fserver.port))
    starter.sendall(resp("CLIENT", "ID"))
    sid = int(starter.recv(64).strip()[1:])
    starter.sendall(resp("EMBCACHE.FETCH", "dc", M, 1, "x"))
    wait_for(lambda: info_fields(f)["fills_in_flight"] == 1, what="fill started")
    joined = []
    j = threading.Thread(target=lambda: joined.append(fetch(fserver.client(), "dc", "x")))
    j.start()
    wait_for(lambda: info_fields(f)["coalesced_waiters"] > 0, what="second client to join")
    f.client_kill_filter(_id=sid)
    j.join()
    assert starter.recv(64) == b"", "a killed client got a reply"
    starter.close()
    assert joined == [[expected("x")]]
    assert f.execute_command("EMBCACHE.GET", "dc", M, "x") == expected("x")
    assert upstream.calls() == 1


def test_a_fill_past_its_lease_no_longer_blocks_new_fills(f, fserver, upstream):
    f.config_set("aicache.lease-ms", 300)
    upstream.latency(1500)
    first = []
    t = threading.Thread(target=lambda: first.append(
        pytest.raises(redis.ResponseError, fetch, fserver.client(), "lease", "x")))
    t.start()
    wait_for(lambda: upstream.calls() == 1, what="first call")
    time.sleep(0.35)  # let the lease run out; no condition to poll for this
    upstream.latency(0)
    second = fetch(fserver.client(), "lease", "x")
    assert second == [expected("x")] and upstream.calls() == 2
    t.join()
    # The lease also bounds the first fill's own deadline.
    assert "timed out" in str(first[0].value)


def test_killing_200_blocked_clients_leaves_the_server_clean(f, fserver, upstream):
    upstream.latency(300)
    socks, ids = [], []
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", fserver.port))
        s.sendall(resp("CLIENT", "ID"))
        ids.append(int(s.recv(64).strip()[1:]))
        # Half share one fill, half start their own.
        s.sendall(resp("EMBCACHE.FETCH", "kill", M, 1, "shared" if i % 2 else f"own-{i}"))
        socks.append(s)
    wait_for(lambda: f.info("clients")["blocked_clients"] == 200, what="200 blocked clients")
    for cid in ids:
        f.client_kill_filter(_id=cid)
    wait_for(lambda: f.info("clients")["blocked_clients"] == 0, what="blocked_clients back to 0")
    wait_for(lambda: info_fields(f)["fills_in_flight"] == 0, what="fills done")
    for s in socks:
        s.close()
    assert fserver.alive()
    # Every fill still landed for the next caller.
    assert fetch(f, "kill", "shared", "own-0") == [expected("shared"), expected("own-0")]


def test_pipelined_replies_stay_in_order(f, fserver, upstream):
    upstream.latency(100)
    f.execute_command("EMBCACHE.SET", "p", M, "hit", expected("hit"))
    p = fserver.client().pipeline(transaction=False)
    p.execute_command("EMBCACHE.FETCH", "p", M, 1, "miss")
    p.ping()
    p.execute_command("EMBCACHE.FETCH", "p", M, 1, "hit")
    p.execute_command("EMBCACHE.FETCH", "p", M, 1, "miss2", "TIMEOUT", "bad")
    p.execute_command("EMBCACHE.FETCH", "p", M, 1, "miss3")
    out = p.execute(raise_on_error=False)
    assert out[0] == [expected("miss")] and out[1] is True and out[2] == [expected("hit")]
    assert isinstance(out[3], redis.ResponseError) and out[4] == [expected("miss3")]
