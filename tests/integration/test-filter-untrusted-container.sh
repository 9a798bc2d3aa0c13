#!/usr/bin/env bash
# A container whose metadata cannot be trusted is refused by every writer,
# never written over (issue: silent loss of dirty bits):
#  1. bitmaps extension without autoclear bit 0 (an interrupted header
#     rewrite, or a program that does not know bitmaps): the filter with
#     cbt-create=true refuses instead of recreating b0 empty, and names
#     'cbt recover --mark-all', which keeps b0 with every granule dirty;
#  2. a bitmap data cluster with refcount 0: the filter and 'cbt bitmap
#     --add' refuse (a persist or an add would allocate it over live bits)
#     and name 'cbt check --repair';
#  3. a bitmap table entry pointing at the refcount table: refused too.
source "$(dirname "$0")/lib.sh"
POKE="python3 $(dirname "$0")/qcow2_poke.py"

truncate -s 64M "$T/disk.raw"
args=(--filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true)
uri="nbd+unix:///?socket=$T/sock"

# A container holding b0 with 64 KiB dirty at 1 MiB, stopped cleanly.
fresh() {
  rm -f "$T/disk.cbt"
  start_nbdkit "$T/sock" "${args[@]}"
  timeout 30 qemu-io -f raw -c "write -P 7 1M 64k" "$uri" >/dev/null || fail "qemu-io write"
  stop_nbdkit "$NBDKIT_PID"
  [ "$(qemu_map "$T/disk.cbt" b0)" = \
    '[{"start":0,"length":1048576,"dirty":false},{"start":1048576,"length":65536,"dirty":true},{"start":1114112,"length":65994752,"dirty":false}]' ] ||
    fail "setup: unexpected map $(qemu_map "$T/disk.cbt" b0)"
}

# refused WHAT PATTERN... : nbdkit must exit non-zero at start, print every
# pattern, and leave the container byte for byte.
refused() {
  local what=$1; shift
  local sum rc=0 p
  sum=$(md5sum <"$T/disk.cbt")
  rm -f "$T/sock"
  timeout 30 "${NBDKIT_ENV[@]}" nbdkit -f -U "$T/sock" "${args[@]}" 2>"$T/err" || rc=$?
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "$what: nbdkit started (rc $rc)"
  for p in "$@"; do
    grep -q -- "$p" "$T/err" || fail "$what: no '$p' in: $(cat "$T/err")"
  done
  [ "$(md5sum <"$T/disk.cbt")" = "$sum" ] || fail "$what: refusing changed the container"
  echo "ok: $what refused: $(grep -m1 cbt "$T/err")"
}

# 1. Autoclear bit 0 (byte 95 of the header) cleared.
fresh
ac=$($POKE "$T/disk.cbt" get 95 1)
$POKE "$T/disk.cbt" put 95 1 $((ac & ~1))
refused "stale bitmaps extension" "autoclear bit 0" "cbt recover" "--mark-all"
sum=$(md5sum <"$T/disk.cbt")
rc=0; "$CBT" bitmap "$T/disk.cbt" b1 --add 2>"$T/err" || rc=$?
[ $rc -ne 0 ] || fail "cbt bitmap --add wrote over a stale extension"
[ "$(md5sum <"$T/disk.cbt")" = "$sum" ] || fail "refused --add changed the file"
rc=0; "$CBT" recover "$T/disk.cbt" --bitmap b0 2>"$T/err" || rc=$?
[ $rc -ne 0 ] && grep -q -- "--mark-all" "$T/err" || fail "recover without --mark-all: $(cat "$T/err")"
"$CBT" recover "$T/disk.cbt" --bitmap b0 --mark-all >/dev/null || fail "recover --mark-all"
[ "$(qemu_map "$T/disk.cbt" b0)" = '[{"start":0,"length":67108864,"dirty":true}]' ] ||
  fail "after --mark-all b0 is not all dirty: $(qemu_map "$T/disk.cbt" b0)"
qemu-img check -q "$T/disk.cbt" || fail "qemu-img check after recover"
start_nbdkit "$T/sock" "${args[@]}"
stop_nbdkit "$NBDKIT_PID"
echo "ok: recover --mark-all keeps b0 (all dirty) and the filter starts"

# 2. Refcount 0 on b0's data cluster.
fresh
eval "$($POKE "$T/disk.cbt" where)"
data=$($POKE "$T/disk.cbt" get "$TABLE0" 8)
[ "$data" -ne 0 ] || fail "setup: b0 has no data cluster"
eval "$($POKE "$T/disk.cbt" refcount-entry "$data")"
$POKE "$T/disk.cbt" put "$ENTRY" 2 0
refused "refcount 0 on a bitmap data cluster" "refusing to write" "cbt check" "--repair"
sum=$(md5sum <"$T/disk.cbt")
rc=0; "$CBT" bitmap "$T/disk.cbt" b1 --add 2>"$T/err" || rc=$?
[ $rc -ne 0 ] && grep -q -- "--repair" "$T/err" || fail "cbt bitmap --add on a corrupt file: rc $rc $(cat "$T/err")"
[ "$(md5sum <"$T/disk.cbt")" = "$sum" ] || fail "refused --add changed the file"
echo "ok: cbt bitmap --add refused on the corrupt file"

# 3. b0's table entry pointing at the refcount table.
fresh
eval "$($POKE "$T/disk.cbt" where)"
eval "$($POKE "$T/disk.cbt" refcount-entry "$($POKE "$T/disk.cbt" get "$TABLE0" 8)")"
$POKE "$T/disk.cbt" put "$TABLE0" 8 "$REFTABLE"
refused "table entry pointing at the refcount table" "refusing to write" "--repair"
echo "OK"
