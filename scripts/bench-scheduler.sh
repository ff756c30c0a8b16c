#!/usr/bin/env bash
# Scheduler scale benchmark (benches/scheduler.rs): 10,000 projects, 2,000 concurrent
# builds, the in-memory `sim` provider, real PostgreSQL with pg_stat_statements to count
# statements per decision.
#   bash scripts/bench-scheduler.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres_binaries
cargo bench --locked --bench scheduler --no-run
BENCH_BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/scheduler-* | grep -v '\.d$' | head -n 1)

start_throwaway_postgres
trap stop_throwaway_postgres EXIT
echo "shared_preload_libraries = 'pg_stat_statements'" >> "$PG_DIR/data/postgresql.conf"
as_pg "$(pg_bin_dir)/pg_ctl" -D "$PG_DIR/data" -o "-p $PG_PORT" -w restart >/dev/null
psql -q "$PG_URL" -c "CREATE DATABASE kiln_sched"
DB_URL="postgres://postgres@127.0.0.1:$PG_PORT/kiln_sched"
psql -q "$DB_URL" -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" || echo "pg_stat_statements unavailable: statement counts will read n/a"

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
BENCH_DATABASE_URL="$DB_URL" "$BENCH_BIN"
