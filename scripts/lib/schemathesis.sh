# schemathesis (PyPI), pinned, in a venv outside the checkout: the property-based API
# tester run against Kiln's /api/v1/openapi.json by tests/rest_openapi.rs. Source this file.

SCHEMATHESIS_VERSION="4.32.5"

# ensure_schemathesis: sets and exports TEST_SCHEMATHESIS (the `st` executable).
ensure_schemathesis() {
  local venv="${SCHEMATHESIS_VENV:-/var/tmp/kiln-schemathesis}"
  if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('schemathesis') == '$SCHEMATHESIS_VERSION' else 1)" 2>/dev/null; then
    echo "==> installing schemathesis $SCHEMATHESIS_VERSION into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" || { rm -rf "$venv"; return 1; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      "schemathesis==$SCHEMATHESIS_VERSION" || { rm -rf "$venv"; return 1; }
  fi
  TEST_SCHEMATHESIS="$venv/bin/st"
  export TEST_SCHEMATHESIS
}
