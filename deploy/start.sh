#!/usr/bin/env bash
# Builds and starts kmsd on its embedded default: a bbolt file and a SoftHSM2
# token created under ./data on first start. Extra arguments go to kmsd
# (see ./bin/kmsd --help).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
go build -o bin/kmsd ./cmd/kmsd
go build -o bin/kmsctl ./cmd/kmsctl
go build -o bin/kmsd-mcp ./cmd/kmsd-mcp
exec ./bin/kmsd --data-dir "${KMS_DATA_DIR:-./data}" "$@"
