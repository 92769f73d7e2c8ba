"""contrib/prometheus/aicache.lua run by the real prometheus-redis-exporter:
every numeric field of INFO aicache reaches /metrics with its value."""
import os
import re
import shutil
import subprocess
import urllib.request

import pytest
import redis

from helpers import ROOT, free_port, stop_process, wait_for

EXPORTER = os.environ.get("REDIS_EXPORTER", "/usr/bin/prometheus-redis-exporter")
SCRIPT = os.path.join(ROOT, "contrib", "prometheus", "aicache.lua")
APT_PACKAGE = "prometheus-redis-exporter"
# What Go's strconv.ParseFloat takes and the script passes on.
DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
METRIC = re.compile(r'^redis_script_values\{key="([^"]*)"\} (\S+)$', re.M)


def exporter_binary():
    """The exporter, installed with apt when missing and we may (root on
    Debian, as CI runs); None only when it cannot be had."""
    if os.path.exists(EXPORTER):
        return EXPORTER
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", APT_PACKAGE],
                ["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", APT_PACKAGE]):
        if os.path.exists(EXPORTER):
            break
        subprocess.run(cmd, env=env, capture_output=True, timeout=900)
    return EXPORTER if os.path.exists(EXPORTER) else None


def expected_metrics(info_text):
    """What the script promises for an INFO text, computed independently."""
    out = {}
    for line in info_text.splitlines():
        if not line or line.startswith("#") or ":" not in line:
            continue
        name, value = line.split(":", 1)
        if DECIMAL.fullmatch(value):
            out[name] = float(value)
        else:
            for k, v in re.findall(r"([^,=]+)=([^,]*)", value):
                if DECIMAL.fullmatch(v):
                    out[f"{name}_{k}"] = float(v)
    return out


def raw_info(port):
    """INFO aicache as the server sends it (redis-py would parse it)."""
    conn = redis.Connection(port=port)
    try:
        conn.send_command("INFO", "aicache")
        return conn.read_response().decode()
    finally:
        conn.disconnect()


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def script_values(text):
    return {k: float(v) for k, v in METRIC.findall(text)}


@pytest.fixture(scope="module")
def exporter(fserver):
    binary = exporter_binary()
    if binary is None:
        pytest.skip(f"{EXPORTER} absent and `apt-get install {APT_PACKAGE}` not possible here")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    proc = subprocess.Popen(
        [binary, "-redis.addr", f"redis://127.0.0.1:{fserver.port}",
         "-web.listen-address", f"127.0.0.1:{port}", "-script", SCRIPT],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"the exporter exited with {proc.returncode}")
        try:
            return 'redis_script_values{key="aicache_hits"}' in scrape(port)
        except OSError:
            return False

    try:
        wait_for(ready, timeout=30, what="the exporter to serve the script's metrics")
        yield port
    finally:
        stop_process(proc)


def test_every_numeric_info_field_is_exported_with_its_value(f, fserver, exporter):
    f.config_resetstat()
    fetch = ["EMBCACHE.FETCH", "docs", "emb-model"]
    f.execute_command(*fetch, 3, "a", "b", "c")
    f.execute_command(*fetch, 4, "a", "b", "c", "d")
    req = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    f.execute_command("LLMCACHE.FETCH", "chat", req)
    f.execute_command("LLMCACHE.FETCH", "chat", req)
    wait_for(lambda: "aicache_fills_in_flight:0" in raw_info(fserver.port), what="fills to end")

    before = raw_info(fserver.port)
    text = scrape(exporter)
    assert raw_info(fserver.port) == before, "INFO moved during the scrape"
    want = expected_metrics(before)
    got = script_values(text)
    assert len(want) >= 30 and got == want
    assert (got["aicache_hits"], got["aicache_misses"]) == (4, 5)
    assert got["aicache_tokens_total"] == 2 * 4 + 10  # the fake's usage: 2 per text, 10 per chat
    assert 'redis_exporter_last_scrape_error{err=""} 0' in text


def test_metrics_follow_the_counters_between_scrapes(f, fserver, exporter):
    first = script_values(scrape(exporter))
    f.execute_command("EMBCACHE.FETCH", "docs", "emb-model", 2, "new one", "new two")
    wait_for(lambda: "aicache_fills_in_flight:0" in raw_info(fserver.port), what="fills to end")
    second = script_values(scrape(exporter))
    assert second["aicache_misses"] == first["aicache_misses"] + 2
    assert second["aicache_upstream_requests"] == first["aicache_upstream_requests"] + 1
    assert second == expected_metrics(raw_info(fserver.port))


def run_on(r, info_text):
    """The script as the exporter sends it, reading info_text instead of INFO."""
    with open(SCRIPT) as fh:
        source = fh.read()
    call = 'redis.call("INFO", "aicache")'
    assert source.count(call) == 1, "the script's INFO call moved"
    reply = r.eval(source.replace(call, "ARGV[1]"), 0, info_text)
    return dict(zip(*[iter(x.decode() for x in reply)] * 2))


def test_fields_unknown_today_come_through(f):
    """The script lists no field: a histogram, float sums, dict fields and
    new sections pass; values Go's ParseFloat refuses (one would drop the
    whole scrape) do not."""
    info = "\r\n".join([
        "# aicache_fills", "aicache_hits:7", "aicache_emb_hits:5", "aicache_tokens_saved:1200",
        "", "# aicache_latency",
        "aicache_upstream_latency_le_50:3", "aicache_upstream_latency_le_250:9",
        "aicache_upstream_latency_le_inf:10", "aicache_upstream_latency_count:10",
        "aicache_upstream_latency_sum:1234.5", "aicache_ratio:.25", "aicache_big:1e+21",
        "aicache_negative:-1", "aicache_families:emb=3,llm=x,chat=4.5",
        "aicache_version:1.2.3", "aicache_hex:0x10", "aicache_inf:inf", "aicache_spaced: 5",
        "aicache_empty:", "no colon here", ""])
    got = run_on(f, info)
    assert got == {
        "aicache_hits": "7", "aicache_emb_hits": "5", "aicache_tokens_saved": "1200",
        "aicache_upstream_latency_le_50": "3", "aicache_upstream_latency_le_250": "9",
        "aicache_upstream_latency_le_inf": "10", "aicache_upstream_latency_count": "10",
        "aicache_upstream_latency_sum": "1234.5", "aicache_ratio": ".25",
        "aicache_big": "1e+21", "aicache_negative": "-1",
        "aicache_families_emb": "3", "aicache_families_chat": "4.5",
    }
    assert {k: float(v) for k, v in got.items()} == expected_metrics(info)


def test_an_empty_info_gives_no_values(f):
    assert run_on(f, "") == {}
