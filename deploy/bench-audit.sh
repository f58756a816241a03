#!/usr/bin/env bash
# Measures what the audit log costs: the same kmsd binary serves the same
# requests with the audit log on (as always in production) and off (the
# benchmark-only KMSD_BENCHMARK_UNAUDITED=1), loaded by wrk from another
# process over 127.0.0.1 (concurrency 16 unless given). Prints a Markdown table for
# BENCHMARKS.md. Usage: deploy/bench-audit.sh [seconds per run, default 10] [connections, default 16]
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

# run MODE: starts kmsd, loads it, stops it; prints one line per request kind.
run() {
  local mode="$1" data="$work/data-$1" port=$((18400 + RANDOM % 1000)) env=()
  [ "$mode" = off ] && env=(KMSD_BENCHMARK_UNAUDITED=1)
  env "${env[@]}" "$work/kmsd" --data-dir "$data" --addr "127.0.0.1:$port" --insecure-http 2>"$work/$mode.log" &
  local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  local tok; tok=$(cat "$data/admin.token")
  curl -sf -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' \
    "http://127.0.0.1:$port/v1/keys" -d '{"name":"bench","kind":"ml-dsa-65"}' >/dev/null
  local total=0
  for kind in public-key sign; do
    local out
    if [ "$kind" = public-key ]; then
      out=$(wrk -t2 -c"$conns" -d"${secs}s" --latency -H "Authorization: Bearer $tok" "http://127.0.0.1:$port/v1/keys/bench/versions/primary/public-key")
    else
      out=$(wrk -t2 -c"$conns" -d"${secs}s" --latency -H "Authorization: Bearer $tok" -s "$work/sign.lua" "http://127.0.0.1:$port/v1/keys/bench/sign")
    fi
    if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx answers in $mode $kind run" >&2; echo "$out" >&2; exit 1; fi
    local rps p50 p99 n
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    total=$((total + n))
    echo "$mode $kind $rps $p50 $p99 $n"
  done
  kill -TERM "$pid"; wait "$pid" || true
  local fsyncs groups
  fsyncs=$(grep -o '"fsyncs":[0-9]*' "$work/$mode.log" | cut -d: -f2 || true)
  groups=$(grep -o '"audit_group_commits":[0-9]*' "$work/$mode.log" | cut -d: -f2 || true)
  echo "$mode fsyncs ${fsyncs:-0} $total ${groups:-0}"
}

{ run off; run on; } > "$work/results"
awk -v conns="$conns" '
  $2=="fsyncs" { fsyncs[$1]=$3; reqs[$1]=$4; groups[$1]=$5; next }
  { rps[$1" "$2]=$3; p50[$1" "$2]=$4; p99[$1" "$2]=$5 }
  END {
    printf "| request (concurrency %d) | audit off req/s | audit on req/s | on/off | on p50 | on p99 |\n|---|---|---|---|---|---|\n", conns
    split("public-key sign", kinds, " ")
    for (i = 1; i <= 2; i++) { k = kinds[i]
      printf "| %s | %.0f | %.0f | %.2f | %s | %s |\n", k, rps["off " k], rps["on " k], rps["on " k] / rps["off " k], p50["on " k], p99["on " k] }
    printf "\nfsyncs per 1000 audited requests: %.1f (one fdatasync per audit WAL frame, two per bbolt commit); %.1f requests per group commit\n", \
      1000 * fsyncs["on"] / reqs["on"], reqs["on"] / groups["on"]
  }' "$work/results"
