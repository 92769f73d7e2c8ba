"""redis.conf.example: starts as `make run` starts it, and its ACL users,
eviction, persistence and hardening do what its comments say; with its
#prod lines switched on it starts a locked-down server that reads the API
key from a file."""
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile

import pytest
import redis
from redis.exceptions import NoPermissionError, ResponseError

from helpers import MODULE, REDIS_SERVER, ROOT, free_port, resp, stop_process, wait_for

CONF = os.path.join(ROOT, "redis.conf.example")
SCRIPT = os.path.join(ROOT, "contrib", "prometheus", "aicache.lua")
M = "emb-model"
CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


class ConfServer:
    """redis-server started on a config file, in its own directory (the
    file's relative `dir` lands there, as it lands in the repo for make run)."""

    def __init__(self, args):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="aicache-conf-")
        self.out = open(os.path.join(self.dir, "stdout.log"), "w")
        self.proc = subprocess.Popen([REDIS_SERVER, *args(self), "--port", str(self.port)],
                                     cwd=self.dir, stdout=self.out, stderr=subprocess.STDOUT,
                                     env={k: v for k, v in os.environ.items()
                                          if k != "OPENAI_API_KEY"})
        try:
            wait_for(self.answers, what="redis-server on the example config")
        except AssertionError:
            self.stop()
            raise

    def answers(self):
        """Any reply to PING, NOAUTH included: the default user may be off."""
        if self.proc.poll() is not None:
            with open(os.path.join(self.dir, "stdout.log")) as fh:
                raise AssertionError(f"redis-server exited: {fh.read()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(resp("PING"))
                return s.recv(64)[:1] in (b"+", b"-")
        except OSError:
            return False

    def as_user(self, user=None):
        kw = {"username": user, "password": f"{user}-dev-password"} if user else {}
        return redis.Redis(port=self.port, socket_timeout=30, **kw)

    def stop(self):
        stop_process(self.proc)
        self.out.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def dev(upstream):
    # Exactly the Makefile's `run` command line.
    s = ConfServer(lambda s: [CONF, "--loadmodule", MODULE, "upstream-url", upstream.url])
    yield s
    alive = s.proc.poll() is None
    s.stop()
    assert alive, "redis-server died during the config tests"


@pytest.fixture
def users(dev, upstream):
    upstream.reset()
    dev.as_user().flushall()
    clients = {u: dev.as_user(u) for u in ("app", "tenantA", "tenantB", "operator", "metrics")}
    yield clients
    for c in clients.values():
        c.close()


def fetch(c, ns, *texts, opts=()):
    return c.execute_command("EMBCACHE.FETCH", ns, M, len(texts), *texts, *opts)


def refused(call, *args):
    with pytest.raises(NoPermissionError):
        call(*args)


def test_the_make_run_command_line_applies_the_documented_settings(dev, upstream):
    c = dev.as_user()  # dev: the default user needs no password
    cfg = c.config_get("*")
    assert {k: cfg[k] for k in ("maxmemory-policy", "appendonly", "appendfsync", "maxmemory",
                                "enable-protected-configs", "enable-debug-command",
                                "enable-module-command", "save")} == {
        "maxmemory-policy": "volatile-lfu", "appendonly": "yes", "appendfsync": "everysec",
        "maxmemory": str(1 << 30), "enable-protected-configs": "no",
        "enable-debug-command": "no", "enable-module-command": "no", "save": ""}
    assert (cfg["aicache.tenant-source"], cfg["aicache.default-ttl"]) == ("user", "86400")
    # The file must not override make run's module argument.
    assert cfg["aicache.upstream-url"] == upstream.url
    assert len(fetch(c, "docs", "hello")[0]) == 32
    wait_for(lambda: os.path.isdir(os.path.join(dev.dir, "appendonlydir")), what="the AOF")


def test_entries_carry_ttls_and_pins_do_not(users, dev):
    """The eviction policy's premise: volatile-* can evict every entry, and
    never the pins or the flush generations."""
    app = users["app"]
    fetch(app, "docs", "one")
    app.execute_command("EMBCACHE.FLUSH", "old")
    app.execute_command("LLMCACHE.FETCH", "chat", CHAT)
    root = dev.as_user()
    kinds = {}
    for key in root.scan_iter("aicache:*"):
        kinds.setdefault(key.split(b":")[1], []).append(root.pttl(key))
    assert set(kinds) == {b"emb", b"llm", b"dims", b"gen"}, kinds
    assert all(t > 0 for t in kinds[b"emb"] + kinds[b"llm"]), kinds
    assert kinds[b"dims"] == kinds[b"gen"] == [-1]


def test_the_app_user_fetches_reads_and_throttles_but_administers_nothing(users, upstream):
    app = users["app"]
    (vec,) = fetch(app, "docs", "hello")
    key = app.execute_command("EMBCACHE.KEY", "docs", M, "hello")
    assert app.get(key) == vec
    assert app.execute_command("LLMCACHE.FETCH", "chat", CHAT).startswith(b"{")
    assert app.execute_command("AICACHE.THROTTLE", "app:rl", 10, 1000)[0] == 1
    assert upstream.calls() == 2
    for args in (["CONFIG", "GET", "maxmemory"], ["FLUSHALL"], ["KEYS", "*"], ["SET", "x", "1"],
                 ["AICACHE.DEBUG", "PANIC", "COMMAND"], ["CLIENT", "KILL", "ID", "1"],
                 ["INFO"], ["MODULE", "LIST"]):
        refused(app.execute_command, *args)


def test_a_tenant_is_confined_to_its_own_namespaces(users):
    a, b = users["tenantA"], users["tenantB"]
    (mine,) = fetch(a, "{tenantA}:docs", "hello")
    assert a.get(a.execute_command("EMBCACHE.KEY", "{tenantA}:docs", M, "hello")) == mine
    fetch(b, "{tenantB}:docs", "secret")
    theirs = b.execute_command("EMBCACHE.KEY", "{tenantB}:docs", M, "secret")
    assert b.get(theirs) is not None
    refused(a.get, theirs)
    refused(a.delete, theirs)
    refused(a.execute_command, "EMBCACHE.GET", "{tenantB}:docs", M, "secret")
    refused(fetch, a, "{tenantB}:docs", "x")
    refused(fetch, a, "{tenantAB}:docs", "x")  # the pattern ends at the brace
    refused(a.execute_command, "LLMCACHE.FETCH", "{tenantB}", CHAT)
    refused(a.execute_command, "LLMCACHE.FETCH", "{tenantB}", CHAT, "SIMILAR", "0")
    refused(a.execute_command, "LLMCACHE.SIMILAR", "{tenantB}", CHAT)
    assert a.execute_command("LLMCACHE.SIMILAR", "{tenantA}", CHAT) == []
    refused(a.execute_command, "AICACHE.THROTTLE", "{tenantB}:rl", 10, 1000)
    assert a.execute_command("AICACHE.THROTTLE", "{tenantA}:rl", 10, 1000)[0] == 1
    for args in (["CONFIG", "GET", "*"], ["CONFIG", "SET", "aicache.tenant-max-tokens", "0"],
                 ["INFO"], ["KEYS", "*"], ["SCAN", "0"], ["SET", "{tenantA}:x", "1"],
                 ["FLUSHDB"], ["CLIENT", "LIST"], ["SELECT", "1"]):
        refused(a.execute_command, *args)
    assert a.execute_command("EMBCACHE.FLUSH", "{tenantA}:docs") == 1
    assert a.execute_command("EMBCACHE.GET", "{tenantA}:docs", M, "hello") is None
    refused(a.execute_command, "EMBCACHE.FLUSH", "{tenantB}:docs")
    refused(a.execute_command, "LLMCACHE.FLUSH", "{tenantB}")
    # Spend limits follow the ACL user, whatever TENANT a call names.
    with pytest.raises(ResponseError, match="not yours"):
        fetch(a, "{tenantA}:docs", "other", opts=["TENANT", "tenantB"])


def test_a_tenant_reads_its_own_streams_only(users):
    a, b = users["tenantA"], users["tenantB"]
    kind, stream = a.execute_command("LLMCACHE.STREAM", "{tenantA}:chat", CHAT)
    assert kind == b"stream" and stream.startswith(b"aicache:stream:v1:{tenantA}:")

    def ended():
        entries = a.xrange(stream)
        return entries and entries[-1][1].get(b"end") == b"finished"

    wait_for(ended, what="the generation's end entry")
    refused(b.xrange, stream)
    refused(b.execute_command, "LLMCACHE.READ", "{tenantA}:chat", stream, "0")


def test_the_operator_tunes_but_cannot_redirect_or_destroy(users, dev):
    op = users["operator"]
    assert op.config_set("aicache.tenant-max-tokens", 5000)
    assert op.config_get("aicache.tenant-max-tokens") == {"aicache.tenant-max-tokens": "5000"}
    op.config_set("aicache.tenant-max-tokens", 0)
    assert "aicache_hits" in op.info("aicache")
    op.config_resetstat()
    # PROTECTED: nobody redirects fills (and the API key) at run time.
    for client in (op, dev.as_user()):
        for name, value in (("aicache.upstream-url", "http://198.51.100.1/v1"),
                            ("aicache.api-key-file", "/tmp/other.key"),
                            ("aicache.api-key-env", "OTHER_API_KEY")):
            with pytest.raises(ResponseError, match="protected"):
                client.config_set(name, value)
    with pytest.raises(ResponseError, match="MODULE command not allowed"):
        dev.as_user().execute_command("MODULE", "LOAD", os.path.join(dev.dir, "none.so"))
    for args in (["FLUSHALL"], ["KEYS", "*"], ["AICACHE.DEBUG", "PANIC", "COMMAND"],
                 ["SHUTDOWN", "NOSAVE"], ["ACL", "SETUSER", "x", "on"], ["MODULE", "LIST"]):
        refused(op.execute_command, *args)


def test_the_metrics_user_runs_the_exporter_script_and_nothing_else(users, dev):
    m, op = users["metrics"], users["operator"]
    fetch(users["app"], "docs", "counted")
    with open(SCRIPT) as fh:
        source = fh.read()
    values = dict(zip(*[iter(x.decode() for x in m.eval(source, 0))] * 2))
    assert values["aicache_misses"] == "1"
    refused(m.get, "anything")
    refused(m.execute_command, "EMBCACHE.GET", "docs", M, "counted")
    with pytest.raises(ResponseError, match="can't run this command|no permissions to run"):
        m.eval("return redis.call('GET', 'x')", 0)

    from test_prometheus import exporter_binary, scrape, script_values
    binary = exporter_binary()
    if binary is None:
        return
    op.execute_command("ACL", "LOG", "RESET")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "-redis.addr", f"redis://127.0.0.1:{dev.port}", "-redis.user", "metrics",
         "-web.listen-address", f"127.0.0.1:{port}", "-script", SCRIPT],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("REDIS_")},
             "REDIS_PASSWORD": "metrics-dev-password"})
    try:
        def scraped():
            try:
                return script_values(scrape(port)).get("aicache_misses") == 1
            except OSError:
                return False
        wait_for(scraped, timeout=30, what="the exporter to scrape as the metrics user")
    finally:
        stop_process(proc)
    denied = [e for e in op.acl_log() if e.get("username") == "metrics"]
    assert denied == [], "the exporter needs more than the metrics user allows"


def production_conf(tmp, upstream_url, key_file):
    """The example with its #prod lines on and their paths moved into tmp."""
    with open(CONF) as fh:
        text = re.sub(r"^#prod ", "", fh.read(), flags=re.M)
    for path, local in (("/usr/lib/redis/modules/libaicache.so", MODULE),
                        ("/etc/redis/aicache/openai.key", key_file),
                        ("/var/lib/redis", tmp), ("/var/log/redis/redis-server.log",
                                                  os.path.join(tmp, "redis.log"))):
        assert path in text, f"{path} is no longer in the #prod lines"
        text = text.replace(path, local)
    live = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert not re.search(r"/(etc|var|usr)/", live), "a #prod path the test does not move"
    # An operator's own gateway, as the upstream comment shows.
    return text + f"\naicache.upstream-url {upstream_url}\n"


def test_the_prod_lines_start_a_locked_down_server(upstream, tmp_path):
    key = "sk-prod-from-file-0123456789"
    key_file = tmp_path / "openai.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o400)
    conf = tmp_path / "redis.conf"
    conf.write_text(production_conf(str(tmp_path), upstream.url, str(key_file)))
    s = ConfServer(lambda s: [str(conf)])  # no --loadmodule: the file loads it
    try:
        with pytest.raises(redis.AuthenticationError):
            s.as_user().ping()
        upstream.reset()
        app = s.as_user("app")
        assert len(fetch(app, "docs", "prod")[0]) == 32
        assert upstream.stats()["auth"] == [f"Bearer {key}"]
        op = s.as_user("operator")
        assert op.config_get("aicache.api-key-file")["aicache.api-key-file"] == str(key_file)
        assert key not in json.dumps(op.config_get("*"))
        assert os.path.isdir(tmp_path / "appendonlydir")
        wait_for(lambda: "Module 'aicache' loaded" in (tmp_path / "redis.log").read_text(),
                 what="the log file")
    finally:
        s.stop()


def test_a_tenant_keeps_chat_history_in_its_own_namespace_only(users):
    from aicache import ChatHistory
    a = users["tenantA"]
    h = ChatHistory(a, "{tenantA}:chat", "session-1", max_messages=2, ttl_s=60)
    for i in range(3):
        h.append({"role": "user", "content": f"m{i}"})
    assert [m["content"] for m in h.last(5)] == ["m1", "m2"]
    h.clear()
    assert h.last(5) == []
    refused(ChatHistory(a, "{tenantB}:chat", "session-1").append, {"role": "user", "content": "x"})
