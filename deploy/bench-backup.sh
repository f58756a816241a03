#!/usr/bin/env bash
# Backup, restore and KEK rotation at size (issue 22): kmsd on its
# embedded store with KEYS keys of VERSIONS versions each (ML-DSA-44: made
# and rotated over HTTP) and one CKKS key of the given parameters. It
# times kmsctl backup (with the HE blobs and without), kmsd restore into a
# new data dir through the same SoftHSM token, and kmsctl kek rotate
# --wait on the restored store, and prints a Markdown table for
# BENCHMARKS.md (seconds, bytes, rates).
# Usage: deploy/bench-backup.sh [keys, default 1000] [versions per key, default 10] [he params, default ckks-logn15]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_bench_deps
keys="${1:-1000}"
per="${2:-10}"
params="${3:-ckks-logn15}"
work=$(mktemp -d)
port=$((18400 + RANDOM % 1000))
trap 'pkill -f "$work/kmsd" 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/kmsd" ./cmd/kmsd
go build -o "$work/kmsctl" ./cmd/kmsctl
data="$work/data"
start_kmsd() {
  "$work/kmsd" --data-dir "$1" --addr "127.0.0.1:$port" --insecure-http "${@:2}" 2>>"$work/kmsd.log" &
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && return; sleep 0.1; done
  echo "kmsd did not start" >&2; tail "$work/kmsd.log" >&2; exit 1
}
start_kmsd "$data"
export KMS_URL="http://127.0.0.1:$port" KMS_TOKEN_FILE="$data/admin.token" KMS_TIMEOUT=60m
tok=$(cat "$data/admin.token")
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b - a}'; }
t0=$(now)
seq -f 'k%05g' 1 "$keys" | xargs -P 4 -I{} sh -c '
  curl -sf -H "Authorization: Bearer '"$tok"'" -H "Content-Type: application/json" "'"$KMS_URL"'/v1/keys" -d "{\"name\":\"{}\",\"kind\":\"ml-dsa-44\"}" >/dev/null
  for _ in $(seq 2 '"$per"'); do curl -sf -X POST -H "Authorization: Bearer '"$tok"'" "'"$KMS_URL"'/v1/keys/{}/rotate" >/dev/null; done'
t1=$(now)
"$work/kmsctl" keys create he --kind ckks --params "$params" --rotations 1,2,4,8,16 --relinearization >/dev/null 2>&1
t2=$(now)
versions=$((keys * per))
echo "made $versions versions in $(secs "$t0" "$t1") s and a $params keyset in $(secs "$t1" "$t2") s" >&2
t3=$(now)
"$work/kmsctl" backup --out "$work/full.kmsbak" >/dev/null 2>&1
t4=$(now)
"$work/kmsctl" backup --out "$work/noblobs.kmsbak" --with-blobs=false >/dev/null 2>&1
t5=$(now)
kill "$(pgrep -f "$work/kmsd --data-dir $data")"
wait 2>/dev/null || true
mod=$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so 2>/dev/null | head -1)
t6=$(now)
SOFTHSM2_CONF="$data/softhsm/softhsm2.conf" "$work/kmsd" restore --from "$work/full.kmsbak" --data-dir "$work/restored" \
  --pkcs11-module "$mod" --pkcs11-pin-file "$data/softhsm/pin" >/dev/null 2>>"$work/kmsd.log"
t7=$(now)
SOFTHSM2_CONF="$data/softhsm/softhsm2.conf" start_kmsd "$work/restored" --pkcs11-module "$mod" --pkcs11-pin-file "$data/softhsm/pin"
export KMS_TOKEN_FILE="$data/admin.token"
t8=$(now)
rewrapped=$("$work/kmsctl" kek rotate --wait 2>/dev/null | jq .rotation.rewrapped)
t9=$(now)
size() { stat -c %s "$1"; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b / 1048576}'; }
blobs=$(du -sb "$data/blobs" | cut -f1)
echo "| what | seconds | size MiB | rate |"
echo "|---|---|---|---|"
echo "| kmsctl backup, $versions versions + $params keyset ($(mib "$blobs") MiB of blobs) | $(secs "$t3" "$t4") | $(mib "$(size "$work/full.kmsbak")") | $(awk -v b="$(size "$work/full.kmsbak")" -v s="$(secs "$t3" "$t4")" 'BEGIN{printf "%.0f MiB/s", b/1048576/s}') |"
echo "| kmsctl backup --with-blobs=false, the same | $(secs "$t4" "$t5") | $(mib "$(size "$work/noblobs.kmsbak")") | $(awk -v v="$versions" -v s="$(secs "$t4" "$t5")" 'BEGIN{printf "%.0f versions/s", v/s}') |"
echo "| kmsd restore of the full backup (kms.db $(mib "$(size "$work/restored/kms.db")") MiB) | $(secs "$t6" "$t7") | | $(awk -v b="$(size "$work/full.kmsbak")" -v s="$(secs "$t6" "$t7")" 'BEGIN{printf "%.0f MiB/s", b/1048576/s}') |"
echo "| kmsctl kek rotate --wait ($rewrapped secrets sealed again) | $(secs "$t8" "$t9") | | $(awk -v v="$rewrapped" -v s="$(secs "$t8" "$t9")" 'BEGIN{printf "%.0f versions/s", v/s}') |"
