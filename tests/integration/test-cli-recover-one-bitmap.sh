#!/usr/bin/env bash
# cbt recover --bitmap NAME touches NAME only: after a kill -9 of the filter
# (cbt-durability=power) with two enabled bitmaps, both are left in use;
# recovering b0 makes b0 usable (a superset of the writes, judged by
# qemu-nbd's map) while b1 stays in use (qemu-img info's flags) and can be
# recovered later from the same record.
source "$(dirname "$0")/lib.sh"
[ -x "$CBT" ] || fail "cbt not built: $CBT"
need qemu-img qemu-nbd nbdinfo jq python3

truncate -s 256M "$T/disk.raw"
"$CBT" create "$T/disk.cbt" --size 256M >/dev/null
"$CBT" bitmap "$T/disk.cbt" b0 --add >/dev/null
"$CBT" bitmap "$T/disk.cbt" b1 --add -g 1M >/dev/null
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" \
  cbt-bitmap=b0 cbt-durability=power
"$NBD_LOAD" --socket "$T/sock" --seed 81 --ops 100 --no-final-flush \
  --region 67108864:33554432 --expected "$T/expected.json" --hold-file "$T/hold" &
load=$!; PIDS+=("$load")
wait_for 60 [ -e "$T/hold" ] || fail "client did not finish"
kill9_nbdkit "$NBDKIT_PID"
rm -f "$T/hold"; wait "$load" || true

[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["in-use","auto"]' ] || fail "b0 not left in use"
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '["in-use","auto"]' ] || fail "b1 not left in use"
"$CBT" recover --output=json "$T/disk.cbt" --bitmap b0 >"$T/rec0.json" || fail "recover b0 failed"
jq -e '.method == "record" and ."recovered-granules" > 0' "$T/rec0.json" >/dev/null ||
  fail "unexpected: $(cat "$T/rec0.json")"
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["auto"]' ] || fail "b0 still in use after recover"
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '["in-use","auto"]' ] ||
  fail "recover --bitmap b0 touched b1: $(bitmap_flags "$T/disk.cbt" b1)"
python3 "$(dirname "$0")/extents.py" subset "$T/expected.json" <(qemu_map "$T/disk.cbt" b0) 65536 ||
  fail "recovered b0 misses writes"
echo "ok: b0 recovered, b1 left in use"

"$CBT" recover --output=json "$T/disk.cbt" --bitmap b1 >"$T/rec1.json" || fail "recover b1 failed"
jq -e '.method == "record"' "$T/rec1.json" >/dev/null || fail "b1: $(cat "$T/rec1.json")"
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '["auto"]' ] || fail "b1 still in use"
python3 "$(dirname "$0")/extents.py" subset "$T/expected.json" <(qemu_map "$T/disk.cbt" b1) 1048576 ||
  fail "recovered b1 misses writes"
qemu-img check "$T/disk.cbt" >/dev/null || fail "qemu-img check failed after recover"
echo "OK: recover --bitmap NAME recovers NAME only: $(jq -c . "$T/rec0.json")"
