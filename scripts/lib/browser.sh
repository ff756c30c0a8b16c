# The browser for the dashboard's end-to-end test: Debian's chromium (never a downloaded
# browser) driven by npm playwright-core, pinned and installed outside the checkout.
# Source this file.
source "$(dirname "${BASH_SOURCE[0]}")/debian.sh"

PLAYWRIGHT_CORE_VERSION="1.65.1"

# ensure_browser: sets and exports TEST_CHROMIUM (the browser binary) and
# TEST_PLAYWRIGHT_DIR (a directory whose node_modules holds playwright-core).
ensure_browser() {
  ensure_debian_package chromium chromium || return 1
  local dir="${PLAYWRIGHT_CACHE:-/var/tmp/kiln-playwright}/$PLAYWRIGHT_CORE_VERSION"
  if [ ! -f "$dir/node_modules/playwright-core/package.json" ]; then
    echo "==> installing playwright-core@$PLAYWRIGHT_CORE_VERSION (npm) into $dir" >&2
    rm -rf "$dir" && mkdir -p "$dir"
    (cd "$dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-audit --no-fund \
      "playwright-core@$PLAYWRIGHT_CORE_VERSION" >/dev/null) || { rm -rf "$dir"; return 1; }
  fi
  TEST_CHROMIUM=/usr/bin/chromium
  TEST_PLAYWRIGHT_DIR="$dir"
  export TEST_CHROMIUM TEST_PLAYWRIGHT_DIR
}
