# The official Node SDK of the Depot API (@depot/sdk-node, npm), pinned, installed outside
# the checkout for the public API tests. Source this file.

DEPOT_SDK_VERSION="1.4.0"

# ensure_depot_sdk: sets and exports TEST_DEPOT_SDK_DIR (a directory whose node_modules
# holds @depot/sdk-node and its Connect runtime).
ensure_depot_sdk() {
  local dir="${DEPOT_SDK_CACHE:-/var/tmp/kiln-depot-sdk}/$DEPOT_SDK_VERSION"
  if [ ! -f "$dir/node_modules/@depot/sdk-node/package.json" ]; then
    echo "==> installing @depot/sdk-node@$DEPOT_SDK_VERSION (npm) into $dir" >&2
    rm -rf "$dir" && mkdir -p "$dir"
    (cd "$dir" && npm install --silent --no-audit --no-fund "@depot/sdk-node@$DEPOT_SDK_VERSION" >/dev/null) \
      || { rm -rf "$dir"; return 1; }
  fi
  TEST_DEPOT_SDK_DIR="$dir"
  export TEST_DEPOT_SDK_DIR
}
