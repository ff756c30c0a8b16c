#!/usr/bin/env bash
# Layer-cache benchmarks on a throwaway single-node Ceph cluster (see benches/cache.rs):
# allocator operations beside the rbd CLI, metering 1,000 volumes, rbd-fuse throughput,
# and time to builder when a warm standby is adopted with the project's volume attached
# and mounted (beside the same adoption with a directory volume).
#   bash scripts/bench-cache.sh
# Everything runs on 127.0.0.1: PostgreSQL, Ceph, kiln serve (release), local builders
# (kiln agent + the BuildKit stand-in, volumes through rbd-fuse and loop devices).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
source scripts/lib/ceph.sh
ensure_postgres_binaries
ensure_ceph

cargo build --release --locked --bin kiln --bin buildkitd-standin
cargo bench --locked --bench cache --no-run 2>/dev/null
cargo bench --locked --bench builds --no-run 2>/dev/null
CACHE_BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/cache-* | grep -v '\.d$' | head -n 1)
BUILDS_BIN=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/builds-* | grep -v '\.d$' | head -n 1)
KILN="${CARGO_TARGET_DIR:-target}/release/kiln"

KILN_PID=""
BUILDERS_DIR=$(mktemp -d /var/tmp/kiln-bench-builders.XXXXXX)
cleanup() {
  [ -n "$KILN_PID" ] && kill "$KILN_PID" 2>/dev/null
  wait 2>/dev/null || true
  for m in $(findmnt -rn -o TARGET | grep -F "$BUILDERS_DIR" | sort -r); do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$BUILDERS_DIR"
  stop_throwaway_ceph --purge
  stop_throwaway_postgres
}
start_throwaway_postgres
trap cleanup EXIT
start_throwaway_ceph

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), Ceph $(ceph --version | awk '{print $3}') (1 mon, 1 osd bluestore on a sparse file)"

psql -q "$PG_URL" -c "CREATE DATABASE kiln_bench_ops"
export BENCH_DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/kiln_bench_ops"
echo "== allocator operations, Kiln beside the rbd CLI"
BENCH_MODE=ops BENCH_ITERATIONS="${BENCH_ITERATIONS:-30}" "$CACHE_BIN"
echo "== metering"
BENCH_MODE=meter BENCH_VOLUMES="${BENCH_VOLUMES:-1000}" "$CACHE_BIN"
echo "== an attached volume (rbd-fuse + loop + ext4)"
BENCH_MODE=fuse "$CACHE_BIN"

echo "== time to builder, a warm standby adopted with the project's volume"
psql -q "$PG_URL" -c "CREATE DATABASE kiln_bench"
export KILN_DATABASE__URL="postgres://postgres@127.0.0.1:$PG_PORT/kiln_bench"
export KILN_LOG__FILTER="warn,kiln::agent::volume=info"
export KILN_LIMITS__UNAUTHENTICATED_BURST=100000
export KILN_SECRETS__KEY_ENCRYPTION_KEY=$(head -c 32 /dev/urandom | base64)
export KILN_BUILDERS__LOCAL__STATE_DIR="$BUILDERS_DIR"
export KILN_CACHE__CREATE_ON=project
PORT=$(( 40000 + (RANDOM % 10000) ))
export KILN_SERVER__LISTEN="127.0.0.1:$PORT"
export KILN_SERVER__PUBLIC_URL="http://127.0.0.1:$PORT"
export BENCH_URL="http://127.0.0.1:$PORT"
POOL_SIZE=${BENCH_POOL:-20}

"$KILN" migrate >/dev/null
ORG=$("$KILN" admin --json org create --name Bench --owner-email bench@kiln.test | sed -E 's/.*"id":"([^"]+)".*/\1/')
export BENCH_TOKEN=$("$KILN" admin token create --kind user --user bench@kiln.test --name bench 2>/dev/null)
new_project() { "$KILN" admin --json project create --org "$ORG" --name "$1" | sed -E 's/.*"id":"([^"]+)".*/\1/'; }
q() { psql -tA "$KILN_DATABASE__URL" -c "$1"; }

start_kiln() {
  "$KILN" serve &
  KILN_PID=$!
  for _ in $(seq 1 200); do curl -fsS "$BENCH_URL/readyz" >/dev/null 2>&1 && return; sleep 0.05; done
  echo "kiln did not become ready" >&2; exit 1
}
stop_kiln() { kill "$KILN_PID"; wait "$KILN_PID" || true; KILN_PID=""; }
wait_for() { # wait_for <what> <sql returning true>
  for _ in $(seq 1 1200); do [ "$(q "$2")" = t ] && return; sleep 0.1; done
  echo "timed out waiting for $1" >&2; exit 1
}

# One round: POOL_SIZE projects adopt POOL_SIZE ready standbys, one build each.
adopt_round() { # adopt_round <label> <projects>
  wait_for "$POOL_SIZE standbys" "SELECT count(*) >= $POOL_SIZE FROM machines WHERE project_id IS NULL AND state = 'ready' AND serving"
  BENCH_MODE=cold BENCH_ITERATIONS="$POOL_SIZE" BENCH_PROJECTS="$2" BENCH_LABEL="$1" "$BUILDS_BIN"
}
# The round's builders are reaped (drained and terminated; their volumes let go).
reap_all() {
  q "UPDATE machines SET state = 'draining' WHERE project_id IS NOT NULL AND state IN ('ready', 'assigned')" >/dev/null
  wait_for "the builders to end" "SELECT count(*) = 0 FROM machines WHERE project_id IS NOT NULL AND state NOT IN ('terminated', 'failed')"
  wait_for "the volumes to be let go" "SELECT count(*) = 0 FROM volumes WHERE state = 'attached'"
}

for provider in local ceph; do
  export KILN_CACHE__PROVIDER=$provider
  if [ "$provider" = ceph ]; then
    # Volumes are thin; the throwaway cluster's raw size (20 GiB) would not admit twenty
    # 50 GiB caches.
    export KILN_CACHE__CEPH__CONF_PATH="$CEPH_CONF" KILN_CACHE__CEPH__POOL="$CEPH_POOL" \
      KILN_CACHE__CAPACITY_GB=100000
  else
    export KILN_CACHE__LOCAL__DIR="$BUILDERS_DIR/cache"
  fi
  PROJECTS=""
  for i in $(seq 1 "$POOL_SIZE"); do
    id=$(new_project "$provider-$i")
    PROJECTS="${PROJECTS:+$PROJECTS,}$id"
  done
  KILN_BUILDERS__WARM_POOL_AMD64=$POOL_SIZE start_kiln
  wait_for "the projects' volumes" "SELECT count(*) = 0 FROM volumes WHERE state = 'creating'"
  adopt_round "standby adopted, $provider volume, first use (formats it)" "$PROJECTS"
  reap_all
  adopt_round "standby adopted, $provider volume attached and mounted" "$PROJECTS"
  reap_all
  adopt_round "standby adopted, $provider volume attached and mounted (again)" "$PROJECTS"
  if [ "$provider" = ceph ]; then
    # The agents' own account of each attach (one log line per attach, with its steps).
    cat "$BUILDERS_DIR"/*/builder.log 2>/dev/null | grep -a "attached the cache volume" \
      | sed -E 's/\x1b\[[0-9;]*m//g; s/.*took_ms=([0-9]+).*/\1/' | sort -n \
      | awk '{ v[NR] = $1 } END { if (NR) printf "agent attach of a ceph volume inside adoption: n=%d p50=%d ms p99=%d ms max=%d ms\n", NR, v[int((NR + 1) / 2)], v[int(NR * 0.99 + 0.999)], v[NR] }'
  fi
  stop_kiln
  q "UPDATE machines SET state = 'terminated' WHERE state NOT IN ('terminated', 'failed')" >/dev/null
done
