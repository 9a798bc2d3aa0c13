#!/usr/bin/env bash
# Writes a seed corpus of small qcow2 images for qcow2_volume_fuzz (the
# qcow2::Volume data path) into OUTDIR; fuzz/run.sh adds make_corpus.sh's
# seeds to these.
#   fuzz/volume_seeds.sh OUTDIR
# Needs qemu-img and qemu-io (exit 77 if missing). Covers v2 and v3,
# 512 B / 64 KiB / 2 MiB clusters, refcount_bits 1/16/64, zlib and zstd
# compressed clusters (qemu-img convert -c), zero clusters (write -z),
# preallocation=metadata, a few data writes. Trailing zero bytes are cut off
# (rounded up to 512 B): Volume reads a partial last cluster zero padded, as
# QEMU does, so the 2 MiB cluster images stay a few MiB.
set -euo pipefail
out=${1:?usage: volume_seeds.sh OUTDIR}
for tool in qemu-img qemu-io python3; do
  command -v "$tool" >/dev/null || { echo "volume_seeds.sh: SKIP: $tool not found" >&2; exit 77; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

q() { qemu-img "$@" >/dev/null; }
io() { qemu-io -f qcow2 "$@" >/dev/null; }
new() {  # new NAME OPTIONS SIZE
  q create -f qcow2 -o "$2" "$1" "$3"
}
writes() {  # a few data writes of different patterns and sizes
  local f=$1 cs=$2
  io -c "write -P 0x11 0 $cs" -c "write -P 0x22 $((cs * 3 + 512)) 1k" \
    -c "write -P 0x33 $((cs * 7)) $((cs * 2))" "$f"
}

new v3-c512.qcow2 cluster_size=512 1M
writes v3-c512.qcow2 512
new v3-c64k.qcow2 cluster_size=65536 4M
writes v3-c64k.qcow2 65536
new v3-c2m.qcow2 cluster_size=2M 32M
io -c 'write -P 0x44 0 4k' v3-c2m.qcow2
new v2-c512.qcow2 cluster_size=512,compat=0.10 1M
writes v2-c512.qcow2 512
new v2-c64k.qcow2 cluster_size=65536,compat=0.10 2M
io -c 'write -P 0x66 64k 64k' v2-c64k.qcow2

for rb in 1 16 64; do
  new "rc$rb-c512.qcow2" "cluster_size=512,refcount_bits=$rb" 512k
  writes "rc$rb-c512.qcow2" 512
done
new rc1-c64k.qcow2 cluster_size=65536,refcount_bits=1 1M
io -c 'write -P 0x77 0 128k' rc1-c64k.qcow2

# Compressed: convert -c from a raw file with compressible and random data.
python3 - <<'PY'
import os
with open("src.raw", "wb") as f:
    f.write(b"compressible " * 5000)
    f.write(os.urandom(8192))
    f.write(bytes(65536))
    f.write(b"\xab" * 70000)
    f.truncate(1 << 20)
PY
q convert -c -O qcow2 -o cluster_size=65536 src.raw comp-zlib-c64k.qcow2
q convert -c -O qcow2 -o cluster_size=4096,compression_type=zstd src.raw comp-zstd-c4k.qcow2
q convert -c -O qcow2 -o cluster_size=512 src.raw comp-zlib-c512.qcow2
q convert -c -O qcow2 -o cluster_size=65536,compat=0.10 src.raw comp-zlib-v2.qcow2
# A compressed image partly overwritten (COW of compressed clusters).
cp comp-zstd-c4k.qcow2 comp-zstd-written.qcow2
io -c 'write -P 0x88 2k 4k' comp-zstd-written.qcow2

# Zero clusters: plain (unallocated) and allocated (over data).
new zero-c4k.qcow2 cluster_size=4096 1M
io -c 'write -P 0x99 0 64k' -c 'write -z 0 8k' -c 'write -z 128k 16k' \
  -c 'write -z -u 32k 8k' zero-c4k.qcow2
new zero-c64k.qcow2 cluster_size=65536 2M
io -c 'write -P 0x12 0 256k' -c 'write -z 64k 64k' -c 'discard 128k 64k' zero-c64k.qcow2

# Preallocation=metadata (every cluster allocated, reads zero).
new prealloc-c64k.qcow2 cluster_size=65536,preallocation=metadata 1M
io -c 'write -P 0x34 64k 4k' prealloc-c64k.qcow2
new prealloc-c512.qcow2 cluster_size=512,preallocation=metadata 64k
new prealloc-c2m.qcow2 cluster_size=2M,preallocation=metadata 4M

# A backing file (the name is just bytes; the fuzzer offers an in-memory raw
# disk or refuses it).
new base.qcow2 cluster_size=4096 1M
q create -f qcow2 -o cluster_size=4096 -b base.qcow2 -F raw overlay-raw.qcow2 1M
io -c 'write -P 0x56 4k 4k' overlay-raw.qcow2
q create -f qcow2 -o cluster_size=4096,compat=0.10 -b base.qcow2 -F raw overlay-v2.qcow2 1M

# Cut trailing zeros (rounded up to 512 bytes).
python3 - *.qcow2 <<'PY'
import sys
for name in sys.argv[1:]:
    with open(name, "rb") as f:
        data = f.read()
    end = len(data.rstrip(b"\0"))
    end = (end + 511) // 512 * 512
    with open(name, "wb") as f:
        f.write(data[:end])
PY
rm -f base.qcow2
for f in *.qcow2; do cp "$f" "$out/vol-$f"; done
n=$(ls "$out" | wc -l)
bytes=$(du -cb "$out"/* | tail -1 | cut -f1)
echo "volume_seeds.sh: $n seeds, $bytes bytes in $out"
