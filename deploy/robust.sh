#!/usr/bin/env bash
# The robustness run of issue 24, longer than the suite's: three kmsd
# replicas on a three-member etcd cluster under SIGKILL and SIGSTOP of
# replicas and etcd members, the history checked for linearizability per
# key (porcupine), the 1 s revocation bound, and one audit record per
# answered request. Usage: deploy/robust.sh [seconds, default 300] [runs, default 1]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_test_deps
secs="${1:-300}"
runs="${2:-1}"
for r in $(seq "$runs"); do
  echo "run $r of $runs: $secs s of faults" >&2
  KMSD_ROBUST_SECONDS="$secs" go test -count=1 -timeout 0 -run '^TestReplicasUnderFaults$' -v ./cmd/kmsd 2>&1 | grep -E 'robust_test|^(ok|FAIL|---)'
done
