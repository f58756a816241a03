#!/usr/bin/env bash
# Sourced by start.sh and test.sh: installs what kmsd needs on Debian/Ubuntu
# when it is missing. Safe to run again; needs root (or sudo) only to install.
set -euo pipefail

kmsd_as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

kmsd_apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${KMSD_APT_UPDATED:-}" ]; then
    kmsd_as_root apt-get update -qq
    KMSD_APT_UPDATED=1
  fi
  kmsd_as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

kmsd_have_softhsm() {
  for p in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
           /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/lib64/pkcs11/libsofthsm2.so \
           /usr/local/lib/softhsm/libsofthsm2.so; do
    [ -e "$p" ] && return 0
  done
  return 1
}

kmsd_deps() {
  local need=()
  kmsd_have_softhsm || need+=(softhsm2)
  command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)   # miekg/pkcs11 uses cgo
  [ -x /usr/local/go/bin/go ] && export PATH="/usr/local/go/bin:$PATH"
  command -v go >/dev/null 2>&1 || need+=(golang-go ca-certificates)
  command -v git >/dev/null 2>&1 || need+=(git)
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    kmsd_apt_install "${need[@]}"
  fi
  # go.mod names the Go release; an older go fetches it from the module proxy.
  export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
  export CGO_ENABLED=1
}
