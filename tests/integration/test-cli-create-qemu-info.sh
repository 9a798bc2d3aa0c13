#!/usr/bin/env bash
# Test 1: `cbt create` + `cbt bitmap --add` make files that QEMU reads as we
# meant them: qemu-img info shows each bitmap's name, granularity and flags;
# qemu-img check exits 0 with no leaks. Also: create never overwrites, sizes
# follow qemu-img's rules, and a raw disk linked as data file is untouched and
# readable through the container.
source "$(dirname "$0")/cli_lib.sh" "$@"

cbt_ok create d.cbt --size 64M
[ "$(qemu-img info --output=json d.cbt | jq '."virtual-size"')" = 67108864 ] || fail "virtual size"
qcheck d.cbt
[ "$(qnames d.cbt)" = '[]' ] || fail "a new file has bitmaps"

cbt_ok bitmap d.cbt b0 --add
cbt_ok bitmap d.cbt b1 --add -g 1M --disabled
cbt_ok bitmap d.cbt b2 --add -g 512
[ "$(qnames d.cbt)" = '["b0","b1","b2"]' ] || fail "names: $(qnames d.cbt)"
[ "$(qbitmap d.cbt b0 granularity)" = 65536 ] || fail "b0 granularity"
[ "$(qbitmap d.cbt b0 flags)" = '["auto"]' ] || fail "b0 flags $(qbitmap d.cbt b0 flags)"
[ "$(qbitmap d.cbt b1 granularity)" = 1048576 ] || fail "b1 granularity"
[ "$(qbitmap d.cbt b1 flags)" = '[]' ] || fail "b1 flags $(qbitmap d.cbt b1 flags)"
[ "$(qbitmap d.cbt b2 granularity)" = 512 ] || fail "b2 granularity"
qcheck d.cbt
# Our own view agrees.
[ "$(cinfo d.cbt b1 enabled)" = false ] || fail "cbt info b1 enabled"
[ "$(cinfo d.cbt b0 dirty-bytes)" = 0 ] || fail "cbt info b0 dirty"

# Never overwrite; the existing file is byte-identical afterwards.
cp d.cbt d.orig
cbt_err 1 create d.cbt --size 1G
expect_in "$ERR" "d.cbt" "exists"
cmp d.cbt d.orig || fail "create changed an existing file"

# Sizes as qemu-img reads them; rounded up to 512 (qemu-img create 1000 -> 1024).
cbt_ok create s1.cbt --size 1000
[ "$(qemu-img info --output=json s1.cbt | jq '."virtual-size"')" = 1024 ] || fail "1000 -> 1024"
cbt_ok create s2.cbt --size 1.5G --cluster-size 4K
[ "$(qemu-img info --output=json s2.cbt | jq '."virtual-size", ."cluster-size"' | tr '\n' ' ')" = \
  "1610612736 4096 " ] || fail "1.5G / 4K"
qcheck s2.cbt
for bad in 64MB -1 1e3 ''; do cbt_err 1 create bad.cbt --size "$bad"; done
[ ! -e bad.cbt ] || fail "a refused create left a file"
cbt_err 1 create bad.cbt --size 64M --cluster-size 3000
expect_in "$ERR" "--cluster-size"
cbt_err 1 create bad.cbt
expect_in "$ERR" "--size"
[ ! -e bad.cbt ] || fail "a refused create left a file"

# A raw disk linked as external data file: contents untouched, QEMU reads
# them through the container, the path is stored absolute.
qemu-img create -q -f raw disk.raw 64M
qemu-io -f raw -c 'write -P 0xab 0 64k' -c 'write -P 0xcd 63M 1M' disk.raw >/dev/null
sum=$(md5sum <disk.raw)
mkdir sub
(cd sub && "$CBT" create ../c.cbt --data-file ../disk.raw >/dev/null)
[ "$(md5sum <disk.raw)" = "$sum" ] || fail "create touched the raw disk"
[ "$(qemu-img info --output=json c.cbt | jq -r '."format-specific".data."data-file"')" = "$T/disk.raw" ] ||
  fail "data file not absolute: $(qemu-img info --output=json c.cbt | jq -c '."format-specific".data')"
[ "$(qemu-img info --output=json c.cbt | jq '."virtual-size"')" = 67108864 ] || fail "size from raw disk"
cbt_ok bitmap c.cbt b0 --add
qcheck c.cbt
(cd sub && qemu-io -r -f qcow2 -c 'read -P 0xab 0 64k' -c 'read -P 0xcd 63M 1M' -c 'read -P 0 1M 1M' \
   ../c.cbt >/dev/null) || fail "QEMU cannot read the raw disk through the container"
[ "$(md5sum <disk.raw)" = "$sum" ] || fail "raw disk changed"
[ "$("$CBT" info --output=json c.cbt | jq -r '."data-file"')" = "$T/disk.raw" ] || fail "cbt info data-file"
cbt_err 1 create x.cbt --data-file nonexistent.raw
expect_in "$ERR" "nonexistent.raw"
echo "OK"
