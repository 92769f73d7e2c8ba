import numpy as np
import pytest

from helpers import DEFAULT_CONFIGS, Server


def reset_configs(c):
    args = [x for kv in DEFAULT_CONFIGS.items() for x in kv]
    c.execute_command("CONFIG", "SET", *args)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    alive = s.proc.poll() is None
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
