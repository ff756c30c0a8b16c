#!/usr/bin/env bash
# Build-path benchmarks (see benches/builds.rs): time to builder with an idle builder;
# time to builder when the builder must boot, long-poll vs pending/wait_ms; when a warm
# standby is adopted (its agent then starts BuildKit for the project); and
# ReportBuildHealth from 5,000 concurrent builds at 10x the CLI's real rate.
#   bash scripts/bench-builds.sh
# Everything runs on 127.0.0.1: PostgreSQL, kiln serve (release), local builders (the
# BuildKit stand-in) and the load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres_binaries

cargo build --release --locked --bin kiln --bin buildkitd-standin
cargo bench --locked --bench builds --no-run 2>/dev/null
BENCH_BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/builds-* | grep -v '\.d$' | head -n 1)
KILN="${CARGO_TARGET_DIR:-target}/release/kiln"

start_throwaway_postgres
KILN_PID=""
cleanup() { [ -n "$KILN_PID" ] && kill "$KILN_PID" 2>/dev/null; wait 2>/dev/null || true; stop_throwaway_postgres; }
trap cleanup EXIT

psql -q "$PG_URL" -c "CREATE DATABASE kiln_bench"
export KILN_DATABASE__URL="postgres://postgres@127.0.0.1:$PG_PORT/kiln_bench"
export KILN_LOG__FILTER=warn
# Every local builder registers from 127.0.0.1: keep the per-address limit on
# unauthenticated calls out of the latencies measured here.
export KILN_LIMITS__UNAUTHENTICATED_BURST=100000
export KILN_SECRETS__KEY_ENCRYPTION_KEY=$(head -c 32 /dev/urandom | base64)
PORT=$(( 40000 + (RANDOM % 10000) ))
export KILN_SERVER__LISTEN="127.0.0.1:$PORT"
export KILN_SERVER__PUBLIC_URL="http://127.0.0.1:$PORT"
export BENCH_URL="http://127.0.0.1:$PORT"

"$KILN" migrate >/dev/null
ORG=$("$KILN" admin --json org create --name Bench --owner-email bench@kiln.test | sed -E 's/.*"id":"([^"]+)".*/\1/')
export BENCH_TOKEN=$("$KILN" admin token create --kind user --user bench@kiln.test --name bench 2>/dev/null)
new_project() { "$KILN" admin --json project create --org "$ORG" --name "$1" | sed -E 's/.*"id":"([^"]+)".*/\1/'; }
export BENCH_PROJECT=$(new_project warm)
COLD_LONG=$(for i in $(seq 1 20); do new_project "long-$i"; done | paste -sd, -)
COLD_POLL=$(for i in $(seq 1 20); do new_project "poll-$i"; done | paste -sd, -)
WARM_POOL=$(for i in $(seq 1 20); do new_project "pool-$i"; done | paste -sd, -)

start_kiln() {
  "$KILN" serve &
  KILN_PID=$!
  for _ in $(seq 1 200); do curl -fsS "$BENCH_URL/readyz" >/dev/null 2>&1 && return; sleep 0.05; done
  echo "kiln did not become ready" >&2; exit 1
}
stop_kiln() { kill "$KILN_PID"; wait "$KILN_PID" || true; KILN_PID=""; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"

echo "== time to builder, idle builder"
start_kiln
BENCH_MODE=ttb BENCH_ITERATIONS="${BENCH_ITERATIONS:-1000}" BENCH_CONNECTIONS=1 "$BENCH_BIN"

echo "== time to builder, builder boots: long-poll (builds.connection_wait_seconds=20)"
BENCH_MODE=cold BENCH_PROJECTS="$COLD_LONG" BENCH_LABEL="long-poll" "$BENCH_BIN"
stop_kiln

echo "== time to builder, builder boots: pending/wait_ms=1000 (builds.connection_wait_seconds=0)"
KILN_BUILDS__CONNECTION_WAIT_SECONDS=0 start_kiln
BENCH_MODE=cold BENCH_PROJECTS="$COLD_POLL" BENCH_LABEL="pending wait_ms=1000" "$BENCH_BIN"
stop_kiln

echo "== time to builder, a warm standby is adopted (builders.warm_pool_amd64=20; kiln agent starts BuildKit for the project)"
KILN_BUILDERS__WARM_POOL_AMD64=20 start_kiln
for _ in $(seq 1 600); do
  READY=$(psql -tA "$KILN_DATABASE__URL" -c "SELECT count(*) FROM machines WHERE project_id IS NULL AND state = 'ready' AND serving")
  [ "$READY" -ge 20 ] && break; sleep 0.1
done
echo "standbys ready: $READY"
BENCH_MODE=cold BENCH_PROJECTS="$WARM_POOL" BENCH_LABEL="warm standby adopted" "$BENCH_BIN"
stop_kiln

echo "== ReportBuildHealth: 5000 builds, 10000 calls/s (10x one call per 5 s per build)"
start_kiln
WRITES_BEFORE=$(curl -fsS "$BENCH_URL/metrics" | awk '/^kiln_build_health_writes_total/{print $2}')
BENCH_MODE=health BENCH_BUILDS=5000 BENCH_RATE=10000 BENCH_SECONDS="${BENCH_SECONDS:-20}" BENCH_CONNECTIONS=8 "$BENCH_BIN"
WRITES_AFTER=$(curl -fsS "$BENCH_URL/metrics" | awk '/^kiln_build_health_writes_total/{print $2}')
echo "coalesced health UPDATE statements during the run: $(( ${WRITES_AFTER:-0} - ${WRITES_BEFORE:-0} ))"
echo "RSS of kiln after the run: $(awk '/VmRSS/{print $2, $3}' /proc/$KILN_PID/status)"
