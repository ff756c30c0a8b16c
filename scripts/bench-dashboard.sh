#!/usr/bin/env bash
# Dashboard benchmarks (see benches/dashboard.rs): the server time and size of each page
# for a project with 1,000 builds, through Kiln's HTTP router in process with a session.
#   bash scripts/bench-dashboard.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres_binaries

cargo bench --locked --bench dashboard --no-run 2>/dev/null
BENCH_BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/dashboard-* | grep -v '\.d$' | head -n 1)

start_throwaway_postgres
trap stop_throwaway_postgres EXIT
psql -q "$PG_URL" -c "CREATE DATABASE kiln_bench"
export BENCH_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/kiln_bench"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $("$(pg_bin_dir)/postgres" --version)"
"$BENCH_BIN"
