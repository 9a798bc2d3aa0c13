#!/usr/bin/env bash
# Injected faults.
#  1. Data path: nbdkit's error filter under cbt fails 20 % of writes with
#     EIO. The client sees the errors; every successful change is recorded
#     (failed ones may be too: a superset, never a miss).
#  2. Bitmap path: the container sits on a tiny tmpfs that is full when a
#     persist needs new clusters. The flush fails with ENOSPC (the errno
#     reaches the client), the bits stay in memory, and once space is freed
#     a later flush stores them all.
source "$(dirname "$0")/lib.sh"
need qemu-io

truncate -s 64M "$T/disk.raw"
start_nbdkit "$T/sock" --filter="$FILTER" --filter=error file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true \
  error=EIO error-pwrite-rate=20% error-zero-rate=20%
"$NBD_LOAD" --socket "$T/sock" --seed 61 --ops 1000 --allow-errors --expected "$T/ok.json" \
  2>"$T/load.err"
stop_nbdkit "$NBDKIT_PID"
python3 "$(dirname "$0")/extents.py" subset "$T/ok.json" <(qemu_map "$T/disk.cbt" b0) 65536 ||
  fail "a successful write is missing from the bitmap"
qemu-img check "$T/disk.cbt" >/dev/null || fail "qemu-img check failed"
echo "ok: data-path errors: every successful change recorded"

# 2. ENOSPC on the container.
if ! mkdir "$T/mnt" || ! mount -t tmpfs -o size=2m tmpfs "$T/mnt" 2>/dev/null; then
  echo "SKIP part 2: cannot mount a tmpfs here (needs root); data-path part passed"
  exit 0
fi
MOUNTS+=("$T/mnt")
# 1 TiB disk, 4 KiB granules: every 64 KiB bitmap cluster covers 2 GiB.
truncate -s 1T "$T/big.raw"
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/big.raw" \
  cbt-file="$T/mnt/big.cbt" cbt-bitmap=b0 cbt-create=true cbt-granularity=4K
# Fill the tmpfs so that no new cluster fits.
rc=0
dd if=/dev/zero of="$T/mnt/filler" bs=4k 2>/dev/null || rc=$?
[ $rc -ne 0 ] || fail "the tmpfs did not fill up"
ops=()
for i in 0 3 7 11 100 300 511; do ops+=("w:$((i * 2 << 30)):4096"); done
rc=0
timeout 60 "$NBD_OPS" "$T/sock" "${ops[@]}" f >"$T/q1.out" 2>&1 || rc=$?
[ $rc -eq 1 ] || fail "nbd_ops: expected exit 1 (an operation failed), got $rc"
grep -q "^f error ENOSPC" "$T/q1.out" || fail "flush did not fail with ENOSPC: $(cat "$T/q1.out")"
grep -c "^w.* ok" "$T/q1.out" | grep -qx 7 || fail "writes failed: $(cat "$T/q1.out")"
echo "ok: $(grep '^f' "$T/q1.out")"
rm -f "$T/mnt/filler"
timeout 60 "$NBD_OPS" "$T/sock" f >"$T/q2.out" 2>&1 ||
  fail "flush after freeing space failed: $(cat "$T/q2.out")"
stop_nbdkit "$NBDKIT_PID"
map=$(qemu_map "$T/mnt/big.cbt" b0)
n=$(echo "$map" | jq '[.[] | select(.dirty)] | length')
[ "$n" = 7 ] || fail "expected 7 dirty extents after retry, got $n: $map"
qemu-img check "$T/mnt/big.cbt" >/dev/null || fail "qemu-img check failed after ENOSPC"
echo "OK: ENOSPC reported, bits kept, stored by the retry"
