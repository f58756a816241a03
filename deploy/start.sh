#!/usr/bin/env bash
# Builds and starts kmsd on its embedded default: a bbolt file and a SoftHSM2
# token created under ./data on first start. Extra arguments go to kmsd
# (see ./bin/kmsd --help). kmsd runs in the foreground (Ctrl-C stops it):
# use another terminal for kmsctl and the README's walk-throughs.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "start.sh: $*" >&2; }
step "checking what kmsd needs (SoftHSM2, Go, gcc); anything missing is installed"
. deploy/deps.sh
kmsd_deps
step "downloading the Go modules go.sum names, where missing (the first run: about a minute)"
go mod download
step "building bin/kmsd, bin/kmsctl and bin/kmsd-mcp (the first build compiles Lattigo and the cgo PKCS#11 binding: a minute or two)"
go build -o bin/kmsd ./cmd/kmsd
go build -o bin/kmsctl ./cmd/kmsctl
go build -o bin/kmsd-mcp ./cmd/kmsd-mcp
data="${KMS_DATA_DIR:-./data}"
[ -f "$data/kms.db" ] || step "first start on $data: kmsd makes its SoftHSM2 token, KEK, admin token and local CA there"
step "starting kmsd in the foreground (Ctrl-C stops it); in another terminal: bin/kmsctl, and README's walk-throughs"
exec ./bin/kmsd --data-dir "$data" "$@"
