# The browser for the dashboard's end-to-end test: Debian's chromium (never a downloaded
# browser) driven by npm playwright-core, pinned and installed outside the checkout.
# Source this file.

PLAYWRIGHT_CORE_VERSION="1.65.1"

# ensure_browser: sets and exports TEST_CHROMIUM (the browser binary) and
# TEST_PLAYWRIGHT_DIR (a directory whose node_modules holds playwright-core).
ensure_browser() {
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "==> installing Debian's chromium (apt-get install chromium)" >&2
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
      echo "chromium is missing: sudo apt-get install -y --no-install-recommends chromium" >&2
      return 1
    fi
  fi
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
