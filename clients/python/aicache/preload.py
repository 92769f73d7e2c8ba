"""`python -m aicache preload`: warm a namespace from a file before traffic arrives.

Embedding texts come from a CSV column, a JSON-lines field or a plain query
log (one query per line, most frequent first); `--chat` reads chat requests
from JSON lines. Each batch is classified first (`EMBCACHE.MGET` /
`LLMCACHE.GET`) and only its misses are sent to `*.FETCH`, so the module's
single-flight, spend limits and upstream settings apply as for any app, and
hits cost no upstream call. The hit/new split is per batch: an entry filled
or evicted by other traffic between the read and the FETCH is counted as it
was when read.

Progress is kept in a state file after every batch, so a rerun resumes
where a run stopped (and retries the items that failed); a changed input or
target starts over.

Only redis-py is required: commands go through `execute_command`, so this
works with whatever client code the application uses. tqdm draws the
progress bar when installed.
"""

import argparse
import collections
import csv
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis

THROTTLED = re.compile(r"THROTTLED retry after (\d+) ms")
# A call that can never fit its limit: only a smaller call can pass.
ALONE_OVER = "this call alone is over the limit"
STATE_VERSION = 1

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3


class UsageError(Exception):
    pass


class Stop(Exception):
    """Ends the run early with a reason; completed batches stay recorded."""


# ---------------------------------------------------------------- input


class Items:
    def __init__(self, kind):
        self.kind = kind  # "embed" or "chat"
        self.items = []
        self.blank = 0  # empty values: nothing to cache, not an error
        self.invalid = []  # (line number, why): the input is wrong
        self.duplicates = 0

    def finish(self, values):
        unique = list(dict.fromkeys(values))
        self.duplicates = len(values) - len(unique)
        self.items = unique
        return self


def field_of(obj, path):
    """obj[path], where path may be dotted (`meta.text`)."""
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(path)
        obj = obj[part]
    return obj


def read_csv(path, column, delimiter):
    out, values = Items("embed"), []
    # Texts may be far longer than csv's 128 KiB default field limit.
    csv.field_size_limit(1 << 30)
    # utf-8-sig: spreadsheet exports start with a BOM that would rename column 1.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        cols = reader.fieldnames or []
        if column is None:
            if len(cols) != 1:
                raise UsageError(f"{path} has columns {cols}: choose one with --column")
            column = cols[0]
        elif column not in cols:
            raise UsageError(f"{path} has no column {column!r} (columns: {cols})")
        for row in reader:
            v = row.get(column)
            if v is None:
                out.invalid.append((reader.line_num, f"no {column!r} value"))
            elif v == "":
                out.blank += 1
            else:
                values.append(v.encode())
    return out.finish(values)


def json_lines(path):
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield n, line


def read_jsonl(path, field):
    out, values = Items("embed"), []
    for n, line in json_lines(path):
        try:
            v = field_of(json.loads(line), field)
        except (ValueError, KeyError) as e:
            out.invalid.append((n, f"not JSON with a {field!r} field ({type(e).__name__})"))
            continue
        if not isinstance(v, str):
            out.invalid.append((n, f"{field!r} is not a string"))
        elif v == "":
            out.blank += 1
        else:
            values.append(v.encode())
    return out.finish(values)


def read_query_log(path, top):
    """Distinct lines, most frequent first (ties: first seen first). Read as
    bytes: a log may hold any encoding and the module's texts are binary-safe."""
    out = Items("embed")
    counts = collections.Counter()
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if line.strip():
                counts[line] += 1
            else:
                out.blank += 1
    # Counter keeps first-insertion order, and sorted() is stable.
    ranked = sorted(counts, key=lambda q: -counts[q])
    out.items = ranked[:top] if top else ranked
    return out


def read_chat(path, field):
    out, values = Items("chat"), []
    for n, line in json_lines(path):
        try:
            obj = json.loads(line)
            req = field_of(obj, field) if field else obj
        except (ValueError, KeyError) as e:
            out.invalid.append((n, f"not a JSON request ({type(e).__name__})"))
            continue
        if field is None:
            if not isinstance(obj, dict):
                out.invalid.append((n, "not a JSON object"))
                continue
            # The line as written: the module canonicalises it anyway.
            values.append(line)
        elif isinstance(req, dict):
            values.append(json.dumps(req, ensure_ascii=False, separators=(",", ":")).encode())
        elif isinstance(req, str) and req:
            values.append(req.encode())
        else:
            out.invalid.append((n, f"{field!r} is neither a request object nor a JSON string"))
    return out.finish(values)


def load_items(args):
    ext = os.path.splitext(args.file)[1].lower()
    by_ext = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".json": "jsonl"}.get(ext, "log")
    fmt = args.format or ("chat" if args.chat else
                          ("tsv" if by_ext == "tsv" else "csv") if args.column else
                          "jsonl" if args.field else by_ext)
    if args.chat and fmt != "chat":
        raise UsageError("--chat reads JSON lines; drop --format/--column")
    if args.top is not None and fmt != "log":
        raise UsageError("--top ranks a query log; this input is read as " + fmt)
    if args.column and fmt not in ("csv", "tsv"):
        raise UsageError("--column applies to CSV input")
    if fmt in ("csv", "tsv"):
        return fmt, read_csv(args.file, args.column, "\t" if fmt == "tsv" else ",")
    if fmt == "jsonl":
        return fmt, read_jsonl(args.file, args.field or "text")
    if fmt == "chat":
        return fmt, read_chat(args.file, args.field)
    return fmt, read_query_log(args.file, args.top)


def input_digest(fmt, ns, model, items, target=""):
    """Identifies the work list: the items in order and where they go (the
    server and DB too: a run against staging is not one against prod).
    Batch size and timeouts may change between runs; these may not."""
    h = hashlib.sha256()
    for f in (b"aicache-preload:v1", fmt.encode(), ns.encode(), (model or "").encode(),
              target.encode(), *items):
        h.update(len(f).to_bytes(8, "big"))
        h.update(f)
    return h.hexdigest()


# ---------------------------------------------------------------- state


def load_state(path, digest, total, restart):
    """(done, failed indexes, note) to resume from."""
    if restart or not os.path.exists(path):
        return 0, [], None
    try:
        with open(path) as f:
            st = json.load(f)
        if st.get("version") != STATE_VERSION or st.get("digest") != digest:
            return 0, [], "input or target changed since the last run: starting over"
        done, failed = int(st["done"]), [int(i) for i in st.get("failed", [])]
        if not (0 <= done <= total and all(0 <= i < done for i in failed)):
            raise ValueError("out of range")
        return done, failed, None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return 0, [], f"state file {path} unreadable ({e}): starting over"


def save_state(path, digest, total, done, failed):
    # Written aside and renamed: a kill mid-write leaves the old state whole.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"version": STATE_VERSION, "digest": digest, "total": total, "done": done,
                   "failed": sorted(failed), "updated": int(time.time())}, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the run


def throttle_wait_ms(exc):
    """The wait a THROTTLED refusal asks for, or None for any other error.
    A client library may map it to an exception carrying retry_after_ms."""
    ms = getattr(exc, "retry_after_ms", None)
    if isinstance(ms, int):
        return ms
    m = THROTTLED.search(str(exc))
    return int(m.group(1)) if m else None


def info_tokens(r):
    """The node's upstream token counter, or None when INFO is not allowed."""
    try:
        raw = r.execute_command("INFO", "aicache")
    except redis.RedisError:
        return None
    if isinstance(raw, dict):
        v = raw.get("aicache_tokens_total")
    else:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        m = re.search(r"^aicache_tokens_total:(\d+)", text, re.M)
        v = m and m.group(1)
    return int(v) if v is not None else None


def short(exc):
    text = str(exc)
    return text if len(text) <= 160 else text[:157] + "..."


class Preload:
    def __init__(self, r, args, items):
        self.r, self.args, self.items = r, args, items.items
        self.chat = items.kind == "chat"
        self.hits = self.filled = 0
        self.failed = set()  # indexes failed in this run or still failing from an earlier one
        self.errors = collections.Counter()
        self.waits = self.wait_ms = 0
        self.lock = threading.Lock()  # chat fills count waits from threads
        self.bar = None
        self.done = None
        self.pool = ThreadPoolExecutor(args.concurrency) if self.chat else None

    def opts(self):
        o = ["TIMEOUT", self.args.timeout]
        return o + (["TENANT", self.args.tenant] if self.args.tenant else [])

    def throttled(self, call):
        """call(), waiting out every `THROTTLED retry after <ms>` refusal."""
        while True:
            try:
                return call()
            except redis.ResponseError as e:
                ms = throttle_wait_ms(e)
                if ms is None:
                    raise
                if ms > self.args.max_wait:
                    raise Stop(f"throttled for {ms} ms, longer than --max-wait "
                               f"{self.args.max_wait}: {short(e)}") from e
                with self.lock:
                    self.waits += 1
                    self.wait_ms += ms
                # A little past the window's edge, so the retry is admitted.
                time.sleep((ms + 2) / 1000.0)

    def fail(self, idxs, exc):
        self.failed.update(idxs)
        self.errors[short(exc)] += len(idxs)

    def ok(self, idxs):
        self.failed.difference_update(idxs)

    def split_or_fail(self, idxs, exc, step):
        """Halves a batch refused as a whole, so one bad input fails alone."""
        if len(idxs) == 1:
            return self.fail(idxs, exc)
        mid = len(idxs) // 2
        step(idxs[:mid])
        step(idxs[mid:])

    # Embeddings: MGET to classify, FETCH for the misses only.
    def embed(self, idxs):
        ns, model = self.args.ns, self.args.model
        try:
            cached = self.r.execute_command("EMBCACHE.MGET", ns, model,
                                            *[self.items[i] for i in idxs])
        except redis.ResponseError as e:
            # Only a refused text is about one input; a namespace, model or
            # permission error would fail every batch alike.
            if not str(e).startswith("text "):
                raise Stop(f"the server refuses this input: {short(e)}") from e
            return self.split_or_fail(idxs, e, self.embed)
        misses = [i for i, v in zip(idxs, cached) if v is None]
        self.hits += len(idxs) - len(misses)
        self.ok([i for i, v in zip(idxs, cached) if v is not None])
        if misses:
            self.embed_fill(misses)

    def embed_fill(self, idxs):
        texts = [self.items[i] for i in idxs]
        cmd = ["EMBCACHE.FETCH", self.args.ns, self.args.model, len(texts), *texts,
               "FORMAT", "FP32", *self.opts()]
        try:
            reply = self.throttled(lambda: self.r.execute_command(*cmd))
        except redis.ResponseError as e:
            # A text the module cannot send (`text 3 is not valid UTF-8`) or
            # a batch no limit window can hold: smaller calls get through.
            if ALONE_OVER in str(e) or str(e).startswith("text "):
                return self.split_or_fail(idxs, e, self.embed_fill)
            return self.fail(idxs, e)
        for i, v in zip(idxs, reply):
            if isinstance(v, Exception):  # this input was refused on its own
                self.fail([i], v)
            else:
                self.filled += 1
                self.ok([i])

    # Chat: pipelined GETs to classify, FETCHes in parallel (each blocks
    # its connection until answered).
    def chat_batch(self, idxs):
        pipe = self.r.pipeline(transaction=False)
        for i in idxs:
            pipe.execute_command("LLMCACHE.GET", self.args.ns, self.items[i])
        got = pipe.execute(raise_on_error=False)
        misses = []
        for i, v in zip(idxs, got):
            if isinstance(v, redis.exceptions.NoPermissionError):
                raise Stop(f"the server refuses this input: {short(v)}")
            if isinstance(v, Exception):  # not a valid request
                self.fail([i], v)
            elif v is None:
                misses.append(i)
            else:
                self.hits += 1
                self.ok([i])
        for i, err in zip(misses, self.pool.map(self.chat_fill, misses)):
            if err is None:
                self.filled += 1
                self.ok([i])
            else:
                self.fail([i], err)

    def chat_fill(self, i):
        cmd = ["LLMCACHE.FETCH", self.args.ns, self.items[i], *self.opts()]
        try:
            self.throttled(lambda: self.r.execute_command(*cmd))
            return None
        except redis.ResponseError as e:
            return e

    def batches(self, retry, done):
        """Earlier failures first, then the items not reached yet; each
        batch with the `done` count to record once it is through."""
        size = self.args.batch
        for k in range(0, len(retry), size):
            yield retry[k:k + size], done
        for start in range(done, len(self.items), size):
            end = min(start + size, len(self.items))
            yield list(range(start, end)), end

    def run(self, state_path, digest, done, retry):
        """Works through the batches; self.done is what the state file holds,
        also when the run stops early."""
        self.failed, self.done = set(retry), done
        step = self.chat_batch if self.chat else self.embed
        count = 0
        for idxs, new_done in self.batches(retry, done):
            if self.args.max_batches is not None and count >= self.args.max_batches:
                raise Stop(f"stopped after --max-batches {self.args.max_batches}")
            step(idxs)
            self.done = new_done
            save_state(state_path, digest, len(self.items), self.done, self.failed)
            count += 1
            if self.bar is not None:
                self.bar.update(len(idxs))
                self.bar.set_postfix(collections.OrderedDict(
                    hits=self.hits, new=self.filled, failed=len(self.failed), waits=self.waits),
                    refresh=False)


# ---------------------------------------------------------------- command line


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m aicache preload",
        description="Warm an aicache namespace from a file: CSV column, JSON lines field, "
                    "query log (one query per line, most frequent first) or, with --chat, "
                    "chat requests as JSON lines.")
    p.add_argument("file")
    p.add_argument("--ns", required=True, help="namespace")
    p.add_argument("--model", help="embedding model (required unless --chat)")
    p.add_argument("--chat", action="store_true", help="lines are chat-completions requests")
    p.add_argument("--format", choices=["csv", "tsv", "jsonl", "log"],
                   help="input format (default: from --column/--field, then the extension; "
                        "anything else is a query log)")
    p.add_argument("--column", help="CSV column holding the texts (needed when there are several)")
    p.add_argument("--field", help="JSON field holding the text (default 'text') or, with --chat, "
                                   "the request (default: the whole line); dots reach nested fields")
    p.add_argument("--top", type=int, help="query log: only the N most frequent queries")
    p.add_argument("--batch", type=int, default=100, help="items per batch (default 100)")
    p.add_argument("--concurrency", type=int, default=4,
                   help="--chat: requests filled at once (default 4)")
    p.add_argument("--tenant", help="TENANT passed to FETCH (spend limits)")
    p.add_argument("--timeout", type=int, default=120000,
                   help="TIMEOUT ms of each FETCH (default 120000)")
    p.add_argument("--max-wait", type=int, default=600000,
                   help="stop instead of waiting out a THROTTLED refusal longer than this "
                        "many ms (default 600000)")
    p.add_argument("--url", help="redis://[user:password@]host:port[/db] (overrides --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--state", help="progress file (default FILE.aicache-preload.json)")
    p.add_argument("--restart", action="store_true", help="ignore the progress file")
    p.add_argument("--max-batches", type=int,
                   help="stop after N batches, as an interruption would (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    a = p.parse_args(argv)
    if not a.chat and not a.model:
        p.error("--model is required (or --chat)")
    for name in ("batch", "concurrency", "timeout"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.top is not None and a.top < 1:
        p.error("--top must be at least 1")
    return a


def target_of(r):
    """host:port/db (or the socket path) the client talks to."""
    kw = r.connection_pool.connection_kwargs
    where = kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
    return f"{where}/{kw.get('db', 0)}"


def connect(a):
    # The socket must outlast the longest FETCH we ask the module to wait for.
    kw = {"socket_timeout": a.timeout / 1000.0 + 30, "socket_connect_timeout": 10}
    if a.url:
        return redis.Redis.from_url(a.url, **kw)
    return redis.Redis(host=a.host, port=a.port, **kw)


def progress_bar(a, total, initial):
    if a.no_progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        print("(install tqdm for a progress bar)", file=sys.stderr)
        return None
    return tqdm(total=total, initial=initial, unit="item", dynamic_ncols=True, file=sys.stderr)


def report(s, as_json):
    if as_json:
        print(json.dumps(s, sort_keys=True))
        return
    print(f"aicache preload {s['file']} -> {s['ns']}: {s['items']} items "
          f"({s['duplicates']} duplicates, {s['blank']} blank, {s['invalid']} invalid lines)")
    if s["resumed_from"]:
        print(f"  resumed: {s['resumed_from']} items were done before this run, "
              f"{s['retried']} of them retried after failing")
    print(f"  hits {s['hits']}, filled {s['filled']}, failed {s['failed']}")
    if s["throttle_waits"]:
        print(f"  throttled: waited {s['throttle_waits']} times, {s['throttle_wait_ms']} ms in all")
    tokens = "unknown (INFO not allowed)" if s["upstream_tokens"] is None else s["upstream_tokens"]
    print(f"  upstream tokens: {tokens} (INFO aicache tokens_total delta on this node)")
    for msg, n in s["errors"].items():
        print(f"  {n} x {msg}")
    for line, why in s["invalid_lines"]:
        print(f"  line {line}: {why}")
    if s["stopped"]:
        print(f"  stopped: {s['stopped']}; rerun the same command to continue")
    print(f"  state: {s['state']}")


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    try:
        a = parse_args(sys.argv[1:] if argv is None else argv)
        fmt, items = load_items(a)
    except (UsageError, OSError, UnicodeDecodeError) as e:
        print(f"aicache preload: {e}", file=sys.stderr)
        return EXIT_USAGE
    state_path = a.state or a.file + ".aicache-preload.json"
    r = connect(a)
    digest = input_digest(fmt, a.ns, a.model, items.items, target_of(r))
    done, retry, note = load_state(state_path, digest, len(items.items), a.restart)
    if note:
        print(f"aicache preload: {note}", file=sys.stderr)

    job = Preload(r, a, items)
    stopped = None
    # SIGTERM ends the run like Ctrl-C: the summary still prints, and the
    # state already holds every batch that completed.
    signal.signal(signal.SIGTERM, interrupt)
    resumed_from, tokens_before = done, None
    try:
        tokens_before = info_tokens(r)
        job.bar = progress_bar(a, len(items.items), done - len(retry))
        job.run(state_path, digest, done, retry)
    except Stop as e:
        stopped = str(e)
    except KeyboardInterrupt:
        stopped = "interrupted"
    except redis.RedisError as e:
        stopped = f"redis: {short(e)}"
    finally:
        if job.bar is not None:
            job.bar.close()
        if job.pool is not None:
            # Requests already sent finish in the module whether we wait or not.
            job.pool.shutdown(wait=False, cancel_futures=True)
    tokens_after = info_tokens(r) if tokens_before is not None else None
    upstream_tokens = None
    # A CONFIG RESETSTAT during the run makes the delta meaningless.
    if tokens_after is not None and tokens_after >= tokens_before:
        upstream_tokens = tokens_after - tokens_before

    done = job.done if job.done is not None else done
    complete = stopped is None and done == len(items.items)
    summary = {
        "file": a.file, "ns": a.ns, "format": fmt, "items": len(items.items),
        "duplicates": items.duplicates, "blank": items.blank, "invalid": len(items.invalid),
        "invalid_lines": items.invalid[:20], "resumed_from": resumed_from,
        "retried": len(retry), "hits": job.hits, "filled": job.filled,
        "failed": len(job.failed), "throttle_waits": job.waits,
        "throttle_wait_ms": job.wait_ms, "upstream_tokens": upstream_tokens,
        "errors": dict(job.errors.most_common(10)), "done": done, "complete": complete,
        "stopped": stopped, "state": state_path,
    }
    report(summary, a.json)
    if stopped:
        return EXIT_STOPPED
    return EXIT_FAILED if job.failed or items.invalid else EXIT_OK
