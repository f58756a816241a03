#!/usr/bin/env bash
# The read tail of issue 9: audited public-key reads (wrk, 2 threads, 16
# connections, over plain HTTP on 127.0.0.1) of a key with N versions,
# with the number of garbage collections kmsd ran during the load
# (GODEBUG=gctrace=1 prints one line per collection) and the CPU share the
# hypervisor stole. Prints one Markdown table row.
# Usage: deploy/bench-tail.sh [seconds, default 20] [versions, default 60]
# KMSD_BIN=path runs another kmsd binary (e.g. an older commit's).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_bench_deps
secs="${1:-20}"
versions="${2:-60}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
if [ -n "${KMSD_BIN:-}" ]; then cp "$KMSD_BIN" "$work/kmsd"; else go build -o "$work/kmsd" ./cmd/kmsd; fi
go build -o "$work/kmsload" ./cmd/kmsload
port=$((18400 + RANDOM % 1000))
url="http://127.0.0.1:$port"
data="$work/data"
GODEBUG=gctrace=1 "$work/kmsd" --data-dir "$data" --addr "127.0.0.1:$port" --insecure-http 2>"$work/kmsd.log" &
for _ in $(seq 100); do curl -sf "$url/readyz" >/dev/null && break; sleep 0.1; done
tok=$(cat "$data/admin.token")
curl -sf -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' \
  "$url/v1/keys" -d '{"name":"bench","kind":"ml-dsa-65"}' >/dev/null
"$work/kmsload" rotate --addr "$url" --token-file "$data/admin.token" --key bench --to "$versions" --sample 0
cpu() { awk '$1=="cpu" {print $2+$3+$4+$5+$6+$7+$8+$9, $9}' /proc/stat; }
gcs() { grep -c '^gc [0-9]' "$work/kmsd.log" || true; }
g0=$(gcs); c0=$(cpu)
out=$(wrk -t2 -c16 -d"${secs}s" --latency -H "Authorization: Bearer $tok" "$url/v1/keys/bench/versions/primary/public-key")
g1=$(gcs); c1=$(cpu)
if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx answers" >&2; echo "$out" >&2; exit 1; fi
n=$(echo "$out" | awk '/requests in/ {print $1}')
echo "$out" | awk -v n="$n" -v g=$((g1 - g0)) -v v="$versions" -v st="$(echo "$c0 $c1" | awk '{printf "%.0f", 100 * ($4 - $2) / ($3 - $1)}')" '
  /Requests\/sec/ {rps=$2} $1=="50%" {p50=$2} $1=="99%" {p99=$2}
  END {printf "| %s | %.0f | %s | %s | %d | %.1f | %s%% |\n", v, rps, p50, p99, g, 1000 * g / n, st}'
