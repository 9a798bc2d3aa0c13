#!/usr/bin/env bash
# cbt backup while fio writes (docs/backup.md): a full and then an
# incremental backup, each taken while three fio connections write and trim
# the live export. The disk is copied with no writer connected (writers
# paused by the test, not by the product), the run's checkpoint follows,
# and the writers start again once its session is open. The restored chain
# equals that copy byte for byte (qemu-img compare too), every layer passes
# qemu-img check, and the run reports blocks preserved for it by
# copy-before-write (the writes really raced the copy). The delay filter
# below cbt makes the copy's reads slow enough to overlap the writers.
source "$(dirname "$0")/lib.sh"
[ -x "$CBT" ] || fail "cbt not built: $CBT"
need fio qemu-img jq
fio --enghelp=nbd >/dev/null 2>&1 || skip "fio has no nbd engine (fio --enghelp=nbd)"

URI="nbd+unix:///?socket=$T/sock"
CTL="$T/ctl.sock"
DIR="$T/chain"

# fio_args SEED RUNTIME : 2 writing connections and 1 trimming one, at most
# 300 requests per second each. --thread: one process to stop.
fio_args() {
  echo --thread --ioengine=nbd "--uri=$URI" --iodepth=4 --time_based "--runtime=$2" \
    --rate_iops=300 --refill_buffers=1 "--randseed=$1" --name=w --rw=randwrite \
    --bsrange=4k-128k --numjobs=2 --name=t --rw=randtrim --bs=64k --numjobs=1
}
fio_ok() { grep -q 'err= 0' "$1" && ! grep -E 'err= *[1-9]' "$1"; }

truncate -s 64M "$T/disk.raw"
start_nbdkit "$T/sock" --filter="$FILTER" --filter=delay file "$T/disk.raw" rdelay=300ms \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$CTL"
# Data to back up: fio fills most of the disk (bounded run, then no writer).
# shellcheck disable=SC2046
timeout 120 fio --thread --ioengine=nbd "--uri=$URI" --name=fill --rw=write --bs=1M \
  --size=48M --refill_buffers=1 --output="$T/fill.out" >/dev/null 2>&1 || fail "fio fill"

for round in 1 2; do
  if [ "$round" = 2 ]; then
    # Scattered changes for the incremental: many reads, each slowed by the
    # delay filter, so the run lasts while the writers start (bounded run).
    timeout 60 fio --thread --ioengine=nbd "--uri=$URI" --name=scatter --rw=randwrite --bs=64k \
      --number_ios=200 --randseed=7 --refill_buffers=1 --output="$T/scatter.out" >/dev/null 2>&1 ||
      fail "fio scatter: $(cat "$T/scatter.out")"
  fi
  cp --sparse=always "$T/disk.raw" "$T/snap.raw"  # no writer connected
  "$CBT" backup --socket "$CTL" --dir "$DIR" --jobs 2 --output=json >"$T/out" 2>"$T/err" &
  BK=$!
  PIDS+=("$BK")
  # The run records its open session in the state file (cheap to poll).
  session_open() {
    [ -f "$DIR/cbt-backup.json" ] && jq -e '.session > 0' "$DIR/cbt-backup.json" >/dev/null 2>&1 && return 0
    kill -0 "$BK" 2>/dev/null || fail "round $round: the run ended before the writers could start: $(cat "$T/err")"
    return 1
  }
  wait_for 60 session_open || fail "round $round: the run never opened its session: $(cat "$T/err")"
  # shellcheck disable=SC2046
  fio $(fio_args "$round" 60) --output="$T/fio.out" >/dev/null 2>&1 &
  FIO=$!
  PIDS+=("$FIO")
  rc=0
  wait "$BK" || rc=$?
  kill -INT "$FIO" 2>/dev/null || true
  frc=0
  wait "$FIO" || frc=$?
  [ "$rc" = 0 ] || fail "round $round: cbt backup exited $rc: $(cat "$T/err")"
  [ "$frc" = 0 ] || [ "$frc" = 128 ] || fail "round $round: fio exited $frc: $(cat "$T/fio.out")"
  fio_ok "$T/fio.out" || fail "round $round: fio reported errors: $(cat "$T/fio.out")"
  want=$([ "$round" = 1 ] && echo full || echo incremental)
  [ "$(jq -r .type "$T/out")" = "$want" ] || fail "round $round: $(cat "$T/out")"
  [ "$(jq '."preserved-blocks"' "$T/out")" -gt 0 ] ||
    fail "round $round: no write raced the copy (nothing preserved): $(cat "$T/out")"
  layer=$(jq -r .file "$T/out")
  qemu-img check -q "$layer" || fail "round $round: qemu-img check $layer"
  rm -f "$T/restored.raw"
  timeout 120 "$CBT" restore "$DIR" --to "$T/restored.raw" >/dev/null || fail "round $round: restore"
  cmp "$T/restored.raw" "$T/snap.raw" || fail "round $round: the chain is not the disk at its checkpoint"
  qemu-img compare -q -f qcow2 -F raw "$layer" "$T/snap.raw" || fail "round $round: qemu-img compare"
  echo "round $round: $(jq -c '{type, "bytes-read", "preserved-blocks"}' "$T/out")"
done
stop_nbdkit "$NBDKIT_PID"
echo "PASS"
