# Debian packages the tests need. Source this file.

# ensure_debian_package PROGRAM PACKAGE: installs PACKAGE with apt-get when PROGRAM is not
# on the PATH (as root; otherwise says what to run and fails).
ensure_debian_package() {
  local program="$1" package="$2"
  command -v "$program" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing Debian's $package (apt-get install $package)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null
  else
    echo "$program is missing: sudo apt-get install -y --no-install-recommends $package" >&2
    return 1
  fi
}
