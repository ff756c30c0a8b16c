#!/usr/bin/env bash
# Runs Kiln on this machine with no setup: installs PostgreSQL's server binaries and the
# Ceph client libraries kiln links if they are missing (as root; otherwise prints the
# apt line) and the pinned depot CLI
# (npm), builds kiln and the local BuildKit stand-in, then runs `kiln dev`, which starts
# a throwaway PostgreSQL under ./.kiln, seeds a dev org/project/token and serves.
#   bash scripts/dev.sh                      # http://127.0.0.1:8080
#   bash scripts/dev.sh --listen 0.0.0.0:9000
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
source scripts/lib/depot-cli.sh
source scripts/lib/ceph.sh
ensure_postgres_binaries
ensure_ceph_client_libs
# The CLI is a convenience: kiln dev names it in its hint. Without npm, carry on.
if ensure_depot_cli; then
  export KILN_DEV__DEPOT_CLI="$TEST_DEPOT_CLI"
fi
# Both binaries: local builders run `kiln agent` around the stand-in found next to kiln.
# The debug profile shares its build with the tests and compiles the AWS SDK in minutes
# rather than a quarter of an hour on 2 cores; it is plenty for one machine's builds.
cargo build --locked --bin kiln --bin buildkitd-standin
exec "${CARGO_TARGET_DIR:-target}/debug/kiln" dev "$@"
