#!/usr/bin/env bash
# cbt backup / cbt restore (docs/backup.md) against a real nbdkit running the
# filter, judged by QEMU's tools:
#  - a full backup, then incrementals over writes, zeroes over data and
#    discards: each layer passes qemu-img check, names the previous one as
#    its backing file (relative, qcow2), stores only the dirty clusters, and
#    the chain restores (cbt restore, and plain qemu-img convert) byte for
#    byte to the disk as it was at that backup; --verify agrees;
#  - a run that fails after its checkpoint (an unreachable --nbd) leaves no
#    layer and the chain unchanged; the next run is incremental and covers
#    the failed run's changes too;
#  - a copy of the chain directory backs up on its own (a full backup under a
#    new chain id) and takes nothing from the original, whose next
#    incremental still has every change; a chain missing a middle layer
#    starts again with a full one; another disk into the directory is
#    refused; a --dir with missing parents is an error;
#  - cbt backup begin --nbd-socket serves qemu:dirty-bitmap:FROZEN through
#    qemu-nbd: nbdinfo --map equals cbt map --socket of the frozen bitmap,
#    and the data read there is the point-in-time view; cbt backup end stops
#    it and leaves nothing behind.
source "$(dirname "$0")/lib.sh"
[ -x "$CBT" ] || fail "cbt not built: $CBT"
need qemu-io qemu-img qemu-nbd nbdinfo jq python3

URI="nbd+unix:///?socket=$T/sock"
CTL="$T/ctl.sock"
DIR="$T/backups"
# qemu-nbd endpoints are daemons, not our children: stop them by their pid
# files on any exit, then the usual cleanup.
stop_endpoints() {
  local f
  for f in "$T"/*.sock.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null; done
  cleanup
}
trap stop_endpoints EXIT

qio() {
  timeout 60 qemu-io -f raw "$@" "$URI" >"$T/qio.out" 2>&1 ||
    fail "qemu-io $*: $(cat "$T/qio.out")"
}
backup() {
  local rc=0
  timeout 120 "$CBT" backup --socket "$CTL" --dir "$DIR" --output=json "$@" >"$T/out" 2>"$T/err" ||
    rc=$?
  [ "$rc" = 0 ] || fail "cbt backup $* exited $rc: $(cat "$T/err")"
}
# restored_equals POINT FILE : cbt restore of backup POINT equals FILE, and so
# does a plain qemu-img convert of that layer.
restored_equals() {
  local layer
  layer=$(jq -r ".layers[$1].file" "$DIR/cbt-backup.json")
  rm -f "$T/restored.raw" "$T/plain.raw"
  timeout 120 "$CBT" restore "$DIR" --point "$1" --to "$T/restored.raw" >/dev/null ||
    fail "cbt restore --point $1"
  cmp "$T/restored.raw" "$2" || fail "backup $1 ($layer) does not restore to $(basename "$2")"
  timeout 120 qemu-img convert -f qcow2 -O raw "$DIR/$layer" "$T/plain.raw"
  cmp "$T/plain.raw" "$2" || fail "qemu-img convert of $layer differs from $(basename "$2")"
}
check_layer() {
  timeout 60 qemu-img check -q "$DIR/$1" || fail "qemu-img check $1"
}
# allocated_in_top FILE : bytes allocated in FILE's own layer (not its backing).
allocated_in_top() {
  qemu-img map --output=json -f qcow2 "$DIR/$1" |
    jq '[.[] | select(.depth == 0 and .data == true) | .length] | add // 0'
}

# A 64 MiB disk: data at the start, a hole in the middle, data at the end.
truncate -s 64M "$T/disk.raw"
qemu-io -f raw -c 'write -P 0x11 0 8M' -c 'write -P 0x22 60M 4M' "$T/disk.raw" >/dev/null
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$CTL"
qio -c 'write -P 0x33 1M 64k'  # a writable client attaches the tracker

# --- full -------------------------------------------------------------------
cp "$T/disk.raw" "$T/snap0.raw"
backup
[ "$(jq -r .type "$T/out")" = full ] || fail "first run not full: $(cat "$T/out")"
[ -f "$DIR/000-full.qcow2" ] || fail "no 000-full.qcow2"
check_layer 000-full.qcow2
restored_equals 0 "$T/snap0.raw"
# Only the allocated 12 MiB were read, not the hole.
[ "$(jq .\"bytes-read\" "$T/out")" = $((12 << 20)) ] || fail "full read: $(cat "$T/out")"
chain_bitmap=$(jq -r .bitmap "$T/out")
"$CBT" info --socket "$CTL" --output=json | jq -e --arg b "$chain_bitmap" \
  '[.bitmaps[] | select(.name == $b and .enabled)] | length == 1' >/dev/null ||
  fail "the chain's bitmap $chain_bitmap does not record"

# --- incremental: writes, a zero over data, a discard ------------------------
qio -c 'write -P 0x44 2M 100k' -c 'write -z 4M 1M' -c 'discard 60M 64k' -c 'write -P 0x55 30M 4k'
cp "$T/disk.raw" "$T/snap1.raw"
backup --verify
[ "$(jq -r .type "$T/out")" = incremental ] || fail "second run not incremental: $(cat "$T/out")"
[ "$(jq -r .verified "$T/out")" = true ] || fail "not verified: $(cat "$T/out")"
check_layer 001-inc.qcow2
info=$(qemu-img info --output=json "$DIR/001-inc.qcow2")
[ "$(jq -r '.["backing-filename"]' <<<"$info")" = 000-full.qcow2 ] || fail "backing: $info"
[ "$(jq -r '.["backing-filename-format"]' <<<"$info")" = qcow2 ] || fail "backing format: $info"
restored_equals 1 "$T/snap1.raw"
restored_equals 0 "$T/snap0.raw"  # the older point is still there
# Read: the dirty 64K clusters (2M+100k -> 2 clusters, 4M+1M -> 16, 60M -> 1,
# 30M -> 1); stored as data: the 0x44 and 0x55 clusters only (the zeroed and
# discarded ones are zero clusters).
[ "$(jq .\"bytes-read\" "$T/out")" = $((20 * 65536)) ] || fail "incremental read: $(cat "$T/out")"
[ "$(allocated_in_top 001-inc.qcow2)" = $((3 * 65536)) ] ||
  fail "001-inc.qcow2 stores $(allocated_in_top 001-inc.qcow2) bytes of data"

# --- a failed run, then the next covers its changes --------------------------
qio -c 'write -P 0x66 10M 64k'
rc=0
timeout 60 "$CBT" backup --socket "$CTL" --dir "$DIR" --nbd "nbd+unix:///backup?socket=$T/none.sock" \
  >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] || fail "a run against a dead --nbd exited $rc"
grep -q "the next run covers these changes too" "$T/err" || fail "failure message: $(cat "$T/err")"
[ ! -e "$DIR/002-inc.qcow2" ] && [ ! -e "$DIR/002-inc.qcow2.part" ] || fail "a failed run left a layer"
[ "$(jq '.layers | length' "$DIR/cbt-backup.json")" = 2 ] || fail "the failed run changed the chain"
[ "$(ctl_call "$CTL" '{"execute":"query-backup"}' | jq .return.active)" = false ] ||
  fail "the failed run left its session open"
qio -c 'write -P 0x77 20M 64k'
cp "$T/disk.raw" "$T/snap2.raw"
backup
[ "$(jq -r .type "$T/out")" = incremental ] || fail "run after a failure not incremental: $(cat "$T/out")"
check_layer 002-inc.qcow2
restored_equals 2 "$T/snap2.raw"  # has 0x66 (the failed run's) and 0x77
[ "$(jq .\"bytes-read\" "$T/out")" = $((2 * 65536)) ] || fail "after failure read: $(cat "$T/out")"

# --- a copy of the directory goes its own way; the original loses nothing ---
cp -a "$DIR" "$T/copy"
qio -c 'write -P 0xb1 8M 64k'
cp "$T/disk.raw" "$T/snapA.raw"
backup
restored_equals 3 "$T/snapA.raw"
qio -c 'write -P 0xb2 9M 64k'
cp "$T/disk.raw" "$T/snapB.raw"
timeout 120 "$CBT" backup --socket "$CTL" --dir "$T/copy" --output=json >"$T/out" 2>"$T/err" ||
  fail "backup into the copy: $(cat "$T/err")"
[ "$(jq -r .type "$T/out")" = full ] || fail "the copy's run is not full: $(cat "$T/out")"
jq -r .reason "$T/out" | grep -q "is gone" || fail "the copy's reason: $(cat "$T/out")"
rm -f "$T/restored.raw"
"$CBT" restore "$T/copy" --to "$T/restored.raw" >/dev/null || fail "restore the copy"
cmp "$T/restored.raw" "$T/snapB.raw" || fail "the copy's full backup is not the disk"
qio -c 'write -P 0xb3 10M 64k'
cp "$T/disk.raw" "$T/snapC.raw"
backup
[ "$(jq -r .type "$T/out")" = incremental ] || fail "the original after the copy: $(cat "$T/out")"
restored_equals 4 "$T/snapC.raw"  # 0xb2 too: the copy took nothing from it
# A layer missing in the middle: the next run of that chain is a full one.
rm "$T/copy/001-inc.qcow2"
timeout 120 "$CBT" backup --socket "$CTL" --dir "$T/copy" --output=json >"$T/out" 2>"$T/err" ||
  fail "backup into a broken chain: $(cat "$T/err")"
[ "$(jq -r .type "$T/out")" = full ] && jq -r .reason "$T/out" | grep -q "001-inc.qcow2 is missing" ||
  fail "a broken chain: $(cat "$T/out")"
# Another disk (its own container) into this directory: refused.
truncate -s 64M "$T/other.raw"
MAIN_PID=$NBDKIT_PID
start_nbdkit "$T/osock" --filter="$FILTER" file "$T/other.raw" \
  cbt-file="$T/other.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$T/octl.sock"
OTHER_PID=$NBDKIT_PID
rc=0
"$CBT" backup --socket "$T/octl.sock" --dir "$DIR" >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && grep -q "holds the backups of the disk whose bitmaps are in" "$T/err" ||
  fail "another disk into the directory: exit $rc: $(cat "$T/err")"
[ "$(jq '.layers | length' "$DIR/cbt-backup.json")" = 5 ] || fail "the refused run changed the chain"
stop_nbdkit "$OTHER_PID"
NBDKIT_PID=$MAIN_PID
# A --dir whose parent does not exist is an error, not a new tree.
rc=0
"$CBT" backup --socket "$CTL" --dir "$T/no/such/dir" >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && [ ! -e "$T/no" ] || fail "--dir with missing parents: exit $rc: $(cat "$T/err")"

# --- cbt backup begin --nbd-socket: the dirty-bitmap endpoint ----------------
# Without --freeze, begin freezes the one bitmap that records; here two do
# (b0 and the chains'), so it asks.
rc=0
"$CBT" backup begin --socket "$CTL" >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && grep -q -- "persistent bitmaps record: name the one to freeze with --freeze" "$T/err" ||
  fail "backup begin with two recording bitmaps: exit $rc: $(cat "$T/err")"
qio -c 'write -P 0x88 40M 128k' -c 'write -P 0x99 50M 4k'
cp "$T/disk.raw" "$T/snap3.raw"
timeout 60 "$CBT" backup begin --socket "$CTL" --freeze b0 --new b1 --nbd-socket "$T/ep.sock" \
  --output=json >"$T/begin.json" 2>"$T/err" || fail "backup begin: $(cat "$T/err")"
EP=$(jq -r .uri "$T/begin.json")
[ "$(jq -r .context "$T/begin.json")" = "qemu:dirty-bitmap:b0" ] || fail "$(cat "$T/begin.json")"
qio -c 'write -P 0xaa 40M 64k'  # after the point in time
timeout 30 nbdinfo --json --map=qemu:dirty-bitmap:b0 "$EP" |
  jq -c 'map({start: .offset, length: .length, dirty: ((.type % 2) == 1)})' | merge_runs >"$T/ep.map"
"$CBT" map --socket "$CTL" --bitmap b0 --output=json | merge_runs >"$T/ctl.map"
cmp "$T/ep.map" "$T/ctl.map" || fail "endpoint map $(cat "$T/ep.map") != control $(cat "$T/ctl.map")"
grep -q true "$T/ep.map" || fail "b0 has nothing dirty: $(cat "$T/ep.map")"
timeout 60 qemu-img convert -f raw -O raw "$EP" "$T/ep.raw"
cmp "$T/ep.raw" "$T/snap3.raw" || fail "the endpoint does not serve the point-in-time view"
ep_pid=$(ctl_call "$CTL" '{"execute":"query-backup"}' | jq .return.endpoint.pid)
[ "$ep_pid" -gt 1 ] || fail "no endpoint pid recorded"
timeout 60 "$CBT" backup end --socket "$CTL" >/dev/null 2>"$T/err" || fail "backup end: $(cat "$T/err")"
wait_for 10 bash -c "! kill -0 $ep_pid 2>/dev/null" || fail "qemu-nbd $ep_pid still runs"
[ ! -e "$T/ep.sock" ] && [ ! -e "$T/ep.sock.carrier.qcow2" ] || fail "the endpoint left files"

# --- begin refused or undone; an endpoint that outlived its server ----------
enabled() {  # enabled NAME : "true", "false" or "absent"
  "$CBT" info --socket "$CTL" --output=json |
    jq -r --arg n "$1" '[.bitmaps[] | select(.name == $n)] | if length == 0 then "absent" else (.[0].enabled | tostring) end'
}
touch "$T/busy.sock"
rc=0
"$CBT" backup begin --socket "$CTL" --freeze b1 --new b2 --nbd-socket "$T/busy.sock" \
  >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && grep -q "exists: an endpoint left running" "$T/err" || fail "busy socket: $(cat "$T/err")"
[ "$(enabled b1)" = true ] && [ "$(enabled b2)" = absent ] || fail "a refused begin made a checkpoint"
rc=0
"$CBT" backup begin --socket "$CTL" --freeze b1 --new b2 --nbd-socket "$T/no/such/ep.sock" \
  >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && grep -q "nothing was changed: the session and its checkpoint were undone" "$T/err" ||
  fail "failed endpoint: exit $rc: $(cat "$T/err")"
[ "$(enabled b1)" = true ] && [ "$(enabled b2)" = absent ] || fail "a failed begin kept its checkpoint"
[ "$(ctl_call "$CTL" '{"execute":"query-backup"}' | jq .return.active)" = false ] ||
  fail "a failed begin left its session"
timeout 60 "$CBT" backup begin --socket "$CTL" --freeze b1 --new b2 --nbd-socket "$T/ep2.sock" \
  >/dev/null 2>"$T/err" || fail "backup begin: $(cat "$T/err")"
ep_pid=$(ctl_call "$CTL" '{"execute":"query-backup"}' | jq .return.endpoint.pid)
kill9_nbdkit "$NBDKIT_PID"
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b2 cbt-control="$CTL"
rc=0
"$CBT" backup end --socket "$CTL" >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && grep -q "no backup session is open" "$T/err" || fail "end after restart: $(cat "$T/err")"
grep -q "list bitmaps" "$T/err" && fail "a bitmap hint for a session error: $(cat "$T/err")"
"$CBT" backup end --socket "$CTL" --nbd-socket "$T/ep2.sock" >/dev/null 2>"$T/err" ||
  fail "end --nbd-socket after restart: $(cat "$T/err")"
wait_for 20 bash -c "! kill -0 $ep_pid 2>/dev/null" || fail "the stale endpoint $ep_pid still runs"
[ ! -e "$T/ep2.sock" ] && [ ! -e "$T/ep2.sock.carrier.qcow2" ] || fail "the stale endpoint left files"

stop_nbdkit "$NBDKIT_PID"
echo "PASS"
