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
command -v wrk >/dev/null 2>&1 || kmsd_apt_install wrk
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

# wrkrun NAME URL [wrk args]: prints "NAME req/s p50 p99".
wrkrun() {
  local name="$1" target="$2"; shift 2
  local out
  out=$(wrk -t2 -c16 -d"${secs}s" --latency "$@" "$target")
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx answers in $name" >&2; echo "$out" >&2; exit 1; fi
  echo "$name $(echo "$out" | awk '/Requests\/sec/ {print $2}') $(echo "$out" | awk '$1=="50%" {print $2}') $(echo "$out" | awk '$1=="99%" {print $2}')"
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
  wrkrun "bare-sign" "http://127.0.0.1:$((port + 1))/sign" -s "$work/sign.lua"
  wrkrun "kmsd-sign" "$url/v1/keys/bench/sign" -H "Authorization: Bearer $tok" -s "$work/sign.lua"
  kill "$bare"
} > "$work/results"
cat "$work/results" >&2

awk '
  $1=="sign" || $1=="public-key" { r[$1" "$2]=$3; p50[$1" "$2]=$4; p99[$1" "$2]=$5; if ($1=="sign") lv[++n]=$2 }
  $1=="rotate" { rp50[$2]=$3; rp99[$2]=$4 }
  $1=="bare-sign" || $1=="kmsd-sign" { r[$1]=$2; p50[$1]=$3; p99[$1]=$4 }
  END {
    print "| versions | sign req/s | sign p50 | sign p99 | public-key req/s | public-key p50 | public-key p99 | rotate p50 | rotate p99 |"
    print "|---|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= n; i++) { l = lv[i]
      printf "| %s | %.0f | %s | %s | %.0f | %s | %s | %s ms | %s ms |\n", l, r["sign " l], p50["sign " l], p99["sign " l], r["public-key " l], p50["public-key " l], p99["public-key " l], (l in rp50 ? rp50[l] : "-"), (l in rp99 ? rp99[l] : "-") }
    printf "\nrotate p50 at 10 versions: %s ms (p99 %s ms); at %s: %s ms, ratio %.2f (target <= 1.5)\n", rp50[10], rp99[10], lv[n], rp50[lv[n]], rp50[lv[n]] / rp50[10]
    printf "sign throughput at %s versions / at %s: %.2f (target >= 0.90)\n", lv[n], lv[1], r["sign " lv[n]] / r["sign " lv[1]]
    printf "\n| same run, c16 | req/s | p50 | p99 |\n|---|---|---|---|\n"
    printf "| bare circl sign server | %.0f | %s | %s |\n", r["bare-sign"], p50["bare-sign"], p99["bare-sign"]
    printf "| kmsd sign (audited, %s versions) | %.0f | %s | %s |\n", lv[n], r["kmsd-sign"], p50["kmsd-sign"], p99["kmsd-sign"]
    printf "\nkmsd / bare: %.2f (target >= 0.70)\n", r["kmsd-sign"] / r["bare-sign"]
  }' "$work/results"
