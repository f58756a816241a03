#!/usr/bin/env bash
# Measures whether a request's cost depends on a key's history (issue 9).
# One kmsd (audited, as always; plain HTTP on 127.0.0.1 so that the
# comparison with the bare server is of the work behind the transport),
# one ML-DSA-65 key rotated to 1, 100, 1,000 and 10,000 versions; at each:
#   - sign and public-key throughput with wrk (concurrency 16), p50 and p99;
#   - the latency of 30 rotations (kmsload rotate), p50 and p99 (at 10
#     versions, too: the reference of the rotation target).
# Then, same run, same client: a bare HTTP server that only signs with
# circl (kmsload bare-sign) and kmsd's signing at the last level.
# Prints Markdown tables for BENCHMARKS.md.
# Usage: deploy/bench-versions.sh [seconds per wrk run, default 10] [levels, default "1 100 1000 10000"]
# KMSD_BIN=path runs another kmsd binary (e.g. an older commit's) instead of this tree's.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_bench_deps
secs="${1:-10}"
levels="${2:-1 100 1000 10000}"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
if [ -n "${KMSD_BIN:-}" ]; then cp "$KMSD_BIN" "$work/kmsd"; else go build -o "$work/kmsd" ./cmd/kmsd; fi
go build -o "$work/kmsload" ./cmd/kmsload
cat > "$work/sign.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"message":"' .. string.rep("A", 340) .. '"}'
wrk.headers["Content-Type"] = "application/json"
LUA

port=$((18400 + RANDOM % 1000))
url="http://127.0.0.1:$port"
data="$work/data"
"$work/kmsd" --data-dir "$data" --addr "127.0.0.1:$port" --insecure-http 2>"$work/kmsd.log" &
for _ in $(seq 100); do curl -sf "$url/readyz" >/dev/null && break; sleep 0.1; done
tok=$(cat "$data/admin.token")
curl -sf -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' \
  "$url/v1/keys" -d '{"name":"bench","kind":"ml-dsa-65"}' >/dev/null

# cpu: the aggregate cpu line of /proc/stat (for the share stolen by the
# hypervisor during a run: on a shared VM it swings from 5% to 40% and
# moves every figure with it).
cpu() { awk '$1=="cpu" {print $2+$3+$4+$5+$6+$7+$8+$9, $9}' /proc/stat; }
# wrkrun NAME URL [wrk args]: prints "NAME req/s p50 p99 steal%".
wrkrun() {
  local name="$1" target="$2"; shift 2
  local out before after
  before=$(cpu)
  out=$(wrk -t2 -c16 -d"${secs}s" --latency "$@" "$target")
  after=$(cpu)
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx answers in $name" >&2; echo "$out" >&2; exit 1; fi
  echo "$name $(echo "$out" | awk '/Requests\/sec/ {print $2}') $(echo "$out" | awk '$1=="50%" {print $2}') $(echo "$out" | awk '$1=="99%" {print $2}') $(echo "$before $after" | awk '{printf "%.0f", 100 * ($4 - $2) / ($3 - $1)}')"
}
# rot N [SAMPLE]: rotate to N versions, then SAMPLE (default 30) measured rotations.
rot() { "$work/kmsload" rotate --addr "$url" --token-file "$data/admin.token" --key bench --to "$1" --sample "${2:-30}"; }

{
  for level in $levels; do
    rot "$level" 0 # no rotation measured: reach the level (if not yet)
    wrkrun "sign $level" "$url/v1/keys/bench/sign" -H "Authorization: Bearer $tok" -s "$work/sign.lua"
    wrkrun "public-key $level" "$url/v1/keys/bench/versions/primary/public-key" -H "Authorization: Bearer $tok"
    if [ "$level" -eq 1 ]; then rot 10; else rot "$level"; fi # rotation at 10 versions: the reference
  done
  "$work/kmsload" bare-sign --addr "127.0.0.1:$((port + 1))" &
  bare=$!
  for _ in $(seq 100); do curl -sf -X POST -d '{"message":"AA=="}' "http://127.0.0.1:$((port + 1))/sign" >/dev/null && break; sleep 0.1; done
  for pair in 1 2 3; do # alternating, so that a slow spell of the machine hits both
    wrkrun "bare-sign $pair" "http://127.0.0.1:$((port + 1))/sign" -s "$work/sign.lua"
    wrkrun "kmsd-sign $pair" "$url/v1/keys/bench/sign" -H "Authorization: Bearer $tok" -s "$work/sign.lua"
  done
  kill "$bare"
} > "$work/results"
cat "$work/results" >&2

awk '
  $1=="sign" || $1=="public-key" { r[$1" "$2]=$3; p50[$1" "$2]=$4; p99[$1" "$2]=$5; st[$1" "$2]=$6; if ($1=="sign") lv[++n]=$2 }
  $1=="rotate" { rp50[$2]=$3; rp99[$2]=$4 }
  $1=="bare-sign" || $1=="kmsd-sign" { r[$1" "$2]=$3; p50[$1" "$2]=$4; p99[$1" "$2]=$5; st[$1" "$2]=$6 }
  END {
    print "| versions | sign req/s | sign p50 | sign p99 | public-key req/s | public-key p50 | public-key p99 | rotate p50 | rotate p99 | steal (sign, pk) |"
    print "|---|---|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= n; i++) { l = lv[i]
      printf "| %s | %.0f | %s | %s | %.0f | %s | %s | %s ms | %s ms | %s%%, %s%% |\n", l, r["sign " l], p50["sign " l], p99["sign " l], r["public-key " l], p50["public-key " l], p99["public-key " l], (l in rp50 ? rp50[l] : "-"), (l in rp99 ? rp99[l] : "-"), st["sign " l], st["public-key " l] }
    printf "\nrotate p50 at 10 versions: %s ms (p99 %s ms); at %s: %s ms, ratio %.2f (target <= 1.5)\n", rp50[10], rp99[10], lv[n], rp50[lv[n]], rp50[lv[n]] / rp50[10]
    printf "sign throughput at %s versions / at %s: %.2f (target >= 0.90)\n", lv[n], lv[1], r["sign " lv[n]] / r["sign " lv[1]]
    printf "\n| same run, c16, pair | bare req/s | bare p50 | bare p99 | kmsd req/s (audited, %s versions) | kmsd p50 | kmsd p99 | kmsd/bare | steal (bare, kmsd) |\n|---|---|---|---|---|---|---|---|---|\n", lv[n]
    for (i = 1; i <= 3; i++) {
      q = r["kmsd-sign " i] / r["bare-sign " i]; ratio[i] = q
      printf "| %d | %.0f | %s | %s | %.0f | %s | %s | %.2f | %s%%, %s%% |\n", i, r["bare-sign " i], p50["bare-sign " i], p99["bare-sign " i], r["kmsd-sign " i], p50["kmsd-sign " i], p99["kmsd-sign " i], q, st["bare-sign " i], st["kmsd-sign " i] }
    a = ratio[1]; b = ratio[2]; c = ratio[3]
    med = (a > b) ? ((b > c) ? b : ((a > c) ? c : a)) : ((a > c) ? a : ((b > c) ? c : b))
    printf "\nkmsd / bare, median of 3 pairs: %.2f (target >= 0.70)\n", med
  }' "$work/results"
