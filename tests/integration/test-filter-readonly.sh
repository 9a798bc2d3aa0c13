#!/usr/bin/env bash
# nbdkit -r: nothing is ever written to the container.
source "$(dirname "$0")/lib.sh"

truncate -s 64M "$T/disk.raw"
qemu-img create -q -f qcow2 "$T/disk.cbt" 64M
qemu-img bitmap --add "$T/disk.cbt" b0
sum=$(md5sum <"$T/disk.cbt")
start_nbdkit "$T/sock" -r --filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" cbt-bitmap=b0
timeout 30 nbdinfo --map "nbd+unix:///?socket=$T/sock" >/dev/null || fail "cannot read"
if timeout 30 qemu-io -f raw -c 'write 0 4k' "nbd+unix:///?socket=$T/sock" 2>/dev/null | grep -q wrote; then
  fail "a write succeeded on a read-only export"
fi
stop_nbdkit "$NBDKIT_PID"
[ "$(md5sum <"$T/disk.cbt")" = "$sum" ] || fail "container written under -r"
echo "OK: container unchanged under nbdkit -r"
