#!/usr/bin/env bash
# Measures how fast kmsd serves a full HE keyset's blobs over 127.0.0.1,
# beside nginx serving the same files in the same run, and how much kmsd's
# memory grows while serving. Prints lines for BENCHMARKS.md.
# Usage: deploy/bench-blobs.sh [preset, default ckks-logn15] [seconds, default 10] [connections, default 4]
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
kmsd_bench_deps
command -v nginx >/dev/null 2>&1 || kmsd_apt_install nginx-light
preset="${1:-ckks-logn15}" secs="${2:-10}" conns="${3:-4}"
work=$(mktemp -d)
trap 'kill $kpid 2>/dev/null || true; [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/kmsd" ./cmd/kmsd
kport=$((19400 + RANDOM % 500)) nport=$((19900 + RANDOM % 500))
"$work/kmsd" --data-dir "$work/data" --addr "127.0.0.1:$kport" --insecure-http --log-level warn 2>"$work/kmsd.log" &
kpid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$kport/readyz" >/dev/null && break; sleep 0.1; done
tok=$(cat "$work/data/admin.token")
H="Authorization: Bearer $tok"
rots=$(python3 -c "import sys; n=int(sys.argv[1]); print(','.join(str(1<<i) for i in range(n)))" "$(( ${preset##*logn} - 1 ))")
curl -sf -H "$H" -H 'Content-Type: application/json' "http://127.0.0.1:$kport/v1/keys" \
  -d "{\"name\":\"bench\",\"kind\":\"ckks\",\"policy\":{\"params\":\"$preset\",\"rotations\":[$rots],\"relinearization\":true}}" >/dev/null
for _ in $(seq 600); do
  curl -sf -H "$H" "http://127.0.0.1:$kport/v1/keys/bench/versions/1/evaluation-keys" > "$work/manifest.json" 2>/dev/null && break
  sleep 0.5
done
paths=$(python3 -c '
import json,sys
m=json.load(open(sys.argv[1]))
ds=[m["public_key"]["digest"]]+([m["relinearization_key"]["digest"]] if m["relinearization_key"] else [])+[g["digest"] for g in m["galois_keys"]]
print(" ".join("/v1/blobs/sha256/"+d.split(":")[1] for d in ds))' "$work/manifest.json")
total=$(python3 -c '
import json,sys
m=json.load(open(sys.argv[1]))
print(m["public_key"]["size"]+(m["relinearization_key"]["size"] if m["relinearization_key"] else 0)+sum(g["size"] for g in m["galois_keys"]))' "$work/manifest.json")
{ echo 'paths = {'; for p in $paths; do echo "  \"$p\","; done; echo '}'
  echo 'i = 0'
  echo 'request = function() i = i % #paths + 1; return wrk.format("GET", paths[i]) end'; } > "$work/blobs.lua"
# The blobs are 0600 files in a 0700 directory of kmsd's user: nginx's
# workers must run as that user to read them.
cat > "$work/nginx.conf" <<NGINX
user $(id -un);
daemon on;
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 256; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  server {
    listen 127.0.0.1:$nport;
    location /v1/blobs/sha256/ { alias $work/data/blobs/; }
  }
}
NGINX
nginx -c "$work/nginx.conf" -p "$work"
rss() { awk '/^VmRSS/ {print $2}' "/proc/$kpid/status"; }
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$kpid/status"; }
# Warm both (page cache) once.
wrk -t1 -c1 -d2s -s "$work/blobs.lua" -H "$H" "http://127.0.0.1:$kport" >/dev/null
wrk -t1 -c1 -d2s -s "$work/blobs.lua" "http://127.0.0.1:$nport" >/dev/null
rss0=$(rss)
kout=$(wrk -t2 -c"$conns" -d"${secs}s" -s "$work/blobs.lua" -H "$H" "http://127.0.0.1:$kport")
hwm1=$(hwm) rss1=$(rss)
nout=$(wrk -t2 -c"$conns" -d"${secs}s" -s "$work/blobs.lua" "http://127.0.0.1:$nport")
for out in "$kout" "$nout"; do
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx answers:" >&2; echo "$out" >&2; exit 1; fi
done
tr() { echo "$1" | awk '/Transfer\/sec/ {v=$2; u=substr(v, length(v)-1); n=substr(v, 1, length(v)-2)+0; if (u=="GB") n*=1024; if (u=="KB") n/=1024; printf "%.0f", n}'; }
kt=$(tr "$kout") nt=$(tr "$nout")
echo "keyset: $preset, $(echo $paths | wc -w) blobs, $((total >> 20)) MiB; wrk -t2 -c$conns -d${secs}s over 127.0.0.1"
echo "| server | MiB/s | requests/s |"
echo "|---|---|---|"
echo "| kmsd | $kt | $(echo "$kout" | awk '/Requests\/sec/ {printf "%.1f", $2}') |"
echo "| nginx $(nginx -v 2>&1 | sed 's/.*\///') | $nt | $(echo "$nout" | awk '/Requests\/sec/ {printf "%.1f", $2}') |"
awk -v k="$kt" -v n="$nt" 'BEGIN { printf "kmsd/nginx: %.2f\n", k / n }'
echo "kmsd RSS: $((rss0 >> 10)) MiB before the load, $((rss1 >> 10)) MiB after, peak $((hwm1 >> 10)) MiB (peak growth $(((hwm1 - rss0) >> 10)) MiB)"
