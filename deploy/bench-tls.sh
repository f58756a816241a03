#!/usr/bin/env bash
# Measures what TLS costs: the same kmsd binary, audited as always, serves
# the same requests over HTTPS (its default: TLS 1.3, local CA) and over
# plain HTTP (--insecure-http, loopback), loaded by the same wrk from
# another process over 127.0.0.1 with keep-alive connections (concurrency
# 16 unless given). wrk uses Debian's OpenSSL, which negotiates X25519
# (OpenSSL 3.0 has no ML-KEM): with keep-alive the key exchange happens
# once per connection, so the figures are the per-request cost of TLS.
# Prints a Markdown table for BENCHMARKS.md.
# Usage: deploy/bench-tls.sh [seconds per run, default 10] [connections, default 16]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_bench_deps
secs="${1:-10}"
conns="${2:-16}"
work=$(mktemp -d)
trap 'pkill -f "$work/kmsd" 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/kmsd" ./cmd/kmsd
cat > "$work/sign.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"message":"' .. string.rep("A", 340) .. '"}'
wrk.headers["Content-Type"] = "application/json"
LUA

# run MODE (http or https): starts kmsd, loads it, stops it.
run() {
  local mode="$1" data="$work/data-$1" port=$((18400 + RANDOM % 1000)) flags=() curlca=()
  if [ "$mode" = http ]; then flags=(--insecure-http); else curlca=(--cacert "$data/tls/ca.pem"); fi
  "$work/kmsd" --data-dir "$data" --addr "127.0.0.1:$port" "${flags[@]}" 2>"$work/$mode.log" &
  local pid=$! base="$mode://127.0.0.1:$port"
  for _ in $(seq 100); do
    [ "$mode" = https ] && [ ! -f "$data/tls/ca.pem" ] && { sleep 0.1; continue; }
    [ "$mode" = https ] && curlca=(--cacert "$data/tls/ca.pem")
    curl -sf "${curlca[@]}" "$base/readyz" >/dev/null && break; sleep 0.1
  done
  local tok; tok=$(cat "$data/admin.token")
  curl -sf "${curlca[@]}" -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' \
    "$base/v1/keys" -d '{"name":"bench","kind":"ml-dsa-65"}' >/dev/null
  for kind in public-key sign; do
    local out
    if [ "$kind" = public-key ]; then
      out=$(wrk -t2 -c"$conns" -d"${secs}s" --latency -H "Authorization: Bearer $tok" "$base/v1/keys/bench/versions/primary/public-key")
    else
      out=$(wrk -t2 -c"$conns" -d"${secs}s" --latency -H "Authorization: Bearer $tok" -s "$work/sign.lua" "$base/v1/keys/bench/sign")
    fi
    if echo "$out" | grep -q "Non-2xx\|Socket errors"; then echo "errors in the $mode $kind run" >&2; echo "$out" >&2; exit 1; fi
    local rps p50 p99
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    echo "$mode $kind $rps $p50 $p99"
  done
  kill -TERM "$pid"; wait "$pid" || true
}

{ run http; run https; } > "$work/results"
awk -v conns="$conns" '
  { rps[$1" "$2]=$3; p50[$1" "$2]=$4; p99[$1" "$2]=$5 }
  END {
    printf "| audited request (concurrency %d, keep-alive) | HTTP req/s | HTTPS req/s | HTTPS/HTTP | HTTPS p50 | HTTPS p99 |\n|---|---|---|---|---|---|\n", conns
    split("public-key sign", kinds, " ")
    for (i = 1; i <= 2; i++) { k = kinds[i]
      printf "| %s | %.0f | %.0f | %.2f | %s | %s |\n", k, rps["http " k], rps["https " k], rps["https " k] / rps["http " k], p50["https " k], p99["https " k] }
  }' "$work/results"
