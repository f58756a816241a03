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

# kmsd_go_switches: the go on PATH is 1.21 or newer, so it fetches the
# release go.mod names by itself (GOTOOLCHAIN=auto).
kmsd_go_switches() {
  local v major minor
  v=$(go env GOVERSION 2>/dev/null) || return 1   # e.g. go1.19.8
  v=${v#go}; major=${v%%.*}; v=${v#*.}; minor=${v%%.*}
  [ "$major" -gt 1 ] || [ "$minor" -ge 21 ]
}

# kmsd_go_bootstrap: an older go (Debian 12 ships 1.19) cannot switch
# toolchains, but it can download the golang.org/toolchain module of the
# release go.mod names through the module proxy; that go is then used.
kmsd_go_bootstrap() {
  local want mod dir
  want=$(awk '$1 == "go" {print $2; exit}' go.mod)
  mod="golang.org/toolchain@v0.0.1-go${want}.$(go env GOOS)-$(go env GOARCH)"
  echo "go $(go env GOVERSION) cannot build go ${want}: fetching ${mod}" >&2
  dir=$(cd "$(mktemp -d)" && GO111MODULE=on go mod download -json "$mod" | awk -F'"' '$2 == "Dir" {print $4}')
  [ -n "$dir" ] && [ -f "$dir/bin/go" ] || { echo "could not download $mod" >&2; return 1; }
  # Module zips carry no exec bits (cmd/go sets them when it switches).
  chmod a+x "$dir/bin/"* "$dir"/pkg/tool/*/*
  export PATH="$dir/bin:$PATH" GOTOOLCHAIN=local
  unset GOROOT
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
  # go.mod names the Go release; a go of 1.21 or newer fetches it from the
  # module proxy by itself, an older one through kmsd_go_bootstrap.
  if kmsd_go_switches; then
    export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
  else
    kmsd_go_bootstrap
  fi
  export CGO_ENABLED=1
}

# kmsd_bench_deps: what the benchmark scripts use besides kmsd's own needs
# (wrk loads, curl waits for readiness and sets up keys, jq reads answers).
kmsd_bench_deps() {
  local need=()
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v jq >/dev/null 2>&1 || need+=(jq) # bench-archive.sh reads /readyz
  command -v pgrep >/dev/null 2>&1 || need+=(procps) # bench-backup.sh stops kmsd by its command line
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    kmsd_apt_install "${need[@]}"
  fi
}

# kmsd_test_deps: what deploy/test.sh uses besides kmsd's own needs: Node.js
# and npm for the OpenAPI lint (Redocly CLI, pinned in deploy/spec-lint), and
# the tools README.md's walk-throughs call (curl, jq, pkcs11-tool), which a
# test runs as written, etcd (Debian's etcd-server), which the tests of
# the replicated store start for real on loopback, versitygw, the S3
# server the blob tests start, and promtool (Debian's prometheus), which
# checks the metrics kmsd serves and the alerting rules.
kmsd_test_deps() {
  local need=()
  command -v node >/dev/null 2>&1 || need+=(nodejs)
  command -v npm >/dev/null 2>&1 || need+=(npm)
  command -v curl >/dev/null 2>&1 || need+=(curl)
  command -v jq >/dev/null 2>&1 || need+=(jq)
  command -v pkcs11-tool >/dev/null 2>&1 || need+=(opensc)
  command -v promtool >/dev/null 2>&1 || need+=(prometheus) # promtool checks the metrics and deploy/prometheus/alerts.yml
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    kmsd_apt_install "${need[@]}"
  fi
  command -v etcd >/dev/null 2>&1 || kmsd_install_etcd
  kmsd_install_versitygw
  # The second PKCS#11 implementation the tests run on: Debian's
  # opencryptoki soft token (installed, pkcsslotd started, token set up).
  kmsd_as_root bash deploy/ock.sh >/dev/null
}

# kmsd_install_versitygw: the S3-compatible server the blob tests start
# (versitygw, built from its Go module at a pinned release into GOPATH/bin,
# which goes on PATH). About a minute the first time.
kmsd_versitygw_version=v1.8.0
kmsd_install_versitygw() {
  local bin
  bin="$(go env GOPATH)/bin"
  export PATH="$bin:$PATH"
  [ -x "$bin/versitygw" ] && [ -e "$bin/.versitygw-$kmsd_versitygw_version" ] && return 0
  echo "installing: versitygw $kmsd_versitygw_version (go install)" >&2
  GOBIN="$bin" go install "github.com/versity/versitygw/cmd/versitygw@$kmsd_versitygw_version"
  touch "$bin/.versitygw-$kmsd_versitygw_version"
}

# kmsd_install_etcd installs Debian's etcd-server without starting its
# service (the tests start their own members on free ports): a policy-rc.d
# that refuses service starts is in place during the install, unless the
# machine already has one.
kmsd_install_etcd() {
  echo "installing: etcd-server" >&2
  local policy=/usr/sbin/policy-rc.d made=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | kmsd_as_root tee "$policy" >/dev/null
    kmsd_as_root chmod 755 "$policy"
    made=1
  fi
  local rc=0
  kmsd_apt_install etcd-server || rc=$?
  [ -n "$made" ] && kmsd_as_root rm -f "$policy"
  return "$rc"
}

# kmsd_lint_spec: Redocly's recommended rules over openapi.yaml; any error or
# warning fails.
kmsd_lint_spec() {
  ( cd deploy/spec-lint && npm ci --no-audit --no-fund --loglevel=error >/dev/null )
  local out
  if ! out=$(REDOCLY_TELEMETRY=off REDOCLY_SUPPRESS_UPDATE_NOTICE=true deploy/spec-lint/node_modules/.bin/redocly lint openapi.yaml 2>&1) || grep -qi 'warning' <<<"$out"; then
    echo "$out" >&2
    echo "redocly lint: openapi.yaml has errors or warnings" >&2
    return 1
  fi
  echo "redocly lint: openapi.yaml: 0 errors, 0 warnings" >&2
}

# kmsd_mcp_inspector: the official MCP Inspector for the kmsd-mcp test, and
# the Node.js 22 it needs, both from the npm registry (pinned by
# deploy/mcp-inspector's lockfile; the Node build is for x86_64 Linux).
kmsd_mcp_inspector() {
  ( cd deploy/mcp-inspector && npm ci --no-audit --no-fund --loglevel=error >/dev/null )
}

# kmsd_mcp_conformance: the official MCP conformance suite
# (@modelcontextprotocol/conformance) for the kmsd-mcp test
# (TestConformance), and the Node.js 22 it needs, both from the npm
# registry (pinned by deploy/mcp-conformance's lockfile; the Node build is
# for x86_64 Linux).
kmsd_mcp_conformance() {
  ( cd deploy/mcp-conformance && npm ci --no-audit --no-fund --loglevel=error >/dev/null )
}
