#!/usr/bin/env bash
# Runs every check and test: gofmt, go vet, and go test -race over all
# packages against a real SoftHSM2 token, bbolt files, etcd clusters and an
# S3-compatible server (versitygw) started on loopback and kmsd over HTTPS
# on 127.0.0.1, README.md's command blocks as
# written, the MCP Inspector and the TypeScript MCP SDK, the MCP conformance suite (against kmsd-mcp
# and kmsd), and Redocly's lint of openapi.yaml. Installs what it needs
# first (deploy/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_test_deps
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt: not formatted:" $unformatted >&2
  exit 1
fi
go vet ./...
kmsd_lint_spec
kmsd_mcp_inspector
kmsd_mcp_conformance
go test -race -count=1 -timeout 20m ./...
