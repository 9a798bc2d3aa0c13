#!/usr/bin/env bash
# Backup sessions when the fleece store cannot keep the old data:
#  (a) cbt-fleece-max=256K, default policy (break-backup): a 1M write during
#      a session succeeds and reaches the disk; query-backup's broken names
#      the full store; reading the backup export fails; backup-end works; the
#      next session (b1 frozen, b2 new) begins and its view is the disk at its
#      start;
#  (b) cbt-fleece-max=256K, cbt-fleece-error=fail-write: writes, zeroes and
#      trims of blocks that no longer fit fail with ENOSPC ("No space left")
#      and do not reach the disk; those that fit, and any change to blocks
#      already preserved, succeed; the view stays exactly the disk at
#      backup-begin and the session is not broken;
#  (c) the store's pwrite fails with EIO (fleece_fault.so under nbdkit):
#      break-backup: the write succeeds, view reads fail, query-backup and
#      the log say the session broke and why; fail-write: a write of a block
#      not yet preserved fails with EIO (once the fault is on; blocks
#      preserved before still take writes) and the view stays the snapshot;
#      the log names the policy.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/backup_lib.sh"
SHIM="$CBT_BUILD/tests/fleece_fault.so"
[ -f "$SHIM" ] || fail "not built: $SHIM"

M=$((1024 * 1024))
# fresh_disk : a 64M disk with non-zero data everywhere (so that every block
# copied needs store space) and a new container.
fresh_disk() {
  rm -f "$T/disk.raw" "$T/disk.cbt"
  truncate -s 64M "$T/disk.raw"
  qio "$T/disk.raw" "write -q -P 0x11 0 32M" "write -q -P 0x22 32M 32M" >/dev/null
}
# live_ok CMD... : qemu-io commands on the live export all succeed.
live_ok() {
  local rc=0
  qio "$LIVE" "$@" >"$T/qio.out" 2>&1 || rc=$?
  [ "$rc" -eq 0 ] && ! grep -q -i -E 'fail|error' "$T/qio.out" ||
    { echo "qemu-io $* (rc $rc): $(cat "$T/qio.out")" >&2; return 1; }
}
# live_fails PATTERN CMD : the one qemu-io command fails, its output matches PATTERN.
live_fails() {
  local pat=$1 rc=0; shift
  qio "$LIVE" "$@" >"$T/qio.out" 2>&1 || rc=$?
  grep -q "$pat" "$T/qio.out" ||
    { echo "qemu-io $* (rc $rc) did not fail with '$pat': $(cat "$T/qio.out")" >&2; return 1; }
}
view_fails() {
  ! copy_export "$VIEW" "$T/view.raw" 2>"$T/convert.err"
}
log_has() { grep -q -- "$1" "$T/nbdkit.log"; }

# --- (a) full store, break-backup ------------------------------------------
fresh_disk
: >"$T/nbdkit.log"
start_backup_server cbt-bitmap=b0 cbt-create=true cbt-fleece-max=256K
backup_begin b1 b0
live_ok "write -q -P 0x55 0 1M" || fail "(a) a write beyond the store limit failed under break-backup"
qio "$T/disk.raw" "read -q -P 0x55 0 1M" >"$T/r.out" 2>&1 && ! grep -q -i fail "$T/r.out" ||
  fail "(a) the write did not reach the disk: $(cat "$T/r.out")"
query_backup '.broken != null and (.broken | test("full"))' || fail "(a) query-backup: not broken by the full store"
view_fails || fail "(a) the backup export of a broken session was read in full"
log_has "backup session broken" || fail "(a) the log does not say the session broke"
live_ok "write -q -P 0x56 2M 1M" || fail "(a) a write after the break failed"
backup_end
backup_begin b2 b1
cp --sparse=always "$T/disk.raw" "$T/snap.raw"
live_ok "write -q -P 0x57 0 128K" "write -q -z 1M 64K" || fail "(a) writes in the next session"
query_backup '.broken == null and ."copied-blocks" == 3' || fail "(a) query-backup, next session"
copy_export "$VIEW" "$T/view.raw" || fail "(a) reading the next session's view: $(tail -3 "$T/nbdkit.log")"
cmp "$T/view.raw" "$T/snap.raw" || fail "(a) the next session's view is not the disk at its start"
backup_end
stop_nbdkit "$NBDKIT_PID"

# --- (b) full store, fail-write ----------------------------------------------
fresh_disk
: >"$T/nbdkit.log"
start_backup_server cbt-bitmap=b0 cbt-create=true cbt-fleece-max=256K cbt-fleece-error=fail-write
backup_begin b1 b0
cp --sparse=always "$T/disk.raw" "$T/snap.raw"
cp --sparse=always "$T/disk.raw" "$T/expected.raw"
live_ok "write -q -P 0x55 0 128K" || fail "(b) a write that fits the store failed"
live_fails "No space left" "write -q -P 0x56 1M 1M" || fail "(b) a write beyond the store limit"
live_ok "write -q -P 0x57 4M 128K" || fail "(b) a write that exactly fills the store failed"
live_fails "No space left" "write -q -P 0x58 8M 64K" || fail "(b) a write to a full store"
live_fails "No space left" "write -q -z 9M 64K" || fail "(b) a zero to a full store"
live_ok "write -q -P 0x59 0 128K" "write -q -P 0x5a $((4 * M + 4096)) 8K" "write -q -z 4M 4K" "discard -q $((4 * M + 64 * 1024)) 64K" ||
  fail "(b) changes to preserved blocks failed"
qio "$T/expected.raw" "write -q -P 0x55 0 128K" "write -q -P 0x57 4M 128K" "write -q -P 0x59 0 128K" \
  "write -q -P 0x5a $((4 * M + 4096)) 8K" "write -q -z 4M 4K" "discard -q $((4 * M + 64 * 1024)) 64K" >/dev/null
query_backup '.broken == null and ."copied-blocks" == 4 and ."stored-bytes" == 262144' || fail "(b) query-backup"
copy_export "$VIEW" "$T/view.raw" || fail "(b) reading the view failed"
cmp "$T/view.raw" "$T/snap.raw" || fail "(b) the view is not the disk at backup-begin"
copy_export "$LIVE" "$T/live.raw" || fail "(b) reading the live export failed"
cmp "$T/live.raw" "$T/expected.raw" || fail "(b) the live disk: a refused write reached it, or an accepted one did not"
log_has "fleece store is full" || fail "(b) the log does not name the full store"
log_has "cbt-fleece-error=fail-write" || fail "(b) the log does not name the policy"
backup_end
stop_nbdkit "$NBDKIT_PID"

# --- (c) EIO from the store ------------------------------------------------
# nbdkit under the shim (after any sanitizer runtime in LD_PRELOAD).
SAVED_ENV=("${NBDKIT_ENV[@]}")
if [ "${#NBDKIT_ENV[@]}" -gt 0 ]; then
  NBDKIT_ENV=()
  for a in "${SAVED_ENV[@]}"; do
    [[ "$a" == LD_PRELOAD=* ]] && a="$a $SHIM"
    NBDKIT_ENV+=("$a")
  done
else
  NBDKIT_ENV=(env "LD_PRELOAD=$SHIM")
fi
NBDKIT_ENV+=(CBT_FAULT_ERRNO=5 "CBT_FAULT_WHILE=$T/fault.on")

# break-backup
fresh_disk
: >"$T/nbdkit.log"
touch "$T/fault.on"
start_backup_server cbt-bitmap=b0 cbt-create=true
backup_begin b1 b0
live_ok "write -q -P 0x55 0 64K" || fail "(c) break-backup: a write with a failing store failed"
query_backup '.broken != null and (.broken | test("Input/output error"))' ||
  fail "(c) break-backup: query-backup does not say the store failed"
view_fails || fail "(c) break-backup: the view of a broken session was read in full"
log_has "backup session broken" || fail "(c) break-backup: no message in the log"
grep "backup session broken" "$T/nbdkit.log" | head -2
backup_end
stop_nbdkit "$NBDKIT_PID"

# fail-write: the fault off for the first blocks, then on.
fresh_disk
: >"$T/nbdkit.log"
rm -f "$T/fault.on"
start_backup_server cbt-bitmap=b0 cbt-create=true cbt-fleece-error=fail-write
backup_begin b1 b0
cp --sparse=always "$T/disk.raw" "$T/snap.raw"
live_ok "write -q -P 0x55 0 128K" || fail "(c) fail-write: a write before the fault failed"
touch "$T/fault.on"
live_fails "Input/output error" "write -q -P 0x56 1M 64K" || fail "(c) fail-write: a write with a failing store"
live_fails "Input/output error" "discard -q 2M 64K" || fail "(c) fail-write: a discard with a failing store"
live_ok "write -q -P 0x57 0 128K" || fail "(c) fail-write: a write to preserved blocks failed"
query_backup '.broken == null' || fail "(c) fail-write: the session broke"
copy_export "$VIEW" "$T/view.raw" || fail "(c) fail-write: reading the view failed"
cmp "$T/view.raw" "$T/snap.raw" || fail "(c) fail-write: the view is not the disk at backup-begin"
qio "$T/disk.raw" "read -q -P 0x11 1M 64K" >"$T/r.out" 2>&1 && ! grep -q -i fail "$T/r.out" ||
  fail "(c) fail-write: the failed write reached the disk"
log_has "cbt-fleece-error=fail-write: the write fails" || fail "(c) fail-write: no message in the log"
grep "fail-write" "$T/nbdkit.log" | head -2
backup_end
stop_nbdkit "$NBDKIT_PID"
NBDKIT_ENV=("${SAVED_ENV[@]}")
echo "PASS"
