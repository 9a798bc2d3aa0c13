#!/usr/bin/env bash
# The read-write qcow2 plugin on a full file system (ENOSPC).
# A qcow2 image (64 KiB clusters, 64 MiB virtual) on an 8 MiB tmpfs:
#  1. 2 MiB written and flushed while there is room: acknowledged;
#  2. 1 MiB writes over the rest of the disk until the tmpfs is full: the
#     first failing write fails with ENOSPC (nbd_ops prints the errno), no
#     write fails with another errno, later writes fail the same way; a
#     flush then succeeds or fails with ENOSPC/EIO (reported, both allowed);
#  3. the server keeps serving reads: the flushed data reads back over NBD
#     (qemu-io read -P), and so does every acknowledged write when the flush
#     succeeded;
#  4. freeing space: trim of whole clusters of acknowledged data, flush; the
#     trimmed range reads zeros; writes into the rest of the disk then
#     succeed again (what is observed is printed), flush succeeds;
#  5. after stopping the server (SIGTERM), qemu-img check reports no
#     corruption (leaks only if qemu-img check -r leaks then fixes them) and
#     QEMU reads back the acknowledged data (qemu-io -r read -P per range)
#     and zeros where it was trimmed.
#  6. the same on a 512 B cluster image, 4 KiB writes 256 KiB apart (each
#     needs a new L2 table): ENOSPC hits L2 table allocation too.
# Skipped (77, reason printed) when a tmpfs cannot be mounted.
#
#   MUTATE   TEST OF THE TEST only; the test must then FAIL:
#            errno    (expect EIO instead of ENOSPC)
#            pattern  (QEMU reads back the acknowledged data as 0x5a)
#            trim     (the trimmed range must read 0xa5, not zeros)
#            qemu     (step 5 only: QEMU must read the data as 0x5a)
#            l2       (step 6 only: QEMU must read the 512 B image's data as 0x5a)
source "$(dirname "$0")/lib.sh"
need qemu-io
MUTATE=${MUTATE:-}
case "$MUTATE" in "" | errno | pattern | trim | qemu | l2) ;; *) fail "unknown MUTATE=$MUTATE" ;; esac
[ -f "$QCOW2_PLUGIN" ] || fail "plugin not built: $QCOW2_PLUGIN"
[ -x "$NBD_OPS" ] || fail "nbd_ops not built: $NBD_OPS"
want_errno=ENOSPC
[ "$MUTATE" = errno ] && want_errno=EIO
pat=0xa5 # nbd_ops writes 0xa5
[ "$MUTATE" = pattern ] && pat=0x5a

MIB=$((1 << 20))
mkdir "$T/mnt"
mount -t tmpfs -o size=8m tmpfs "$T/mnt" 2>"$T/mount.err" ||
  skip "cannot mount a tmpfs (needs root): $(cat "$T/mount.err")"
MOUNTS+=("$T/mnt")
IMG=$T/mnt/disk.qcow2
qemu-img create -q -f qcow2 -o cluster_size=65536 "$IMG" 64M
free_kib=$(df -k --output=avail "$T/mnt" | tail -1 | tr -d ' ')
[ "$free_kib" -lt $((64 * 1024)) ] || fail "tmpfs has ${free_kib} KiB free, not less than the disk"
echo "tmpfs: ${free_kib} KiB free, virtual size 64 MiB"

URL="nbd+unix:///?socket=$T/sock"
start_nbdkit "$T/sock" "$QCOW2_PLUGIN" file="$IMG"

# nbd_qio OPS... : qemu-io as an NBD client of the running server; fails
# unless every command succeeded (qemu-io prints failures but exits 0).
nbd_qio() {
  local args=() c
  for c in "$@"; do args+=(-c "$c"); done
  timeout 60 qemu-io -f raw "${args[@]}" "$URL" >"$T/qio.out" 2>&1 || return 1
  ! grep -qiE 'error|fail|mismatch' "$T/qio.out"
}
# img_qio OPS... : the same, QEMU reading the image file directly (read-only).
img_qio() {
  local args=() c
  for c in "$@"; do args+=(-c "$c"); done
  timeout 60 qemu-io -r -f qcow2 "${args[@]}" "$IMG" >"$T/qio.out" 2>&1 || return 1
  ! grep -qiE 'error|fail|mismatch' "$T/qio.out"
}

# 1. Room enough: 2 MiB written and flushed.
timeout 60 "$NBD_OPS" "$T/sock" "w:0:$MIB" "w:$MIB:$MIB" f >"$T/ops1.out" 2>&1 ||
  fail "writes with room to spare failed: $(cat "$T/ops1.out")"
echo "ok: 2 MiB written and flushed"

# 2. Write 1 MiB pieces over the rest of the disk until the tmpfs is full.
ops=()
for i in $(seq 2 63); do ops+=("w:$((i * MIB)):$MIB"); done
rc=0
timeout 120 "$NBD_OPS" "$T/sock" "${ops[@]}" f >"$T/ops2.out" 2>&1 || rc=$?
[ $rc -eq 1 ] || fail "nbd_ops: expected exit 1 (a write failed), got $rc: $(cat "$T/ops2.out")"
first_bad=$(grep -m1 '^w.* error ' "$T/ops2.out") || fail "no write failed: $(cat "$T/ops2.out")"
echo "first failing write: $first_bad"
[[ "$first_bad" == *" error $want_errno "* ]] ||
  fail "the first failing write did not fail with $want_errno: $first_bad"
if grep '^w.* error ' "$T/ops2.out" | grep -qv " error $want_errno "; then
  fail "a write failed with another errno: $(grep '^w.* error ' "$T/ops2.out" | grep -v " error $want_errno " | head -3)"
fi
acked=() # offsets (MiB) of the acknowledged 1 MiB writes of step 2
while read -r op res; do
  [ "$res" = ok ] || continue
  off=${op#w:}
  off=${off%%:*}
  acked+=($((off / MIB)))
done < <(grep '^w:' "$T/ops2.out")
n_bad=$(grep -c '^w.* error ' "$T/ops2.out")
echo "ok: ${#acked[@]} more 1 MiB writes acknowledged (MiB ${acked[*]:-none}), $n_bad failed with $want_errno"
[ "${#acked[@]}" -gt 0 ] || fail "no write of step 2 succeeded: the tmpfs was full too early"
# Acknowledged writes after the first failure (a later write that fits).
late=$(awk '/^w.* error /{bad=1} bad && /^w.* ok$/{n++} END{print n+0}' "$T/ops2.out")
echo "observed: $late write(s) acknowledged after the first ENOSPC"
flush_line=$(grep '^f ' "$T/ops2.out") || fail "no flush result: $(cat "$T/ops2.out")"
echo "observed: flush after ENOSPC: $flush_line"
case "$flush_line" in
  "f ok") flushed=1 ;;
  "f error ENOSPC "* | "f error EIO "*) flushed=0 ;;
  *) fail "flush after ENOSPC neither succeeded nor failed cleanly: $flush_line" ;;
esac
kill -0 "$NBDKIT_PID" 2>/dev/null || fail "nbdkit died after ENOSPC"

# 3. Reads still served.
nbd_qio "read -P $pat 0 2M" || fail "flushed data does not read back over NBD: $(cat "$T/qio.out")"
if [ $flushed = 1 ]; then
  for m in "${acked[@]}"; do
    nbd_qio "read -P $pat $((m * MIB)) 1M" ||
      fail "acknowledged and flushed write at $m MiB does not read back: $(cat "$T/qio.out")"
  done
fi
echo "ok: reads served after ENOSPC; flushed data reads back"

# A second flush on a fresh connection (nothing new written).
rc=0
timeout 60 "$NBD_OPS" "$T/sock" f >"$T/ops3.out" 2>&1 || rc=$?
echo "observed: second flush: $(cat "$T/ops3.out")"
if [ $rc -eq 0 ]; then
  flushed=1 # every acknowledged write is now durable
else
  grep -qE '^f error (ENOSPC|EIO) ' "$T/ops3.out" || fail "second flush failed uncleanly: $(cat "$T/ops3.out")"
fi

echo "observed: $(df -k --output=avail "$T/mnt" | tail -1 | tr -d ' ') KiB free after ENOSPC; image file $(stat -c %s "$IMG") bytes"

# 4. Free space: trim the first 4 MiB of step 2's acknowledged data (whole
# clusters), flush; then write again where step 2 failed.
trim_mib=()
for m in "${acked[@]}"; do
  [ ${#trim_mib[@]} -lt 4 ] && trim_mib+=("$m")
done
ops=()
for m in "${trim_mib[@]}"; do ops+=("t:$((m * MIB)):$MIB"); done
timeout 60 "$NBD_OPS" "$T/sock" "${ops[@]}" f >"$T/ops4.out" 2>&1 ||
  fail "trim + flush failed: $(cat "$T/ops4.out")"
flushed=1 # that flush made every earlier acknowledged write durable
tpat=0
[ "$MUTATE" = trim ] && tpat=0xa5
for m in "${trim_mib[@]}"; do
  nbd_qio "read -P $tpat $((m * MIB)) 1M" || fail "trimmed range at $m MiB does not read zeros: $(cat "$T/qio.out")"
done
echo "observed: after trimming ${#trim_mib[@]} MiB: $(df -k --output=avail "$T/mnt" | tail -1 | tr -d ' ') KiB free"
# Retry the first writes that failed in step 2 (as much as was trimmed).
retry=()
while read -r op res; do
  [ "$res" = ok ] && continue
  [ ${#retry[@]} -lt ${#trim_mib[@]} ] || break
  off=${op#w:}
  off=${off%%:*}
  retry+=($((off / MIB)))
done < <(grep '^w:' "$T/ops2.out")
ops=()
for m in "${retry[@]}"; do ops+=("w:$((m * MIB)):$MIB"); done
rc=0
timeout 60 "$NBD_OPS" "$T/sock" "${ops[@]}" f >"$T/ops5.out" 2>&1 || rc=$?
echo "observed: writes after freeing space: $(tr '\n' ';' <"$T/ops5.out")"
[ $rc -eq 0 ] || fail "writes after freeing space failed: $(cat "$T/ops5.out")"
for m in "${retry[@]}"; do
  nbd_qio "read -P $pat $((m * MIB)) 1M" || fail "rewritten range at $m MiB does not read back: $(cat "$T/qio.out")"
done
echo "ok: trim freed space; ${#retry[@]} MiB written again and flushed"

stop_nbdkit "$NBDKIT_PID"

# 5. QEMU's view.
rc=0
qemu-img check "$IMG" >"$T/check.out" 2>&1 || rc=$?
case $rc in
  0) echo "ok: qemu-img check: no errors, no leaks" ;;
  3)
    echo "observed: qemu-img check reports leaks: $(grep -i leak "$T/check.out" | head -2 | tr '\n' ' ')"
    qemu-img check -r leaks "$IMG" >"$T/repair.out" 2>&1 || fail "qemu-img check -r leaks failed: $(cat "$T/repair.out")"
    qemu-img check "$IMG" >"$T/check2.out" 2>&1 || fail "leaks remain after -r leaks: $(cat "$T/check2.out")"
    echo "ok: qemu-img check -r leaks fixed them"
    ;;
  *) fail "qemu-img check exit $rc: $(cat "$T/check.out")" ;;
esac
[ "$MUTATE" = qemu ] && pat=0x5a
img_qio "read -P $pat 0 2M" || fail "QEMU: step 1 data does not read back: $(cat "$T/qio.out")"
for m in "${acked[@]}" "${retry[@]}"; do
  want=$pat
  for t in "${trim_mib[@]}"; do [ "$t" = "$m" ] && want=$tpat; done
  img_qio "read -P $want $((m * MIB)) 1M" || fail "QEMU: $m MiB does not read $want: $(cat "$T/qio.out")"
done
echo "ok: ENOSPC reported, reads served, image checks clean, QEMU reads the acknowledged data"

# 6. 512 B clusters: each 4 KiB write at a 256 KiB stride needs a new L2
# table as well as data clusters, so ENOSPC also hits L2 table allocation
# (written at flush). Same judgement: ENOSPC only, flush ok or clean, the
# server keeps serving, qemu-img check, QEMU reads every acknowledged write
# (after a successful flush).
rm -f "$IMG"
# 4 MiB left: fewer than the ~4.6 MiB the 1000 writes need.
dd if=/dev/zero of="$T/mnt/filler" bs=1M count=4 status=none
qemu-img create -q -f qcow2 -o cluster_size=512 "$IMG" 256M
start_nbdkit "$T/sock" "$QCOW2_PLUGIN" file="$IMG"
ops=()
for i in $(seq 0 999); do ops+=("w:$((i * 256 * 1024)):4096"); done
rc=0
timeout 120 "$NBD_OPS" "$T/sock" "${ops[@]}" f >"$T/ops6.out" 2>&1 || rc=$?
[ $rc -eq 1 ] || fail "512 B clusters: expected a write to fail, nbd_ops exit $rc"
if grep '^w.* error ' "$T/ops6.out" | grep -qv " error $want_errno "; then
  fail "512 B clusters: a write failed with another errno: $(grep '^w.* error ' "$T/ops6.out" | grep -v " error $want_errno " | head -3)"
fi
flush_line=$(grep '^f ' "$T/ops6.out") || fail "512 B clusters: no flush result"
echo "observed: 512 B clusters: $(grep -c '^w.* ok$' "$T/ops6.out") writes acknowledged, $(grep -c '^w.* error ' "$T/ops6.out") failed with $want_errno; $flush_line"
case "$flush_line" in
  "f ok") ;;
  "f error ENOSPC "* | "f error EIO "*)
    timeout 60 "$NBD_OPS" "$T/sock" f >"$T/ops7.out" 2>&1 ||
      skip_flush=1 ;;
  *) fail "512 B clusters: flush neither succeeded nor failed cleanly: $flush_line" ;;
esac
[ "${skip_flush:-0}" = 0 ] || fail "512 B clusters: flush keeps failing: $(cat "$T/ops7.out")"
nbd_qio "read -P $pat 0 4k" || fail "512 B clusters: reads not served after ENOSPC: $(cat "$T/qio.out")"
stop_nbdkit "$NBDKIT_PID"
rc=0
qemu-img check "$IMG" >"$T/check.out" 2>&1 || rc=$?
case $rc in
  0) ;;
  3)
    echo "observed: 512 B clusters: qemu-img check reports leaks"
    qemu-img check -r leaks "$IMG" >"$T/repair.out" 2>&1 || fail "qemu-img check -r leaks failed: $(cat "$T/repair.out")"
    qemu-img check "$IMG" >"$T/check2.out" 2>&1 || fail "leaks remain after -r leaks: $(cat "$T/check2.out")"
    ;;
  *) fail "512 B clusters: qemu-img check exit $rc: $(cat "$T/check.out")" ;;
esac
# One qemu-io run reads every acknowledged write.
l2pat=$pat
[ "$MUTATE" = l2 ] && l2pat=0x5a
args=()
while read -r op res; do
  [ "$res" = ok ] || continue
  off=${op#w:}
  off=${off%%:*}
  args+=(-c "read -P $l2pat $off 4k")
done < <(grep '^w:' "$T/ops6.out")
rc=0
timeout 120 qemu-io -r -f qcow2 "${args[@]}" "$IMG" >"$T/qio.out" 2>&1 || rc=$?
[ $rc -eq 0 ] && ! grep -qiE 'error|fail|mismatch' "$T/qio.out" ||
  fail "512 B clusters: QEMU does not read back an acknowledged write (qemu-io exit $rc): $(grep -iE 'error|fail' "$T/qio.out" | head -2)"
echo "OK: 512 B clusters: ENOSPC on L2 allocation, image checks clean, QEMU reads the acknowledged writes"
