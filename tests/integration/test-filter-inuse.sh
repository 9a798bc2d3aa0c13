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
wait_for 60 [ -e "$T/hold" ] || fail "client did not finish its writes"

[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["in-use","auto"]' ] ||
  fail "expected in-use while serving, got $(bitmap_flags "$T/disk.cbt" b0)"
if qemu-img info "$T/disk.cbt" >/dev/null 2>"$T/lock.err"; then
  fail "qemu-img opened the container we hold for writing"
fi
grep -q "lock" "$T/lock.err" || fail "qemu-img failed, but not on the lock: $(cat "$T/lock.err")"
# cbt honours the same locks: it refuses the container the server holds.
[ -x "$CBT" ] || fail "cbt not built: $CBT"
if "$CBT" info --output=json "$T/disk.cbt" >"$T/info.json" 2>"$T/cbt-lock.err"; then
  fail "cbt info opened the container the server holds for writing: $(cat "$T/info.json")"
fi
grep -q "open for write" "$T/cbt-lock.err" ||
  fail "cbt info failed, but not on the lock: $(cat "$T/cbt-lock.err")"
# ... and points at the way to look without stopping it: the filter's socket.
grep -qF "or ask the running filter: cbt info --socket CTL (CTL: its cbt-control= socket)" \
  "$T/cbt-lock.err" || fail "cbt info names no way around the lock: $(cat "$T/cbt-lock.err")"
if "$CBT" map "$T/disk.cbt" --bitmap b0 >/dev/null 2>"$T/cbt-lock.err"; then
  fail "cbt map opened the container the server holds for writing"
fi
grep -q "open for write.*or ask the running filter: cbt map --socket CTL --bitmap b0" \
  "$T/cbt-lock.err" || fail "cbt map: $(cat "$T/cbt-lock.err")"

rm -f "$T/hold"
wait "$load" || fail "client failed"
# A clean stop (SIGTERM) must exit 0; bounded wait, then the EXIT trap kills it.
kill -TERM "$NBDKIT_PID"
for i in $(seq 300); do kill -0 "$NBDKIT_PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$NBDKIT_PID" 2>/dev/null && fail "nbdkit did not stop within 30 s of SIGTERM"
rc=0; wait "$NBDKIT_PID" || rc=$?
[ "$rc" -eq 0 ] || fail "nbdkit exited $rc after SIGTERM"
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["auto"]' ] || fail "in-use left after a clean stop"
qemu-img check "$T/disk.cbt" >/dev/null || fail "qemu-img check failed"
# Once stopped, cbt opens it and agrees with QEMU: consistent, not in use, dirty.
"$CBT" info --output=json "$T/disk.cbt" >"$T/info.json" || fail "cbt info failed after the stop"
jq -e '.bitmaps[] | select(.name == "b0") | (."in-use" == false and .consistent == true
       and ."dirty-bytes" > 0)' "$T/info.json" >/dev/null ||
  fail "cbt info after the stop: $(cat "$T/info.json")"
echo "OK: in-use while serving (QEMU and cbt refused by the lock), clear after a clean stop"
