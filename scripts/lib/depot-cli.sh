# The unmodified depot CLI the end-to-end tests drive, pinned to one release and
# installed from the npm registry into a cache outside the checkout. Source this file.

DEPOT_CLI_VERSION="0.0.1-cli.2.102.12"

ensure_depot_cli() {
  local dir="${DEPOT_CLI_CACHE:-/var/tmp/kiln-depot-cli}/$DEPOT_CLI_VERSION"
  if [ ! -x "$dir/package/bin/depot" ]; then
    if ! command -v npm >/dev/null 2>&1; then
      if [ "$(id -u)" = 0 ]; then
        echo "==> installing npm (apt-get install -y npm)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
      else
        echo "npm is missing: sudo apt-get install -y npm" >&2
        return 1
      fi
    fi
    echo "==> installing @depot/cli-linux-x64@$DEPOT_CLI_VERSION" >&2
    rm -rf "$dir" && mkdir -p "$dir"
    (cd "$dir" && npm pack --silent "@depot/cli-linux-x64@$DEPOT_CLI_VERSION" >/dev/null \
      && tar xzf "depot-cli-linux-x64-$DEPOT_CLI_VERSION.tgz") || { rm -rf "$dir"; return 1; }
  fi
  TEST_DEPOT_CLI="$dir/package/bin/depot"
  export TEST_DEPOT_CLI
  "$TEST_DEPOT_CLI" --version | head -n 1 >&2
}
