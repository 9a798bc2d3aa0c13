#!/usr/bin/env bash
# Two connections writing at once (QD 8 each) share one tracker: the union
# of both is recorded.
source "$(dirname "$0")/lib.sh"

truncate -s 128M "$T/disk.raw"
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true
"$NBD_LOAD" --socket "$T/sock" --seed 21 --ops 4000 --qd 8 --connections 2 \
  --expected "$T/expected.json"
stop_nbdkit "$NBDKIT_PID"
got=$(qemu_map "$T/disk.cbt" b0)
want=$(normalize "$T/expected.json")
[ "$got" = "$want" ] || fail "map differs from the union of both connections"
qemu-img check "$T/disk.cbt" >/dev/null || fail "qemu-img check failed"
echo "OK: union of 2 connections recorded"
