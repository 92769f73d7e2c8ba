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


class Server:
    def __init__(self, module_args=(), extra=(), load_module=True):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="aicache-test-")
        self.log = os.path.join(self.dir, "redis.log")
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
               "--dir", self.dir, "--logfile", self.log, "--save", "",
               "--appendonly", "no", "--enable-debug-command", "yes"]
        if load_module:
            cmd += ["--loadmodule", MODULE, *map(str, module_args)]
        cmd += list(map(str, extra))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        return redis.Redis(port=self.port, protocol=protocol, socket_timeout=30, **kw)

    def alive(self):
        return self.proc.poll() is None and self.client().ping()

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
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
