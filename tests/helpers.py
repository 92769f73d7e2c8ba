"""Start real redis-server processes with the built module loaded."""
import os
import shutil
import socket
import subprocess
import tempfile
import time

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.environ.get("AICACHE_MODULE", os.path.join(ROOT, "target", "release", "libaicache.so"))
REDIS_SERVER = os.environ.get("REDIS_SERVER", shutil.which("redis-server") or "redis-server")

DEFAULT_CONFIGS = {
    "aicache.default-ttl": "86400",
    "aicache.ttl-jitter-pct": "10",
    "aicache.max-text-bytes": "32768",
    "aicache.max-dims": "8192",
    "aicache.fixed-dims": "0",
    "aicache.key-prefix": "aicache:",
    "aicache.normalize-whitespace": "no",
    "aicache.max-request-bytes": str(1 << 20),
    "aicache.max-response-bytes": str(4 << 20),
    "aicache.cache-sampled": "yes",
    "aicache.max-fills": "65536",
    "aicache.batch-size": "100",
    "aicache.batch-max-tokens": "200000",
    "aicache.tenant-source": "arg",
    "aicache.model-dims": "text-embedding-3-small=1536,text-embedding-3-large=3072,"
                          "text-embedding-ada-002=1536",
    "aicache.lease-ms": "60000",
    "aicache.wait-timeout-ms": "60000",
    "aicache.fail-memory-ms": "0",
    "aicache.quota-window-ms": "60000",
    "aicache.tenant-max-requests": "0",
    "aicache.tenant-max-tokens": "0",
    "aicache.global-max-requests": "0",
    "aicache.global-max-tokens": "0",
    "aicache.daily-token-budget": "0",
    "aicache.stream-linger-ms": "60000",
    "aicache.stream-max-entries": "20000",
    "aicache.upstream-connect-timeout-ms": "5000",
    "aicache.upstream-timeout-ms": "30000",
    "aicache.upstream-max-bytes": str(64 << 20),
    "aicache.upstream-retries": "2",
    "aicache.upstream-backoff-base-ms": "200",
    "aicache.upstream-backoff-cap-ms": "5000",
    "aicache.upstream-base64": "yes",
    "aicache.batch-window-ms": "5",
    "aicache.refresh-ahead-pct": "0",
    "aicache.refresh-max-inflight": "256",
    "aicache.breaker-failures": "5",
    "aicache.breaker-window-ms": "10000",
    "aicache.breaker-cooldown-ms": "5000",
    "aicache.semantic-model": "text-embedding-3-small",
    "aicache.semantic-threshold": "0.92",
    "aicache.semantic-max-entries": "1000000",
}
# Fixed at load or admin-only (PROTECTED): not reset between tests.
LOAD_TIME_CONFIGS = {
    "aicache.workers": "8",
    "aicache.queue-size": "1024",
    "aicache.upstream-url": "https://api.openai.com/v1",
    "aicache.upstream-embeddings-url": "",
    "aicache.upstream-chat-url": "",
    "aicache.api-key-env": "OPENAI_API_KEY",
    "aicache.api-key-file": "",
    **{f"aicache.route-{i}": "" for i in range(1, 9)},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, what="condition"):
    """Poll until predicate() is truthy; fail loudly on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def read_log(path):
    """A server's log file, or "" when there is none (yet)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def stop_process(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Server:
    def __init__(self, module_args=(), extra=(), load_module=True, env=None):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="aicache-test-")
        self.log = os.path.join(self.dir, "redis.log")
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", self.dir, "--logfile", self.log, "--save", "",
               "--appendonly", "no", "--enable-debug-command", "yes"]
        if load_module:
            cmd += ["--loadmodule", MODULE, *map(str, module_args)]
        cmd += list(map(str, extra))
        full_env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        full_env.update(env or {})
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=full_env)
        try:
            wait_for(self._ready, what=f"redis-server on port {self.port}")
        except AssertionError:
            self.stop()
            raise

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.ConnectionError:
            return False

    def client(self, protocol=2, **kw):
        # No silent reconnect-and-resend: tests must see every dropped reply.
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        return redis.Redis(port=self.port, protocol=protocol, socket_timeout=30,
                           retry=Retry(NoBackoff(), 0), **kw)

    def alive(self):
        return self.proc.poll() is None and self.client().ping()

    def log_text(self):
        return read_log(self.log)

    def stop(self):
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def crc16(data: bytes) -> int:
    """CRC16-XMODEM, the checksum Redis Cluster uses for key slots."""
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def key_slot(key: bytes) -> int:
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return crc16(key) % 16384


def entry_key(ns: bytes, model: bytes, text: bytes, prefix=b"aicache:") -> bytes:
    """The README's key recipe, independent of the module's code."""
    import hashlib

    def tag(n):
        s = n.find(b"{")
        if s >= 0:
            e = n.find(b"}", s + 1)
            if e > s + 1:
                return n[s + 1:e]
        return n

    enc = b"".join(len(f).to_bytes(8, "big") + f for f in (b"emb:v1", ns, model, text))
    return prefix + b"emb:v1:{" + tag(ns) + b"}:" + hashlib.sha256(enc).hexdigest().encode()


class Upstream:
    """tests/fake_upstream.py in its own process, driven over HTTP."""

    def __init__(self, name=None):
        import sys
        self.port = free_port()
        self.name = name
        script = os.path.join(ROOT, "tests", "fake_upstream.py")
        cmd = [sys.executable, script, "--port", str(self.port)] + (["--name", name] if name else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1"
        wait_for(self._ready, what="fake upstream")

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError("fake upstream exited")
        try:
            self.stats()
            return True
        except OSError:
            return False

    def _post(self, path, obj):
        import json
        import urllib.request
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                     data=json.dumps(obj).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self):
        import json
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_stats", timeout=10) as resp:
            return json.loads(resp.read())

    def calls(self, kind=None):
        s = self.stats()
        return s["total_calls"] if kind is None else s["calls"][kind]

    def reset(self):
        self._post("/_reset", {})

    def fault(self, kind, times=1, **kw):
        self._post("/_fault", {"kind": kind, "times": times, **kw})

    def latency(self, ms, jitter_ms=0):
        """Each API call sleeps ms + uniform(0, jitter_ms)."""
        self._post("/_latency", {"ms": ms, "jitter_ms": jitter_ms})

    def stream(self, chunks=None, delay_ms=0):
        """Until reset(), streamed answers come in `chunks` content pieces
        (None: about 8 characters each) and wait delay_ms before every SSE
        event after the first."""
        self._post("/_stream", {"chunks": chunks, "delay_ms": delay_ms})

    def require_auth(self, style, key):
        """Until reset(), API calls must carry `key` as a Bearer token
        (style "bearer") or in the api-key header ("azure"); others get 401."""
        self._post("/_auth", {"style": style, "key": key})

    def poison(self, marker="POISON", status=400, message=None):
        """Until reset(), embeddings requests with an input containing marker fail
        as a whole with status and a message that does not name the input."""
        self._post("/_poison", {"marker": marker, "status": status,
                                **({"message": message} if message is not None else {})})

    def stop(self):
        stop_process(self.proc)


def info_fields(client, section="aicache"):
    """The module's INFO counters as ints."""
    raw = client.execute_command("INFO", section)
    if isinstance(raw, bytes):
        raw = raw.decode()
    if isinstance(raw, dict):
        return {k[len("aicache_"):] if k.startswith("aicache_") else k: v for k, v in raw.items()}
    out = {}
    for line in raw.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            k = k[len("aicache_"):] if k.startswith("aicache_") else k
            try:
                out[k] = int(v)
            except ValueError:
                out[k] = v
    return out


def resp(*args):
    """One command in the Redis protocol, for tests that talk raw sockets."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def load_outcome(module_args, env=None):
    """("exited" or "serving", exit status): what redis-server, started with
    Server's flags, does with the module loaded with these arguments. Polled
    with a raw PING, since redis-py retries refused connections and makes a
    failed start slow."""
    import socket
    port, workdir = free_port(), tempfile.mkdtemp(prefix="aicache-test-")
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
         "--logfile", os.path.join(workdir, "redis.log"), "--save", "", "--appendonly", "no",
         "--enable-debug-command", "yes", "--loadmodule", MODULE, *map(str, module_args)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    def settled():
        if proc.poll() is not None:
            return "exited"
        # Redis listens before it loads modules, but answers only after.
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return "serving" if s.recv(7).startswith(b"+PONG") else None
        except OSError:
            return None

    try:
        return wait_for(settled, what="redis-server to load or refuse the module"), proc.returncode
    finally:
        stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)
