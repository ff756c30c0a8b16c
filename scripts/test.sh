#!/usr/bin/env bash
# Runs every test. Installs what the tests need (PostgreSQL's server binaries, the pinned
# depot CLI from npm), starts a throwaway PostgreSQL cluster for them, runs the whole
# suite, and cleans up.
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh jobs       # extra args go to the test runner (a filter here)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
source scripts/lib/depot-cli.sh

ensure_postgres_binaries
ensure_depot_cli
start_throwaway_postgres
trap stop_throwaway_postgres EXIT
echo "==> PostgreSQL for tests at 127.0.0.1:$PG_PORT"

# Tests create one database each from this server.
export TEST_PG_ADMIN_URL="$PG_URL"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --lib --bins --tests --no-fail-fast "$@"
else
  cargo test --lib --bins --tests --no-fail-fast "$@"
fi
