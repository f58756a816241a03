#!/usr/bin/env bash
# kmsd-mcp's start (issue 11): kmsd with a ckks-logn15 key (Galois keys for
# every power of two below the slot count, a relinearization key), then
# kmsd-mcp started cold (empty blob cache: download and verify the keyset)
# and warm (every blob cached, checked by digest, conditional requests
# only), three times each, alternating. For each: seconds to "keys ready"
# (kmsd-mcp's own log), wall seconds to listening, peak and current RSS
# once ready, the keyset's bytes. Prints a Markdown table for BENCHMARKS.md.
# Usage: deploy/bench-mcp.sh [preset, default ckks-logn15]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_bench_deps
preset="${1:-ckks-logn15}"
logn=${preset##*logn}
slots=$((1 << (logn - 1)))
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/kmsd" ./cmd/kmsd
go build -o "$work/kmsctl" ./cmd/kmsctl
go build -o "$work/kmsd-mcp" ./cmd/kmsd-mcp
port=$((18400 + RANDOM % 1000))
data="$work/data"
"$work/kmsd" --data-dir "$data" --addr "127.0.0.1:$port" --max-keyset-mib 8192 2>"$work/kmsd.log" &
export KMS_URL="https://127.0.0.1:$port" KMS_CA_CERT="$data/tls/ca.pem" KMS_TOKEN_FILE="$data/admin.token"
for _ in $(seq 200); do curl -sf --cacert "$data/tls/ca.pem" "$KMS_URL/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
rot=1; r=2; while [ $r -lt $slots ]; do rot="$rot,$r"; r=$((r * 2)); done
echo "generating a $preset keyset (rotations $rot)..." >&2
"$work/kmsctl" keys create bench --kind ckks --params "$preset" --rotations "$rot" --relinearization >/dev/null
"$work/kmsctl" tokens create --role evaluator --keys bench | jq -r .token > "$work/worker.token"
curl -sf --cacert "$data/tls/ca.pem" "$KMS_URL/v1/identity" | jq -r .public_key > "$work/identity.pub"
bytes=$(curl -sf --cacert "$data/tls/ca.pem" -H "Authorization: Bearer $(cat "$data/admin.token")" \
  "$KMS_URL/v1/keys/bench/versions/1/evaluation-keys" | jq '[.public_key.size, (.relinearization_key.size // 0), (.galois_keys[].size)] | add')

mport=$((port + 1))
run_mcp() { # $1: cold|warm
  [ "$1" = cold ] && rm -rf "$work/cache"
  local log="$work/mcp-$1.log" t0 t1 pid
  t0=$(date +%s.%N)
  "$work/kmsd-mcp" --kms-url "$KMS_URL" --ca-cert "$data/tls/ca.pem" --token-file "$work/worker.token" \
    --identity-key-file "$work/identity.pub" --key bench --cache-dir "$work/cache" --http "127.0.0.1:$mport" 2>"$log" &
  pid=$!
  until grep -q '"msg":"listening"' "$log" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.05
  done
  t1=$(date +%s.%N)
  local ready rss hwm
  ready=$(grep '"msg":"keys ready"' "$log" | jq -r .seconds)
  rss=$(awk '/^VmRSS/ {print int($2/1024)}' /proc/$pid/status)
  hwm=$(awk '/^VmHWM/ {print int($2/1024)}' /proc/$pid/status)
  kill $pid; wait $pid 2>/dev/null || true
  printf "| %s | %.2f | %s | %s | %s |\n" "$1" "$ready" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')" "$rss" "$hwm"
}
printf "\n%s keyset: %d bytes (%d MiB), slots %d\n\n" "$preset" "$bytes" $((bytes >> 20)) "$slots"
printf "| start | keys ready (s, kmsd-mcp's log) | to listening (s, wall) | RSS once ready (MiB) | peak RSS (MiB) |\n|---|---|---|---|---|\n"
for _ in 1 2 3; do
  run_mcp cold
  run_mcp warm
done
