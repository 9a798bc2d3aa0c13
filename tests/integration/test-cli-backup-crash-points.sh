#!/usr/bin/env bash
# Crash-point enumeration of an offline incremental `cbt backup` run
# (docs/backup.md): the run writes the container twice (the checkpoint:
# merge, freeze and add in one commit; the end: the frozen bitmap removed)
# and the chain directory (layer .part + rename, state file + rename).
# crash_after_writes.so kills the run (SIGKILL) before its Nth write or sync
# to the container, for every N the run has. After each kill:
#  - qemu-img check finds no error in the container (leaks allowed);
#  - every point the chain lists still restores to the disk it was taken of,
#    and no complete layer file exists that the state file does not list;
#  - the next run, not killed, succeeds, is incremental, and its layer
#    restores to the disk as it is now (nothing the killed run froze is
#    lost).
source "$(dirname "$0")/lib.sh"
[ -x "$CBT" ] || fail "cbt not built: $CBT"
need qemu-io qemu-img jq
preload_env crash_after_writes

URI="nbd+unix:///?socket=$T/sock"
DIR="$T/chain"
restored_equals() {
  rm -f "$T/restored.raw"
  timeout 60 "$CBT" restore "$DIR" --point "$1" --to "$T/restored.raw" >/dev/null ||
    fail "$2: cbt restore --point $1"
  cmp -s "$T/restored.raw" "$3" || fail "$2: point $1 does not restore to $(basename "$3")"
}

truncate -s 8M "$T/disk.raw"
qemu-io -f raw -c 'write -P 0x11 0 2M' "$T/disk.raw" >/dev/null
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true
stop_nbdkit "$NBDKIT_PID"
cp "$T/disk.raw" "$T/point0.raw"
"$CBT" backup --disk "$T/disk.raw" --container "$T/disk.cbt" --dir "$DIR" >/dev/null ||
  fail "the full backup"
# Changes, recorded by the filter in the chain's bitmap.
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" cbt-bitmap=b0
timeout 60 qemu-io -f raw -c 'write -P 0x22 1M 128k' -c 'write -z 0 64k' -c 'write -P 0x33 6M 4k' \
  "$URI" >/dev/null || fail "qemu-io"
stop_nbdkit "$NBDKIT_PID"
cp "$T/disk.raw" "$T/point1.raw"
cp "$T/disk.cbt" "$T/saved.cbt"
cp -a "$DIR" "$T/saved-chain"

# How many steps does the run take on the container?
env "${CBT_ENV[@]}" CBT_CRASH_FILE="$T/disk.cbt" CBT_CRASH_LOG="$T/steps.log" \
  "$CBT" backup --disk "$T/disk.raw" --container "$T/disk.cbt" --dir "$DIR" >/dev/null ||
  fail "the counting run failed"
steps=$(wc -l <"$T/steps.log")
[ "$steps" -ge 4 ] || fail "only $steps container steps logged: is the preload working?"
restored_equals 1 "counting run" "$T/point1.raw"

for n in $(seq "$steps"); do
  rm -rf "$DIR" && cp -a "$T/saved-chain" "$DIR" && cp "$T/saved.cbt" "$T/disk.cbt"
  rc=0
  env "${CBT_ENV[@]}" CBT_CRASH_FILE="$T/disk.cbt" CBT_CRASH_AT_STEP="$n" \
    "$CBT" backup --disk "$T/disk.raw" --container "$T/disk.cbt" --dir "$DIR" \
    >"$T/out" 2>&1 || rc=$?
  [ "$rc" = 137 ] || fail "step $n/$steps: the run was not killed (exit $rc): $(cat "$T/out")"
  rc=0
  qemu-img check -q "$T/disk.cbt" >"$T/check.out" 2>&1 || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 3 ] || fail "step $n: qemu-img check exit $rc: $(cat "$T/check.out")"
  listed=$(jq '.layers | length' "$DIR/cbt-backup.json")
  restored_equals 0 "step $n" "$T/point0.raw"
  [ "$listed" = 1 ] || restored_equals 1 "step $n (layer listed)" "$T/point1.raw"
  for f in "$DIR"/*.qcow2; do
    jq -e --arg f "$(basename "$f")" 'any(.layers[]; .file == $f)' "$DIR/cbt-backup.json" \
      >/dev/null || fail "step $n: $(basename "$f") exists but the chain does not list it"
  done
  # The next run covers everything.
  timeout 60 "$CBT" backup --disk "$T/disk.raw" --container "$T/disk.cbt" --dir "$DIR" \
    --output=json >"$T/out" 2>"$T/err" || fail "step $n: the run after the kill: $(cat "$T/err")"
  [ "$(jq -r .type "$T/out")" = incremental ] || fail "step $n: next run: $(cat "$T/out")"
  last=$(($(jq '.layers | length' "$DIR/cbt-backup.json") - 1))
  restored_equals "$last" "step $n (next run)" "$T/point1.raw"
  rc=0
  qemu-img check -q "$T/disk.cbt" >"$T/check.out" 2>&1 || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 3 ] || fail "step $n: qemu-img check after the next run: exit $rc"
done
echo "PASS: $steps crash points"
