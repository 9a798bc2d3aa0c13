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
start_nbdkit "$T/sock" "${args[@]}" cbt-autoload=false cbt-control="$T/ctl"
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '["in-use"]' ] ||
  fail "b1 not set aside at attach: $(bitmap_flags "$T/disk.cbt" b1)"
qio 'write 1M 4k'
# The live view says what the file says: b1 is in use, inconsistent.
"$CBT" info --socket "$T/ctl" >"$T/live" || fail "cbt info --socket"
grep -E '^  b1 .* in-use .* inconsistent \(see cbt recover\)$' "$T/live" >/dev/null ||
  fail "cbt info --socket does not call b1 in use and inconsistent: $(cat "$T/live")"
grep -E '^  b0 .* enabled$' "$T/live" >/dev/null || fail "cbt info --socket, b0: $(cat "$T/live")"
"$CBT" info --socket "$T/ctl" --output=json >"$T/live.json" || fail "cbt info --socket --output=json"
jq -e '.bitmaps[] | select(.name == "b1") |
    .consistent == false and ."in-use" == true and .flags == ["in-use"] and ."dirty-bytes" == null' \
  "$T/live.json" >/dev/null || fail "cbt info --socket --output=json, b1: $(cat "$T/live.json")"
jq -e '.bitmaps[] | select(.name == "b0") | .consistent and .enabled' "$T/live.json" >/dev/null ||
  fail "cbt info --socket --output=json, b0: $(cat "$T/live.json")"
rc=0; "$CBT" map --socket "$T/ctl" --bitmap b1 >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" != 0 ] && grep -q "inconsistent" "$T/err" || fail "cbt map --socket of b1: rc $rc $(cat "$T/err")"
rc=0; "$CBT" bitmap --socket "$T/ctl" b1 --enable 2>"$T/err" || rc=$?
[ "$rc" != 0 ] && grep -q "inconsistent" "$T/err" || fail "online --enable of b1: rc $rc $(cat "$T/err")"
# An edit of the set keeps b1 in use (it still misses the changes made here).
"$CBT" bitmap --socket "$T/ctl" b2 --add >/dev/null || fail "online --add b2"
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '["in-use"]' ] ||
  fail "an online edit changed b1's flags: $(bitmap_flags "$T/disk.cbt" b1)"
"$CBT" bitmap --socket "$T/ctl" b2 --remove >/dev/null || fail "online --remove b2"
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
