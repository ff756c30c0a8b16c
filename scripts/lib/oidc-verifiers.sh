# Third-party JWT/OIDC verifiers the issuer's tokens are checked with: PyJWT (with
# PyJWKClient) and authlib (strict discovery validation) from PyPI in a venv, and npm
# `jose`, each pinned and installed outside the checkout. Source this file.

PYJWT_VERSION="2.10.1"
AUTHLIB_VERSION="1.6.5"
JOSE_VERSION="6.1.0"

# ensure_oidc_verifiers: sets and exports TEST_OIDC_PYTHON (a python with jwt and authlib)
# and TEST_JOSE_DIR (a directory whose node_modules holds jose).
ensure_oidc_verifiers() {
  local venv="${OIDC_VERIFIERS_VENV:-/var/tmp/kiln-oidc-verifiers}"
  if ! "$venv/bin/python" -c "import jwt, authlib, sys; sys.exit(0 if (jwt.__version__, authlib.__version__) == ('$PYJWT_VERSION', '$AUTHLIB_VERSION') else 1)" 2>/dev/null; then
    echo "==> installing PyJWT $PYJWT_VERSION and authlib $AUTHLIB_VERSION into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" || { rm -rf "$venv"; return 1; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      "pyjwt[crypto]==$PYJWT_VERSION" "authlib==$AUTHLIB_VERSION" || { rm -rf "$venv"; return 1; }
  fi
  local jose="${JOSE_CACHE:-/var/tmp/kiln-jose}/$JOSE_VERSION"
  if [ ! -f "$jose/node_modules/jose/package.json" ]; then
    echo "==> installing jose@$JOSE_VERSION (npm) into $jose" >&2
    rm -rf "$jose" && mkdir -p "$jose"
    (cd "$jose" && npm install --silent --no-audit --no-fund "jose@$JOSE_VERSION" >/dev/null) \
      || { rm -rf "$jose"; return 1; }
  fi
  TEST_OIDC_PYTHON="$venv/bin/python"
  TEST_JOSE_DIR="$jose"
  export TEST_OIDC_PYTHON TEST_JOSE_DIR
}
