#!/usr/bin/env bash
# Test 3: every `cbt bitmap` operation, on QEMU's files and on ours, judged
# both ways: what cbt does, qemu-img info / check / qemu-nbd see; what
# qemu-img bitmap does, cbt sees. Several operations in one call apply in
# order and atomically (a failing call leaves the file byte-identical).
source "$(dirname "$0")/cli_lib.sh" "$@"

# --- cbt operating on a file QEMU made ---------------------------------
qemu-img create -q -f qcow2 q.qcow2 64M
qemu-img bitmap --add q.qcow2 b0
qemu-io -f qcow2 -c 'write 0 64k' -c 'write 10M 1M' q.qcow2 >/dev/null
qemu-img bitmap --disable q.qcow2 b0
qemu-img bitmap --add -g 128K q.qcow2 b1
qemu-io -f qcow2 -c 'write 30M 4k' q.qcow2 >/dev/null
b0_map=$(qemu_map q.qcow2 b0)

# qemu-img --disable -> cbt info sees it; cbt --enable/--disable -> qemu-img sees it.
[ "$(cinfo q.qcow2 b0 enabled)" = false ] || fail "cbt info: b0 should be disabled"
[ "$(cinfo q.qcow2 b0 dirty-bytes)" = $((65536 + 1048576)) ] || fail "cbt info dirty bytes $(cinfo q.qcow2 b0 dirty-bytes)"
cbt_ok bitmap q.qcow2 b0 --enable
[ "$(qbitmap q.qcow2 b0 flags)" = '["auto"]' ] || fail "cbt --enable: $(qbitmap q.qcow2 b0 flags)"
cbt_ok bitmap q.qcow2 b0 --disable
[ "$(qbitmap q.qcow2 b0 flags)" = '[]' ] || fail "cbt --disable"
[ "$(qemu_map q.qcow2 b0)" = "$b0_map" ] || fail "enable/disable changed the data"
qcheck q.qcow2

# --add --merge: a copy, as qemu-img would make it; merge = union.
cbt_ok bitmap q.qcow2 c0 --add --merge b0
[ "$(cat "$T/out")" = "q.qcow2: bitmap 'c0' added, merged from b0: granularity 65536, enabled" ] ||
  fail "--add --merge output: $(cat "$T/out")"
[ "$(qemu_map q.qcow2 c0)" = "$b0_map" ] || fail "--add --merge b0 is not a copy"
[ "$(qbitmap q.qcow2 c0 flags)" = '["auto"]' ] || fail "c0 flags"
cbt_ok bitmap q.qcow2 c0 --merge b1
want='[{"start":0,"length":65536,"dirty":true},{"start":65536,"length":10420224,"dirty":false},{"start":10485760,"length":1048576,"dirty":true},{"start":11534336,"length":19922944,"dirty":false},{"start":31457280,"length":131072,"dirty":true},{"start":31588352,"length":35520512,"dirty":false}]'
[ "$(qemu_map q.qcow2 c0)" = "$want" ] || fail "merge is not the union: $(qemu_map q.qcow2 c0)"
expect_same_map q.qcow2 c0
# The same merge done by qemu-img gives the same bitmap.
qemu-img bitmap --add q.qcow2 d0
qemu-img bitmap --merge b0 --merge b1 q.qcow2 d0
[ "$(qemu_map q.qcow2 d0)" = "$want" ] || fail "qemu-img merge differs from cbt merge"
qcheck q.qcow2

# --clear, --remove.
cbt_ok bitmap q.qcow2 c0 --clear
[ "$(qemu_map q.qcow2 c0)" = '[{"start":0,"length":67108864,"dirty":false}]' ] || fail "--clear"
# The result line says what was done, then what the bitmap is now.
[ "$(cat "$T/out")" = "q.qcow2: bitmap 'c0' cleared: granularity 65536, enabled" ] ||
  fail "--clear output: $(cat "$T/out")"
[ "$(qbitmap q.qcow2 c0 flags)" = '["auto"]' ] || fail "--clear changed flags"
cbt_ok bitmap q.qcow2 c0 --remove
[ "$(qnames q.qcow2)" = '["b0","b1","d0"]' ] || fail "--remove: $(qnames q.qcow2)"
qcheck q.qcow2
# QEMU keeps working on the file: its writes land in the enabled bitmaps.
qemu-io -f qcow2 -c 'write 40M 64k' q.qcow2 >/dev/null
expect_same_map q.qcow2 d0
[ "$(qemu_map q.qcow2 b0)" = "$b0_map" ] || fail "disabled b0 changed"

# --merge -b: the source bitmap read from another file.
qemu-img create -q -f qcow2 src.qcow2 64M
qemu-img bitmap --add src.qcow2 s0
qemu-io -f qcow2 -c 'write 50M 2M' src.qcow2 >/dev/null
cbt_ok bitmap q.qcow2 e0 --add -g 1M --merge s0 -b src.qcow2
[ "$(qbitmap q.qcow2 e0 granularity)" = 1048576 ] || fail "e0 granularity"
[ "$(qemu_map q.qcow2 e0)" = "$(qemu_map src.qcow2 s0)" ] || fail "merge -b"
qcheck q.qcow2
qcheck src.qcow2

# --- qemu-img operating on a file cbt made --------------------------------
"$CBT" create o.cbt --size 64M >/dev/null
cbt_ok bitmap o.cbt b0 --add
cbt_ok bitmap o.cbt b1 --add --disabled -g 1M
qemu-img bitmap --disable o.cbt b0
[ "$(cinfo o.cbt b0 enabled)" = false ] || fail "qemu-img --disable not seen by cbt"
qemu-img bitmap --enable o.cbt b0
[ "$(cinfo o.cbt b0 enabled)" = true ] || fail "qemu-img --enable not seen by cbt"
qemu-io -f qcow2 -c 'write 1M 8k' -c 'write 7M 2M' o.cbt >/dev/null
expect_same_map o.cbt b0
qemu-img bitmap --merge b0 o.cbt b1
expect_same_map o.cbt b1
[ "$(cinfo o.cbt b1 dirty-bytes)" = $((3 << 20)) ] || fail "b1 dirty bytes: $(cinfo o.cbt b1 dirty-bytes)"
qemu-img bitmap --clear o.cbt b0
[ "$(cinfo o.cbt b0 dirty-bytes)" = 0 ] || fail "qemu-img --clear not seen by cbt"
qemu-img bitmap --remove o.cbt b0
[ "$(cinfo o.cbt b0 name)" = '"absent"' ] || fail "qemu-img --remove not seen by cbt"
qemu-img bitmap --add o.cbt q0
cbt_ok bitmap o.cbt q0 --merge b1 --disable
[ "$(qbitmap o.cbt q0 flags)" = '[]' ] || fail "q0 flags"
expect_same_map o.cbt q0
qcheck o.cbt
# Removing the last bitmap leaves a file QEMU sees as bitmap-free.
cbt_ok bitmap o.cbt q0 --remove
cbt_ok bitmap o.cbt b1 --remove
[ "$(qnames o.cbt)" = '[]' ] || fail "not empty: $(qnames o.cbt)"
qcheck o.cbt

# --- several operations: in order, all or none ---------------------------
cbt_ok bitmap o.cbt m --add --disable
[ "$(qbitmap o.cbt m flags)" = '[]' ] || fail "--add --disable"
cbt_ok bitmap o.cbt m --enable --disable --enable
[ "$(qbitmap o.cbt m flags)" = '["auto"]' ] || fail "order not kept"
cbt_ok bitmap o.cbt m --remove --add -g 4K --disable
[ "$(qbitmap o.cbt m granularity)" = 4096 ] || fail "--remove --add"
qcheck o.cbt
for f in o.cbt q.qcow2; do
  cp "$f" before
  cbt_err 1 bitmap "$f" n1 --add --merge missing
  expect_in "$ERR" "'missing'" "not found" "nothing was changed"
  cmp "$f" before || fail "$f changed by a failed --add --merge missing"
  cbt_err 1 bitmap "$f" n1 --add --disable --add
  expect_in "$ERR" "already exists"
  cmp "$f" before || fail "$f changed by a failed --add --add"
  cbt_err 1 bitmap "$f" b1 --remove --clear
  cmp "$f" before || fail "$f changed by a failed --remove --clear"
  cbt_err 1 bitmap "$f" b9 --clear
  expect_in "$ERR" "bitmap 'b9' not found in $f; list bitmaps with 'cbt info $f'"
  cbt_err 1 bitmap "$f" n1 --add -g 3K
  expect_in "$ERR" "granularity"
  cbt_err 1 bitmap "$f" n1 --add -g 4G
  cbt_err 1 bitmap "$f" n1 --add --merge b1 -b nonexistent.qcow2
  expect_in "$ERR" "nonexistent.qcow2"
  cmp "$f" before || fail "$f changed by a refused call"
done

# Usage errors: exit 1, one line naming the problem.
cbt_err 1 bitmap o.cbt m
expect_in "$ERR" "no operation"
cbt_err 1 bitmap o.cbt
expect_in "$ERR" "missing NAME"
cbt_err 1 bitmap o.cbt m --frob
expect_in "$ERR" "--frob"
cbt_err 1 bitmap o.cbt m --clear -g 64K
cbt_err 1 frobnicate o.cbt
expect_in "$ERR" "unknown subcommand 'frobnicate'"

# A file QEMU holds for writing is refused (QEMU's OFD locks).
qemu-nbd -t --shared=0 -f qcow2 -k "$T/s.sock" o.cbt 2>/dev/null &
PIDS+=($!)
wait_served "$T/s.sock" || fail "qemu-nbd did not start"
cp o.cbt before
cbt_err 1 bitmap o.cbt m --clear
cmp o.cbt before || fail "changed a file QEMU holds"
echo "OK"
