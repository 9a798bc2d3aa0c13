#!/usr/bin/env bash
# cbt recover, offline:
#  - cbt-durability=none, kill -9 after unflushed writes: the filter refuses
#    the bitmap; `cbt recover --mark-all` makes it usable (all dirty, in-use
#    clear, qemu-img check clean) and the filter starts again;
#  - cbt-durability=power, kill -9: `cbt recover` (no --mark-all) rebuilds a
#    superset from the crash-safety record, judged by qemu-nbd's map.
source "$(dirname "$0")/lib.sh"
[ -x "$CBT" ] || fail "cbt not built: $CBT"
need dd

truncate -s 256M "$T/disk.raw"
crash_after_writes() {  # crash_after_writes DURABILITY SEED [REGION]
  start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" \
    cbt-bitmap=b0 cbt-create=true cbt-durability="$1"
  "$NBD_LOAD" --socket "$T/sock" --seed "$2" --ops 200 --no-final-flush \
    --region "${3:-67108864:33554432}" --expected "$T/expected.json" --hold-file "$T/hold" &
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
"$CBT" recover --output=json "$T/disk.cbt" --bitmap b0 >"$T/rec.json" 2>"$T/rec.err" ||
  fail "recover failed: $(cat "$T/rec.err")"
jq -e '.method == "record" and ."recovered-granules" > 0' "$T/rec.json" >/dev/null ||
  fail "unexpected: $(cat "$T/rec.json")"
qemu-img check "$T/disk.cbt" >/dev/null || fail "qemu-img check failed after recover"
python3 "$(dirname "$0")/extents.py" subset "$T/expected.json" <(qemu_map "$T/disk.cbt" b0) 65536 ||
  fail "recovered bitmap misses writes"
echo "ok: power-mode crash recovered offline from the record: $(cat "$T/rec.json" | jq -c .)"

# The disk's identity (docs/crash-safety.md): the crash dropped it, and this
# container names no disk (no data-file link, no --disk): one warning line
# says that nothing was recorded, what it means and how to record it.
identity() { "$CBT" info --output=json "$T/disk.cbt" | jq -c '.bitmaps[0]."disk-identity"'; }
[ "$(wc -l <"$T/rec.err")" = 1 ] &&
  grep -qF "cbt: warning: no disk identity recorded for bitmap 'b0'" "$T/rec.err" &&
  grep -qF "a change made to the disk before the filter's next start would not be detected" \
    "$T/rec.err" &&
  grep -qF "record it with 'cbt recover $T/disk.cbt --bitmap b0 --disk DISK'" "$T/rec.err" ||
  fail "no clear warning about the unrecorded identity: $(cat "$T/rec.err")"
jq -e '."disk-identity" == null' "$T/rec.json" >/dev/null || fail "json: $(cat "$T/rec.json")"
[ "$(identity)" = null ] || fail "an identity without a disk: $(identity)"
# Asked again: nothing to recover, and still the warning.
"$CBT" recover "$T/disk.cbt" --bitmap b0 >"$T/out" 2>"$T/rec.err" || fail "recover again"
grep -qF "nothing to recover" "$T/out" &&
  grep -qF "cbt: warning: no disk identity recorded for bitmap 'b0'" "$T/rec.err" ||
  fail "recover of the consistent bitmap: $(cat "$T/out" "$T/rec.err")"
# What the warning says to do records it (the bitmap is consistent now).
"$CBT" recover "$T/disk.cbt" --bitmap b0 --disk "$T/disk.raw" >"$T/out" ||
  fail "recover --disk on the recovered bitmap"
grep -qF "nothing to recover; disk identity recorded ($T/disk.raw)" "$T/out" ||
  fail "recover --disk: $(cat "$T/out")"
[ "$(identity | jq -r .inode)" = "$(stat -c %i "$T/disk.raw")" ] || fail "not recorded: $(identity)"
"$CBT" recover "$T/disk.cbt" --bitmap b0 >/dev/null 2>"$T/rec.err" || fail "recover, recorded"
[ ! -s "$T/rec.err" ] || fail "a warning with the identity recorded: $(cat "$T/rec.err")"
echo "ok: no disk known: one warning; the --disk it suggests records the identity"

# Crash again; the recovery with the disk known records its identity, so a
# change made to the disk after the recovery and before the next start is
# refused there (it would be missing from the bitmap). Writes where b0 is
# clean (64M..128M is all dirty since the recovery: writes there would not
# set in-use).
crash_after_writes power 73 0:33554432
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["in-use","auto"]' ] || fail "in-use not left by the crash"
[ "$(identity)" = null ] || fail "the first change did not drop the identity: $(identity)"
"$CBT" recover --output=json "$T/disk.cbt" --bitmap b0 --disk "$T/disk.raw" >"$T/rec.json" \
  2>"$T/rec.err" || fail "recover --disk failed: $(cat "$T/rec.err")"
[ ! -s "$T/rec.err" ] || fail "recover --disk warned: $(cat "$T/rec.err")"
jq -e --arg d "$T/disk.raw" '.method == "record" and ."disk-identity" == $d' "$T/rec.json" \
  >/dev/null || fail "recover --disk: $(cat "$T/rec.json")"
id=$(identity)
[ "$(jq -r .path <<<"$id")" = "$T/disk.raw" ] &&
  [ "$(jq -r .inode <<<"$id")" = "$(stat -c %i "$T/disk.raw")" ] &&
  [ "$(jq -r .size <<<"$id")" = "$(stat -c %s "$T/disk.raw")" ] &&
  [ "$(jq -r '."mtime-sec"' <<<"$id")" = "$(stat -c %Y "$T/disk.raw")" ] ||
  fail "cbt info does not show the disk as it is: $id"
dd if=/dev/urandom of="$T/disk.raw" bs=64k seek=100 count=1 conv=notrunc status=none
rc=0
timeout 60 "${NBDKIT_ENV[@]}" nbdkit -U - --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 --run 'nbdinfo "$uri"' >/dev/null 2>"$T/err" || rc=$?
[ $rc -ne 124 ] || fail "hung (timeout)"
[ $rc -ne 0 ] || fail "started over a disk written after the recovery"
grep -q "disk $T/disk.raw changed while no tracker ran (mtime" "$T/err" ||
  fail "no refusal naming the change: $(cat "$T/err")"
echo "OK: power-mode crash recovered with --disk: identity recorded, a later outside write refused"
