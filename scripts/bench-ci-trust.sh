#!/usr/bin/env bash
# What a request with a CI provider's OIDC token pays to find the projects that trust
# it (benches/ci_trust.rs): the principal and the named project's confirmation, with
# 0, 1,000 and 100,000 other organizations' policies naming the same repository.
#   bash scripts/bench-ci-trust.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres_binaries
cargo bench --locked --bench ci_trust --no-run 2>/dev/null
BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/ci_trust-* | grep -v '\.d$' | head -n 1)
start_throwaway_postgres
trap stop_throwaway_postgres EXIT
psql -q "$PG_URL" -c "CREATE DATABASE kiln_bench"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); PostgreSQL $(psql -At "$PG_URL" -c 'SHOW server_version')"
BENCH_DB_URL="postgres://postgres@127.0.0.1:$PG_PORT/kiln_bench" "$BIN"
