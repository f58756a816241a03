#!/usr/bin/env bash
# Sets up Debian's opencryptoki soft token for kmsd (and its tests): installs
# the package if missing (without starting services), starts the slot daemon
# pkcsslotd if it is not running, and initializes the soft token with the
# label OCK_LABEL (default kmsd-ock) unless it is initialized already and
# its user PIN still logs in. Prints, as shell assignments, the module path,
# the token label and a file holding the user PIN:
#
#   eval "$(deploy/ock.sh)"   # OCK_MODULE, OCK_TOKEN, OCK_PIN_FILE
#
# Needs root. opencryptoki keeps its token under /var/lib/opencryptoki
# (fixed paths in 3.8): one soft token per machine. OCK_RESET=1 wipes it and
# starts again. The PINs are made once and kept in
# /var/lib/opencryptoki/kmsd-ock.pins (0600).
set -euo pipefail
label=${OCK_LABEL:-kmsd-ock}
tok=/var/lib/opencryptoki/swtok
conf=/etc/opencryptoki/opencryptoki.conf
pins=/var/lib/opencryptoki/kmsd-ock.pins
say() { echo "ock.sh: $*" >&2; }

if ! dpkg-query -W -f='${Status}' opencryptoki 2>/dev/null | grep -q 'ok installed'; then
  say "installing opencryptoki"
  export DEBIAN_FRONTEND=noninteractive
  # Its postinst starts pkcsslotd through invoke-rc.d: refused here, the
  # daemon is started below, the same way with or without systemd.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && own_policy=1
  fi
  apt-get install -y -qq --no-install-recommends opencryptoki >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends opencryptoki >/dev/null; }
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
# pkcs11-tool (opensc) checks the login; pgrep (procps, not in a minimal
# Debian) keeps pkcsslotd from being started twice.
for tool in pkcs11-tool:opensc pgrep:procps; do
  command -v "${tool%%:*}" >/dev/null || apt-get install -y -qq --no-install-recommends "${tool#*:}" >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${tool#*:}" >/dev/null; }
done
module=$(dpkg -L opencryptoki | grep -m1 '/pkcs11/libopencryptoki\.so$')

getent group pkcs11 >/dev/null || addgroup --system pkcs11 >/dev/null
for d in /var/lock/opencryptoki /var/lock/opencryptoki/swtok /var/lib/opencryptoki "$tok" "$tok/TOK_OBJ" /var/log/opencryptoki; do
  mkdir -p "$d"; chown root:pkcs11 "$d"; chmod 0770 "$d"
done

# pkcsslotd has no guard against a second instance (which would wipe the
# first one's shared memory): start it only if none runs.
if ! pgrep -x pkcsslotd >/dev/null; then
  rm -f /var/run/pkcsslotd.pid
  /usr/sbin/pkcsslotd
  for _ in $(seq 50); do [ -S /var/run/pkcsslotd.socket ] && break; sleep 0.1; done
  [ -S /var/run/pkcsslotd.socket ] || { say "pkcsslotd did not start"; exit 1; }
fi
# The soft token's slot: the one whose stdll is libpkcs11_sw.so.
slot=$(awk '/^[ \t]*slot[ \t]+[0-9]/{s=$2;sw=0} /libpkcs11_sw\.so/{sw=1} /^[ \t]*}/{if(sw){print s;exit}}' "$conf")
[ -n "$slot" ] || { say "no soft token slot in $conf"; exit 1; }

if [ ! -s "$pins" ] || [ "${OCK_RESET:-0}" = 1 ]; then
  # PINs are 4 to 8 characters in 3.8.
  so="s$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
  user="u$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
  init=1
else
  . "$pins"
  init=0
  pkcs11-tool --module "$module" --slot "$slot" --login --pin "$user" -O >/dev/null 2>&1 || init=1
fi
if [ "$init" = 1 ]; then
  say "initializing the soft token in slot $slot as \"$label\""
  # C_InitToken over a token whose SO PIN was changed leaves it unusable in
  # 3.8: start from empty files instead.
  rm -f "$tok/NVTOK.DAT" "$tok/MK_SO" "$tok/MK_USER" /dev/shm/var.lib.opencryptoki.swtok
  find "$tok/TOK_OBJ" -mindepth 1 -delete
  printf '%s\n' "$label" | pkcsconf -c "$slot" -I -S 87654321 >/dev/null
  pkcsconf -c "$slot" -P -S 87654321 -n "$so" >/dev/null
  pkcsconf -c "$slot" -u -S "$so" -n "$user" >/dev/null
  umask 077
  printf 'so=%s\nuser=%s\n' "$so" "$user" > "$pins"
  pkcs11-tool --module "$module" --slot "$slot" --login --pin "$user" -O >/dev/null 2>&1 || { say "the new token does not log in"; exit 1; }
fi
umask 077
printf '%s\n' "$user" > /var/lib/opencryptoki/kmsd-ock.pin
printf 'OCK_MODULE=%s\nOCK_TOKEN=%s\nOCK_PIN_FILE=%s\n' "$module" "$label" /var/lib/opencryptoki/kmsd-ock.pin
