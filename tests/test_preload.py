"""`python -m aicache preload` against a real server and the fake upstream:
every input format, hits vs fills, resume from the state file, THROTTLED
waits, and failures counted and retried."""
import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np

from fake_upstream import vector
from helpers import ROOT, info_fields, wait_for

M = "emb-model"  # 8 dimensions in the fake
CLIENT = os.path.join(ROOT, "clients", "python")


def expected(text):
    return np.asarray(vector(M, text, 8), dtype="<f4").tobytes()


def command(server, *args):
    return [sys.executable, "-m", "aicache", "preload", "--port", str(server.port),
            "--no-progress", "--json", *map(str, args)]


def env():
    return {**os.environ, "PYTHONPATH": CLIENT}


def preload(server, *args):
    """(exit code, summary) of one run."""
    p = subprocess.run(command(server, *args), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=300)
    lines = p.stdout.strip().splitlines()
    assert lines, f"no summary (exit {p.returncode}): {p.stderr}"
    return p.returncode, json.loads(lines[-1])


def cached(r, texts, ns="docs"):
    return r.execute_command("EMBCACHE.MGET", ns, M, *texts)


def sent(upstream):
    return sum(upstream.stats()["inputs"])


def write_csv(path, rows, header=("id", "text")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_csv_column_fills_the_misses_and_counts_the_hits(f, fserver, upstream, tmp_path):
    texts = [f"document {i}, with a comma" for i in range(30)]
    f.execute_command("EMBCACHE.FETCH", "docs", M, 5, *texts[:5])
    upstream.reset()
    path = tmp_path / "docs.csv"
    write_csv(path, [(i, t) for i, t in enumerate(texts)] + [(99, texts[3]), (100, "")])
    code, s = preload(fserver, path, "--ns", "docs", "--model", M, "--column", "text",
                      "--batch", 7)
    assert code == 0, s
    assert (s["items"], s["duplicates"], s["blank"]) == (30, 1, 1)
    assert (s["hits"], s["filled"], s["failed"]) == (5, 25, 0)
    assert sent(upstream) == 25, "a hit went upstream"
    assert cached(f, texts) == [expected(t) for t in texts]
    # The fake reports 2 tokens per input; the summary reads the module's counter.
    assert s["upstream_tokens"] == 50
    assert json.loads((tmp_path / "docs.csv.aicache-preload.json").read_text())["done"] == 30


def test_a_csv_with_several_columns_needs_column(fserver, tmp_path):
    path = tmp_path / "docs.csv"
    write_csv(path, [(1, "a")])
    p = subprocess.run(command(fserver, path, "--ns", "docs", "--model", M), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--column" in p.stderr


def test_jsonl_field_reaches_nested_text_and_counts_bad_lines(f, fserver, upstream, tmp_path):
    texts = [f"jsonl text {i} \u4e00" for i in range(12)]
    lines = [json.dumps({"doc": {"body": t}, "id": i}) for i, t in enumerate(texts)]
    lines.insert(4, "{not json")
    lines.insert(7, json.dumps({"doc": {"title": "no body"}}))
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    code, s = preload(fserver, path, "--ns", "docs", "--model", M, "--field", "doc.body",
                      "--batch", 5)
    assert code == 1, "invalid lines must fail the run"
    assert (s["items"], s["invalid"], s["filled"], s["failed"]) == (12, 2, 12, 0)
    assert [line for line, _ in s["invalid_lines"]] == [5, 8]
    assert cached(f, texts) == [expected(t) for t in texts]


def test_query_log_ranks_by_frequency_and_keeps_the_top(f, fserver, upstream, tmp_path):
    log = ["rare"] + ["tie second"] * 3 + ["most"] * 5 + ["tie first"] * 3 + ["", "once"]
    # Equal counts keep the order of first appearance, not the alphabet's.
    path = tmp_path / "queries.log"
    path.write_text("\n".join(log) + "\n")
    code, s = preload(fserver, path, "--ns", "docs", "--model", M, "--top", 2)
    assert code == 0, s
    assert (s["format"], s["items"], s["filled"]) == ("log", 2, 2)
    assert upstream.stats()["inputs"] == [2]
    got = cached(f, ["most", "tie second", "tie first", "rare", "once"])
    assert [g is not None for g in got] == [True, True, False, False, False]


def test_chat_jsonl_fills_each_request_once(f, fserver, upstream, tmp_path):
    reqs = [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}]}
            for i in range(3)]
    same_as_first = {"messages": reqs[0]["messages"], "model": "gpt-4o-mini"}  # key order
    lines = [json.dumps(q) for q in reqs] + [json.dumps(reqs[1]), json.dumps(same_as_first)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    # One request per batch: the reordered twin is read after its first form is stored.
    code, s = preload(fserver, path, "--ns", "chat", "--chat", "--batch", 1)
    assert code == 0, s
    assert (s["items"], s["duplicates"], s["hits"], s["filled"]) == (4, 1, 1, 3)
    assert upstream.calls("chat") == 3
    for q in reqs:
        assert f.execute_command("LLMCACHE.GET", "chat", json.dumps(q)) is not None
    code, s = preload(fserver, path, "--ns", "chat", "--chat", "--restart")
    assert (code, s["hits"], s["filled"]) == (0, 4, 0) and upstream.calls("chat") == 3


def test_chat_field_holds_the_request(f, fserver, upstream, tmp_path):
    req = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "wrapped"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"id": 1, "request": req}) + "\n"
                    + json.dumps({"id": 2, "request": {"model": "m"}}) + "\n")
    code, s = preload(fserver, path, "--ns", "chat", "--chat", "--field", "request")
    assert code == 1 and (s["filled"], s["failed"]) == (1, 1)
    assert "messages" in " ".join(s["errors"])
    assert f.execute_command("LLMCACHE.GET", "chat", json.dumps(req)) is not None


def test_a_rerun_resumes_after_the_completed_batches(f, fserver, upstream, tmp_path):
    texts = [f"resume {i}" for i in range(50)]
    path = tmp_path / "q.log"
    path.write_text("\n".join(texts) + "\n")
    args = (path, "--ns", "docs", "--model", M, "--batch", 10)
    code, s = preload(fserver, *args, "--max-batches", 2)
    assert (code, s["done"], s["filled"], s["complete"]) == (3, 20, 20, False)
    assert sent(upstream) == 20
    code, s = preload(fserver, *args)
    assert code == 0 and s["complete"]
    # Not even read: a re-read of the first 20 would count them as hits.
    assert (s["resumed_from"], s["hits"], s["filled"]) == (20, 0, 30)
    assert sent(upstream) == 50
    assert cached(f, texts) == [expected(t) for t in texts]
    code, s = preload(fserver, *args)
    assert (code, s["hits"], s["filled"]) == (0, 0, 0), "a finished input is not redone"
    # The same input into another DB (or server) is other work, not a resume.
    code, s = preload(fserver, *args, "--url", f"redis://127.0.0.1:{fserver.port}/1")
    assert (code, s["resumed_from"], s["filled"]) == (0, 0, 50)
    db1 = fserver.client(db=1)
    assert cached(db1, texts) == [expected(t) for t in texts]
    db1.close()
    code, s = preload(fserver, *args)
    assert (code, s["resumed_from"], s["hits"], s["filled"]) == (0, 0, 50, 0)
    # Another input starts over.
    path.write_text("\n".join(texts + ["one more"]) + "\n")
    code, s = preload(fserver, *args)
    assert (code, s["resumed_from"], s["hits"], s["filled"]) == (0, 0, 50, 1)
    assert sent(upstream) == 101


def test_a_killed_run_resumes_without_resending(f, fserver, upstream, tmp_path):
    texts = [f"killed {i}" for i in range(40)]
    path = tmp_path / "q.log"
    path.write_text("\n".join(texts) + "\n")
    state = tmp_path / "state.json"
    args = (path, "--ns", "docs", "--model", M, "--batch", 4, "--state", state)
    upstream.latency(100)
    proc = subprocess.Popen(command(fserver, *args), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def done_so_far():
        try:
            return json.loads(state.read_text())["done"] >= 8
        except (OSError, ValueError):
            return False

    wait_for(done_so_far, timeout=60, what="two batches recorded")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    first = json.loads(out.strip().splitlines()[-1])
    assert first["stopped"] == "interrupted" and first["done"] < 40
    wait_for(lambda: info_fields(f)["fills_in_flight"] == 0, what="the killed batch's fill")
    upstream.latency(0)
    code, s = preload(fserver, *args)
    assert code == 0 and s["resumed_from"] == first["done"]
    # The batch in flight at the kill was filled anyway and reads as hits.
    assert s["hits"] <= 4 and s["hits"] + s["filled"] == 40 - first["done"]
    assert sent(upstream) == 40, "an item was sent upstream twice"


def test_throttled_batches_wait_and_complete(f, fserver, upstream, tmp_path):
    # One upstream request per 1.5 s window: each fill after the first
    # comes well inside the window of the one before.
    f.config_set("aicache.quota-window-ms", 1500)
    f.config_set("aicache.tenant-max-requests", 1)
    texts = [f"throttle {i}" for i in range(15)]
    path = tmp_path / "q.log"
    path.write_text("\n".join(texts) + "\n")
    code, s = preload(fserver, path, "--ns", "docs", "--model", M, "--batch", 5,
                      "--tenant", "t1")
    assert code == 0, s
    assert (s["filled"], s["failed"]) == (15, 0)
    assert upstream.calls("embeddings") == 3
    assert s["throttle_waits"] >= 2
    assert info_fields(f)["throttled_tenant"] == s["throttle_waits"]
    assert cached(f, texts) == [expected(t) for t in texts]


def test_a_batch_alone_over_the_limit_is_split(f, fserver, upstream, tmp_path):
    # 40-byte texts are 10 estimated tokens: one batch of 8 can never fit 30.
    f.config_set("aicache.quota-window-ms", 200)
    f.config_set("aicache.tenant-max-tokens", 30)
    texts = [f"split {i:02d} ".ljust(40, "x") for i in range(8)]
    path = tmp_path / "q.log"
    path.write_text("\n".join(texts) + "\n")
    code, s = preload(fserver, path, "--ns", "docs", "--model", M, "--tenant", "t2")
    assert code == 0, s
    assert (s["filled"], s["failed"]) == (8, 0)
    assert max(upstream.stats()["inputs"]) <= 3
    assert cached(f, texts) == [expected(t) for t in texts]


def test_refused_inputs_fail_alone_and_are_retried_next_run(f, fserver, upstream, tmp_path):
    texts = [f"text {i}" for i in range(20)]
    texts[3], texts[14] = "bad POISON 3", "bad POISON 14"
    path = tmp_path / "q.log"
    path.write_text("\n".join(texts) + "\n")
    args = (path, "--ns", "docs", "--model", M, "--batch", 10)
    upstream.poison("POISON")
    code, s = preload(fserver, *args)
    assert code == 1 and s["complete"]
    assert (s["filled"], s["failed"]) == (18, 2)
    assert any("HTTP 400" in e for e in s["errors"]), s["errors"]
    st = json.loads((tmp_path / "q.log.aicache-preload.json").read_text())
    assert (st["done"], st["failed"]) == (20, [3, 14])
    upstream.reset()
    code, s = preload(fserver, *args)
    assert code == 0
    assert (s["retried"], s["hits"], s["filled"], s["failed"]) == (2, 0, 2, 0)
    assert cached(f, texts) == [expected(t) for t in texts]


def test_a_failed_upstream_fails_the_whole_batch(f, fserver, upstream, tmp_path):
    f.config_set("aicache.upstream-retries", 0)
    upstream.fault("status", status=503, message="overloaded")
    texts = [f"down {i}" for i in range(12)]
    path = tmp_path / "q.log"
    path.write_text("\n".join(texts) + "\n")
    code, s = preload(fserver, path, "--ns", "docs", "--model", M, "--batch", 6)
    assert code == 1
    assert (s["filled"], s["failed"]) == (6, 6)
    assert any("HTTP 503" in e and n == 6 for e, n in s["errors"].items()), s["errors"]
    assert [v is None for v in cached(f, texts)] == [True] * 6 + [False] * 6


def test_texts_the_module_refuses_fail_alone(f, fserver, upstream, tmp_path):
    good = [f"good {i}".encode() for i in range(10)]
    bad = [b"caf\xe9 latin-1", b"x" * 40000]  # not UTF-8; over max-text-bytes
    path = tmp_path / "q.log"
    path.write_bytes(b"\n".join(good[:4] + bad[:1] + good[4:] + bad[1:]) + b"\n")
    code, s = preload(fserver, path, "--ns", "docs", "--model", M)
    assert code == 1 and s["complete"]
    assert (s["filled"], s["failed"]) == (10, 2)
    assert any("UTF-8" in e for e in s["errors"]) and any("max-text-bytes" in e for e in s["errors"])
    assert sent(upstream) == 10
    assert cached(f, [g.decode() for g in good]) == [expected(g.decode()) for g in good]


def test_an_unusable_namespace_stops_the_run_at_once(f, fserver, upstream, tmp_path):
    path = tmp_path / "q.log"
    path.write_text("a\nb\n")
    code, s = preload(fserver, path, "--ns", "bad}ns", "--model", M)
    assert code == 3 and "namespace" in s["stopped"]
    assert (s["done"], s["failed"]) == (0, 0) and upstream.calls() == 0


def test_a_tsv_file_is_split_on_tabs(f, fserver, upstream, tmp_path):
    path = tmp_path / "docs.tsv"
    path.write_text("id\tbody\n1\tcomma, inside\n2\ttwo\n")
    code, s = preload(fserver, path, "--ns", "docs", "--model", M, "--column", "body")
    assert (code, s["format"], s["filled"]) == (0, "tsv", 2)
    assert cached(f, ["comma, inside", "two"]) == [expected("comma, inside"), expected("two")]
