#!/usr/bin/env bash
# cbt check against qemu-img check (the judge) on this machine:
#  - exit codes on metadata at offsets QEMU cannot read (L1 table, snapshot
#    table, refcount block near 2^63): qemu-img check exits 1 (cannot open,
#    or check not completed), so must cbt, with an error naming the table;
#  - JSON total-clusters / allocated-clusters mean what qemu-img check's
#    mean (guest clusters), on a QEMU image with data, a bitmaps-only
#    container and a container with a data file;
#  - -r leaks frees leaks only (an untrusted bitmap stays), -r all also drops
#    it; each time cbt's exit code is qemu-img check's on the result.
source "$(dirname "$0")/cli_lib.sh" "$@"
need python3
POKE="python3 $HERE/qcow2_poke.py"

"$CBT" create good.cbt --size 64M >/dev/null
cbt_ok bitmap good.cbt aa --add
cbt_ok bitmap good.cbt ab --add
qemu-io -f qcow2 -c 'write 0 64k' -c 'write 32M 64k' good.cbt >/dev/null
read -r RT L1 < <(python3 -c "import struct;d=open('good.cbt','rb').read(128);print(struct.unpack('>Q',d[48:56])[0], struct.unpack('>Q',d[40:48])[0])")

# same_code NAME FILE [WANT_IN_ERROR] : cbt check exits as qemu-img check.
same_code() {
  local q=0 c=0
  qemu-img check "$2" >"$T/q.out" 2>&1 || q=$?
  "$CBT" check "$2" >"$T/out" 2>"$T/err" || c=$?
  check_no_sanitizer "$T/err"
  [ "$q" = "$c" ] || { cat "$T/q.out" "$T/out" "$T/err" >&2; fail "$1: cbt check exit $c, qemu-img check $q"; }
  if [ -n "${3:-}" ]; then expect_in "$(cat "$T/err")" "$3"; fi
  echo "ok $1: both exit $c $(head -c 150 "$T/err")"
}
damaged() { cp good.cbt "$1"; $POKE "$1" put "$2" "$3" "$4"; }

damaged l1-huge.q 40 8 0x7fffffffffff0000
same_code l1-unreadable l1-huge.q "L1 table at 0x7fffffffffff0000"
damaged snap-huge.q 64 8 0x7fffffffffff0000; $POKE snap-huge.q put 60 4 1
same_code snapshot-table-unreadable snap-huge.q "snapshot table at 0x7fffffffffff0000"
damaged rb-huge.q "$RT" 8 0x7fffffffffff0000
same_code refcount-block-unreadable rb-huge.q "refcount block 0 at 0x7fffffffffff0000"
damaged l1-far.q 40 8 0x10000000000
same_code l1-past-eof l1-far.q
same_code good good.cbt

# The cluster figures of qemu-img check --output=json.
qemu-img create -f qcow2 -o cluster_size=4096 data.qcow2 10M >/dev/null
qemu-io -f qcow2 -c 'write 0 100k' -c 'write -z 1M 64k' -c 'write 9M 4k' data.qcow2 >/dev/null
truncate -s 8M disk.raw
"$CBT" create linked.cbt --data-file disk.raw >/dev/null
for f in good.cbt data.qcow2 linked.cbt; do
  q=$(qemu-img check --output=json "$f" | jq -c '{t: ."total-clusters", a: ."allocated-clusters"}')
  c=$("$CBT" check --output=json "$f" | jq -c '{t: ."total-clusters", a: ."allocated-clusters"}')
  [ "$q" = "$c" ] || fail "$f: qemu-img check says $q, cbt check $c"
  echo "ok $f: clusters $c"
done

# -r leaks / -r all. aa's data cluster also serves as ab's table (untrusted),
# and QEMU dropped the bitmaps extension once on another copy (leaks).
cp good.cbt leaky.cbt
$POKE leaky.cbt put 88 8 0
qemu-io -f qcow2 -c 'write 1M 64k' leaky.cbt >/dev/null 2>&1
cbt_err 1 check -r some leaky.cbt
expect_in "$ERR" "-r some" "'leaks' or 'all'"
rc=0; "$CBT" check leaky.cbt >/dev/null || rc=$?
[ "$rc" = 3 ] || fail "leaks: cbt check exit $rc"
cbt_ok check -r leaks leaky.cbt
same_code after-r-leaks leaky.cbt

cp good.cbt shared.cbt
eval "$($POKE shared.cbt where)"
D0=$((16#$(od -An -tx1 -j "$TABLE0" -N 8 shared.cbt | tr -d ' \n')))
$POKE shared.cbt put "$TABLE1" 8 "$D0"
same_code shared-cluster shared.cbt
rc=0; "$CBT" check -r leaks shared.cbt >"$T/out" 2>&1 || rc=$?
[ "$rc" = 2 ] || { cat "$T/out"; fail "-r leaks on an untrusted bitmap exited $rc"; }
[ "$(qnames shared.cbt)" = '["aa","ab"]' ] || fail "-r leaks dropped a bitmap: $(qnames shared.cbt)"
expect_in "$(cat "$T/out")" "cbt check -r all shared.cbt"
same_code after-r-leaks-untrusted shared.cbt
cbt_ok check -r all shared.cbt
same_code after-r-all shared.cbt
[ "$(qnames shared.cbt)" = '[]' ] || fail "-r all kept $(qnames shared.cbt)"
echo "OK: cbt check exits and counts as qemu-img check"
