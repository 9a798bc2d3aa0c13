#!/usr/bin/env bash
# P2/P3: while a client that wrote is still connected, the container shows
# in-use (and QEMU's tools see our lock); after a clean stop in-use is clear
# and qemu-img check is clean.
source "$(dirname "$0")/lib.sh"

truncate -s 64M "$T/disk.raw"
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["auto"]' ] || fail "in-use before any write"

"$NBD_LOAD" --socket "$T/sock" --ops 20 --no-final-flush --hold-file "$T/hold" &
load=$!; PIDS+=("$load")
for i in $(seq 200); do [ -e "$T/hold" ] && break; sleep 0.05; done
[ -e "$T/hold" ] || fail "client did not finish its writes"

[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["in-use","auto"]' ] ||
  fail "expected in-use while serving, got $(bitmap_flags "$T/disk.cbt" b0)"
if qemu-img info "$T/disk.cbt" >/dev/null 2>"$T/lock.err"; then
  fail "qemu-img opened the container we hold for writing"
fi
grep -q "lock" "$T/lock.err" || fail "qemu-img failed, but not on the lock: $(cat "$T/lock.err")"
if [ -x "$CBT" ]; then
  "$CBT" info --output=json "$T/disk.cbt" >"$T/info.json" 2>/dev/null || true
fi

rm -f "$T/hold"
wait "$load" || fail "client failed"
stop_nbdkit "$NBDKIT_PID"
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["auto"]' ] || fail "in-use left after a clean stop"
qemu-img check "$T/disk.cbt" >/dev/null || fail "qemu-img check failed"
echo "OK: in-use while serving, clear after stop"
