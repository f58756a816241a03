#!/usr/bin/env bash
# Throughput of public-key reads, ml-dsa-65 signs and rotations at a total
# concurrency of 16 (wrk over 127.0.0.1, plain HTTP, audited unless said), on
# set-ups in one run on this machine: kmsd on bbolt; one replica on a
# one-member etcd, audited and (to price the audit log on etcd) with
# KMSD_BENCHMARK_UNAUDITED=1; three replicas on a three-member etcd, the load split
# over them (16 connections in all: 6, 5 and 5), then all of it on one of
# the three; answers other than 2xx are
# counted apart (req/s is wrk's, all answers). Every process shares the
# same cores: read the figures as what the set-ups cost, not as scaling.
# Prints a Markdown table for BENCHMARKS.md.
# Usage: deploy/bench-replicas.sh [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_bench_deps
command -v etcd >/dev/null 2>&1 || kmsd_install_etcd
secs="${1:-10}"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; if [ -n "${KMSD_BENCH_KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi; }
trap cleanup EXIT
go build -o "$work/kmsd" ./cmd/kmsd
cat > "$work/sign.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"message":"' .. string.rep("A", 340) .. '"}'
wrk.headers["Content-Type"] = "application/json"
LUA
cat > "$work/rotate.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{}'
wrk.headers["Content-Type"] = "application/json"
LUA

# etcd_start N NAME: a new N-member cluster; sets eps to its client endpoints.
etcd_start() {
  local n="$1" name="$2" base=$((24000 + RANDOM % 500 * 10)) cluster=""
  eps=""
  for i in $(seq "$n"); do cluster+="${cluster:+,}m$i=http://127.0.0.1:$((base + 5 + i))"; eps+="${eps:+,}http://127.0.0.1:$((base + i))"; done
  for i in $(seq "$n"); do
    etcd --name "m$i" --data-dir "$work/etcd-$name-$i" \
      --listen-client-urls "http://127.0.0.1:$((base + i))" --advertise-client-urls "http://127.0.0.1:$((base + i))" \
      --listen-peer-urls "http://127.0.0.1:$((base + 5 + i))" --initial-advertise-peer-urls "http://127.0.0.1:$((base + 5 + i))" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "bench-$name" >"$work/etcd-$name-$i.log" 2>&1 &
    pids+=($!)
  done
}

ready() { for _ in $(seq 300); do curl -sf "http://$1/readyz" >/dev/null && return 0; sleep 0.1; done; echo "kmsd at $1 not ready" >&2; exit 1; }

# load KIND ADDR...: wrk on each address at once (16 connections in all);
# prints req/s summed, p50 and p99 of the first.
load() {
  local kind="$1"; shift
  local n=$# i=0 path script=()
  case "$kind" in
    public-key) path=/v1/keys/bench/versions/primary/public-key ;;
    sign) path=/v1/keys/bench/sign; script=(-s "$work/sign.lua") ;;
    rotate) path=/v1/keys/bench/rotate; script=(-s "$work/rotate.lua") ;;
  esac
  for a in "$@"; do
    local c=$((16 / n)); [ "$i" -lt $((16 % n)) ] && c=$((c + 1))
    wrk -t1 -c"$c" -d"${secs}s" --latency -H "Authorization: Bearer $tok" "${script[@]}" "http://$a$path" >"$work/wrk-$i" &
    i=$((i + 1))
  done
  wait $(jobs -p | tail -n "$n")
  local rps=0 bad=0 all=0
  for j in $(seq 0 $((n - 1))); do
    rps=$(awk -v a="$rps" '/Requests\/sec/ {print a + $2}' "$work/wrk-$j")
    all=$(awk -v a="$all" '/requests in/ {print a + $1}' "$work/wrk-$j")
    bad=$(awk -v a="$bad" 'BEGIN {x = a} /Non-2xx/ {x = a + $NF} END {print x}' "$work/wrk-$j")
  done
  # req/s counts answered requests; the refused (5xx) are reported apart.
  echo "$rps $(awk '$1=="50%" {print $2}' "$work/wrk-0") $(awk '$1=="99%" {print $2}' "$work/wrk-0") $bad $all"
}

# setup NAME ADDR...: creates the key, loads each kind.
bench() {
  local name="$1"; shift
  curl -sf -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' "http://$1/v1/keys" -d '{"name":"bench","kind":"ml-dsa-65"}' >/dev/null
  for kind in public-key sign rotate; do echo "$name $kind $(load "$kind" "$@")"; done
}

results="$work/results"
# bbolt
a=127.0.0.1:$((18500 + RANDOM % 500))
"$work/kmsd" --data-dir "$work/bolt" --addr "$a" --insecure-http 2>"$work/kmsd-bolt.log" & pids+=($!)
ready "$a"; tok=$(cat "$work/bolt/admin.token")
bench bbolt "$a" >>"$results"
kill "${pids[@]}"; wait 2>/dev/null || true; pids=()

# one replica, one member
etcd_start 1 r1
a=127.0.0.1:$((19000 + RANDOM % 500))
"$work/kmsd" --store etcd --etcd-endpoints "$eps" --data-dir "$work/r1" --addr "$a" --insecure-http 2>"$work/kmsd-r1.log" & pids+=($!)
ready "$a"; tok=$(cat "$work/r1/admin.token")
bench "etcd-1" "$a" >>"$results"
kill "${pids[@]}"; wait 2>/dev/null || true; pids=()

# one replica, one member, audit log off: what the log costs on etcd
etcd_start 1 r1u
a=127.0.0.1:$((19000 + RANDOM % 500))
KMSD_BENCHMARK_UNAUDITED=1 "$work/kmsd" --store etcd --etcd-endpoints "$eps" --data-dir "$work/r1u" --addr "$a" --insecure-http 2>"$work/kmsd-r1u.log" & pids+=($!)
ready "$a"; tok=$(cat "$work/r1u/admin.token")
bench "etcd-1u" "$a" >>"$results"
kill "${pids[@]}"; wait 2>/dev/null || true; pids=()

# three replicas, three members
etcd_start 3 r3
addrs=()
for i in 1 2 3; do addrs+=("127.0.0.1:$((19600 + RANDOM % 300 + i * 300))"); done
"$work/kmsd" --store etcd --etcd-endpoints "$eps" --data-dir "$work/r3-1" --addr "${addrs[0]}" --insecure-http 2>"$work/kmsd-r3-1.log" & pids+=($!)
ready "${addrs[0]}"; tok=$(cat "$work/r3-1/admin.token")
module=$(sed -n 's/^.*"module":"\([^"]*\)".*$/\1/p' "$work/kmsd-r3-1.log" | head -1)
for i in 2 3; do
  SOFTHSM2_CONF="$work/r3-1/softhsm/softhsm2.conf" "$work/kmsd" --store etcd --etcd-endpoints "$eps" --data-dir "$work/r3-$i" --addr "${addrs[$((i - 1))]}" \
    --insecure-http --pkcs11-module "$module" --pkcs11-pin-file "$work/r3-1/softhsm/pin" 2>"$work/kmsd-r3-$i.log" & pids+=($!)
  ready "${addrs[$((i - 1))]}" # one at a time: SoftHSM's file store is not safe for two processes opening the token at once
done
bench "etcd-3" "${addrs[@]}" >>"$results"
# the same three replicas with the whole load on one of them: beside the
# split load, what spreading it over replicas of one log costs
for kind in public-key sign rotate; do echo "etcd-3one $kind $(load "$kind" "${addrs[0]}")"; done >>"$results"

awk '
  { rps[$1" "$2]=$3; p50[$1" "$2]=$4; p99[$1" "$2]=$5; bad[$1" "$2]=$6; all[$1" "$2]=$7 }
  END {
    printf "| request (concurrency 16) | bbolt req/s | 1 replica, 1-member etcd | 1 replica, audit off | 3 replicas, 3-member etcd | 3 replicas, load on one | p99 bbolt / 1 / 3 / 3-on-one | non-2xx bbolt / 1 / 3 / 3-on-one (of requests) |\n|---|---|---|---|---|---|---|---|\n"
    split("public-key sign rotate", kinds, " ")
    for (i = 1; i <= 3; i++) { k = kinds[i]
      printf "| %s | %.0f | %.0f | %.0f | %.0f | %.0f | %s / %s / %s / %s | %d / %d / %d / %d (of %d / %d / %d / %d) |\n", k, rps["bbolt " k], rps["etcd-1 " k], rps["etcd-1u " k], rps["etcd-3 " k], rps["etcd-3one " k], p99["bbolt " k], p99["etcd-1 " k], p99["etcd-3 " k], p99["etcd-3one " k], bad["bbolt " k], bad["etcd-1 " k], bad["etcd-3 " k], bad["etcd-3one " k], all["bbolt " k], all["etcd-1 " k], all["etcd-3 " k], all["etcd-3one " k] }
  }' "$results"
