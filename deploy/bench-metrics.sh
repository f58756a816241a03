#!/usr/bin/env bash
# Measures what the Prometheus metrics cost on the audited read path: the
# same kmsd binary (audited, as always) serves the same public-key reads
# with --metrics-addr off and on, the "on" runs scraped once a second as
# Prometheus would, loaded by wrk from another process over 127.0.0.1.
# Off and on alternate, ROUNDS times, so the machine's drift falls on
# both. Prints a Markdown table for BENCHMARKS.md.
# Usage: deploy/bench-metrics.sh [seconds per run, default 10] [rounds, default 3] [connections, default 16]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_bench_deps
secs="${1:-10}"
rounds="${2:-3}"
conns="${3:-16}"
work=$(mktemp -d)
trap 'pkill -f "$work/kmsd" 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/kmsd" ./cmd/kmsd

# run MODE ROUND: starts kmsd on a fresh data dir, loads it, stops it.
run() {
  local mode="$1" data="$work/data-$1-$2" port=$((18400 + RANDOM % 1000)) mport=$((19400 + RANDOM % 1000)) args=()
  [ "$mode" = on ] && args=(--metrics-addr "127.0.0.1:$mport")
  "$work/kmsd" --data-dir "$data" --addr "127.0.0.1:$port" --insecure-http "${args[@]}" 2>"$work/$mode-$2.log" &
  local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  local tok; tok=$(cat "$data/admin.token")
  curl -sf -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' \
    "http://127.0.0.1:$port/v1/keys" -d '{"name":"bench","kind":"ml-dsa-65"}' >/dev/null
  local scraper=""
  if [ "$mode" = on ]; then
    ( while sleep 1; do curl -sf "http://127.0.0.1:$mport/metrics" >/dev/null || true; done ) &
    scraper=$!
  fi
  local out
  out=$(wrk -t2 -c"$conns" -d"${secs}s" --latency -H "Authorization: Bearer $tok" "http://127.0.0.1:$port/v1/keys/bench/versions/primary/public-key")
  [ -n "$scraper" ] && kill "$scraper" 2>/dev/null || true
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx answers in the $mode run" >&2; echo "$out" >&2; exit 1; fi
  if [ "$mode" = on ]; then
    # The run was counted: the requests the metrics saw are the ones wrk made.
    local seen; seen=$(curl -sf "http://127.0.0.1:$mport/metrics" | grep '^kmsd_http_requests_total{' | grep -F 'code="200"' | grep -F 'route="/v1/keys/{name}/versions/{version}/public-key"' | awk '{print $2}')
    echo "$mode counted ${seen:-0}"
  fi
  local rps p50 p99 n
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  echo "$mode $2 $rps $p50 $p99 $n"
  kill -TERM "$pid"; wait "$pid" || true
}

for r in $(seq "$rounds"); do run off "$r"; run on "$r"; done > "$work/results"
cat "$work/results" >&2
awk -v conns="$conns" '
  $2=="counted" { counted=$3; next }
  { rps[$1" "$2]=$3; p50[$1" "$2]=$4; p99[$1" "$2]=$5; n[$1" "$2]=$6; if ($2>rounds) rounds=$2 }
  END {
    printf "| round (public-key, concurrency %d) | metrics off req/s | metrics on req/s | on/off | off p50 / p99 | on p50 / p99 |\n|---|---|---|---|---|---|\n", conns
    for (r = 1; r <= rounds; r++)
      printf "| %d | %.0f | %.0f | %.3f | %s / %s | %s / %s |\n", r, rps["off " r], rps["on " r], rps["on " r] / rps["off " r], p50["off " r], p99["off " r], p50["on " r], p99["on " r]
    printf "\nthe last on run: wrk made %d requests, kmsd_http_requests_total counted %d\n", n["on " rounds], counted
  }' "$work/results"
