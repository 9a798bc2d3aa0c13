#!/usr/bin/env bash
# cbt-durability=none (QEMU's semantics; process/power: tests/crash/):
#  - write, flush, kill -9 with nothing written after the flush: the bitmap is
#    clean (no in-use) and exact;
#  - kill -9 after unflushed writes: the next start refuses the bitmap and
#    says how to recover; the container is left untouched.
source "$(dirname "$0")/lib.sh"

truncate -s 64M "$T/disk.raw"
args=(--filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true
      cbt-durability=none)

start_nbdkit "$T/sock" "${args[@]}"
# The final flush persists; the client then stays connected (no disconnect).
"$NBD_LOAD" --socket "$T/sock" --seed 5 --ops 500 --expected "$T/expected.json" \
  --hold-file "$T/hold" &
load=$!; PIDS+=("$load")
wait_for 60 [ -e "$T/hold" ] || fail "client did not finish"
kill9_nbdkit "$NBDKIT_PID"
rm -f "$T/hold"; wait "$load" || true
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["auto"]' ] || fail "in-use after flush + kill -9"
[ "$(qemu_map "$T/disk.cbt" b0)" = "$(normalize "$T/expected.json")" ] || fail "map not exact"
echo "ok: flushed bitmap survives kill -9 exactly"

start_nbdkit "$T/sock" "${args[@]}"
"$NBD_LOAD" --socket "$T/sock" --seed 6 --ops 50 --no-final-flush --hold-file "$T/hold" &
load=$!; PIDS+=("$load")
wait_for 60 [ -e "$T/hold" ] || fail "timed out (60 s)"
kill9_nbdkit "$NBDKIT_PID"
rm -f "$T/hold"; wait "$load" || true
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["in-use","auto"]' ] || fail "in-use not left by the crash"
sum=$(md5sum <"$T/disk.cbt")
rm -f "$T/sock"
rc=0
timeout 20 "${NBDKIT_ENV[@]}" nbdkit -f -U "$T/sock" "${args[@]}" 2>"$T/err" || rc=$?
[ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "nbdkit started on an inconsistent bitmap (rc $rc)"
grep -q "not closed cleanly" "$T/err" || fail "no recovery message: $(cat "$T/err")"
grep -q -- "--remove" "$T/err" || fail "message does not say how to recover: $(cat "$T/err")"
[ "$(md5sum <"$T/disk.cbt")" = "$sum" ] || fail "refusing to start changed the container"
echo "OK: refused with: $(grep -m1 'not closed cleanly' "$T/err")"
