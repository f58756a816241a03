#!/usr/bin/env bash
# Runs three kmsd replicas on a three-member etcd cluster, all on this
# machine's loopback (for trying replicas out and for the benchmarks; a
# production cluster puts the members on separate machines, with TLS).
#
#   deploy/replicas.sh [DIR]     # state under DIR (default ./replicas); Ctrl-C stops all
#
# Every port is counted from a base port, KMSD_REPLICAS_BASE_PORT (default
# 8430), all on 127.0.0.1:
#   base+1..base+3    the replicas (HTTPS), each with its own local CA
#                     under DIR/kmsd-N/tls
#   base+4            versitygw (an S3-compatible server over DIR/s3) for
#                     the HE keys' blobs, bucket "kmsd"; credentials in
#                     DIR/s3.env
#   base+11..base+13  etcd clients;  base+21..base+23  etcd peers
# The script prints the ports it uses, waits for each server with a
# deadline (and stops, printing the server's last log lines, if one exits
# or does not answer), then prints "three replicas: ..." and runs until
# interrupted.
# The first replica makes the embedded SoftHSM token under DIR/kmsd-1;
# the others use that token through --pkcs11-module (one KEK for all, as
# replicas on a real HSM share a partition). The admin token is
# DIR/kmsd-1/admin.token.
set -euo pipefail
cd "$(dirname "$0")/.."
base="${KMSD_REPLICAS_BASE_PORT:-8430}"
case "$base" in
  ''|*[!0-9]*) echo "KMSD_REPLICAS_BASE_PORT=$base: want a port number" >&2; exit 2 ;;
esac
if [ "$base" -lt 1024 ] || [ "$base" -gt 65500 ]; then
  echo "KMSD_REPLICAS_BASE_PORT=$base: want 1024..65500 (the script uses base+1 to base+23)" >&2
  exit 2
fi
. deploy/deps.sh
kmsd_deps
command -v etcd >/dev/null 2>&1 || kmsd_install_etcd
command -v curl >/dev/null 2>&1 || kmsd_apt_install curl
kmsd_install_versitygw
dir="$(realpath -m "${1:-./replicas}")"
mkdir -p "$dir/bin"
echo "building kmsd into $dir/bin" >&2
go build -o "$dir/bin/kmsd" ./cmd/kmsd
kmsd_port() { echo $((base + $1)); }
s3_port=$((base + 4))
echo "ports: replicas $((base + 1))-$((base + 3)), versitygw $s3_port, etcd clients $((base + 11))-$((base + 13)), etcd peers $((base + 21))-$((base + 23)) (KMSD_REPLICAS_BASE_PORT=$base)" >&2
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait' EXIT INT TERM

# wait_for NAME PID LOG SECONDS CMD...: runs CMD until it succeeds; fails,
# with LOG's last lines, if the process PID exits or SECONDS pass.
wait_for() {
  local name="$1" pid="$2" log="$3" secs="$4"
  shift 4
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name exited; the last lines of $log:" >&2
      tail -n 15 "$log" >&2
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$name did not answer within ${secs} s; the last lines of $log:" >&2
      tail -n 15 "$log" >&2
      exit 1
    fi
    sleep 0.2
  done
}

cluster="m1=http://127.0.0.1:$((base + 21)),m2=http://127.0.0.1:$((base + 22)),m3=http://127.0.0.1:$((base + 23))"
state=new
[ -d "$dir/etcd-1" ] && state=existing
for i in 1 2 3; do
  etcd --name "m$i" --data-dir "$dir/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:$((base + 10 + i))" --advertise-client-urls "http://127.0.0.1:$((base + 10 + i))" \
    --listen-peer-urls "http://127.0.0.1:$((base + 20 + i))" --initial-advertise-peer-urls "http://127.0.0.1:$((base + 20 + i))" \
    --initial-cluster "$cluster" --initial-cluster-state "$state" --initial-cluster-token kmsd-replicas \
    --auto-compaction-mode periodic --auto-compaction-retention 10m \
    2>"$dir/etcd-$i.log" &
  pids+=($!)
done
if [ ! -f "$dir/s3.env" ]; then
  ( umask 077; printf 'AWS_ACCESS_KEY_ID=kmsd%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
    "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$dir/s3.env" )
fi
set -a; . "$dir/s3.env"; set +a
mkdir -p "$dir/s3/root" "$dir/s3/sidecar"
versitygw --port "127.0.0.1:$s3_port" --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" --quiet \
  posix --sidecar "$dir/s3/sidecar" "$dir/s3/root" >"$dir/s3.log" 2>&1 &
s3_pid=$!
pids+=("$s3_pid")
# make_bucket: the bucket exists (made now, or before).
make_bucket() {
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" -X PUT "http://127.0.0.1:$s3_port/kmsd" \
    -H "x-amz-content-sha256: $(printf '' | sha256sum | cut -d' ' -f1)") || code=000
  case "$code" in 200|409) return 0 ;; esac
  return 1
}
wait_for versitygw "$s3_pid" "$dir/s3.log" 30 make_bucket
endpoints="http://127.0.0.1:$((base + 11)),http://127.0.0.1:$((base + 12)),http://127.0.0.1:$((base + 13))"
common=(--store etcd --etcd-endpoints "$endpoints" --etcd-prefix /kmsd/ --s3-endpoint "http://127.0.0.1:$s3_port" --s3-bucket kmsd)
ready() { [ -f "$1/tls/ca.pem" ] && curl -sf --cacert "$1/tls/ca.pem" "https://127.0.0.1:$2/readyz"; }
"$dir/bin/kmsd" "${common[@]}" --data-dir "$dir/kmsd-1" --addr "127.0.0.1:$(kmsd_port 1)" 2>"$dir/kmsd-1.log" &
pids+=($!)
echo "starting replica 1 (it waits for the etcd cluster to elect a leader)" >&2
wait_for "kmsd replica 1" $! "$dir/kmsd-1.log" 60 ready "$dir/kmsd-1" "$(kmsd_port 1)"
module=$(sed -n 's/^.*"module":"\([^"]*\)".*$/\1/p' "$dir/kmsd-1.log" | head -1)
# One at a time: SoftHSM's file store is not safe for two processes opening
# the token at once.
for i in 2 3; do
  SOFTHSM2_CONF="$dir/kmsd-1/softhsm/softhsm2.conf" "$dir/bin/kmsd" "${common[@]}" --data-dir "$dir/kmsd-$i" --addr "127.0.0.1:$(kmsd_port "$i")" \
    --pkcs11-module "$module" --pkcs11-pin-file "$dir/kmsd-1/softhsm/pin" 2>"$dir/kmsd-$i.log" &
  pids+=($!)
  wait_for "kmsd replica $i" $! "$dir/kmsd-$i.log" 60 ready "$dir/kmsd-$i" "$(kmsd_port "$i")"
done
echo "three replicas: https://127.0.0.1:$(kmsd_port 1) $(kmsd_port 2) $(kmsd_port 3) (CA of each: $dir/kmsd-N/tls/ca.pem), admin token $dir/kmsd-1/admin.token; logs in $dir" >&2
wait
