#!/usr/bin/env bash
# cbt-autoload=false: only the named bitmaps record. Another enabled bitmap
# (here b1, made by QEMU) would miss every change made now, so the filter
# sets it aside before the first change: disabled and in use (inconsistent:
# QEMU refuses it, a crash-safety record never adopts it), its bits kept.
# `cbt recover --mark-all` + `cbt bitmap --enable` bring it back. Without the
# option (the default) b1 records, as QEMU's auto flag says. A read-only
# export leaves everything as found.
source "$(dirname "$0")/lib.sh"

truncate -s 64M "$T/disk.raw"
"$CBT" create "$T/disk.cbt" --size 64M >/dev/null || fail "cbt create"
qemu-img bitmap --add "$T/disk.cbt" b0
qemu-img bitmap --add "$T/disk.cbt" b1
args=(--filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" cbt-bitmap=b0)
qio() { timeout 60 qemu-io -f raw -c "$1" "nbd+unix:///?socket=$T/sock" >/dev/null || fail "qemu-io $1"; }

# Default: b1 records too.
start_nbdkit "$T/sock" "${args[@]}"
qio 'write 0 4k'
stop_nbdkit "$NBDKIT_PID"
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '["auto"]' ] || fail "b1 flags: $(bitmap_flags "$T/disk.cbt" b1)"
[ "$(qemu_map "$T/disk.cbt" b1 | jq -c '.[0]')" = '{"start":0,"length":65536,"dirty":true}' ] ||
  fail "b1 did not record by default: $(qemu_map "$T/disk.cbt" b1)"
cp "$T/disk.cbt" "$T/before.cbt"

# Read-only export with cbt-autoload=false: nothing is touched.
start_nbdkit "$T/sock" -r "${args[@]}" cbt-autoload=false
stop_nbdkit "$NBDKIT_PID"
cmp "$T/disk.cbt" "$T/before.cbt" || fail "a read-only export changed the container"

# cbt-autoload=false: b0 records, b1 is set aside before the first change.
truncate -s 0 "$T/nbdkit.log"
start_nbdkit "$T/sock" "${args[@]}" cbt-autoload=false
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '["in-use"]' ] ||
  fail "b1 not set aside at attach: $(bitmap_flags "$T/disk.cbt" b1)"
qio 'write 1M 4k'
stop_nbdkit "$NBDKIT_PID"
grep -q "cbt-autoload=false: bitmap(s) 'b1' do not record here" "$T/nbdkit.log" ||
  fail "no log line names b1: $(cat "$T/nbdkit.log")"
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["auto"]' ] || fail "b0 flags: $(bitmap_flags "$T/disk.cbt" b0)"
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '["in-use"]' ] || fail "b1 flags: $(bitmap_flags "$T/disk.cbt" b1)"
qemu_map "$T/disk.cbt" b0 | jq -e 'map(select(.dirty)) == [{"start":0,"length":65536,"dirty":true},{"start":1048576,"length":65536,"dirty":true}]' >/dev/null ||
  fail "b0: $(qemu_map "$T/disk.cbt" b0)"
rc=0; timeout 30 nbdinfo --map=qemu:dirty-bitmap:b1 -- [ qemu-nbd -r -f qcow2 -B b1 "$T/disk.cbt" ] \
  >"$T/qemu.out" 2>&1 || rc=$?
[ "$rc" != 0 ] || fail "QEMU serves the set-aside b1 as if it were exact"
"$CBT" info "$T/disk.cbt" | grep "b1" | grep -q inconsistent || fail "cbt info does not call b1 inconsistent"

# A later start (default autoload) is not refused by b1: disabled bitmaps are left alone.
start_nbdkit "$T/sock" "${args[@]}"
qio 'write 2M 4k'
stop_nbdkit "$NBDKIT_PID"
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '["in-use"]' ] || fail "b1 changed by a later start"

# Back: mark all, enable.
"$CBT" recover "$T/disk.cbt" --bitmap b1 --mark-all >/dev/null || fail "recover --mark-all b1"
"$CBT" bitmap "$T/disk.cbt" b1 --enable || fail "enable b1"
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '["auto"]' ] || fail "b1 not back: $(bitmap_flags "$T/disk.cbt" b1)"
[ "$(qemu_map "$T/disk.cbt" b1)" = '[{"start":0,"length":67108864,"dirty":true}]' ] ||
  fail "b1 after --mark-all: $(qemu_map "$T/disk.cbt" b1)"
timeout 60 qemu-img check -q "$T/disk.cbt" || fail "qemu-img check"

# A bad value is refused at start.
rc=0; timeout 30 "${NBDKIT_ENV[@]}" nbdkit -f -U "$T/bad.sock" "${args[@]}" cbt-autoload=maybe --run true \
  >"$T/bad.log" 2>&1 || rc=$?
[ "$rc" != 0 ] && grep -q "cbt-autoload=maybe: must be true or false" "$T/bad.log" ||
  fail "bad cbt-autoload: $(cat "$T/bad.log")"
echo PASS
