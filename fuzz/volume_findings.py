#!/usr/bin/env python3
"""Writes the qcow2_volume_fuzz findings' reproducers into OUTDIR.

  fuzz/volume_findings.py OUTDIR   (needs qemu-img)
  build/fuzz/fuzz/qcow2_volume_fuzz -timeout=10 OUTDIR/FILE

reftable-all-full.qcow2: 64 KiB clusters, 1 MiB disk; the refcount table
is 16 clusters (131072 entries) and every entry names the same refcount
block, whose 32768 16-bit refcounts are all 0xffff. Refcounts::Load
accepts it (entries are only checked for alignment), and the first write
that allocates (Volume::WritePiece -> GetL2/AllocateCluster ->
Refcounts::Allocate -> FindFreeRun) scans 131072 * 32768 = 4.3e9 "used"
refcounts, one Get() each, holding the Volume's mutex: a libFuzzer
timeout (> 10 s); in the plugin, every request stalls for minutes.
"""
import os
import struct
import subprocess
import sys
import tempfile

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    base = os.path.join(tmp, "base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
                    base, "1M"], check=True)
    d = bytearray(open(base, "rb").read())
cs = 65536
block = struct.unpack(">Q", d[48:56])[0] + cs  # qemu-img: the block follows the table
ntab, table = 16, 0x40000
d += bytes(max(0, table + ntab * cs - len(d)))
for i in range(ntab * cs // 8):
    struct.pack_into(">Q", d, table + i * 8, block)
d[block:block + cs] = b"\xff" * cs
struct.pack_into(">Q", d, 48, table)  # refcount_table_offset
struct.pack_into(">I", d, 56, ntab)   # refcount_table_clusters
with open(os.path.join(out, "reftable-all-full.qcow2"), "wb") as f:
    f.write(d)
