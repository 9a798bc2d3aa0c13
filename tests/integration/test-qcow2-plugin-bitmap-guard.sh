#!/usr/bin/env bash
# The qcow2 plugin alone (no cbt filter) on an image with persistent
# bitmaps: nothing records its changes in them, so before its first write it
# marks every enabled bitmap in use (QEMU then treats it as inconsistent,
# as after a crash) and leaves disabled ones alone; a session that only
# reads changes nothing. With the filter on top (internal bitmaps) the
# filter records them instead, and they stay consistent.
LIB_NO_FILTER=1
source "$(dirname "$0")/lib.sh"
need qemu-io

img=$T/disk.qcow2
qemu-img create -q -f qcow2 "$img" 8M
qemu-img bitmap --add "$img" on
qemu-img bitmap --add --disable "$img" off

# Reads only: untouched.
before=$(sha256sum <"$img")
start_nbdkit "$T/s" "$QCOW2_PLUGIN" file="$img"
timeout 30 nbdcopy "nbd+unix:///?socket=$T/s" "$T/out.raw"
stop_nbdkit "$NBDKIT_PID"
[ "$(sha256sum <"$img")" = "$before" ] || fail "a read-only session changed the image"
[ "$(bitmap_flags "$img" on)" = '["auto"]' ] || fail "reads marked the bitmap: $(bitmap_flags "$img" on)"

# A write: the enabled bitmap is in use from then on, the disabled one not.
start_nbdkit "$T/s" "$QCOW2_PLUGIN" file="$img"
timeout 30 qemu-io -f raw -c "write -P 0x5a 0 4k" "nbd+unix:///?socket=$T/s" >/dev/null
stop_nbdkit "$NBDKIT_PID"
[ "$(bitmap_flags "$img" on)" = '["in-use","auto"]' ] ||
  fail "enabled bitmap not marked in use after an untracked write: $(bitmap_flags "$img" on)"
[ "$(bitmap_flags "$img" off)" = '[]' ] || fail "disabled bitmap changed: $(bitmap_flags "$img" off)"
qemu-img check -q "$img" || fail "qemu-img check after the write"
qemu-io -f qcow2 -c "read -P 0x5a 0 4k" "$img" | grep -q "read 4096/4096" || fail "data lost"

# Internal bitmaps: the filter records the image's bitmap; consistent after a
# clean stop, and the write is in it.
[ -f "$FILTER" ] || fail "filter not built: $FILTER"
img2=$T/tracked.qcow2
qemu-img create -q -f qcow2 "$img2" 8M
qemu-img bitmap --add "$img2" b0
start_nbdkit "$T/s" --filter="$FILTER" "$QCOW2_PLUGIN" file="$img2" cbt-bitmap=b0
timeout 30 qemu-io -f raw -c "write -P 0x5a 1M 4k" "nbd+unix:///?socket=$T/s" >/dev/null
stop_nbdkit "$NBDKIT_PID"
[ "$(bitmap_flags "$img2" b0)" = '["auto"]' ] ||
  fail "tracked bitmap not consistent after a clean stop: $(bitmap_flags "$img2" b0)"
[ "$(qemu_map "$img2" b0)" = '[{"start":0,"length":1048576,"dirty":false},{"start":1048576,"length":65536,"dirty":true},{"start":1114112,"length":7274496,"dirty":false}]' ] ||
  fail "b0 as QEMU reads it: $(qemu_map "$img2" b0)"
qemu-img check -q "$img2" || fail "qemu-img check of the tracked image"
echo OK
