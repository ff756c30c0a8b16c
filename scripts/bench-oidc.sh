#!/usr/bin/env bash
# OIDC token verification throughput with the key set cached: Kiln's verifier
# (benches/oidc.rs, all cores) beside PyJWT on the same token and key (one process per
# core, the key parsed once), in the same run. Then the fork pull request claim -> token
# latency against a release `kiln serve` (benches/oidc_claims.rs).
#   bash scripts/bench-oidc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/oidc-verifiers.sh
ensure_oidc_verifiers
cargo bench --locked --bench oidc --no-run 2>/dev/null
BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/oidc-* | grep -v '\.d$' | head -n 1)
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
SECONDS_EACH=${BENCH_SECONDS:-5}
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
BENCH_OUT="$OUT" BENCH_SECONDS="$SECONDS_EACH" "$BIN"
cores=$(nproc)
for i in $(seq 1 "$cores"); do
  "$TEST_OIDC_PYTHON" - "$OUT" "$SECONDS_EACH" <<'PY' &
import json, sys, time
import jwt
bench = json.load(open(sys.argv[1]))
key = jwt.PyJWK(bench["jwk"]).key
token, seconds, done = bench["token"], float(sys.argv[2]), 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    jwt.decode(token, key, algorithms=["RS256"], audience=bench["audience"], issuer=bench["issuer"])
    done += 1
print(done / seconds)
PY
done | awk -v cores="$cores" '{ total += $1 } END { printf "PyJWT %s (%d processes): %.0f/s\n", "'"$(${TEST_OIDC_PYTHON} -c 'import jwt; print(jwt.__version__)')"'", cores, total }'

# Claim -> token latency of the fork pull request flow (benches/oidc_claims.rs): a
# release `kiln serve` on PostgreSQL, with a GitHub stand-in inside the bench process.
source scripts/lib/postgres.sh
ensure_postgres_binaries
cargo build --release --locked --bin kiln
cargo bench --locked --bench oidc_claims --no-run 2>/dev/null
CLAIMS_BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/oidc_claims-* | grep -v '\.d$' | head -n 1)
KILN="${CARGO_TARGET_DIR:-target}/release/kiln"
start_throwaway_postgres
KILN_PID=""
trap 'rm -f "$OUT"; rm -rf "${CACHE_DIR:-}"; [ -n "$KILN_PID" ] && kill "$KILN_PID" 2>/dev/null; wait 2>/dev/null || true; stop_throwaway_postgres' EXIT
psql -q "$PG_URL" -c "CREATE DATABASE kiln_bench"
export KILN_DATABASE__URL="postgres://postgres@127.0.0.1:$PG_PORT/kiln_bench"
export KILN_LOG__FILTER=warn
# A cache directory of its own: another installation's leftovers are not this one's.
CACHE_DIR=$(mktemp -d)
export KILN_CACHE__LOCAL__DIR="$CACHE_DIR"
export KILN_SECRETS__KEY_ENCRYPTION_KEY=$(head -c 32 /dev/urandom | base64)
PORT=$(( 40000 + (RANDOM % 10000) ))
GITHUB_PORT=$(( PORT + 1 ))
export KILN_SERVER__LISTEN="127.0.0.1:$PORT" KILN_SERVER__PUBLIC_URL="http://127.0.0.1:$PORT"
export KILN_OIDC__GITHUB__API_URL="http://127.0.0.1:$GITHUB_PORT"
export KILN_OIDC__GITHUB__WEB_URL="http://127.0.0.1:$GITHUB_PORT"
export KILN_OIDC__GITHUB__WEB_SESSION=bench
export KILN_OIDC__CLAIMS__PER_CLIENT_BURST=1000000 KILN_OIDC__CLAIMS__MAX_PENDING_PER_REPOSITORY=1000000
"$KILN" migrate >/dev/null
"$KILN" serve &
KILN_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
BENCH_URL="http://127.0.0.1:$PORT" BENCH_GITHUB_PORT=$GITHUB_PORT "$CLAIMS_BIN"
