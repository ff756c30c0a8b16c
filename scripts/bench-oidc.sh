#!/usr/bin/env bash
# OIDC token verification throughput with the key set cached: Kiln's verifier
# (benches/oidc.rs, all cores) beside PyJWT on the same token and key (one process per
# core, the key parsed once), in the same run.
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
