#!/usr/bin/env bash
# Offline `cbt backup --disk --container` and the disk identity
# (docs/backup.md, docs/crash-safety.md "Changes made while no tracker runs"):
#  - the disk written behind cbt's back after the filter's clean stop: the
#    offline incremental is refused, exit 1, with what changed and the fix
#    (cbt recover ... --compare LAST --compare-format qcow2 --disk DISK,
#    --mark-all, --full); the chain directory and the container's bitmaps
#    (cbt info --output=json, the file's bytes) are unchanged;
#  - after either fix (--compare as printed, --mark-all) the offline run
#    works and cbt restore is identical to the disk (qemu-img compare);
#  - the bitmap an offline run starts has an identity entry (path, inode,
#    size, mtime of the disk), so a disk written after it is refused by the
#    next offline run and by the next cbt serve, naming that bitmap;
#  - a disk moved with its mtime (mv) is taken as the same disk;
#  - a disk written while the run reads it (pause_at_read.so holds the
#    first read): no layer stored, the chain unchanged, and the next run
#    refuses until the fix;
#  - --verify finding a change the bitmap never saw (written behind cbt's
#    back with the mtime put back, which the identity cannot see): the
#    message says the next run would miss it again and names recover
#    --compare; the next run without the fix fails the same way, with it
#    it restores identical.
source "$(dirname "$0")/lib.sh"
[ -x "$CBT" ] || fail "cbt not built: $CBT"
need qemu-io qemu-img jq dd touch
preload_env pause_at_read
cd "$T"
DISK="$T/h.raw"
C="$T/h.raw.cbt"
DIR="$T/bk"

# serve [ARGS...] : cbt serve --fork over h.raw; the server's pid in $SPID
serve() {
  local rc=0
  rm -f "$T/p"
  timeout 120 "${NBDKIT_ENV[@]}" "$CBT" serve "$DISK" --create --socket "$T/s" \
    --control "$T/ctl" --fork --pid-file "$T/p" "$@" >"$T/serve.out" 2>"$T/serve.err" || rc=$?
  [ "$rc" = 0 ] || fail "cbt serve exited $rc: $(cat "$T/serve.err")"
  SPID=$(cat "$T/p")
  PIDS+=("$SPID")
}
stop() {
  kill -TERM "$SPID"
  wait_for 60 eval "! kill -0 $SPID 2>/dev/null" || fail "server $SPID still runs 60 s after SIGTERM"
}
qio() {
  timeout 60 qemu-io -f raw "$@" "nbd+unix:///?socket=$T/s" >"$T/qio.out" 2>&1 ||
    fail "qemu-io $*: $(cat "$T/qio.out")"
}
# behind OFFSET : one byte written into the disk without any tracker
behind() { printf X | dd of="$DISK" bs=1 seek="$1" conv=notrunc status=none; }
# offline [ARGS...] : the offline run; exit code in $RC, JSON in $T/out
offline() {
  RC=0
  timeout 120 "$CBT" backup --disk "$DISK" --container "$C" --dir "$DIR" --output=json "$@" \
    >"$T/out" 2>"$T/err" || RC=$?
}
offline_ok() {
  offline "$@"
  [ "$RC" = 0 ] || fail "offline backup $* exited $RC: $(cat "$T/err")"
}
restored_identical() {
  rm -f "$T/r.raw"
  timeout 120 "$CBT" restore "$DIR" --to "$T/r.raw" >/dev/null || fail "cbt restore"
  qemu-img compare -q -f raw -F raw "$T/r.raw" "$DISK" || fail "$1: the restore differs from the disk"
  # Every file the runs wrote passes QEMU's own check.
  local f
  for f in "$C" "$DIR"/*.qcow2; do
    qemu-img check -q -f qcow2 "$f" >"$T/check" 2>&1 || fail "$1: qemu-img check $f: $(cat "$T/check")"
  done
}
info() { "$CBT" info --output=json "$C"; }
recording() { jq -r .recording "$DIR/cbt-backup.json"; }
last_layer() { jq -r '.layers[-1].file' "$DIR/cbt-backup.json"; }
# refused_offline WHAT BITMAP : an offline run over the disk as it is now is
# refused naming WHAT, BITMAP and the fixes; nothing stored changes
refused_offline() {
  local info0 state0 ls0 sum0 line
  info0=$(info); state0=$(cat "$DIR/cbt-backup.json"); ls0=$(ls -A "$DIR"); sum0=$(md5sum <"$C")
  offline
  [ "$RC" = 1 ] || fail "offline backup over a disk changed behind cbt's back exited $RC: $(cat "$T/out")"
  line=$(cat "$T/err")
  [ "$(wc -l <"$T/err")" = 1 ] || fail "not one line: $line"
  for want in "disk $DISK changed while no tracker ran" "$1" "'$2'" \
      "cbt recover $C --bitmap $2 --compare $DIR/$(last_layer) --compare-format qcow2 --disk $DISK" \
      "--mark-all" "--full" "nothing was changed"; do
    [[ "$line" == *"$want"* ]] || fail "the refusal does not name '$want': $line"
  done
  [ "$(info)" = "$info0" ] || fail "a refused run changed the container's bitmaps"
  [ "$(md5sum <"$C")" = "$sum0" ] || fail "a refused run wrote the container"
  [ "$(cat "$DIR/cbt-backup.json")" = "$state0" ] || fail "a refused run changed the chain's state"
  [ "$(ls -A "$DIR")" = "$ls0" ] || fail "a refused run left files in $DIR: $(ls -A "$DIR")"
  echo "ok: refused: $line"
}

# --- the trial's reproduction ------------------------------------------------
truncate -s 64M "$DISK"
serve
qio -c 'write -P 1 0 1M'
timeout 120 "$CBT" backup --socket "$T/ctl" --dir "$DIR" >/dev/null || fail "the online full backup"
stop  # a clean stop records the disk's identity
rec=$(recording)
[ "$(info | jq -r --arg b "$rec" '.bitmaps[] | select(.name == $b) | ."disk-identity".path')" = "$DISK" ] ||
  fail "the filter's clean stop recorded no identity for $rec: $(info)"
behind $((30 << 20))
refused_offline "mtime" "$rec"

# The fix the refusal names, as printed: the offline run then copies the byte.
"$CBT" recover "$C" --bitmap "$rec" --compare "$DIR/$(last_layer)" --compare-format qcow2 \
  --disk "$DISK" >/dev/null || fail "cbt recover --compare"
offline_ok
[ "$(jq -r .type "$T/out")" = incremental ] && [ "$(jq '."bytes-read"' "$T/out")" = 65536 ] ||
  fail "the run after recover --compare: $(cat "$T/out")"
restored_identical "after recover --compare"
echo "ok: after recover --compare the offline incremental has the change"

# --- the new bitmap's identity entry -------------------------------------------
new=$(recording)
[ "$new" != "$rec" ] || fail "no new bitmap"
id=$(info | jq -c --arg b "$new" '.bitmaps[] | select(.name == $b) | ."disk-identity"')
[ "$(jq -r .path <<<"$id")" = "$DISK" ] || fail "no identity for the new bitmap $new: $(info)"
[ "$(jq -r .inode <<<"$id")" = "$(stat -c %i "$DISK")" ] || fail "wrong inode: $id"
[ "$(jq -r .size <<<"$id")" = 67108864 ] || fail "wrong size: $id"
[ "$(jq -r '."mtime-sec"' <<<"$id").$(printf %09d "$(jq -r '."mtime-nsec"' <<<"$id")")" = \
  "$(stat -c %.9Y "$DISK")" ] || fail "wrong mtime: $id vs $(stat -c %.9Y "$DISK")"
# Every bitmap left recording has an entry (b0's from the filter's stop).
[ "$(info | jq '[.bitmaps[] | select(.enabled and ."disk-identity" == null)] | length')" = 0 ] ||
  fail "an enabled bitmap without an identity entry: $(info)"
echo "ok: the offline run recorded the disk's identity for $new: $id"

# The other fix: --mark-all (the next run copies everything once).
behind $((40 << 20))
refused_offline "mtime" "$new"
"$CBT" recover "$C" --bitmap "$new" --mark-all >/dev/null || fail "cbt recover --mark-all"
offline_ok
[ "$(jq -r .type "$T/out")" = incremental ] && [ "$(jq '."bytes-read"' "$T/out")" = $((64 << 20)) ] ||
  fail "the run after recover --mark-all: $(cat "$T/out")"
restored_identical "after recover --mark-all"
echo "ok: after recover --mark-all the offline incremental has the change"

# --- a moved disk is the same disk -------------------------------------------
mv "$DISK" "$T/moved.raw"
RC=0
timeout 120 "$CBT" backup --disk "$T/moved.raw" --container "$C" --dir "$DIR" >"$T/out" 2>"$T/err" || RC=$?
[ "$RC" = 0 ] || fail "the moved disk was refused: $(cat "$T/err")"
grep -q "the disk moved (path $DISK -> $T/moved.raw) with its size and modification time" "$T/err" ||
  fail "no note of the move: $(cat "$T/err")"
mv "$T/moved.raw" "$DISK"
offline_ok  # moved back: the same again
restored_identical "after the move"
echo "ok: a disk moved with its mtime is accepted"

# --- the next cbt serve checks the offline run's bitmap ------------------------
# b0 was recorded at the first stop and misses the behind-the-back bytes:
# make it right, so the refusal below can only be the offline run's entry.
"$CBT" recover "$C" --bitmap b0 --mark-all >/dev/null || fail "recover b0"
offline_ok
new=$(recording)
behind $((50 << 20))
rc=0
timeout 120 "${NBDKIT_ENV[@]}" "$CBT" serve "$DISK" --socket "$T/s" --control "$T/ctl" --fork \
  --pid-file "$T/p" >"$T/serve.out" 2>"$T/serve.err" || rc=$?
if [ "$rc" = 0 ]; then PIDS+=("$(cat "$T/p")"); fail "cbt serve started over a changed disk"; fi
line=$(grep -m1 "changed while no tracker ran" "$T/serve.err") ||
  fail "cbt serve: no refusal: $(cat "$T/serve.err")"
[[ "$line" == *"'$new'"* ]] || fail "the refusal does not name the offline run's bitmap $new: $line"
echo "ok: cbt serve refuses, naming $new: $line"
"$CBT" recover "$C" --bitmap b0 --mark-all >/dev/null || fail "recover b0"
"$CBT" recover "$C" --bitmap "$new" --mark-all >/dev/null || fail "recover $new"

# --- a disk written while the run reads it -----------------------------------
state0=$(cat "$DIR/cbt-backup.json")
rm -f "$T/ready" "$T/go"
env "${CBT_ENV[@]}" CBT_PAUSE_FILE="$DISK" CBT_PAUSE_READY="$T/ready" CBT_PAUSE_GO="$T/go" \
  timeout 120 "$CBT" backup --disk "$DISK" --container "$C" --dir "$DIR" >"$T/out" 2>"$T/err" &
victim=$!
PIDS+=("$victim")
wait_for 60 test -e "$T/ready" || fail "the run never read the disk: $(cat "$T/err")"
behind $((60 << 20))
touch "$T/go"
rc=0
wait "$victim" || rc=$?
[ "$rc" = 1 ] || fail "a run over a disk written while read exited $rc: $(cat "$T/out" "$T/err")"
grep -q "disk $DISK changed while it was read" "$T/err" || fail "no reason: $(cat "$T/err")"
[ "$(jq -c .layers "$DIR/cbt-backup.json")" = "$(jq -c .layers <<<"$state0")" ] ||
  fail "a layer was stored from a disk that changed while read"
[ -z "$(find "$DIR" -name '*.part')" ] || fail "a .part file was left"
during=$(recording)
refused_offline "mtime" "$during"  # the next run does not miss it either
"$CBT" recover "$C" --bitmap "$during" --mark-all >/dev/null || fail "recover $during"
offline_ok
restored_identical "after the change during the read"
echo "ok: a disk written during the read is not stored, and the next run refuses until the fix"

# --- --verify: a change the identity cannot see ------------------------------
touch -r "$DISK" "$T/mtime.ref"
behind $((20 << 20))
touch -r "$T/mtime.ref" "$DISK"  # the mtime put back: only --verify sees it
offline --verify
[ "$RC" = 1 ] || fail "--verify over a missed change exited $RC: $(cat "$T/out")"
line=$(cat "$T/err")
fixed=$(recording)
for want in "found the layer chain different" "the next run would miss them again" \
    "cbt recover $C --bitmap $fixed --compare $DIR/$(last_layer) --compare-format qcow2 --disk $DISK" \
    "--full"; do
  [[ "$line" == *"$want"* ]] || fail "the --verify failure does not say '$want': $line"
done
[[ "$line" != *"the next run covers these changes too"* ]] || fail "--verify promises a cover: $line"
offline --verify  # true: the next run misses it again
[ "$RC" = 1 ] && grep -q "the next run would miss them again" "$T/err" ||
  fail "the run after a --verify failure, no fix: $RC: $(cat "$T/err")"
"$CBT" recover "$C" --bitmap "$(recording)" --compare "$DIR/$(last_layer)" --compare-format qcow2 \
  --disk "$DISK" >/dev/null || fail "recover --compare after --verify"
offline_ok --verify
restored_identical "after the --verify fix"
echo "ok: --verify's failure names the fix that works: $line"

# Online, the same: a change accepted with cbt-trust-disk=true is not in the
# bitmap; --verify says so and that recover needs the server stopped.
behind $((10 << 20))
serve -o cbt-trust-disk=true
rc=0
timeout 120 "$CBT" backup --socket "$T/ctl" --dir "$DIR" --verify >"$T/out" 2>"$T/err" || rc=$?
line=$(cat "$T/err")
[ "$rc" = 1 ] || fail "online --verify over a missed change exited $rc: $line"
for want in "the next run would miss them again" "cbt recover" "--compare $DIR/$(last_layer)" \
    "(with the server stopped)" "--full"; do
  [[ "$line" == *"$want"* ]] || fail "the online --verify failure does not say '$want': $line"
done
timeout 120 "$CBT" backup --socket "$T/ctl" --dir "$DIR" --full >/dev/null || fail "online --full"
stop
restored_identical "after the online --full"
echo "ok: online --verify's failure names the fix: $line"
echo "PASS"
