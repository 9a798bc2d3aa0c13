#!/usr/bin/env bash
# Writes a seed corpus of small qcow2 files for qcow2_fuzz into OUTDIR.
#   fuzz/make_corpus.sh OUTDIR
# Needs qemu-img and qemu-io (exit 77 if missing). Adds files written by the
# cbt tool when build/default/server/cbt exists (or $CBT points at one).
# Files stay small: small virtual sizes, 512 B/4 KiB clusters mostly.
set -euo pipefail
out=${1:?usage: make_corpus.sh OUTDIR}
src=$(cd "$(dirname "$0")/.." && pwd)
for tool in qemu-img qemu-io; do
  command -v "$tool" >/dev/null || { echo "make_corpus.sh: SKIP: $tool not found" >&2; exit 77; }
done
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

q() { qemu-img "$@" >/dev/null; }
# 'abort' kills qemu-io: run it under sh so the shell's "Aborted" stays quiet.
io() { sh -c 'qemu-io "$@"; exit 0' qemu-io "$@" >/dev/null 2>&1; }
new() {  # new NAME CLUSTER SIZE [extra -o options]
  local name=$1 cs=$2 size=$3
  shift 3
  q create -f qcow2 -o "cluster_size=$cs${1:+,$1}" "$name" "$size"
}

# Cluster sizes 512 / 4096 / 65536, 0, 1 and 3 bitmaps, some dirty data.
new c512-0.qcow2 512 1M
new c4k-0.qcow2 4096 4M
new c64k-0.qcow2 65536 8M
new c512-1.qcow2 512 1M
q bitmap --add -g 512 c512-1.qcow2 b0
io -f qcow2 -c 'write -P 0xaa 0 4k' -c 'write -P 0x55 600k 1k' c512-1.qcow2
new c4k-1.qcow2 4096 4M
q bitmap --add -g 4096 c4k-1.qcow2 b0
io -f qcow2 -c 'write 0 64k' -c 'write 3M 4k' c4k-1.qcow2
new c64k-3.qcow2 65536 1M
q bitmap --add c64k-3.qcow2 b0
q bitmap --add -g 512 c64k-3.qcow2 b1
q bitmap --add -g 1M c64k-3.qcow2 b2
new c64k-1.qcow2 65536 1M
q bitmap --add -g 4096 c64k-1.qcow2 b0
io -f qcow2 -c 'write 0 4k' c64k-1.qcow2
new c4k-3.qcow2 4096 2M
for b in a bb ccc; do q bitmap --add -g 4096 c4k-3.qcow2 "$b"; done
io -f qcow2 -c 'write 0 8k' c4k-3.qcow2

# A disabled bitmap (with data recorded before it was disabled).
new c4k-disabled.qcow2 4096 2M
q bitmap --add -g 4096 c4k-disabled.qcow2 on
q bitmap --add -g 4096 c4k-disabled.qcow2 frozen
io -f qcow2 -c 'write 0 16k' c4k-disabled.qcow2
q bitmap --disable c4k-disabled.qcow2 frozen
io -f qcow2 -c 'write 1M 16k' c4k-disabled.qcow2

# An in-use (inconsistent) bitmap: qemu-io dies without storing bitmaps.
new c512-inuse.qcow2 512 1M
q bitmap --add -g 512 c512-inuse.qcow2 b0
io -f qcow2 -c 'write 0 4k' c512-inuse.qcow2
io -f qcow2 -c 'write 8k 4k' -c abort c512-inuse.qcow2

# External data file (raw) container with a bitmap.
truncate -s 1M data.raw
new c4k-datafile.qcow2 4096 1M "data_file=$work/data.raw,data_file_raw=on"
q bitmap --add -g 4096 c4k-datafile.qcow2 b0
io -f qcow2 -c 'write 0 4k' c4k-datafile.qcow2

# Backing file (the overlay is the seed; the name is just bytes to us).
new base.qcow2 4096 1M
q create -f qcow2 -o cluster_size=4096 -b "$work/base.qcow2" -F qcow2 c4k-backing.qcow2
q bitmap --add -g 4096 c4k-backing.qcow2 b0
io -f qcow2 -c 'write 0 4k' c4k-backing.qcow2

# Snapshot (+ a bitmap, data before and after it).
new c4k-snap.qcow2 4096 1M
q bitmap --add -g 4096 c4k-snap.qcow2 b0
io -f qcow2 -c 'write 0 8k' c4k-snap.qcow2
q snapshot -c s1 c4k-snap.qcow2
io -f qcow2 -c 'write 0 4k' c4k-snap.qcow2

# Refcount widths, compressed clusters, extended L2, v2 (compat=0.10).
new c512-rc1.qcow2 512 1M refcount_bits=1
q bitmap --add -g 512 c512-rc1.qcow2 b0
io -f qcow2 -c 'write 0 2k' c512-rc1.qcow2
new c4k-rc64.qcow2 4096 1M refcount_bits=64
io -f qcow2 -c 'write 0 4k' c4k-rc64.qcow2
new c4k-compressed.qcow2 4096 1M
io -f qcow2 -c 'write -c 0 4k' -c 'write -c 8k 4k' c4k-compressed.qcow2
new c16k-extl2.qcow2 16384 1M extended_l2=on
io -f qcow2 -c 'write 0 2k' c16k-extl2.qcow2
new c4k-v2.qcow2 4096 1M compat=0.10
new c4k-lazy.qcow2 4096 1M lazy_refcounts=on

# Written by the cbt tool, when built.
cbt=${CBT:-$src/build/default/server/cbt}
if [ -x "$cbt" ]; then
  "$cbt" create cbt-c512.qcow2 --size 1M --cluster-size 512 >/dev/null
  "$cbt" bitmap cbt-c512.qcow2 b0 --add -g 512 >/dev/null
  "$cbt" bitmap cbt-c512.qcow2 b1 --add -g 4096 --disabled >/dev/null
  "$cbt" create cbt-c4k.qcow2 --size 4M --cluster-size 4096 >/dev/null
  "$cbt" bitmap cbt-c4k.qcow2 b0 --add -g 4096 >/dev/null
  "$cbt" create cbt-datafile.qcow2 --size 1M --cluster-size 4096 \
    --data-file "$work/data.raw" >/dev/null
  "$cbt" bitmap cbt-datafile.qcow2 b0 --add -g 4096 >/dev/null
  # qemu-io records writes into the cbt-created bitmap, then cbt merges.
  io -f qcow2 -c 'write 0 8k' cbt-c4k.qcow2
  "$cbt" bitmap cbt-c4k.qcow2 m --add -g 4096 --merge b0 >/dev/null
else
  echo "make_corpus.sh: note: $cbt not built; no cbt-written seeds" >&2
fi

rm -f data.raw
for f in *.qcow2; do
  cp "$f" "$out/$f"
done
n=$(ls "$out" | wc -l)
bytes=$(du -cb "$out"/* | tail -1 | cut -f1)
echo "make_corpus.sh: $n seeds, $bytes bytes in $out"
