#!/usr/bin/env bash
# Test 5: the format's corners, each judged by qemu-img info/check (and by
# qemu-nbd's map where data is involved): 100 bitmaps, a 1023-byte name
# (1024 refused), granularity 512 B and 2 GiB, disk sizes that are not a
# multiple of the granularity, a 16 TiB disk, cluster sizes 512 B .. 2 MiB.
source "$(dirname "$0")/cli_lib.sh" "$@"

# 100 bitmaps, then QEMU adds one more and cbt still reads them all.
"$CBT" create many.cbt --size 1G >/dev/null
for i in $(seq 1 100); do "$CBT" bitmap many.cbt "bitmap-$i" --add -g $((512 << (i % 10))) >/dev/null; done
[ "$(qemu-img info --output=json many.cbt | jq '."format-specific".data.bitmaps | length')" = 100 ] ||
  fail "qemu-img does not see 100 bitmaps"
[ "$(qbitmap many.cbt bitmap-37 granularity)" = $((512 << 7)) ] || fail "bitmap-37 granularity"
qcheck many.cbt
qemu-img bitmap --add many.cbt extra
qemu-io -f qcow2 -c 'write 100M 1M' many.cbt >/dev/null
[ "$("$CBT" info --output=json many.cbt | jq '.bitmaps | length')" = 101 ] || fail "cbt info count"
expect_same_map many.cbt bitmap-1
expect_same_map many.cbt bitmap-100
qcheck many.cbt

# Names: 1023 bytes works everywhere, 1024 is refused and changes nothing.
"$CBT" create names.cbt --size 64M >/dev/null
n1023=$(printf 'n%.0s' $(seq 1023))
cbt_ok bitmap names.cbt "$n1023" --add
[ "$(qnames names.cbt | jq -r '.[0] | length')" = 1023 ] || fail "1023-byte name"
qcheck names.cbt
cp names.cbt before
cbt_err 1 bitmap names.cbt "${n1023}x" --add
expect_in "$ERR" "1024" "1023"
cmp names.cbt before || fail "refused name changed the file"
qemu-io -f qcow2 -c 'write 1M 1k' names.cbt >/dev/null
[ "$(cinfo names.cbt "$n1023" dirty-bytes)" = 65536 ] || fail "1023-byte name bitmap data"

# Granularity 512 B and 2 GiB, on a disk that is not a multiple of either.
"$CBT" create g.cbt --size 3000000001 >/dev/null   # rounded up to 3000000512
[ "$(qemu-img info --output=json g.cbt | jq '."virtual-size"')" = 3000000512 ] || fail "size rounding"
cbt_ok bitmap g.cbt small --add -g 512
cbt_ok bitmap g.cbt huge --add -g 2G
cbt_ok bitmap g.cbt mid --add -g 64K
[ "$(qbitmap g.cbt small granularity)" = 512 ] || fail "512"
[ "$(qbitmap g.cbt huge granularity)" = 2147483648 ] || fail "2G"
qcheck g.cbt
qemu-io -f qcow2 -c 'write 0 1' -c 'write 1000000 3000' -c 'write 2999999000 1512' g.cbt >/dev/null
for b in small huge mid; do expect_same_map g.cbt "$b"; done
# The last granule is partial: dirty bytes count its real size.
[ "$(cinfo g.cbt huge dirty-bytes)" = 3000000512 ] || fail "huge dirty bytes $(cinfo g.cbt huge dirty-bytes)"
cbt_ok bitmap g.cbt mid2 --add -g 1M --merge small
expect_same_map g.cbt mid2
cbt_err 1 bitmap g.cbt x --add -g 256
cbt_err 1 bitmap g.cbt x --add -g 4G
qcheck g.cbt

# A disk made by qemu-img whose size is not a multiple of the granularity.
qemu-img create -q -f qcow2 odd.qcow2 $((100 * 1024 * 1024 + 4608))
qemu-img bitmap --add -g 1M odd.qcow2 b0
qemu-io -f qcow2 -c "write $((100 * 1024 * 1024)) 4608" odd.qcow2 >/dev/null
expect_same_map odd.qcow2 b0
[ "$(cinfo odd.qcow2 b0 dirty-bytes)" = 4608 ] || fail "partial last granule: $(cinfo odd.qcow2 b0 dirty-bytes)"

# 16 TiB: table sizes at the limit (4 KiB granularity = 2^32 bits).
"$CBT" create big.cbt --size 16T >/dev/null
cbt_ok bitmap big.cbt b0 --add
cbt_ok bitmap big.cbt fine --add -g 4K --disabled
cbt_err 1 bitmap big.cbt tiny --add -g 2K
expect_in "$ERR" "granularity"
[ "$(qemu-img info --output=json big.cbt | jq '."virtual-size"')" = 17592186044416 ] || fail "16T"
[ "$(qbitmap big.cbt fine granularity)" = 4096 ] || fail "fine"
qcheck big.cbt
qemu-io -f qcow2 -c 'write 15T 64k' -c 'write 17592186044415 1' big.cbt >/dev/null
expect_same_map big.cbt b0
[ "$(cinfo big.cbt b0 dirty-bytes)" = 131072 ] || fail "16T dirty bytes"
qcheck big.cbt

# Cluster sizes 512 B .. 2 MiB; default granularity = cluster size in 4K..64K.
for cs in 512 1K 4K 64K 2M; do
  f="cs-$cs.cbt"
  cbt_ok create "$f" --size 200M --cluster-size "$cs"
  cbt_ok bitmap "$f" b0 --add
  cbt_ok bitmap "$f" b1 --add -g 512
  want=$("$CBT" info --output=json "$f" | jq '."cluster-size" | if . < 4096 then 4096 elif . > 65536 then 65536 else . end')
  [ "$(qbitmap "$f" b0 granularity)" = "$want" ] || fail "$f default granularity"
  qcheck "$f"
  qemu-io -f qcow2 -c 'write 3M 5k' -c 'write 150M 1M' "$f" >/dev/null
  expect_same_map "$f" b0
  expect_same_map "$f" b1
  cbt_ok bitmap "$f" b1 --clear --merge b0
  expect_same_map "$f" b1
  qcheck "$f"
done
echo "OK"
