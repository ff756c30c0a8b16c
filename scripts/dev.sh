#!/usr/bin/env bash
# Runs Kiln on this machine with no setup: installs PostgreSQL's server binaries if
# they are missing (as root; otherwise prints the apt line), builds kiln and the local
# BuildKit stand-in, then runs `kiln dev`, which starts a throwaway PostgreSQL under
# ./.kiln, seeds a dev org/project/token and serves.
#   bash scripts/dev.sh                      # http://127.0.0.1:8080
#   bash scripts/dev.sh --listen 0.0.0.0:9000
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
ensure_postgres_binaries
# Both binaries: local builders run the stand-in found next to kiln.
cargo build --release --locked --bin kiln --bin buildkitd-standin
exec "${CARGO_TARGET_DIR:-target}/release/kiln" dev "$@"
