#!/usr/bin/env bash
# The audit archive and retention under load (issue 21): kmsd on its
# embedded store with --audit-archive and --audit-retain, loaded by wrk
# with public-key reads (every one audited) from another process over
# 127.0.0.1 for the given time; every 30 s it samples the records logged,
# the records archived, the store's lag, kms.db's size and the archive's.
# Prints a Markdown table for BENCHMARKS.md, then the archive's bytes per
# record and the archive's pace against the request rate.
# Usage: deploy/bench-archive.sh [seconds, default 600] [retain, default 1m] [connections, default 16]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_bench_deps
secs="${1:-600}"
retain="${2:-1m}"
conns="${3:-16}"
work=$(mktemp -d)
port=$((18400 + RANDOM % 1000))
trap 'pkill -f "$work/kmsd" 2>/dev/null || true; pkill -f "wrk.*127.0.0.1:$port" 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/kmsd" ./cmd/kmsd
data="$work/data"
"$work/kmsd" --data-dir "$data" --addr "127.0.0.1:$port" --insecure-http \
  --audit-archive "$work/archive" --audit-retain "$retain" 2>"$work/kmsd.log" &
pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
tok=$(cat "$data/admin.token")
curl -sf -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' \
  "http://127.0.0.1:$port/v1/keys" -d '{"name":"bench","kind":"ml-dsa-65"}' >/dev/null
wrk -t2 -c"$conns" -d"${secs}s" -H "Authorization: Bearer $tok" \
  "http://127.0.0.1:$port/v1/keys/bench/versions/primary/public-key" >"$work/wrk.out" &
wrkpid=$!
mib() { du -sb "$1" 2>/dev/null | awk '{printf "%.1f", $1 / 1048576}'; }
echo "| time | records logged | archived | lag | pruned below | kms.db MiB | archive MiB |"
echo "|---|---|---|---|---|---|---|"
start=$SECONDS
while kill -0 "$wrkpid" 2>/dev/null; do
  sleep 30
  r=$(curl -sf "http://127.0.0.1:$port/readyz" || echo '{}')
  size=$(curl -sf -H "Authorization: Bearer $tok" "http://127.0.0.1:$port/v1/audit/checkpoint" | sed -n 2p)
  echo "| $((SECONDS - start)) s | ${size:-?} | $(echo "$r" | jq -r '.audit_archive.archived // "?"') | $(echo "$r" | jq -r '.audit_archive.lag // "?"') | $(echo "$r" | jq -r '.audit_archive.pruned_below // 0') | $(mib "$data/kms.db") | $(mib "$work/archive") |"
done
wait "$wrkpid" || true
rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.out")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.out")
r=$(curl -sf "http://127.0.0.1:$port/readyz")
archived=$(echo "$r" | jq -r '.audit_archive.archived')
abytes=$(du -sb "$work/archive" | awk '{print $1}')
echo
echo "wrk: ${rps} req/s for ${secs} s (${non2xx:-0} non-2xx); the archive holds ${archived} records in $(mib "$work/archive") MiB: $((abytes / archived)) bytes per record (bundles, tiles, directories); lag at the end: $(echo "$r" | jq -r '.audit_archive.lag') records; failing: $(echo "$r" | jq -r '.audit_archive.failing_since // "never"')"
kill -TERM "$pid"; wait "$pid" || true
