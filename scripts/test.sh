#!/usr/bin/env bash
# Runs every test of the workspace. Installs what the tests need (PostgreSQL's server
# binaries, Debian's Ceph, the pinned depot CLI from npm, moto from PyPI into a venv,
# PyJWT/authlib from PyPI and jose from npm as third-party token verifiers, the official
# Node SDK of the Depot API from npm, schemathesis from PyPI for the REST API's OpenAPI
# document, Debian's chromium and npm playwright-core for the dashboard's browser test,
# Debian's skopeo for the model images),
# starts a throwaway PostgreSQL cluster, a single-node Ceph cluster and a moto_server for
# them, runs the whole suite, and cleans up.
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh jobs       # extra args go to the test runner (a filter here)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/postgres.sh
source scripts/lib/depot-cli.sh
source scripts/lib/moto.sh
source scripts/lib/ceph.sh
source scripts/lib/oidc-verifiers.sh
source scripts/lib/depot-sdk.sh
source scripts/lib/schemathesis.sh
source scripts/lib/browser.sh
source scripts/lib/oci-clients.sh

cleanup() {
  stop_moto
  stop_throwaway_ceph --purge
  stop_throwaway_postgres
}

ensure_postgres_binaries
ensure_ceph
ensure_depot_cli
ensure_moto
ensure_oidc_verifiers
ensure_depot_sdk
ensure_schemathesis
ensure_browser
ensure_oci_clients
start_throwaway_postgres
trap cleanup EXIT
echo "==> PostgreSQL for tests at 127.0.0.1:$PG_PORT"
# Ceph tests (crates/kiln-ceph, the cache allocator) find it through TEST_CEPH_CONF.
start_throwaway_ceph
export TEST_CEPH_CONF="$CEPH_CONF" TEST_CEPH_POOL="$CEPH_POOL" TEST_CEPH_DIR="$CEPH_DIR"
echo "==> Ceph for tests: $TEST_CEPH_CONF (pool $TEST_CEPH_POOL)"
# The model registry's S3 store tests use its RADOS Gateway.
start_rgw
export TEST_S3_ENDPOINT="$RGW_ENDPOINT" TEST_S3_ACCESS_KEY="$RGW_ACCESS_KEY" \
  TEST_S3_SECRET_KEY="$RGW_SECRET_KEY" TEST_S3_BUCKET="$RGW_BUCKET"
echo "==> S3 (radosgw) for tests at $TEST_S3_ENDPOINT, bucket $TEST_S3_BUCKET"
# kiln-ec2's tests (crates/kiln-ec2/tests/moto.rs) find it through TEST_MOTO_URL.
start_moto
echo "==> moto_server for tests at $TEST_MOTO_URL"

# Tests create one database each from this server.
export TEST_PG_ADMIN_URL="$PG_URL"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --lib --bins --tests --no-fail-fast "$@"
else
  cargo test --workspace --lib --bins --tests --no-fail-fast "$@"
fi
