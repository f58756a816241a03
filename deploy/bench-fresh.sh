#!/usr/bin/env bash
# Read and write latency on three kmsd replicas (a three-member etcd on
# this machine, the load split over the three, 16 connections in all, wrk
# over 127.0.0.1, audited), for two builds in one run: BASE (default
# 234e867, before issue 24: no heartbeat, no freshness check, one read of
# the header and one of the versions) and the working tree (heartbeats
# every 200 ms, cached records served only while fresh within 1 s, a key
# and its versions from one revision, every commit moving the shard). The
# requests: public-key (the cached, bounded-stale path), get-key (GET
# /v1/keys/bench: linearizable reads from etcd) and rotate (a write).
# Prints a Markdown table for BENCHMARKS.md.
# Usage: deploy/bench-fresh.sh [seconds per run, default 10] [base commit, default 234e867] [order: base-first (default) or new-first]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_bench_deps
command -v etcd >/dev/null 2>&1 || kmsd_install_etcd
secs="${1:-10}"
base="${2:-234e867}"
order="${3:-base-first}"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; git worktree remove --force "$work/base-src" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
go build -o "$work/kmsd-new" ./cmd/kmsd
git worktree add -f --detach "$work/base-src" "$base" >/dev/null 2>&1
(cd "$work/base-src" && go build -o "$work/kmsd-base" ./cmd/kmsd)
cat > "$work/rotate.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{}'
wrk.headers["Content-Type"] = "application/json"
LUA

ready() { for _ in $(seq 300); do curl -sf "http://$1/readyz" >/dev/null && return 0; sleep 0.1; done; echo "kmsd at $1 not ready" >&2; exit 1; }

# run BUILD: a new 3-member etcd and 3 replicas of $work/kmsd-BUILD, loaded.
run() {
  local build="$1" b=$((24000 + RANDOM % 500 * 10)) cluster="" eps="" addrs=()
  for i in 1 2 3; do cluster+="${cluster:+,}m$i=http://127.0.0.1:$((b + 5 + i))"; eps+="${eps:+,}http://127.0.0.1:$((b + i))"; done
  for i in 1 2 3; do
    etcd --name "m$i" --data-dir "$work/etcd-$build-$i" \
      --listen-client-urls "http://127.0.0.1:$((b + i))" --advertise-client-urls "http://127.0.0.1:$((b + i))" \
      --listen-peer-urls "http://127.0.0.1:$((b + 5 + i))" --initial-advertise-peer-urls "http://127.0.0.1:$((b + 5 + i))" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "fresh-$build" >"$work/etcd-$build-$i.log" 2>&1 &
    pids+=($!)
  done
  for i in 1 2 3; do addrs+=("127.0.0.1:$((19600 + RANDOM % 300 + i * 300))"); done
  "$work/kmsd-$build" --store etcd --etcd-endpoints "$eps" --data-dir "$work/$build-1" --addr "${addrs[0]}" --insecure-http 2>"$work/kmsd-$build-1.log" & pids+=($!)
  ready "${addrs[0]}"
  local tok; tok=$(cat "$work/$build-1/admin.token")
  local module; module=$(sed -n 's/^.*"module":"\([^"]*\)".*$/\1/p' "$work/kmsd-$build-1.log" | head -1)
  for i in 2 3; do
    SOFTHSM2_CONF="$work/$build-1/softhsm/softhsm2.conf" "$work/kmsd-$build" --store etcd --etcd-endpoints "$eps" --data-dir "$work/$build-$i" --addr "${addrs[$((i - 1))]}" \
      --insecure-http --pkcs11-module "$module" --pkcs11-pin-file "$work/$build-1/softhsm/pin" 2>"$work/kmsd-$build-$i.log" & pids+=($!)
    ready "${addrs[$((i - 1))]}"
  done
  curl -sf -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' "http://${addrs[0]}/v1/keys" -d '{"name":"bench","kind":"ml-dsa-65"}' >/dev/null
  for kind in public-key get-key rotate; do
    local path script=() i=0
    case "$kind" in
      public-key) path=/v1/keys/bench/versions/primary/public-key ;;
      get-key) path=/v1/keys/bench?limit=10 ;;
      rotate) path=/v1/keys/bench/rotate; script=(-s "$work/rotate.lua") ;;
    esac
    for a in "${addrs[@]}"; do
      local c=5; [ "$i" = 0 ] && c=6
      wrk -t1 -c"$c" -d"${secs}s" --latency -H "Authorization: Bearer $tok" "${script[@]}" "http://$a$path" >"$work/wrk-$i" &
      i=$((i + 1))
    done
    wait $(jobs -p | tail -n 3)
    local rps=0 bad=0
    for j in 0 1 2; do
      rps=$(awk -v a="$rps" '/Requests\/sec/ {print a + $2}' "$work/wrk-$j")
      bad=$(awk -v a="$bad" 'BEGIN {x = a} /Non-2xx/ {x = a + $NF} END {print x}' "$work/wrk-$j")
    done
    echo "$build $kind $rps $(awk '$1=="50%" {print $2}' "$work/wrk-0") $(awk '$1=="99%" {print $2}' "$work/wrk-0") $bad"
  done
  kill "${pids[@]}"; wait 2>/dev/null || true; pids=()
}

if [ "$order" = new-first ]; then { run new; run base; } >"$work/results"; else { run base; run new; } >"$work/results"; fi
awk -v base="$base" '
  { rps[$1" "$2]=$3; p50[$1" "$2]=$4; p99[$1" "$2]=$5; bad[$1" "$2]=$6 }
  END {
    printf "| request (3 replicas, 16 connections) | before (%s) req/s | p50 | p99 | now req/s | p50 | p99 | non-2xx before / now |\n|---|---|---|---|---|---|---|---|\n", base
    split("public-key get-key rotate", kinds, " ")
    for (i = 1; i <= 3; i++) { k = kinds[i]
      printf "| %s | %.0f | %s | %s | %.0f | %s | %s | %d / %d |\n", k, rps["base " k], p50["base " k], p99["base " k], rps["new " k], p50["new " k], p99["new " k], bad["base " k], bad["new " k] }
  }' "$work/results"
