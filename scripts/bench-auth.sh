#!/usr/bin/env bash
# Benchmark: idle RSS of `kiln serve`, and throughput/latency of an authenticated no-op
# request (GET /api/v1/me with a user token) at 200 concurrent connections.
#   bash scripts/bench-auth.sh [duration_seconds]
#   BENCH_KILN=/path/to/other/kiln bash scripts/bench-auth.sh   # measure another build
# Needs wrk (installed from Debian when run as root). Load goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
DURATION="${1:-20}"

ensure_postgres_binaries
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else
    echo "wrk is missing: sudo apt-get install -y wrk" >&2; exit 1
  fi
fi

if [ -n "${BENCH_KILN:-}" ]; then
  KILN="$BENCH_KILN"
else
  cargo build --release --locked --bin kiln
  KILN="${CARGO_TARGET_DIR:-target}/release/kiln"
fi

start_throwaway_postgres
KILN_PID=""
cleanup() { [ -n "$KILN_PID" ] && kill "$KILN_PID" 2>/dev/null; wait 2>/dev/null; stop_throwaway_postgres; }
trap cleanup EXIT

psql -q "$PG_URL" -c "CREATE DATABASE kiln_bench"
export KILN_DATABASE__URL="postgres://postgres@127.0.0.1:$PG_PORT/kiln_bench"
export KILN_LOG__FILTER=warn
PORT=$(( 40000 + (RANDOM % 10000) ))
export KILN_SERVER__LISTEN="127.0.0.1:$PORT"

"$KILN" migrate >/dev/null
"$KILN" admin --json org create --name Bench --owner-email bench@kiln.test >/dev/null
TOKEN=$("$KILN" admin token create --kind user --user bench@kiln.test --name bench 2>/dev/null)

"$KILN" serve &
KILN_PID=$!
for _ in $(seq 1 200); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.05
done
sleep 2
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
echo "idle RSS: $(awk '/VmRSS/{print $2, $3}' /proc/$KILN_PID/status)"

# Warm the token cache and connections, then measure.
wrk -t2 -c200 -d3s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/api/v1/me" >/dev/null
wrk -t2 -c200 -d"${DURATION}s" --latency -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/api/v1/me"
echo "RSS after load: $(awk '/VmRSS/{print $2, $3}' /proc/$KILN_PID/status)"
