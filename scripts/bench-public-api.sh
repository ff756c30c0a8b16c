#!/usr/bin/env bash
# Public API benchmarks (see benches/public_api.rs): ListBuilds and GetBuildSteps on a
# project with 100,000 builds, at page size 50, first and deep pages; GetUsage over a
# month of 1,000,000 builds beside a scan of the same builds; FinishBuild's aggregate
# upkeep. Server-side: requests run through Kiln's HTTP router in process.
#   bash scripts/bench-public-api.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres_binaries

cargo bench --locked --bench public_api --no-run 2>/dev/null
BENCH_BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/public_api-* | grep -v '\.d$' | head -n 1)

start_throwaway_postgres
trap stop_throwaway_postgres EXIT
psql -q "$PG_URL" -c "CREATE DATABASE kiln_bench"
export BENCH_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/kiln_bench"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $("$(pg_bin_dir)/postgres" --version)"
"$BENCH_BIN"
