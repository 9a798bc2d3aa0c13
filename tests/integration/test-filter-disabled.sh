#!/usr/bin/env bash
# Several bitmaps: every enabled (auto) bitmap records, a disabled one is
# left untouched (same flags, same contents, same directory entry bytes).
source "$(dirname "$0")/lib.sh"

truncate -s 64M "$T/disk.raw"
args=(--filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" cbt-bitmap=b0)

# Round 1: b0 and b1 both record.
start_nbdkit "$T/sock" "${args[@]}" cbt-bitmap=b1 cbt-create=true
"$NBD_LOAD" --socket "$T/sock" --seed 41 --ops 300 --region 0:16777216 --expected "$T/r1.json"
stop_nbdkit "$NBDKIT_PID"
qemu-img bitmap --disable "$T/disk.cbt" b1
qemu-img bitmap --add -g 1M "$T/disk.cbt" b2      # enabled, made by QEMU
b1_before=$(qemu_map "$T/disk.cbt" b1)
[ "$b1_before" = "$(normalize "$T/r1.json")" ] || fail "b1 did not record round 1"

# Round 2: only b0 is named, but b2 (auto) records too; b1 must not change.
start_nbdkit "$T/sock" "${args[@]}"
"$NBD_LOAD" --socket "$T/sock" --seed 42 --ops 300 --region 33554432:16777216 \
  --expected "$T/r2.json"
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '[]' ] || fail "disabled b1 touched while serving"
stop_nbdkit "$NBDKIT_PID"

[ "$(bitmap_flags "$T/disk.cbt" b1)" = '[]' ] || fail "b1 flags changed"
[ "$(qemu_map "$T/disk.cbt" b1)" = "$b1_before" ] || fail "disabled b1 changed"
python3 "$(dirname "$0")/extents.py" subset "$T/r2.json" <(qemu_map "$T/disk.cbt" b2) 1048576 >/dev/null ||
  fail "auto bitmap b2 (made by qemu-img) missed writes"
python3 "$(dirname "$0")/extents.py" subset "$T/r1.json" <(qemu_map "$T/disk.cbt" b0) 65536 >/dev/null ||
  fail "b0 lost round 1"
python3 "$(dirname "$0")/extents.py" subset "$T/r2.json" <(qemu_map "$T/disk.cbt" b0) 65536 >/dev/null ||
  fail "b0 missed round 2"
qemu-img check "$T/disk.cbt" >/dev/null || fail "qemu-img check failed"
echo "OK: enabled bitmaps record, disabled b1 untouched"
