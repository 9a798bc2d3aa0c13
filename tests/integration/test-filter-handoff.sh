#!/usr/bin/env bash
# Handoff of a disk and its bitmaps from host A to host B (issue 12,
# docs/crash-safety.md "Moving a disk to another host"). "Host B" is the
# same machine seen through another boot id: nbdkit and cbt run in a mount
# namespace (unshare -m) where a file with another id is bind-mounted over
# /proc/sys/kernel/random/boot_id; the product has no switch for it.
#  - clean stop on A, files copied to B (and the disk renamed): B serves
#    them, the bitmap is valid, an incremental `cbt backup` on B continues
#    A's backup chain and restores byte for byte; a copy that lost the
#    disk's modification time is refused (it looks like a changed disk);
#  - kill -9 on A in power mode: B recovers (a superset of A's writes);
#  - kill -9 on A in process mode: B refuses, naming the other boot; A
#    itself (same boot) recovers;
#  - A and B on the SAME container: the OFD lock refuses the second server.
source "$(dirname "$0")/lib.sh"
need unshare mount stdbuf
[ "$(id -u)" = 0 ] || skip "needs root for unshare -m and the bind mount of boot_id"

REAL_NBDKIT=$(command -v nbdkit)
A="$T/a"; B="$T/b"
mkdir -p "$A" "$B" "$T/bin-b"
echo 0badb000-0000-4000-8000-00000000000b >"$T/boot-b"
# On host B, `nbdkit` and `cbt` see another boot id.
for tool in nbdkit cbt; do
  real=$REAL_NBDKIT; [ "$tool" = cbt ] && real=$CBT
  cat >"$T/bin-b/$tool" <<EOF
#!/bin/sh
exec unshare -m sh -c 'mount --bind "\$0" /proc/sys/kernel/random/boot_id && exec "\$@"' \
  "$T/boot-b" "$real" "\$@"
EOF
  chmod +x "$T/bin-b/$tool"
done
unshare -m sh -c "mount --bind '$T/boot-b' /proc/sys/kernel/random/boot_id &&
  [ \"\$(cat /proc/sys/kernel/random/boot_id)\" != \"$(cat /proc/sys/kernel/random/boot_id)\" ]" ||
  skip "cannot give a mount namespace another boot id here"
on_b() { PATH="$T/bin-b:$PATH" "$@"; }
CBT_B="$T/bin-b/cbt"

serve() {  # serve DIR DISK DURABILITY : nbdkit over DIR/DISK, container DIR/disk.cbt
  start_nbdkit "$1/sock" --filter="$FILTER" file "$1/$2" cbt-file="$1/disk.cbt" \
    cbt-bitmap=b0 cbt-create=true cbt-durability="$3" cbt-control="$1/ctl"
}
qio() {  # qio DIR CMD...
  local d=$1; shift
  timeout 60 qemu-io -f raw "$@" "nbd+unix:///?socket=$d/sock" >"$T/qio.out" 2>&1 ||
    fail "qemu-io $*: $(cat "$T/qio.out")"
}
# crash_with_writes DIR DISK DURABILITY SEED : writes held open, kill -9
crash_with_writes() {
  serve "$1" "$2" "$3"
  "$NBD_LOAD" --socket "$1/sock" --seed "$4" --ops 100 --no-final-flush \
    --region 0:33554432 --expected "$T/expected.json" --hold-file "$T/hold" &
  local load=$!; PIDS+=("$load")
  wait_for 60 [ -e "$T/hold" ] || fail "client did not finish"
  kill9_nbdkit "$NBDKIT_PID"
  rm -f "$T/hold"; wait "$load" || true
}

# --- clean stop on A, start on B from copied files ----------------------------
truncate -s 128M "$A/disk.raw"
qemu-io -f raw -c 'write -P 0x11 0 8M' "$A/disk.raw" >/dev/null
serve "$A" disk.raw power
qio "$A" -c 'write -P 0x22 16M 64k'
timeout 120 "$CBT" backup --socket "$A/ctl" --dir "$A/backups" --output=json >"$T/out" ||
  fail "full backup on A: $(cat "$T/out")"
qio "$A" -c 'write -P 0x33 32M 128k'
stop_nbdkit "$NBDKIT_PID"
cp "$A/disk.cbt" "$B/disk.cbt"
cp -r "$A/backups" "$B/backups"
# A copy that does not keep the modification time cannot be told from a
# changed disk (nor from another disk: another path and inode): refused,
# naming both readings and the fix (docs: copy with cp -p / rsync -a).
cp "$A/disk.raw" "$B/moved.raw"
rc=0
on_b timeout 60 "${NBDKIT_ENV[@]}" nbdkit -f -U "$B/sock" --filter="$FILTER" file "$B/moved.raw" \
  cbt-file="$B/disk.cbt" cbt-bitmap=b0 --run 'nbdinfo --size "nbd+unix:///?socket=$unixsocket"' \
  >"$T/b.out" 2>&1 || rc=$?
[ "$rc" != 0 ] && grep -q "made for disk $A/disk.raw (inode [0-9]*), not for $B/moved.raw: .*moved and changed since (mtime" "$T/b.out" ||
  fail "a copy with a new mtime was accepted: rc $rc $(cat "$T/b.out")"
cp -p "$A/disk.raw" "$B/moved.raw"  # the disk under another name on B, mtime kept
[ -z "$(bitmap_flags "$B/disk.cbt" b0 | jq -r '.[] | select(. == "in-use")')" ] ||
  fail "a clean stop left in-use"
on_b serve "$B" moved.raw power
qio "$B" -c 'write -P 0x44 64M 64k'
timeout 120 "$CBT_B" backup --socket "$B/ctl" --dir "$B/backups" --output=json >"$T/out" ||
  fail "incremental backup on B: $(cat "$T/out")"
[ "$(jq -r .type "$T/out")" = incremental ] || fail "B's backup is not incremental: $(cat "$T/out")"
stop_nbdkit "$NBDKIT_PID"
timeout 120 "$CBT_B" restore "$B/backups" --to "$T/restored.raw" >/dev/null || fail "restore on B"
cmp "$T/restored.raw" "$B/moved.raw" || fail "B's chain does not restore B's disk"
timeout 60 qemu-img check -q "$B/disk.cbt" || fail "qemu-img check of B's container"
echo "ok: clean handoff, chain continued on B"

# --- kill -9 on A in power mode: B recovers ------------------------------------
rm -rf "$A"/* "$B"/*
truncate -s 64M "$A/disk.raw"
crash_with_writes "$A" disk.raw power 31
cp -p "$A/disk.cbt" "$A/disk.raw" "$B/"
[ "$(bitmap_flags "$B/disk.cbt" b0)" = '["in-use","auto"]' ] || fail "the crash left no in-use"
truncate -s 0 "$T/nbdkit.log"
on_b serve "$B" disk.raw power
stop_nbdkit "$NBDKIT_PID"
grep -q "recovered" "$T/nbdkit.log" || fail "B did not say it recovered: $(cat "$T/nbdkit.log")"
python3 "$(dirname "$0")/extents.py" subset "$T/expected.json" <(qemu_map "$B/disk.cbt" b0) 65536 ||
  fail "B's recovered bitmap misses A's writes"
echo "ok: power mode, kill -9 on A, B recovers"

# --- kill -9 on A in process mode: B refuses, A recovers -------------------------
rm -rf "$A"/* "$B"/*
truncate -s 64M "$A/disk.raw"
crash_with_writes "$A" disk.raw process 32
cp -p "$A/disk.cbt" "$A/disk.raw" "$B/"
truncate -s 0 "$T/nbdkit.log"
rc=0
on_b timeout 60 "${NBDKIT_ENV[@]}" nbdkit -f -U "$B/sock" --filter="$FILTER" file "$B/disk.raw" \
  cbt-file="$B/disk.cbt" cbt-bitmap=b0 cbt-durability=process \
  --run 'nbdinfo --size "nbd+unix:///?socket=$unixsocket"' >"$T/b.out" 2>>"$T/nbdkit.log" || rc=$?
[ "$rc" != 0 ] || fail "B served a process-mode record written by another boot"
grep -q "boot" "$T/nbdkit.log" || fail "B's refusal does not name the boot: $(cat "$T/nbdkit.log")"
cmp "$A/disk.cbt" "$B/disk.cbt" || fail "B's refusal changed the container"
rc=0; "$CBT_B" recover "$B/disk.cbt" --bitmap b0 >"$T/out" 2>&1 || rc=$?
[ "$rc" != 0 ] && grep -q "boot" "$T/out" || fail "cbt recover on B: rc $rc $(cat "$T/out")"
serve "$A" disk.raw process  # same boot: the record is trusted
stop_nbdkit "$NBDKIT_PID"
python3 "$(dirname "$0")/extents.py" subset "$T/expected.json" <(qemu_map "$A/disk.cbt" b0) 65536 ||
  fail "A's recovered bitmap misses its writes"
echo "ok: process mode, kill -9 on A, B refuses, A recovers"

# --- one container, two hosts: the lock --------------------------------------------
serve "$A" disk.raw power
A_PID=$NBDKIT_PID
rc=0
on_b timeout 60 "${NBDKIT_ENV[@]}" nbdkit -f -U "$B/sock" --filter="$FILTER" file "$A/disk.raw" \
  cbt-file="$A/disk.cbt" cbt-bitmap=b0 --run true >"$T/b.out" 2>&1 || rc=$?
[ "$rc" != 0 ] && grep -q "another process (QEMU or cbt) holds it" "$T/b.out" ||
  fail "B served A's container while A held it: rc $rc $(cat "$T/b.out")"
stop_nbdkit "$A_PID"
echo PASS
