#!/usr/bin/env bash
# Random writes, zeroes and trims (mixed sizes, unaligned, QD 8) through the
# cbt filter over the file plugin; after a clean stop the bitmap QEMU reads
# from the container equals the granules the client touched, the container
# passes qemu-img check and in_use is clear.
source "$(dirname "$0")/lib.sh"

truncate -s 256M "$T/disk.raw"
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true
"$NBD_LOAD" --socket "$T/sock" --seed 11 --ops 3000 --qd 8 --expected "$T/expected.json"
stop_nbdkit "$NBDKIT_PID"

qemu-img check "$T/disk.cbt" >/dev/null || fail "qemu-img check failed"
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["auto"]' ] || fail "flags: $(bitmap_flags "$T/disk.cbt" b0)"
got=$(qemu_map "$T/disk.cbt" b0)
want=$(normalize "$T/expected.json")
[ "$got" = "$want" ] || { echo "want $want" | head -c 600; echo; echo "got  $got" | head -c 600; fail "map differs"; }
echo "OK: $(echo "$want" | jq '[.[] | select(.dirty)] | length') dirty extents match"
