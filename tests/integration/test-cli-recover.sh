#!/usr/bin/env bash
# cbt recover, offline:
#  - cbt-durability=none, kill -9 after unflushed writes: the filter refuses
#    the bitmap; `cbt recover --mark-all` makes it usable (all dirty, in-use
#    clear, qemu-img check clean) and the filter starts again;
#  - cbt-durability=power, kill -9: `cbt recover` (no --mark-all) rebuilds a
#    superset from the crash-safety record, judged by qemu-nbd's map.
source "$(dirname "$0")/lib.sh"
[ -x "$CBT" ] || fail "cbt not built: $CBT"

truncate -s 256M "$T/disk.raw"
crash_after_writes() {  # crash_after_writes DURABILITY SEED
  start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" \
    cbt-bitmap=b0 cbt-create=true cbt-durability="$1"
  "$NBD_LOAD" --socket "$T/sock" --seed "$2" --ops 200 --no-final-flush \
    --region 67108864:33554432 --expected "$T/expected.json" --hold-file "$T/hold" &
  local load=$!; PIDS+=("$load")
  wait_for 60 [ -e "$T/hold" ] || fail "client did not finish"
  kill9_nbdkit "$NBDKIT_PID"
  rm -f "$T/hold"; wait "$load" || true
}

crash_after_writes none 71
"$CBT" info "$T/disk.cbt" | grep -q inconsistent || fail "cbt info does not say inconsistent"
"$CBT" check "$T/disk.cbt" >"$T/check.out" || fail "cbt check exit $? on an image whose only problem is an in-use bitmap"
grep -q "cbt recover .*--bitmap b0" "$T/check.out" || fail "cbt check does not point at cbt recover: $(cat "$T/check.out")"
"$CBT" recover "$T/disk.cbt" --bitmap b0 >"$T/out" 2>&1 && fail "recover without a record succeeded"
grep -q -- "--mark-all" "$T/out" || fail "no hint: $(cat "$T/out")"
"$CBT" recover "$T/disk.cbt" --bitmap b0 --mark-all || fail "recover --mark-all failed"
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["auto"]' ] || fail "in-use left after recover"
qemu-img check "$T/disk.cbt" >/dev/null || fail "qemu-img check failed after recover"
[ "$(qemu_map "$T/disk.cbt" b0)" = '[{"start":0,"length":268435456,"dirty":true}]' ] ||
  fail "not all dirty: $(qemu_map "$T/disk.cbt" b0)"
echo "ok: none-mode crash recovered with --mark-all"

rm -f "$T/disk.cbt"
crash_after_writes power 72
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["in-use","auto"]' ] || fail "in-use not left by the crash"
"$CBT" recover --output=json "$T/disk.cbt" --bitmap b0 >"$T/rec.json" || fail "recover failed"
jq -e '.method == "record" and ."recovered-granules" > 0' "$T/rec.json" >/dev/null ||
  fail "unexpected: $(cat "$T/rec.json")"
qemu-img check "$T/disk.cbt" >/dev/null || fail "qemu-img check failed after recover"
python3 "$(dirname "$0")/extents.py" subset "$T/expected.json" <(qemu_map "$T/disk.cbt" b0) 65536 ||
  fail "recovered bitmap misses writes"
echo "OK: power-mode crash recovered offline from the record: $(cat "$T/rec.json" | jq -c .)"
