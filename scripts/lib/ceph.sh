# A throwaway single-node Ceph cluster (1 mon, 1 osd with bluestore on a sparse file,
# 1 mgr) run as plain background processes: no systemd, no cephadm, no containers.
# Debian's Ceph 16.2 (Pacific). Source this file; it defines functions only.
#
#   ensure_ceph                 installs the packages when missing (root), or says how
#   ensure_ceph_client_libs     only what building kiln needs (librados-dev, librbd-dev)
#   start_throwaway_ceph        new cluster under $CEPH_DIR; sets CEPH_CONF, CEPH_POOL
#   restart_ceph                starts the daemons of an existing cluster again
#   start_rgw                   adds a RADOS Gateway (S3) with a user and a bucket; sets
#                               RGW_ENDPOINT, RGW_ACCESS_KEY, RGW_SECRET_KEY, RGW_BUCKET
#   stop_throwaway_ceph [--purge]
#
# Adapted from ../shared/ceph-lab/ceph-up.sh and ceph-down.sh.

CEPH_PACKAGES="ceph-mon ceph-osd ceph-mgr ceph-common librados-dev librbd-dev rbd-fuse radosgw"

ensure_ceph() {
  local missing=""
  for bin in ceph-mon ceph-osd ceph-mgr ceph rbd rbd-fuse radosgw; do
    command -v "$bin" >/dev/null 2>&1 || missing="$missing $bin"
  done
  for lib in librados.so librbd.so; do
    ldconfig -p 2>/dev/null | grep -q "$lib " || missing="$missing $lib"
  done
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing Ceph (apt-get install $CEPH_PACKAGES)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $CEPH_PACKAGES >/dev/null
    return 0
  fi
  echo "Ceph is missing ($missing ). Install it with:" >&2
  echo "    sudo apt-get install -y --no-install-recommends $CEPH_PACKAGES" >&2
  return 1
}

# kiln links librados and librbd (crates/kiln-ceph).
ensure_ceph_client_libs() {
  local missing=""
  for lib in librados.so librbd.so; do
    ldconfig -p 2>/dev/null | grep -q "$lib " || missing="$missing $lib"
  done
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing the Ceph client libraries (apt-get install librados-dev librbd-dev)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends librados-dev librbd-dev >/dev/null
    return 0
  fi
  echo "Building kiln needs the Ceph client libraries ($missing ). Install them with:" >&2
  echo "    sudo apt-get install -y --no-install-recommends librados-dev librbd-dev" >&2
  return 1
}

_ceph_port_free() { ! ss -Hltn "sport = :$1" | grep -q .; }

_ceph_wait() { # _ceph_wait <timeout_s> <what> <command...>
  local timeout=$1 what=$2; shift 2
  local end=$(( $(date +%s) + timeout ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$end" ]; then echo "timeout waiting for $what" >&2; return 1; fi
    sleep 0.25
  done
}

_ceph_start_daemons() {
  ceph-mon -i a
  _ceph_wait 60 "the Ceph monitor" timeout 10 ceph mon stat
  ceph-osd -i 0
  ceph-mgr -i x
  _ceph_wait 120 "the Ceph OSD" bash -c 'ceph osd stat -f json | grep -q "\"num_up_osds\":1"'
}

start_throwaway_ceph() {
  CEPH_DIR=${CEPH_DIR:-$(mktemp -d /var/tmp/kiln-ceph.XXXXXX)}
  CEPH_POOL=${CEPH_POOL:-kiln-cache}
  CEPH_CONF="$CEPH_DIR/ceph.conf"
  export CEPH_DIR CEPH_POOL CEPH_CONF
  mkdir -p "$CEPH_DIR"/{osd.0,mgr.x,run,log}
  local port="" p fsid mon_addr
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 20000 ))
    if _ceph_port_free "$p" && _ceph_port_free $((p + 1)); then port=$p; break; fi
  done
  [ -n "$port" ] || { echo "no free port for the Ceph monitor" >&2; return 1; }
  fsid=$(cat /proc/sys/kernel/random/uuid)
  mon_addr="[v2:127.0.0.1:${port},v1:127.0.0.1:$((port + 1))]"
  cat > "$CEPH_CONF" <<EOF
[global]
fsid = $fsid
mon host = $mon_addr
public addr = 127.0.0.1
ms bind port min = $((port + 2))
ms bind port max = $((port + 40))
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $CEPH_DIR/run
pid file = $CEPH_DIR/run/\$name.pid
admin socket = $CEPH_DIR/run/\$cluster-\$name.asok
log file = $CEPH_DIR/log/\$name.log
mon cluster log file = $CEPH_DIR/log/cluster.log
crash dir = $CEPH_DIR/crash
keyring = $CEPH_DIR/ceph.client.admin.keyring
osd crush chooseleaf type = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon max pg per osd = 1000
mon osd min down reporters = 1
debug ms = 0/0

[client]
admin socket = $CEPH_DIR/run/\$cluster-\$name.\$pid.\$cctid.asok
log file = $CEPH_DIR/log/client.\$pid.log
rbd default features = layering,exclusive-lock,object-map,fast-diff,deep-flatten
# Calls to a cluster that lost its OSD fail after this instead of waiting forever.
rados osd op timeout = 20
rados mon op timeout = 20

[mon]
mon data = $CEPH_DIR/mon.\$id
keyring = $CEPH_DIR/mon.\$id/keyring
mon data avail warn = 2
mon data avail crit = 1

[osd]
osd data = $CEPH_DIR/osd.\$id
keyring = $CEPH_DIR/osd.\$id/keyring
osd objectstore = bluestore
osd memory target = 939524096
bluestore block create = true
bluestore block size = $((20 * 1024 * 1024 * 1024))
bluestore fsck on mkfs = false
bluestore fsck on mount = false
bluestore cache autotune = false
bluestore cache size = 134217728
osd op num shards = 1
osd op num threads per shard = 2
osd class load list = *
osd class default list = *

[mgr]
mgr data = $CEPH_DIR/mgr.\$id
keyring = $CEPH_DIR/mgr.\$id/keyring
mgr initial modules = iostat
EOF
  ceph-authtool --create-keyring "$CEPH_DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$CEPH_DIR/ceph.client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$CEPH_DIR/mon.keyring" --import-keyring "$CEPH_DIR/ceph.client.admin.keyring" >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "$mon_addr" "$CEPH_DIR/monmap" >/dev/null
  ceph-mon --mkfs -i a --monmap "$CEPH_DIR/monmap" --keyring "$CEPH_DIR/mon.keyring"
  ceph-mon -i a
  _ceph_wait 60 "the Ceph monitor" timeout 10 ceph mon stat || return 1
  local osd_uuid osd_key
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  ceph-authtool --create-keyring "$CEPH_DIR/osd.0/keyring" --gen-key -n osd.0 >/dev/null
  osd_key=$(ceph-authtool -p -n osd.0 "$CEPH_DIR/osd.0/keyring")
  echo "{\"cephx_secret\": \"$osd_key\"}" > "$CEPH_DIR/osd.0/secret.json"
  ceph osd new "$osd_uuid" 0 -i "$CEPH_DIR/osd.0/secret.json" >/dev/null
  rm -f "$CEPH_DIR/osd.0/secret.json"
  ceph-osd -i 0 --mkfs --osd-uuid "$osd_uuid" 2> "$CEPH_DIR/log/osd.0.mkfs.err"
  ceph-osd -i 0
  ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    > "$CEPH_DIR/mgr.x/keyring"
  ceph-mgr -i x
  _ceph_wait 120 "the Ceph OSD" bash -c 'ceph osd stat -f json | grep -q "\"num_up_osds\":1"' || return 1
  ceph osd pool create "$CEPH_POOL" 8 8 replicated >/dev/null 2>&1
  ceph osd pool set "$CEPH_POOL" size 1 --yes-i-really-mean-it >/dev/null 2>&1 || true
  rbd pool init "$CEPH_POOL"
  _ceph_wait 120 "pool $CEPH_POOL" timeout 10 rbd ls "$CEPH_POOL"
}

# Starts the daemons of the cluster in $CEPH_DIR again (after stop_throwaway_ceph or a
# crash) and waits until its pool answers.
restart_ceph() {
  _ceph_start_daemons || return 1
  _ceph_wait 120 "pool $CEPH_POOL" timeout 10 rbd ls "$CEPH_POOL"
}

# A RADOS Gateway on the cluster: the S3 store of the model registry's tests. Answers
# after about 10 s (it creates its pools first).
start_rgw() {
  local port="" p
  for _ in $(seq 1 200); do
    p=$(( 40000 + RANDOM % 20000 ))
    if _ceph_port_free "$p"; then port=$p; break; fi
  done
  [ -n "$port" ] || { echo "no free port for radosgw" >&2; return 1; }
  mkdir -p "$CEPH_DIR/radosgw.gw"
  cat >> "$CEPH_CONF" <<EOF

[client.rgw.gw]
rgw data = $CEPH_DIR/radosgw.gw
keyring = $CEPH_DIR/radosgw.gw/keyring
rgw frontends = beast endpoint=127.0.0.1:$port
pid file = $CEPH_DIR/run/rgw.gw.pid
admin socket = $CEPH_DIR/run/ceph-client.rgw.gw.asok
log file = $CEPH_DIR/log/rgw.gw.log
rgw thread pool size = 32
rgw dns name = localhost
EOF
  ceph auth get-or-create client.rgw.gw mon 'allow rw' osd 'allow rwx' mgr 'allow rw' \
    > "$CEPH_DIR/radosgw.gw/keyring"
  radosgw -n client.rgw.gw
  RGW_ENDPOINT="http://127.0.0.1:$port"
  _ceph_wait 180 "radosgw" curl -fsS "$RGW_ENDPOINT/" || return 1
  # od reads a fixed count: no SIGPIPE for pipefail to trip on.
  RGW_ACCESS_KEY="KILN$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n' | tr 'a-f' 'A-F')"
  RGW_SECRET_KEY="$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')"
  RGW_BUCKET=kiln-models
  radosgw-admin user create --uid=kiln --display-name=kiln \
    --access-key="$RGW_ACCESS_KEY" --secret-key="$RGW_SECRET_KEY" >/dev/null
  # A signed PUT of the bucket (curl signs SigV4 itself; no S3 client to install). S3
  # wants the payload's hash in a header, which curl 7.88 does not add by itself.
  _ceph_wait 60 "bucket $RGW_BUCKET" curl -fsS -X PUT \
    -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
    --aws-sigv4 "aws:amz:us-east-1:s3" --user "$RGW_ACCESS_KEY:$RGW_SECRET_KEY" \
    "$RGW_ENDPOINT/$RGW_BUCKET" || return 1
  export RGW_ENDPOINT RGW_ACCESS_KEY RGW_SECRET_KEY RGW_BUCKET
}

stop_throwaway_ceph() {
  [ -n "${CEPH_DIR:-}" ] || return 0
  local name f pid
  for name in rgw.gw mgr.x osd.0 mon.a; do
    f="$CEPH_DIR/run/$name.pid"
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$f"
  done
  if [ "${1:-}" = --purge ]; then
    # FUSE mounts and loop devices left by tests that died go first.
    for m in $(findmnt -rn -o TARGET | grep -F "$CEPH_DIR" | sort -r); do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$CEPH_DIR"
  fi
}
