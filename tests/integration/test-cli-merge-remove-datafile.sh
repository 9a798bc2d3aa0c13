#!/usr/bin/env bash
# cbt bitmap and cbt create against QEMU's rules:
#  - --merge SRC -b OTHER across disks of different sizes is refused, as
#    qemu-img bitmap refuses it, and FILE is left byte for byte; the same
#    size merges, judged by qemu-nbd's map;
#  - the exit status says whether the file changed: a --remove that took
#    effect exits 0 even when freeing the old clusters fails afterwards
#    (here: a table cluster whose refcount is 0), a refusal leaves the file;
#  - create --data-file refuses a directory, a qcow2 image and a cbt
#    container, saying why, and creates nothing.
source "$(dirname "$0")/cli_lib.sh" "$@"
need python3
POKE="python3 $HERE/qcow2_poke.py"

# Different sizes: qemu-img refuses (the judge), so must cbt.
for size in 32M 128M 67109376; do
  rm -f dst.cbt src.cbt
  cbt_ok create dst.cbt --size 64M
  cbt_ok create src.cbt --size "$size"
  cbt_ok bitmap dst.cbt d --add
  cbt_ok bitmap src.cbt s --add
  qemu-io -f qcow2 -c 'write 0 64k' -c 'write 31M 64k' src.cbt >/dev/null
  qrc=0; qemu-img bitmap --merge s -b src.cbt -F qcow2 dst.cbt d 2>/dev/null || qrc=$?
  [ "$qrc" = 1 ] || fail "setup: qemu-img bitmap merged a $size bitmap into 64M (exit $qrc)"
  cp dst.cbt before  # (qemu-img rewrites the header even when it refuses)
  cbt_err 1 bitmap dst.cbt d --merge s -b src.cbt
  expect_in "$ERR" "different sizes" "67108864" "src.cbt"
  cmp dst.cbt before || fail "a refused merge from a $size disk changed dst.cbt"
  cbt_err 1 bitmap dst.cbt d2 --add --merge s -b src.cbt
  expect_in "$ERR" "nothing was changed"
  cmp dst.cbt before || fail "a refused --add --merge changed dst.cbt"
done
echo "ok: merges across disk sizes refused, as qemu-img does"

# Same size, another file: merged, and QEMU reads what it reads from src.
rm -f src.cbt; cbt_ok create src.cbt --size 64M
cbt_ok bitmap src.cbt s --add -g 4K
qemu-io -f qcow2 -c 'write 4k 4k' -c 'write 63M 512' src.cbt >/dev/null
cbt_ok bitmap dst.cbt d --merge s -b src.cbt -F qcow2
# d (64K granules) covers src's dirty 4K and 512 B granules at 4K and 63M.
[ "$(qemu_map dst.cbt d)" = '[{"start":0,"length":65536,"dirty":true},{"start":65536,"length":65994752,"dirty":false},{"start":66060288,"length":65536,"dirty":true},{"start":66125824,"length":983040,"dirty":false}]' ] ||
  fail "merge from a same-size file: $(qemu_map dst.cbt d)"
qcheck dst.cbt
echo "ok: same-size merge from another file"

# --remove: exit 0 exactly when the file changed. b0's table cluster gets
# refcount 0 (qemu-img check: corruption); cbt may refuse the file (nothing
# changes, exit 1) or remove b0 (exit 0, a warning about freeing).
rm -f r.cbt
cbt_ok create r.cbt --size 64M
cbt_ok bitmap r.cbt b0 --add
cbt_ok bitmap r.cbt b1 --add
qemu-io -f qcow2 -c 'write 0 64k' r.cbt >/dev/null
eval "$($POKE r.cbt where)"
RB=$(python3 -c "import struct;d=open('r.cbt','rb').read(128);rt=struct.unpack('>Q',d[48:56])[0];f=open('r.cbt','rb');f.seek(rt);print(struct.unpack('>Q',f.read(8))[0])")
ORDER=$(python3 -c "import struct;print(struct.unpack('>I',open('r.cbt','rb').read(100)[96:100])[0])")
[ "$ORDER" = 4 ] || skip "test assumes 16-bit refcounts, got order $ORDER"
F=r.cbt; $POKE r.cbt put $((RB + 2 * (TABLE0 / CS))) 2 0
qrc=0; qemu-img check r.cbt >/dev/null 2>&1 || qrc=$?
[ "$qrc" = 2 ] || fail "setup: qemu-img check should see the refcount 0, exit $qrc"
cp r.cbt before
rc=0; "$CBT" bitmap r.cbt b0 --remove >"$T/out" 2>"$T/err" || rc=$?
check_no_sanitizer "$T/err"
if cmp -s r.cbt before; then
  [ "$rc" != 0 ] || fail "--remove exited 0 but did not change the file"
  echo "ok: --remove refused the damaged file and left it ($(head -c 160 "$T/err"))"
else
  [ "$rc" = 0 ] || { cat "$T/err"; fail "--remove changed the file but exited $rc"; }
  [ "$(qnames r.cbt)" = '["b1"]' ] || fail "--remove: QEMU sees $(qnames r.cbt)"
  echo "ok: --remove took effect and exited 0 ($(head -c 160 "$T/err"))"
fi

# create --data-file: only a raw disk.
truncate -s 64M raw.img
mkdir rawdir
qemu-img create -f qcow2 q.qcow2 64M >/dev/null
cbt_err 1 create c1.cbt --data-file rawdir
expect_in "$ERR" "--data-file 'rawdir'" "directory"
cbt_err 1 create c2.cbt --data-file q.qcow2
expect_in "$ERR" "--data-file 'q.qcow2'" "qcow2 magic" "not a raw disk"
cbt_err 1 create c3.cbt --data-file dst.cbt
expect_in "$ERR" "--data-file 'dst.cbt'" "qcow2 magic" "cbt container"
cbt_err 1 create c4.cbt --data-file /dev/null
expect_in "$ERR" "--data-file '/dev/null'" "not a regular file or block device"
for f in c1 c2 c3 c4; do [ ! -e "$f.cbt" ] || fail "$f.cbt created by a refused create"; done
cbt_ok create c5.cbt --data-file raw.img
qcheck c5.cbt
[ "$(qemu-img info --output=json c5.cbt | jq -r '."format-specific".data."data-file"')" = "$T/raw.img" ] ||
  fail "data file of c5.cbt"
echo "OK: merge sizes, --remove exit, --data-file refusals"
