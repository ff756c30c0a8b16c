#!/usr/bin/env bash
# A bounded fuzz run of the Connect decoding (fuzz/fuzz_targets/connect_decode.rs).
#   bash scripts/fuzz.sh [seconds]     # default 60
# Installs cargo-fuzz if missing. Uses the stable toolchain without sanitizers, which is
# what this machine has; crashes land in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN="${1:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
mkdir -p fuzz/corpus/connect_decode
# Seed with real request bodies of the depot CLI (from the wire contract).
printf '\x0a\x07proj123\x12\x02\x08\x01' > fuzz/corpus/connect_decode/create_build
printf '\x00\x00\x00\x00\x0d\x0a\x0blogin-req-1' > fuzz/corpus/connect_decode/finish_login
printf '{"projectId":"p","options":[{"command":"COMMAND_BUILD"}]}' > fuzz/corpus/connect_decode/json
RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none connect_decode fuzz/corpus/connect_decode -- \
  -max_total_time="$SECONDS_TO_RUN" -max_len=65536
