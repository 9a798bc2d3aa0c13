#!/usr/bin/env bash
# Walk-through: export a raw disk through nbdkit with change tracking.
#   examples/export-with-tracking.sh [BUILD_DIR]
# Makes a 1 GiB disk, serves it with the cbt filter (the container disk.cbt
# and bitmap b0 are created on first use), writes to it with qemu-io over
# NBD, stops the server cleanly, and shows what was recorded, with cbt and
# with QEMU's own tools.
set -euo pipefail
build=$(realpath "${1:-build/default}")
filter="$build/plugin/nbdkit-cbt-filter.so"
cbt="$build/server/cbt"
work=$(mktemp -d /tmp/cbt-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "a 1 GiB raw disk"
truncate -s 1G disk.raw
ls -l disk.raw

say "serve it with tracking, and write through NBD"
# nbdkit --run starts the server, runs the command with $uri set, then stops
# the server cleanly (SIGTERM): the bitmap is persisted and in-use cleared.
cat <<'CMD'
nbdkit -U - --filter=cbt file disk.raw cbt-file=disk.cbt cbt-bitmap=b0 cbt-create=true \
  --run 'qemu-io -f raw -t writeback -c "write -P 0xaa 0 4k" ... "$uri"'
CMD
nbdkit -U - --filter="$filter" file disk.raw \
  cbt-file="$work/disk.cbt" cbt-bitmap=b0 cbt-create=true \
  --run 'qemu-io -f raw -t writeback \
           -c "write -P 0xaa 0 4k" \
           -c "write -P 0xbb 1M 64k" \
           -c "write -P 0xcc 300M 2M" \
           -c "write -z 700M 1M" \
           -c "discard 1000M 4k" \
           -c flush "$uri"' | grep -v '^[0-9.]* [KMG]iB,'

say "what cbt recorded (cbt info, cbt map)"
"$cbt" info disk.cbt
"$cbt" map disk.cbt --bitmap b0

say "the same bitmap as QEMU reads it (qemu-nbd -B, nbdinfo)"
nbdinfo --map=qemu:dirty-bitmap:b0 -- [ qemu-nbd -r -f qcow2 -B b0 disk.cbt ] | grep -w dirty

say "qemu-img check and info accept the container"
qemu-img check disk.cbt
qemu-img info disk.cbt | sed -n '/bitmaps:/,/refcount bits/p' | head -8
ls -l disk.cbt
