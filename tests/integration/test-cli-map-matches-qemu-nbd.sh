#!/usr/bin/env bash
# Test 2: on a qcow2 made by qemu-img, with bitmaps added by qemu-img and
# data written by qemu-io (cleanly closed), `cbt map --output=json` equals
# what qemu-nbd -r -B serves as qemu:dirty-bitmap:NAME (read by nbdinfo):
# same extents, same dirty/clean, merged, covering the disk.
source "$(dirname "$0")/cli_lib.sh" "$@"

qemu-img create -q -f qcow2 t.qcow2 100M
qemu-img bitmap --add t.qcow2 b0                   # 64 KiB
qemu-img bitmap --add -g 1M t.qcow2 b1
qemu-img bitmap --add -g 4K t.qcow2 b2
qemu-io -f qcow2 -c 'write 0 1' -c 'write 1M 64k' -c 'write 5000000 300000' \
  -c 'write 63M 128k' -c 'write -z 80M 4M' -c 'discard 90M 1M' -c 'write 104857000 600' \
  t.qcow2 >/dev/null
for b in b0 b1 b2; do expect_same_map t.qcow2 "$b"; done
[ "$(cbt_map t.qcow2 b0 | jq '[.[] | select(.dirty)] | length')" -ge 5 ] || fail "too few dirty extents"
# The JSON covers the disk exactly.
[ "$(cbt_map t.qcow2 b0 | jq 'map(.length) | add')" = 104857600 ] || fail "map does not cover the disk"

# --offset/--length: the same extents, clipped to the range.
want=$(cbt_map t.qcow2 b0 | jq -c --argjson s 1000000 --argjson e 70000000 '
  [ .[] | select(.start + .length > $s and .start < $e)
        | {start: ([.start, $s] | max), length: (([.start + .length, $e] | min) - ([.start, $s] | max)), dirty} ]')
got=$(cbt_map t.qcow2 b0 --offset 1000000 --length 69000000)
[ "$got" = "$want" ] || fail "range map: $got"
[ "$(cbt_map t.qcow2 b0 --offset 100M)" = "[]" ] || fail "empty range at the end"
cbt_err 1 map t.qcow2 --bitmap b0 --offset 101M
expect_in "$ERR" "--offset"

# The human table lists the dirty extents in hex, like qemu-img map.
"$CBT" map t.qcow2 -B b1 >human.txt
grep -q '^0x0 *0x200000 *yes' human.txt || { cat human.txt; fail "human map"; }

# Unknown bitmap: one line naming it and the fix.
cbt_err 1 map t.qcow2 --bitmap b9
expect_in "$ERR" "'b9'" "not found" "cbt info t.qcow2"

# After more writes by a QEMU that closes cleanly, still equal.
qemu-io -f qcow2 -c 'write 20M 3M' t.qcow2 >/dev/null
for b in b0 b1 b2; do expect_same_map t.qcow2 "$b"; done
echo "OK"
