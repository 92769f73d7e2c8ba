"""LangChain embeddings through aicache against LangChain's own cache.

Both sides are LangChain `Embeddings` answering `embed_documents` from the
same redis-server and the same fake upstream (tests/fake_upstream.py, with a
per-call latency):

- ours: `aicache.langchain.AICacheEmbeddings`, one `EMBCACHE.FETCH` per batch;
  misses are filled by the module's workers;
- theirs: `CacheBackedEmbeddings` (langchain-classic) over `RedisStore`
  (langchain-community; a minimal redis-py `ByteStore` if that is missing)
  wrapping `langchain_openai.OpenAIEmbeddings` pointed at the same fake.

Workload: batches of 100 texts, 80 from a pool warmed beforehand through
each side's own path and 20 never seen before (80% hits). Scenario A runs
one app instance; scenario B runs 4 instances at once on the same batches, as
replicas behind a load balancer see the same new texts at the same moment.
Each figure is the sum of wall time over all batches (B: the slowest
instance per batch); ratio = theirs / ours.

    .venv/bin/python bench/langchain_compare.py      # prints a markdown section

Needs: langchain-core, langchain-openai, langchain-classic (and optionally
langchain-community) in .venv.
"""
import os
import random
import sys
import threading
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients",
                                "python"))
from helpers import Server, Upstream  # noqa: E402

MODEL = "text-embedding-3-small"  # 1536 dimensions in the fake, as in the real API
BATCH, HITS = 100, 80
BATCHES = 20
POOL = 400
INSTANCES = 4
LATENCIES_MS = (0, 100)


def redis_byte_store(r, namespace):
    """The store LangChain users reach for; a few lines of redis-py when
    langchain-community is not installed (the same MGET / MSET either way)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from langchain_community.storage import RedisStore
        return RedisStore(client=r, namespace=namespace), "`RedisStore` (langchain-community)"
    except ImportError:
        pass
    from langchain_core.stores import ByteStore

    class MiniRedisStore(ByteStore):
        def mget(self, keys):
            return r.mget([f"{namespace}/{k}" for k in keys]) if keys else []

        def mset(self, pairs):
            if pairs:
                r.mset({f"{namespace}/{k}": v for k, v in pairs})

        def mdelete(self, keys):
            if keys:
                r.delete(*[f"{namespace}/{k}" for k in keys])

        def yield_keys(self, prefix=None):
            for k in r.scan_iter(f"{namespace}/{prefix or ''}*"):
                yield k.decode()[len(namespace) + 1:]

    return MiniRedisStore(), "a redis-py `ByteStore` (MGET / MSET)"


def build(server, up, tag):
    import redis
    from langchain_classic.embeddings import CacheBackedEmbeddings
    from langchain_openai import OpenAIEmbeddings

    from aicache import AICache
    from aicache.langchain import AICacheEmbeddings

    r = redis.Redis(port=server.port, socket_timeout=120)
    ours = AICacheEmbeddings(AICache(r, f"bench-{tag}", MODEL))
    # check_embedding_ctx_length=False: otherwise it tokenizes with tiktoken
    # (a download) and sends token arrays; plain texts is what ours sends too.
    underlying = OpenAIEmbeddings(model=MODEL, base_url=up.url, api_key="sk-bench",
                                  check_embedding_ctx_length=False, max_retries=0)
    store, store_name = redis_byte_store(r, f"lc-{tag}")
    theirs = CacheBackedEmbeddings.from_bytes_store(underlying, store, namespace=MODEL,
                                                    key_encoder="sha256")
    return ours, theirs, store_name


def workload(seed):
    rng = random.Random(seed)
    pool = [f"warm document {seed}-{i}: " + "lorem ipsum " * rng.randint(5, 40)
            for i in range(POOL)]
    batches = []
    for b in range(BATCHES):
        fresh = [f"new document {seed}-{b}-{j}" for j in range(BATCH - HITS)]
        texts = rng.sample(pool, HITS) + fresh
        rng.shuffle(texts)
        batches.append(texts)
    return pool, batches


def run_side(embedders, batches, up):
    """Total wall time over the batches (each batch: all instances at once,
    timed to the slowest) and the upstream calls made."""
    before = up.calls("embeddings")
    total = 0.0
    for texts in batches:
        results = [None] * len(embedders)
        start = threading.Barrier(len(embedders) + 1)

        def one(i, emb):
            start.wait()
            results[i] = emb.embed_documents(texts)

        threads = [threading.Thread(target=one, args=(i, e)) for i, e in enumerate(embedders)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        total += time.perf_counter() - t0
        if any(len(res or []) != len(texts) for res in results):
            raise RuntimeError("an instance returned the wrong number of vectors")
    return total, up.calls("embeddings") - before


def scenario(server, up, latency_ms, instances, seed):
    tag = f"{seed}-{instances}-{latency_ms}"
    sides = [build(server, up, tag) for _ in range(instances)]
    store_name = sides[0][2]
    pool, batches = workload(seed)
    up.latency(0)
    sides[0][0].embed_documents(pool)
    sides[0][1].embed_documents(pool)
    # Both caches must agree with each other before anything is timed.
    probe = batches[0][:5]
    a, b = sides[0][0].embed_documents(probe), sides[0][1].embed_documents(probe)
    if any(max(abs(x - y) for x, y in zip(u, v)) > 1e-6 for u, v in zip(a, b)):
        raise RuntimeError("the two caches disagree on a vector")
    up.latency(latency_ms)
    # Half the batches each way round, so drift lands on both alike.
    half = len(batches) // 2
    t_ours, c_ours = run_side([s[0] for s in sides], batches[:half], up)
    t_theirs, c_theirs = run_side([s[1] for s in sides], batches[:half], up)
    t2, c2 = run_side([s[1] for s in sides], batches[half:], up)
    t_theirs, c_theirs = t_theirs + t2, c_theirs + c2
    t2, c2 = run_side([s[0] for s in sides], batches[half:], up)
    t_ours, c_ours = t_ours + t2, c_ours + c2
    up.latency(0)
    return t_ours, c_ours, t_theirs, c_theirs, store_name, entry_sizes(server, tag, pool[0])


def entry_sizes(server, tag, text):
    """Bytes one cached vector takes as a value, on each side."""
    r = server.client()
    key = r.execute_command("EMBCACHE.KEY", f"bench-{tag}", MODEL, text)
    theirs = next(r.scan_iter(f"lc-{tag}*", count=1000))
    return r.strlen(key), r.strlen(theirs)


NEEDS = ("langchain_core", "langchain_openai", "langchain_classic")
PIP_NAMES = "langchain-core langchain-openai langchain-classic langchain-community"


def missing_packages():
    import importlib.util
    return [m for m in NEEDS if importlib.util.find_spec(m) is None]


def run():
    missing = missing_packages()
    if missing:
        # `make bench` installs none of these; the section says so instead of failing.
        return (f"## LangChain: `AICacheEmbeddings` vs `CacheBackedEmbeddings`\n\nNot run: "
                f"{', '.join(missing)} not installed (`.venv/bin/pip install {PIP_NAMES}`).\n")
    up = Upstream()
    server = Server(module_args=["upstream-url", up.url])
    rows = []
    store_name, sizes = "", (0, 0)
    try:
        n = 1
        for instances in (1, INSTANCES):
            for latency in LATENCIES_MS:
                t_o, c_o, t_t, c_t, store_name, sizes = scenario(server, up, latency, instances, n)
                rows.append((instances, latency, t_o, c_o, t_t, c_t))
                n += 1
    finally:
        server.stop()
        up.stop()
    import langchain_core
    table = []
    for i, (instances, latency, t_o, c_o, t_t, c_t) in enumerate(rows, 1):
        who = "1 app instance" if instances == 1 else f"{instances} app instances at once"
        table.append(
            f"| {i} | {who}, upstream latency {latency} ms | {t_o * 1e3:,.0f} ms | "
            f"{t_t * 1e3:,.0f} ms | **{t_t / t_o:.2f}x** | {c_o} / {c_t} |")
    body = "\n".join(table)
    return f"""## LangChain: `AICacheEmbeddings` vs `CacheBackedEmbeddings`

Command: `.venv/bin/python bench/langchain_compare.py`. langchain-core {langchain_core.__version__}.
Each row: {BATCHES} x `embed_documents` of {BATCH} texts ({HITS} warm, {BATCH - HITS} new),
{MODEL} (1536-d) from the fake upstream. Theirs: `CacheBackedEmbeddings` over {store_name}
and `OpenAIEmbeddings`, same redis-server, same fake upstream. Time: sum over batches of the
wall time until every instance had its vectors. Ratio: theirs / ours.

| # | scenario | ours | theirs | ratio | upstream calls (ours / theirs) |
|---|----------|------|--------|-------|--------------------------------|
{body}

With several instances, LangChain's cache is per process in effect: each instance that misses
calls the API, so the new texts are paid for once per instance; the module sends each new text
upstream once whichever instance asked first. Hits on their side also pay for JSON: a cached
vector is a JSON list of {sizes[1]:,} bytes (the fake's values are multiples of 1/128, so short;
real embeddings print longer) where the module stores {sizes[0]:,} bytes of FP32, and every
instance parses it. The instances here are threads of one Python process, so they share one
GIL: the side with more Python work per batch (theirs: JSON, HTTP) is slowed more than separate
processes on separate cores would be. The call counts do not depend on that.
"""


if __name__ == "__main__":
    print(run())
