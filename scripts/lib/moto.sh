# moto_server, an in-process fake of AWS APIs, for kiln-ec2's tests. Pinned, installed
# into a Python venv outside the checkout, started on a free loopback port. Source this
# file; it defines functions only.

MOTO_VERSION="5.2.5"

# ensure_moto: creates (or reuses) the venv and sets MOTO_VENV. Installs Debian's
# python3-venv when root and the venv module is missing.
ensure_moto() {
  MOTO_VENV="${MOTO_VENV:-/var/tmp/kiln-moto}"
  if [ -x "$MOTO_VENV/bin/moto_server" ] \
    && [ "$("$MOTO_VENV/bin/python" -c 'import moto; print(moto.__version__)' 2>/dev/null)" = "$MOTO_VERSION" ]; then
    export MOTO_VENV
    return 0
  fi
  local py
  py=$(command -v python3 || true)
  rm -rf "$MOTO_VENV"
  if [ -z "$py" ] || ! "$py" -m venv "$MOTO_VENV" >/dev/null 2>&1; then
    rm -rf "$MOTO_VENV"
    if [ "$(id -u)" = 0 ]; then
      echo "==> installing python3-venv (apt-get install -y python3-venv)" >&2
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      py=/usr/bin/python3
      "$py" -m venv "$MOTO_VENV" || { rm -rf "$MOTO_VENV"; return 1; }
    else
      echo "python3's venv module is missing. Install it with:" >&2
      echo "    sudo apt-get install -y python3-venv" >&2
      return 1
    fi
  fi
  echo "==> installing moto[server]==$MOTO_VERSION into $MOTO_VENV" >&2
  "$MOTO_VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" \
    || { rm -rf "$MOTO_VENV"; return 1; }
  export MOTO_VENV
}

# start_moto: starts moto_server on a free 127.0.0.1 port and waits until its control API
# answers. Sets MOTO_PID, MOTO_LOG and TEST_MOTO_URL.
start_moto() {
  local port
  MOTO_PID=""
  port=$("$MOTO_VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  MOTO_LOG=$(mktemp /var/tmp/kiln-moto-log.XXXXXX)
  # Tests register the AMIs they launch from, so the ~1,300 default AMIs (a few seconds to
  # load per region) are not needed; validation makes moto reject unknown AMIs and types
  # as EC2 would.
  MOTO_EC2_LOAD_DEFAULT_AMIS=false \
    MOTO_ENABLE_AMI_VALIDATION=true \
    MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION=true \
    "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$MOTO_LOG" 2>&1 &
  MOTO_PID=$!
  TEST_MOTO_URL="http://127.0.0.1:$port"
  export MOTO_PID MOTO_LOG TEST_MOTO_URL
  if ! "$MOTO_VENV/bin/python" - "$TEST_MOTO_URL/moto-api/" "$MOTO_PID" <<'PY'
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("moto_server exited")
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit("moto_server did not answer within 60 s")
PY
  then
    echo "could not start moto_server; its log:" >&2
    cat "$MOTO_LOG" >&2
    stop_moto
    return 1
  fi
}

stop_moto() {
  if [ -n "${MOTO_PID:-}" ]; then
    kill "$MOTO_PID" 2>/dev/null || true
    wait "$MOTO_PID" 2>/dev/null || true
    MOTO_PID=""
  fi
  if [ -n "${MOTO_LOG:-}" ]; then rm -f "$MOTO_LOG"; MOTO_LOG=""; fi
}
