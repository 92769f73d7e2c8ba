import os
import sys

import numpy as np
import pytest

# The Python client package (clients/python/aicache) from the working tree, so
# the suite tests this checkout's client without installing it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))

from helpers import DEFAULT_CONFIGS, Server, Upstream, info_fields, wait_for


def reset_configs(c):
    args = [x for kv in DEFAULT_CONFIGS.items() for x in kv]
    c.execute_command("CONFIG", "SET", *args)


def assert_no_panics(s):
    """A panic is caught and answered, so only the counters show it: no
    shared server may have had one (injected panics use their own)."""
    info = info_fields(s.client())
    assert (info["handler_panics"], info["worker_panics"]) == (0, 0), "a command or worker panicked"


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    alive = s.proc.poll() is None
    if alive:
        assert_no_panics(s)
    s.stop()
    assert alive, "redis-server died during the module's tests"


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def r(request, server):
    c = server.client(protocol=request.param)
    c.flushall()
    yield c
    reset_configs(c)
    c.close()


def vec(*xs):
    return np.asarray(xs, dtype="<f4").tobytes()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


API_KEY = "sk-aicache-test-0123456789abcdef"
# Fast retries so fault tests finish quickly; everything else at defaults.
FILL_CONFIGS = {"aicache.upstream-backoff-base-ms": "5", "aicache.upstream-backoff-cap-ms": "50"}


@pytest.fixture(scope="session")
def upstream():
    u = Upstream()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def fserver(upstream):
    s = Server(module_args=["upstream-url", upstream.url], env={"OPENAI_API_KEY": API_KEY})
    yield s
    alive = s.proc.poll() is None
    if alive:
        assert_no_panics(s)
    s.stop()
    assert alive, "redis-server died during the fill tests"


@pytest.fixture
def f(fserver, upstream):
    """A client of a server whose upstream is the fake, both reset."""
    c = fserver.client()
    # A fill left running by the previous test would skew the counters.
    wait_for(lambda: info_fields(c)["fills_in_flight"] == 0, what="previous fills to finish")
    c.flushall()
    upstream.reset()
    c.execute_command("CONFIG", "SET", *[x for kv in FILL_CONFIGS.items() for x in kv])
    yield c
    reset_configs(c)
    c.close()
