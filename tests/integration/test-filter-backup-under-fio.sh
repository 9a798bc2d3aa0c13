#!/usr/bin/env bash
# Backup sessions under load: fio (ioengine=nbd) writes random data (fresh
# buffers, 4K-128K, several connections, plus a trimming job) to the live
# export while the whole backup export is copied with qemu-img convert. The
# point in time is made by the test, not the product: the writers of the
# previous round have exited (none connected) when disk.raw is copied to
# snap.raw and the session begins; the next writers start after that, and
# the copy starts once query-backup shows copy-before-write under way.
# Judged: the copy equals snap.raw byte for byte; nbdinfo --map of the view,
# also taken under load, hides no data of snap.raw; query-backup's
# copied-blocks > 0; no fio job saw an error. Twice: b0 frozen -> b1, then
# b1 frozen -> b2.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/backup_lib.sh"
need fio
fio --enghelp=nbd >/dev/null 2>&1 || skip "fio has no nbd engine (fio --enghelp=nbd)"

SIZE=$((128 * 1024 * 1024))
truncate -s "$SIZE" "$T/disk.raw"
# The view under another name (cbt-backup-export=).
start_backup_server cbt-bitmap=b0 cbt-create=true cbt-backup-export=pit
VIEW="nbd+unix:///pit?socket=$T/sock"

# fio_args SEED RUNTIME [IOPS] : 3 writing connections and 1 trimming one
# (each at most IOPS requests per second: the view copy then races writers
# over a disk partly preserved, partly not). --thread: one process, so that
# the EXIT trap's kill of $FIO_PID ends every job.
fio_args() {
  echo --thread --ioengine=nbd "--uri=$LIVE" --iodepth=4 --time_based "--runtime=$2" ${3:+--rate_iops=$3} \
    --refill_buffers=1 "--randseed=$1" --name=w --rw=randwrite --bsrange=4k-128k \
    --numjobs=3 --name=t --rw=randtrim --bs=64k --numjobs=1
}
# fio_ok OUT : every job reported err= 0 (fio's per-job error), and some did.
fio_ok() {
  grep -q 'err= 0' "$1" || return 1
  ! grep -E 'err= *[1-9]' "$1"
}
# A bounded run to completion: no writer is connected once it returns.
fio_run() {
  # shellcheck disable=SC2046
  timeout 60 fio $(fio_args "$1" "$2") --output="$T/fio-pre.out" >/dev/null 2>&1 ||
    fail "fio (seed $1) failed: $(cat "$T/fio-pre.out")"
  fio_ok "$T/fio-pre.out" || fail "fio (seed $1) reported errors: $(cat "$T/fio-pre.out")"
}

round=0
for pair in "b1 b0" "b2 b1"; do
  round=$((round + 1))
  read -r new frozen <<<"$pair"
  fio_run $((round * 10)) 2
  cp --sparse=always "$T/disk.raw" "$T/snap.raw"  # no writer connected
  backup_begin "$new" "$frozen"

  # shellcheck disable=SC2046
  # Bounded by its runtime; not under timeout(1), whose SIGKILL would orphan fio.
  fio $(fio_args $((round * 10 + 1)) 60 200) --output="$T/fio.out" >/dev/null 2>&1 &
  FIO_PID=$!
  PIDS+=("$FIO_PID")
  wait_for 60 query_backup '."copied-blocks" > 0' 2>/dev/null ||
    fail "round $round: no copy-before-write within 60 s of the writers' start"

  echo "round $round: copy starts at $(ctl '{"execute":"query-backup"}' | jq '.return."copied-blocks"') of 2048 blocks preserved"
  copy_export "$VIEW" "$T/view.raw" || fail "round $round: copying the backup export failed"
  map_vouches "$VIEW" "$T/snap.raw" || fail "round $round: the view's map hides data"

  kill -INT "$FIO_PID"
  rc=0; wait "$FIO_PID" || rc=$?
  # fio exits 128 after SIGINT; anything else (1: errors) fails.
  [ "$rc" -eq 0 ] || [ "$rc" -eq 128 ] || fail "round $round: fio exited $rc: $(cat "$T/fio.out")"
  fio_ok "$T/fio.out" || fail "round $round: fio reported errors: $(cat "$T/fio.out")"

  cmp "$T/view.raw" "$T/snap.raw" || fail "round $round: the backup export is not the disk at backup-begin"
  query_backup '."copied-blocks" > 0 and ."view-reads" > 0 and .broken == null and .export == "pit"' ||
    fail "round $round: query-backup"
  ctl '{"execute":"query-backup"}' | jq -c '.return | {id, "copied-blocks", "zero-blocks", "stored-bytes", "view-reads", "write-waits"}'
  backup_end
done

stop_nbdkit "$NBDKIT_PID"
echo "PASS"
