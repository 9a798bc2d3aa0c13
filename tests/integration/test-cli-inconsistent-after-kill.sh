#!/usr/bin/env bash
# Test 4: a bitmap left in_use by kill -9 of a writable qemu-nbd (after a
# client wrote through it) is reported inconsistent by cbt info; every
# operation but --remove is refused with a clear error and the file is left
# as it was; --remove works and qemu-img check then exits 0.
source "$(dirname "$0")/cli_lib.sh" "$@"

"$CBT" create d.cbt --size 64M >/dev/null
cbt_ok bitmap d.cbt b0 --add
cbt_ok bitmap d.cbt b1 --add --disabled
qemu-nbd -t --shared=0 -f qcow2 -k "$T/s.sock" d.cbt 2>"$T/nbd.log" &
nbd=$!
PIDS+=("$nbd")
wait_served "$T/s.sock" || fail "qemu-nbd did not start"
qemu-io -f raw -c 'write 2M 4k' "nbd+unix:///?socket=$T/s.sock" >/dev/null
kill -9 "$nbd"
wait "$nbd" 2>/dev/null || true

# QEMU's own view: both bitmaps in-use (QEMU marks all it loads RW).
[ "$(qbitmap d.cbt b0 flags)" = '["in-use","auto"]' ] || fail "qemu flags b0: $(qbitmap d.cbt b0 flags)"
[ "$(qbitmap d.cbt b1 flags)" = '["in-use"]' ] || fail "qemu flags b1: $(qbitmap d.cbt b1 flags)"

# cbt info reports them inconsistent, with no dirty count.
[ "$(cinfo d.cbt b0 consistent)" = false ] || fail "cbt info: b0 consistent"
[ "$(cinfo d.cbt b0 in-use)" = true ] || fail "cbt info: b0 in-use"
[ "$(cinfo d.cbt b0 dirty-bytes)" = null ] || fail "cbt info: b0 dirty-bytes"
[ "$(cinfo d.cbt b0 flags)" = '["in-use","auto"]' ] || fail "cbt info: b0 flags"
"$CBT" info d.cbt | grep -q 'b0 .*inconsistent' || fail "human info does not say inconsistent"

# Everything but --remove is refused; the file does not change.
cp d.cbt before
cbt_ok bitmap d.cbt ok --add                  # other bitmaps stay usable
cp d.cbt before
for op in --clear --enable --disable "--merge ok"; do
  # shellcheck disable=SC2086
  cbt_err 1 bitmap d.cbt b0 $op
  expect_in "$ERR" "bitmap 'b0'" "d.cbt" "inconsistent" "cbt bitmap d.cbt b0 --remove"
  cmp d.cbt before || fail "refused $op changed the file"
done
cbt_err 1 bitmap d.cbt ok --merge b0
expect_in "$ERR" "'b0'" "inconsistent"
cbt_err 1 bitmap d.cbt b0 --add
expect_in "$ERR" "already exists" "--remove"
cbt_err 1 map d.cbt --bitmap b0
expect_in "$ERR" "inconsistent" "--remove"
cmp d.cbt before || fail "refused operations changed the file"
# qemu-img agrees it cannot be used.
qemu-img bitmap --clear d.cbt b0 2>/dev/null && fail "qemu-img accepted an inconsistent bitmap"

# --remove works, also together with a re-add of the same name.
cbt_ok bitmap d.cbt b1 --remove
cbt_ok bitmap d.cbt b0 --remove --add
[ "$(qbitmap d.cbt b0 flags)" = '["auto"]' ] || fail "re-added b0: $(qbitmap d.cbt b0 flags)"
[ "$(qnames d.cbt)" = '["ok","b0"]' ] || fail "names: $(qnames d.cbt)"
qcheck d.cbt
expect_same_map d.cbt b0
echo "OK"
