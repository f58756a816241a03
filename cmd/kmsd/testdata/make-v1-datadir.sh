#!/usr/bin/env bash
# Makes v1-datadir.tar.gz: a data dir written by kmsd at commit bf1bdf3
# (schema 1: every version inside its key's record), for the migration test
# (TestMigratesDataDirOfSchema1). It is kept as made; re-making it needs
# that commit's binaries:
#
#   git worktree add /tmp/v1 bf1bdf3 && (cd /tmp/v1 && go build -o /tmp/kmsd-v1 ./cmd/kmsd && go build -o /tmp/kmsctl-v1 ./cmd/kmsctl)
#   cmd/kmsd/testdata/make-v1-datadir.sh /tmp/kmsd-v1 /tmp/kmsctl-v1
#
# The data dir holds: key "sig" (ml-dsa-65; version 1 signed "fixture
# message" into sig-v1.b64; version 2 disabled; version 3 primary) and
# key "kem" (ml-kem-768, one version), the admin token, and the audit log
# of all that.
set -euo pipefail
kmsd="$1" kmsctl="$2"
out="$(cd "$(dirname "$0")" && pwd)/v1-datadir.tar.gz"
work=$(mktemp -d)
trap 'kill %1 2>/dev/null || true; rm -rf "$work"' EXIT
data="$work/data"
port=$((19400 + RANDOM % 500))
"$kmsd" --data-dir "$data" --addr "127.0.0.1:$port" --audit-wal-mib 1 2>"$work/log" &
for _ in $(seq 100); do [ -f "$data/admin.token" ] && curl -sf --cacert "$data/tls/ca.pem" "https://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
ctl() { "$kmsctl" --addr "https://127.0.0.1:$port" --ca-cert "$data/tls/ca.pem" --token-file "$data/admin.token" "$@"; }
ctl keys create sig --kind ml-dsa-65 >/dev/null
printf 'fixture message' | base64 > "$work/msg.b64"
ctl sign sig --message "$(cat "$work/msg.b64")" | python3 -c 'import json,sys; print(json.load(sys.stdin)["signature"])' > "$work/sig-v1.b64"
ctl keys rotate sig >/dev/null
ctl keys rotate sig >/dev/null
ctl versions disable sig 2 >/dev/null
ctl keys create kem --kind ml-kem-768 >/dev/null
kill -TERM %1; wait %1 || true
cp "$work/sig-v1.b64" "$data/"
tar -C "$work" -czf "$out" data
ls -l "$out"
