#!/usr/bin/env bash
# Runs three kmsd replicas on a three-member etcd cluster, all on this
# machine's loopback (for trying replicas out and for the benchmarks; a
# production cluster puts the members on separate machines, with TLS).
#
#   deploy/replicas.sh [DIR]     # state under DIR (default ./replicas); Ctrl-C stops all
#
# etcd members listen on 127.0.0.1:23791..23793 (clients) and
# 127.0.0.1:23801..23803 (peers); the replicas serve HTTPS on
# 127.0.0.1:8431..8433, each with its own local CA under DIR/kmsd-N/tls.
# The first replica makes the embedded SoftHSM token under DIR/kmsd-1;
# the others use that token through --pkcs11-module (one KEK for all, as
# replicas on a real HSM share a partition). The admin token is
# DIR/kmsd-1/admin.token. The HE keys' blobs go to the bucket "kmsd" of a
# versitygw (an S3-compatible server) on 127.0.0.1:7431, over DIR/s3; its
# credentials are in DIR/s3.env.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/deps.sh
kmsd_deps
command -v etcd >/dev/null 2>&1 || kmsd_install_etcd
command -v curl >/dev/null 2>&1 || kmsd_apt_install curl
kmsd_install_versitygw
dir="$(realpath -m "${1:-./replicas}")"
mkdir -p "$dir/bin"
go build -o "$dir/bin/kmsd" ./cmd/kmsd
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait' EXIT INT TERM
cluster="m1=http://127.0.0.1:23801,m2=http://127.0.0.1:23802,m3=http://127.0.0.1:23803"
state=new
[ -d "$dir/etcd-1" ] && state=existing
for i in 1 2 3; do
  etcd --name "m$i" --data-dir "$dir/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
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
versitygw --port 127.0.0.1:7431 --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" --quiet \
  posix --sidecar "$dir/s3/sidecar" "$dir/s3/root" >"$dir/s3.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" -X PUT http://127.0.0.1:7431/kmsd \
    -H "x-amz-content-sha256: $(printf '' | sha256sum | cut -d' ' -f1)") || code=000
  case "$code" in 200|409) break ;; esac   # made, or made before
  sleep 0.1
done
endpoints="http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793"
common=(--store etcd --etcd-endpoints "$endpoints" --etcd-prefix /kmsd/ --s3-endpoint http://127.0.0.1:7431 --s3-bucket kmsd)
"$dir/bin/kmsd" "${common[@]}" --data-dir "$dir/kmsd-1" --addr 127.0.0.1:8431 2>"$dir/kmsd-1.log" &
pids+=($!)
for _ in $(seq 200); do
  [ -f "$dir/kmsd-1/tls/ca.pem" ] && curl -sf --cacert "$dir/kmsd-1/tls/ca.pem" https://127.0.0.1:8431/readyz >/dev/null && break
  sleep 0.1
done
module=$(sed -n 's/^.*"module":"\([^"]*\)".*$/\1/p' "$dir/kmsd-1.log" | head -1)
# One at a time: SoftHSM's file store is not safe for two processes opening
# the token at once.
for i in 2 3; do
  SOFTHSM2_CONF="$dir/kmsd-1/softhsm/softhsm2.conf" "$dir/bin/kmsd" "${common[@]}" --data-dir "$dir/kmsd-$i" --addr "127.0.0.1:843$i" \
    --pkcs11-module "$module" --pkcs11-pin-file "$dir/kmsd-1/softhsm/pin" 2>"$dir/kmsd-$i.log" &
  pids+=($!)
  for _ in $(seq 200); do
    [ -f "$dir/kmsd-$i/tls/ca.pem" ] && curl -sf --cacert "$dir/kmsd-$i/tls/ca.pem" "https://127.0.0.1:843$i/readyz" >/dev/null && break
    sleep 0.1
  done
done
echo "three replicas: https://127.0.0.1:8431 8432 8433 (CA of each: $dir/kmsd-N/tls/ca.pem), admin token $dir/kmsd-1/admin.token; logs in $dir" >&2
wait
