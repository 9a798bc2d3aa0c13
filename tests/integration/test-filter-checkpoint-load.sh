#!/usr/bin/env bash
# A checkpoint under load (issue 9): 4 connections (QD 4 each) write 4 KiB,
# each write to its own 64 KiB granule, while `checkpoint` freeze b0 new b1
# is sent over the control socket mid-run (tests/tools/checkpoint_load.cc).
# After a clean stop, judged offline (tests/integration/checkpoint_check.py):
# every write acknowledged before the request was sent is in b0, every write
# sent after the reply is in b1, every write is in one of them; b0 holds no
# write sent after the reply, b1 none acknowledged before the request, and
# neither a granule nobody wrote. QEMU agrees: qemu-img check is clean, b0 is
# disabled (no auto flag) and b1 records, and qemu-nbd -B serves the same
# extents as `cbt map`.
source "$(dirname "$0")/lib.sh"
need python3
source "$(dirname "$0")/checkpoint_lib.sh"

# Three runs, each on a fresh container: a checkpoint lands at a different
# moment of the writers' queues each time. 1 GiB = 16384 granules.
for run in 1 2 3; do
  rm -f "$T/disk.raw" "$T/disk.cbt"
  truncate -s 1G "$T/disk.raw"
  start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
    cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$T/ctl.sock"
  wait_for 60 [ -S "$T/ctl.sock" ] || fail "no control socket at $T/ctl.sock"

  rc=0
  timeout 60 "$CKPT_LOAD" --socket "$T/sock" --control "$T/ctl.sock" --log "$T/load.log" \
    --threads 4 --qd 4 --before 5000 --after 5000 2>"$T/load.err" || rc=$?
  cat "$T/load.err"
  [ "$rc" -eq 0 ] || fail "run $run: checkpoint_load exited $rc: $(cat "$T/load.err")"

  stop_nbdkit_checked "$NBDKIT_PID"
  judge_bitmaps "$T/disk.cbt"
  python3 "$CKPT_CHECK" --log "$T/load.log" --frozen "$T/b0.json" --new "$T/b1.json" \
    --mode clean >"$T/check.out" || { cat "$T/check.out"; fail "run $run: checkpoint semantics violated"; }
  echo "run $run: $(cat "$T/check.out")"
done
echo "OK: checkpoint under load (3 runs): b0 exact up to the request, b1 from the reply, none lost"
