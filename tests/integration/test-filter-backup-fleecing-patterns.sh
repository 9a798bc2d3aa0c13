#!/usr/bin/env bash
# Backup session (copy-before-write) against QEMU's fleecing patterns, through
# qemu-io on the live export while a session is open: a full-block overwrite,
# partial-left and partial-right writes, two adjacent writes meeting at a 64K
# boundary and one straddling it, write -z, write -z -u, discard (aligned and
# not), a write past the first block spanning three blocks, writes into a
# hole, a write over 4M (several copy runs) and a zero over a hole, a second
# write to a preserved block, and the disk's last, partial block (64M+3K:
# not a multiple of the 64K copy unit). The store lives in cbt-fleece-dir:
# one unlinked file open during the session, closed by backup-end, nothing
# left in the directory. A view connection held open reads the old data
# after the writes, and fails after backup-end, also once session 2 began.
#  - the backup export reads exactly the disk as it was at backup-begin
#    (cmp with a copy taken right after it), the live export exactly the
#    expected disk (the same qemu-io commands applied to a copy of the file);
#  - nbdinfo --map of the backup export never reports a hole or zero extent
#    where the point-in-time copy has data (discarded blocks included);
#  - before any writable client backup-begin is Busy and the backup export
#    refused; before any session the backup export is refused (the log says
#    why);
#    a second backup-begin while one is open: error class Busy;
#  - refused begins (unknown bitmap to freeze: NotFound; a taken name:
#    AlreadyExists) change nothing; backup-end of another id: NotFound, the
#    session stays; during a session nbdinfo --list shows both exports, the
#    backup one read-only (without one: KNOWN BUG, see below);
#  - after backup-end the backup export is refused again; a second session
#    (freeze b1, new b2) begins and its view is the disk at its start;
#  - on a 3T disk the copy unit is 128K: a 4K write copies one 128K block.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/backup_lib.sh"

# A view connection held open across writes, backup-end and the next
# backup-begin: qemu-io reading commands from a fifo (fd 9).
# held_read N PATTERN : one 64K read at 0 expecting PATTERN; waits until the
# connection has answered N commands; prints nothing.
held_answers() {
  [ "$(grep -c -E '^(qemu-io> )*(read [0-9]+/[0-9]+ bytes|read failed)' "$T/held.out")" -ge "$1" ]
}
held_read() {
  echo "read -P $2 0 64K" >&9
  wait_for 30 held_answers "$1" ||
    fail "the held view connection did not answer command $1: $(cat "$T/held.out")"
}
held_fails() { [ "$(grep -c -E 'read failed: ' "$T/held.out")" -ge "$1" ]; }

K=1024
M=$((1024 * 1024))
SIZE=$((64 * M + 3 * K))
truncate -s "$SIZE" "$T/disk.raw"
# Data in places, holes elsewhere (8M-16M, 20M-63M), data in the last block.
qio "$T/disk.raw" "write -q -P 0x11 0 8M" "write -q -P 0x12 16M 4M" \
  "write -q -P 0x13 63M 1M" "write -q -P 0x14 64M 3K" >/dev/null

mkdir "$T/fleece"
# --- before any writable client (not start_nbdkit: its handshake attaches) --
"${NBDKIT_ENV[@]}" nbdkit -f --exit-with-parent -U "$T/sock" -P "$T/sock.pid" \
  --filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true \
  cbt-control="$T/ctl.sock" cbt-fleece-dir="$T/fleece" 2>>"$T/nbdkit.log" &
NBDKIT_PID=$!
PIDS+=("$NBDKIT_PID")
wait_for 60 [ -S "$T/ctl.sock" ] || fail "no control socket at $T/ctl.sock"
r=$(ctl '{"execute":"backup-begin","arguments":{"freeze":"b0","new":"b1"}}')
jq -e '.error.class == "Busy" and (.error.desc | test("no writable client"))' <<<"$r" >/dev/null ||
  fail "backup-begin before any writable client: $r"
rc=0
timeout 30 nbdinfo --size "$VIEW" >"$T/out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "backup export served before any writable client (rc $rc)"
grep -q 'export "backup" refused: no backup session is open (the disk has no writable client yet)' \
  "$T/nbdkit.log" || fail "no clear refusal of the backup export before any writable client"
stop_nbdkit "$NBDKIT_PID"
[ -z "$(ls -A "$T/fleece")" ] || fail "files left in cbt-fleece-dir before any session"

start_backup_server cbt-bitmap=b0 cbt-create=true cbt-fleece-dir="$T/fleece"

# --- no session yet: the backup export is refused ---------------------------
rc=0
timeout 30 nbdinfo --size "$VIEW" >"$T/out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "backup export served with no session (rc $rc): $(cat "$T/out")"
grep -q 'export "backup" refused: no backup session is open' "$T/nbdkit.log" ||
  fail "no clear refusal in the log for the backup export without a session"
query_backup '.active == false' || fail "query-backup before any session"
# Without a session the backup export must not be listed: nbdinfo --list
# opens every listed export. KNOWN BUG at 137b393 (fixed on main by
# 698dea4): it is listed and nbdinfo --list fails; reported, skipped here.
list_without_session() {
  local rc=0
  timeout 30 nbdinfo --json --list "$LIVE" >"$T/list.out" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "KNOWN BUG: nbdinfo --list exits $rc with no backup session open ($1): $(grep -m1 nbdinfo: "$T/list.out")"
    return 0
  fi
  jq -e '[.exports[]."export-name"] == [""]' "$T/list.out" >/dev/null ||
    fail "nbdinfo --list with no session ($1): $(cat "$T/list.out")"
}
list_without_session "before any session"

# Refused begins change nothing: an unknown bitmap to freeze, a taken name.
r=$(ctl '{"execute":"backup-begin","arguments":{"freeze":"nope","new":"b1"}}')
jq -e '.error.class == "NotFound"' <<<"$r" >/dev/null || fail "backup-begin freezing an unknown bitmap: $r"
r=$(ctl '{"execute":"backup-begin","arguments":{"new":"b0"}}')
jq -e '.error.class == "AlreadyExists"' <<<"$r" >/dev/null || fail "backup-begin with a taken name: $r"
query_backup '.active == false' || fail "query-backup after refused begins"
[ -z "$(ls -A "$T/fleece")" ] || fail "files left in cbt-fleece-dir by refused begins"
r=$(ctl '{"execute":"query-bitmaps"}')
jq -e '[.return.bitmaps[] | {name, recording}] == [{"name": "b0", "recording": true}]' <<<"$r" >/dev/null ||
  fail "refused begins changed the bitmaps: $r"

# --- session 1 ----------------------------------------------------------
backup_begin b1 b0
cp --sparse=always "$T/disk.raw" "$T/snap.raw"  # nothing writes now: the point in time
cp --sparse=always "$T/disk.raw" "$T/expected.raw"
timeout 30 nbdinfo --json --list "$LIVE" >"$T/list.json" || fail "nbdinfo --list during a session"
jq -e '[.exports[]."export-name"] | sort == ["", "backup"]' "$T/list.json" >/dev/null ||
  fail "nbdinfo --list during a session: $(cat "$T/list.json")"
jq -e '.exports[] | select(."export-name" == "backup") | ."is_read_only" == true and ."export-size" == '"$SIZE" \
  "$T/list.json" >/dev/null || fail "the backup export is not read-only or has the wrong size: $(cat "$T/list.json")"
# store_fds : the session's store, an unlinked file in cbt-fleece-dir, as
# nbdkit's open descriptors show it.
store_fds() { find "/proc/$NBDKIT_PID/fd" -lname "$T/fleece/#* (deleted)" | wc -l; }
[ "$(store_fds)" -eq 1 ] || fail "no unlinked store file open in cbt-fleece-dir during the session"
r=$(ctl '{"execute":"backup-begin","arguments":{"new":"b9"}}')
jq -e '.error.class == "Busy"' <<<"$r" >/dev/null || fail "second backup-begin while open: $r"
query_backup '.active == true and .frozen == "b0" and .new == "b1" and ."block-size" == 65536 and
  ."disk-size" == '"$SIZE"' and .broken == null and ."copied-blocks" == 0' ||
  fail "query-backup at the start"

# The view before any write equals the snapshot too.
copy_export "$VIEW" "$T/view0.raw" || fail "reading the backup export failed"
cmp "$T/view0.raw" "$T/snap.raw" || fail "view before any write differs from the disk"

mkfifo "$T/held.fifo"
timeout 100 qemu-io -r -f raw "$VIEW" <"$T/held.fifo" >"$T/held.out" 2>&1 &
HELD_PID=$!
PIDS+=("$HELD_PID")
exec 9>"$T/held.fifo"
held_read 1 0x11
grep -q -E 'Pattern|failed' "$T/held.out" && fail "held view connection, first read: $(cat "$T/held.out")"

OPS=(
  "write -q -P 0xa1 1M 64K"               # full block
  "write -q -P 0xa2 2M 4K"                # partial, left end of a block
  "write -q -P 0xa3 $((3 * M + 60 * K)) 4K"  # partial, right end
  "write -q -P 0xa4 $((4 * M + 32 * K)) 32K" # adjacent pair meeting at 4M+64K
  "write -q -P 0xa5 $((4 * M + 64 * K)) 32K"
  "write -q -P 0xa6 $((4 * M + 240 * K)) 32K" # straddles 4M+256K
  "write -q -z 5M 64K"                    # zero
  "write -q -z $((5 * M + 128 * K)) 8K"   # zero, unaligned
  "write -q -z -u 6M 128K"                # zero with unmap
  "discard -q 7M 128K"                    # discard, aligned
  "discard -q $((7 * M + 320 * K)) 8K"    # discard, inside a block
  "write -q -P 0xa7 96K 160K"             # past block 0, spans blocks 1..3
  "write -q -P 0xa8 10M 64K"              # into a hole
  "write -q -P 0xa9 $((63 * M + 1000)) 200K" # unaligned, over 4 blocks
  "write -q -P 0xaa $((64 * M + K)) 1K"   # inside the last, partial block
  "write -q -P 0xab 1M 64K"               # again over a preserved block
  "write -q -P 0xac $((64 * M - 4 * K)) $((7 * K))" # to the very end of the disk
  "write -q -P 0xae 17M 6M"               # over 4M (several copy runs), data and hole
  "write -q -z -u 40M 8M"                 # zero with unmap over a hole
)
qio "$LIVE" "${OPS[@]}" >"$T/qio.out" 2>&1 || fail "qemu-io on the live export: $(cat "$T/qio.out")"
qio "$T/expected.raw" "${OPS[@]}" >/dev/null 2>&1 || fail "qemu-io on the expected copy"
grep -q -i error "$T/qio.out" && fail "qemu-io reported an error: $(cat "$T/qio.out")"

query_backup '."copied-blocks" > 0 and .broken == null' || fail "no block was copied"
r=$(ctl '{"execute":"backup-end","arguments":{"id":99}}')
jq -e '.error.class == "NotFound"' <<<"$r" >/dev/null || fail "backup-end of another id: $r"
query_backup '.active == true' || fail "backup-end of another id ended the session"
copy_export "$VIEW" "$T/view.raw" || fail "reading the backup export failed"
cmp "$T/view.raw" "$T/snap.raw" || fail "the backup export is not the disk at backup-begin"
copy_export "$LIVE" "$T/live.raw" || fail "reading the live export failed"
cmp "$T/live.raw" "$T/expected.raw" || fail "the live export is not the disk after the writes"
map_vouches "$VIEW" "$T/snap.raw" || fail "the backup export's map hides data"
# The live map still says holes where the disk has them (the view is not a copy).
timeout 60 nbdinfo --json --map "$LIVE" |
  jq -e 'any(.type % 2 == 1)' >/dev/null || fail "the live export reports no hole at all"

# More writes after the view was read: it still reads the old data.
qio "$LIVE" "write -q -P 0xad 0 64K" "write -q -z 16M 1M" "discard -q 63M 64K" >/dev/null ||
  fail "qemu-io (second round) on the live export"
qio "$T/expected.raw" "write -q -P 0xad 0 64K" "write -q -z 16M 1M" "discard -q 63M 64K" >/dev/null
copy_export "$VIEW" "$T/view.raw" || fail "reading the backup export failed (second round)"
cmp "$T/view.raw" "$T/snap.raw" || fail "the backup export changed after the second round"
map_vouches "$VIEW" "$T/snap.raw" || fail "the backup export's map hides data (second round)"

held_read 2 0x11  # block 0 was overwritten (0xad) after the connection opened
grep -q -E 'Pattern|failed' "$T/held.out" && fail "held view connection after the writes: $(cat "$T/held.out")"

backup_end
rc=0
timeout 30 nbdinfo --size "$VIEW" >"$T/out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "backup export served after backup-end (rc $rc)"
[ "$(store_fds)" -eq 0 ] || fail "the store is still open after backup-end"
list_without_session "after backup-end"
[ -z "$(ls -A "$T/fleece")" ] || fail "files left in cbt-fleece-dir: $(ls -A "$T/fleece")"
held_read 3 0x11
held_fails 1 || fail "a view connection of the ended session still reads: $(cat "$T/held.out")"
grep -m1 "read failed" "$T/held.out"
query_backup '.active == false' || fail "query-backup after backup-end"
copy_export "$LIVE" "$T/live.raw" || fail "reading the live export failed"
cmp "$T/live.raw" "$T/expected.raw" || fail "the live export after backup-end"

# --- session 2: freeze b1, new b2 ------------------------------------------
backup_begin b2 b1
cp --sparse=always "$T/disk.raw" "$T/snap2.raw"
query_backup '.frozen == "b1" and .new == "b2" and ."copied-blocks" == 0' || fail "query-backup, session 2"
# The connection of session 1 does not see session 2's view either.
held_read 4 0xad
held_fails 2 || fail "a view connection of session 1 reads in session 2: $(cat "$T/held.out")"
echo quit >&9
exec 9>&-
wait_for 30 eval '! kill -0 "$HELD_PID" 2>/dev/null' || fail "the held qemu-io did not quit"
rc=0; wait "$HELD_PID" || rc=$?  # 1: some of its reads failed, as they should
[ "$rc" -eq 1 ] || fail "the held qemu-io exited $rc, want 1 (its reads after backup-end failed)"
qio "$LIVE" "write -q -P 0xb1 0 1M" "discard -q 1M 1M" "write -q -P 0xb2 $((64 * M)) 3K" >/dev/null ||
  fail "qemu-io in session 2"
copy_export "$VIEW" "$T/view2.raw" || fail "reading the backup export failed (session 2)"
cmp "$T/view2.raw" "$T/snap2.raw" || fail "session 2's view is not the disk at its start"
map_vouches "$VIEW" "$T/snap2.raw" || fail "session 2's map hides data"
backup_end

stop_nbdkit "$NBDKIT_PID"

# --- a 3T disk: the copy unit doubles (128K) -----------------------------
rm -f "$T/disk.raw" "$T/disk.cbt"
TB=$((3 * 1024 * 1024 * M))
truncate -s "$TB" "$T/disk.raw"
qio "$T/disk.raw" "write -q -P 0x11 0 256K" "write -q -P 0x12 $((TB - 128 * K)) 128K" >/dev/null
start_backup_server cbt-bitmap=b0 cbt-create=true
backup_begin b1 b0
query_backup '."block-size" == 131072 and ."disk-size" == '"$TB" || fail "3T disk: query-backup"
qio "$LIVE" "write -q -P 0xaa 64K 4K" "write -q -P 0xab $((TB - 4 * K)) 4K" >/dev/null ||
  fail "3T disk: writes to the live export"
query_backup '."copied-blocks" == 2 and ."stored-bytes" == 262144' || fail "3T disk: not two 128K blocks copied"
timeout 60 qemu-io -r -f raw -c "read -P 0x11 0 256K" -c "read -P 0x12 $((TB - 128 * K)) 128K" \
  "$VIEW" >"$T/qio.out" 2>&1 || fail "3T disk: view read: $(cat "$T/qio.out")"
grep -q -E 'Pattern|failed' "$T/qio.out" && fail "3T disk: the view is not the old data: $(cat "$T/qio.out")"
backup_end
stop_nbdkit "$NBDKIT_PID"
echo "PASS"
