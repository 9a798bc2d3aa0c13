#!/usr/bin/env bash
# kill -9 right after a checkpoint under load (issue 9), default durability
# (power). As test-filter-checkpoint-load.sh, but checkpoint_load SIGKILLs
# nbdkit once K writes sent after the checkpoint reply are acknowledged
# (K = 0: as soon as the reply is read; K = 200: while the writers go on into
# b1). The restart names only b1 (b0 is disabled; a missing b1 means the
# checkpoint acknowledged to the client was lost) and recovers; after a clean
# stop QEMU judges the container (b0 frozen, b1 recording) and
# checkpoint_check.py --mode kill: no acknowledged write is missing from
# b0 ∪ b1, every one sent after the reply is in b1 (which recovery may have
# made a superset), and b0, persisted by the checkpoint, is still exact:
# every write acknowledged before the request, none sent after the reply.
source "$(dirname "$0")/lib.sh"
need python3
source "$(dirname "$0")/checkpoint_lib.sh"

for k in 0 200; do
  rm -f "$T/disk.raw" "$T/disk.cbt"
  truncate -s 1G "$T/disk.raw"
  start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
    cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$T/ctl.sock"
  wait_for 60 [ -S "$T/ctl.sock" ] || fail "no control socket at $T/ctl.sock"

  rc=0
  timeout 60 "$CKPT_LOAD" --socket "$T/sock" --control "$T/ctl.sock" --log "$T/load.log" \
    --threads 4 --qd 4 --before 5000 --after 5000 \
    --kill-pid "$NBDKIT_PID" --kill-after "$k" 2>"$T/load.err" || rc=$?
  cat "$T/load.err"
  [ "$rc" -eq 0 ] || fail "checkpoint_load (kill after $k) exited $rc: $(cat "$T/load.err")"
  rc=0; wait "$NBDKIT_PID" || rc=$?
  [ "$rc" -eq 137 ] || fail "nbdkit exit status $rc, want 137 (SIGKILL)"
  echo "after the kill: b0 $(bitmap_flags "$T/disk.cbt" b0), b1 $(bitmap_flags "$T/disk.cbt" b1)"
  qemu-img info -U --output=json "$T/disk.cbt" |
    jq -e '."format-specific".data.bitmaps | any(.name == "b1")' >/dev/null ||
    fail "kill after $k: b1 is not in the container: the acknowledged checkpoint was lost"

  # Recovery happens when the first client connects (start_nbdkit's handshake).
  rm -f "$T/ctl.sock"
  start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
    cbt-file="$T/disk.cbt" cbt-bitmap=b1
  stop_nbdkit_checked "$NBDKIT_PID"
  grep "recovered from an unclean stop" "$T/nbdkit.log" | tail -1

  judge_bitmaps "$T/disk.cbt"
  min_after=100
  [ "$k" -gt 0 ] || min_after=0
  python3 "$CKPT_CHECK" --log "$T/load.log" --frozen "$T/b0.json" --new "$T/b1.json" \
    --mode kill --min-after "$min_after" >"$T/check.out" ||
    { cat "$T/check.out"; fail "kill after $k: acknowledged writes lost"; }
  cat "$T/check.out"
  : >"$T/nbdkit.log"
done
echo "OK: kill -9 after a checkpoint under load: no acknowledged write lost from b0 ∪ b1"
