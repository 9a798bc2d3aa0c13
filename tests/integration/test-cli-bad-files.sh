#!/usr/bin/env bash
# Test 6: damaged and foreign files. For each: cbt info/map/bitmap/check fail
# with one clear line on stderr and a non-zero exit (no crash, no sanitizer
# report), `cbt bitmap` changes nothing, and cbt check's exit code is
# qemu-img check's (1 = cannot open, 2 = corruption). Where QEMU refuses the
# file, cbt refuses it too.
source "$(dirname "$0")/cli_lib.sh" "$@"
need python3
POKE="python3 $HERE/qcow2_poke.py"

# A good file with two bitmaps holding data.
"$CBT" create good.cbt --size 64M >/dev/null
cbt_ok bitmap good.cbt aa --add
cbt_ok bitmap good.cbt ab --add -g 4K
qemu-io -f qcow2 -c 'write 0 64k' -c 'write 32M 1M' good.cbt >/dev/null
qcheck good.cbt
eval "$($POKE good.cbt where)"
entry0_val=$(od -An -tx1 -j "$TABLE0" -N 8 good.cbt | tr -d ' \n')
DATA0=$((16#$entry0_val))
[ "$DATA0" -ne 0 ] || fail "bitmap aa has no data cluster to damage"

# bad NAME QEMU_OPENS(yes|no) COMMAND... : COMMAND damages $F (a copy of
# good.cbt). QEMU_OPENS=yes: damage QEMU tolerates on open (only its check
# complains); cbt must not crash and its check must agree.
count=0
bad() {
  local name=$1 qemu_opens=$2; shift 2
  F="$T/$name.qcow2"
  cp good.cbt "$F"
  "$@"
  count=$((count + 1))
  local qrc=0 crc=0
  qemu-img info -f qcow2 "$F" >/dev/null 2>&1 || qrc=$?
  if [ "$qemu_opens" = no ]; then
    [ "$qrc" != 0 ] || fail "$name: qemu-img info opens it; the test damaged nothing"
    cbt_err 1 info "$F"
    case "$ERR" in *"$name.qcow2"*) ;; *) fail "$name: error does not name the file: $ERR" ;; esac
    cbt_err 1 map "$F" --bitmap aa
  else
    # QEMU opens it: cbt may accept it or refuse it, but cleanly (exit 0
    # or 1, never a crash or a sanitizer report).
    irc=0
    "$CBT" info "$F" >/dev/null 2>"$T/err" || irc=$?
    [ "$irc" = 0 ] || [ "$irc" = 1 ] || fail "$name: cbt info exited $irc: $(cat "$T/err")"
    check_no_sanitizer "$T/err"
  fi
  cp "$F" "$T/before"
  if [ "$qemu_opens" = no ]; then
    cbt_err 1 bitmap "$F" new --add
    cmp "$F" "$T/before" || fail "$name: a refused cbt bitmap changed the file"
  fi
  qrc=0
  qemu-img check -f qcow2 "$F" >/dev/null 2>&1 || qrc=$?
  crc=0
  "$CBT" check "$F" >"$T/out" 2>"$T/err" || crc=$?
  check_no_sanitizer "$T/err"
  [ "$crc" = "$qrc" ] || { cat "$T/out" "$T/err"; fail "$name: cbt check exit $crc, qemu-img check $qrc"; }
  cmp "$F" "$T/before" || fail "$name: cbt check changed the file"
  echo "ok $name: $(head -c 200 "$T/err")"
}
put() { $POKE "$F" put "$@"; }
cut_at() { truncate -s "$1" "$F"; }

bad empty no            cut_at 0
bad truncated-header no cut_at 100
bad truncated-dir no    cut_at "$DIR"
bad truncated-table no  cut_at $((TABLE0 + 4))
bad bad-magic no        put 0 4 0x514649fc
bad bad-version no      put 4 4 4
bad cluster-bits no     put 20 4 30
bad unknown-incompat no put 72 8 0x10000000000
bad reftable-offset no  put 48 8 0x123
bad dir-misaligned no   put $((EXT + 16)) 8 $((DIR + 8))
bad dir-past-eof no     put $((EXT + 16)) 8 0x10000000000
bad dir-size no         put $((EXT + 8)) 8 8
bad nb-bitmaps no       put "$EXT" 4 3
bad ext-reserved no     put $((EXT + 4)) 4 1
bad table-misaligned no put "$ENTRY0" 8 $((TABLE0 + 512))
bad table-size no       put $((ENTRY0 + 8)) 4 2
bad flags-reserved no   put $((ENTRY0 + 12)) 4 6
bad bitmap-type no      put $((ENTRY0 + 16)) 1 2
bad granularity-8 no    put $((ENTRY0 + 17)) 1 8
bad granularity-32 no   put $((ENTRY0 + 17)) 1 32
bad extra-data no       put $((ENTRY0 + 20)) 4 8
bad entry-reserved no   put "$TABLE0" 8 $((DATA0 | 2))
bad entry-misaligned no put "$TABLE0" 8 $((DATA0 | 512))
bad entry-ones-offset no put "$TABLE0" 8 $((DATA0 | 1))
bad entry-high-bits no  put "$TABLE0" 8 $((DATA0 | (1 << 56)))
bad entry-past-eof yes  put "$TABLE0" 8 0x10000000000
bad duplicate-names no  put $((NAME1 + 1)) 1 0x61
bad empty-name no       put $((ENTRY1 + 18)) 2 0

# Raw disks whose first bytes look like qcow2 (a guest can write anything).
# Deterministic noise, so a failure reproduces.
noise() { python3 -c 'import random,sys; random.seed(7); sys.stdout.buffer.write(random.randbytes(4 << 20))'; }
raw_magic() { noise >"$F"; printf 'QFI\xfb\x00\x00\x00\x03' | dd of="$F" conv=notrunc status=none; }
raw_zeros() { truncate -s 0 "$F"; truncate -s 4M "$F"; printf 'QFI\xfb\x00\x00\x00\x03' | dd of="$F" conv=notrunc status=none; }
raw_header() {  # a real qcow2 header, then a guest's data over the rest
  noise >"$F"; head -c 512 good.cbt | dd of="$F" conv=notrunc status=none; }
bad raw-magic no  raw_magic
bad raw-zeros no  raw_zeros
bad raw-header no raw_header

# Leaks (a program without bitmap support dropped the extension): cbt check
# exits 3 like qemu-img check; --repair frees them, says so, and QEMU agrees.
cp good.cbt leaky.cbt
F=leaky.cbt put 88 8 0                                   # autoclear bit 0 off
qemu-io -f qcow2 -c 'write 1M 64k' leaky.cbt >/dev/null 2>&1   # QEMU drops the extension
qrc=0; qemu-img check leaky.cbt >/dev/null 2>&1 || qrc=$?
[ "$qrc" = 3 ] || fail "setup: qemu-img check should see leaks, exit $qrc"
cbt_err_code=0; "$CBT" check leaky.cbt >"$T/out" 2>&1 || cbt_err_code=$?
[ "$cbt_err_code" = 3 ] || { cat "$T/out"; fail "cbt check on leaks exited $cbt_err_code"; }
[ "$("$CBT" check --output=json leaky.cbt | jq '.leaks > 0 and .corruptions == 0')" = true ] ||
  fail "cbt check JSON on leaks"
cbt_ok check --repair leaky.cbt
grep -q 'repaired' "$T/out" || { cat "$T/out"; fail "--repair does not say what it did"; }
qcheck leaky.cbt
cbt_ok check leaky.cbt

# Bitmaps that cannot be trusted (reference-level damage on a file that
# opens): aa's data cluster is ab's table, so both are suspect; ac shares
# nothing. cbt check exits 2 like qemu-img check and names them; --repair
# drops aa and ab (saying so), frees what they held, and exits 0; then
# qemu-img check exits 0, qemu-img info opens the file and QEMU reads ac
# exactly as before. (qemu-img check -r all would instead raise the
# refcount and keep aa, its bits read from ab's table.)
need nbdinfo qemu-nbd jq
cp good.cbt shared.cbt
cbt_ok bitmap shared.cbt ac --add
qemu-io -f qcow2 -c 'write 8M 128k' shared.cbt >/dev/null
ac_before=$(qemu_map shared.cbt ac)
eval "$($POKE shared.cbt where)"
F=shared.cbt put "$TABLE0" 8 "$TABLE1"
qrc=0; qemu-img check shared.cbt >/dev/null 2>&1 || qrc=$?
[ "$qrc" = 2 ] || fail "setup: qemu-img check should see the overlap, exit $qrc"
crc=0; "$CBT" check shared.cbt >"$T/out" 2>&1 || crc=$?
[ "$crc" = 2 ] || { cat "$T/out"; fail "cbt check on shared clusters exited $crc"; }
expect_in "$(cat "$T/out")" "Bitmap 'aa' cannot be trusted" "Bitmap 'ab' cannot be trusted"
crc=0; "$CBT" check --repair shared.cbt >"$T/out" 2>&1 || crc=$?
check_no_sanitizer "$T/out"
[ "$crc" = 0 ] || { cat "$T/out"; fail "cbt check --repair exited $crc"; }
expect_in "$(cat "$T/out")" "Dropped bitmap 'aa': its data cluster" \
  "Dropped bitmap 'ab': its table cluster" "found and repaired" "No errors were found"
qcheck shared.cbt
qemu-img info shared.cbt >"$T/info" || fail "qemu-img info cannot open the repaired file"
grep -q 'name: ac' "$T/info" || fail "ac lost by the repair"
! grep -qE 'name: a[ab]' "$T/info" || fail "an untrusted bitmap survived the repair"
[ "$(qemu_map shared.cbt ac)" = "$ac_before" ] || fail "ac changed by the repair"
cbt_ok check shared.cbt
echo "ok untrusted bitmaps dropped, the other intact"

# Not a file / no such file.
cbt_err 1 info "$T"
cbt_err 1 info nonexistent.qcow2
expect_in "$ERR" "nonexistent.qcow2"
cbt_err 1 check nonexistent.qcow2
echo "OK: $count damaged files refused cleanly"
