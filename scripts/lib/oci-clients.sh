# OCI clients the model registry's tests check its images with: Debian's skopeo. Source
# this file.
source "$(dirname "${BASH_SOURCE[0]}")/debian.sh"

# ensure_oci_clients: sets and exports TEST_SKOPEO.
ensure_oci_clients() {
  ensure_debian_package skopeo skopeo || return 1
  TEST_SKOPEO="$(command -v skopeo)"
  export TEST_SKOPEO
}
