#!/usr/bin/env python3
"""Locates and damages qcow2 bitmap metadata, for test-cli-bad-files.sh.

  qcow2_poke.py FILE where       -> shell assignments: EXT (offset of the
                                    bitmaps extension data), DIR (directory
                                    offset), ENTRY0/ENTRY1 (entry offsets),
                                    NAME1 (offset of entry 1's name),
                                    TABLE0 (table offset of entry 0), CS
  qcow2_poke.py FILE put OFF SIZE VALUE   -> big-endian write of VALUE
  qcow2_poke.py FILE get OFF SIZE         -> big-endian read, printed
  qcow2_poke.py FILE refcount-entry OFF   -> offset of the refcount entry of
                                    the cluster at host offset OFF (refcount
                                    order 4), and REFTABLE=its table offset
Reads the layout by parsing, never by assuming QEMU's or our layout.
"""
import struct
import sys


def where(path):
    with open(path, "rb") as f:
        data = f.read()
    cbits = struct.unpack(">I", data[20:24])[0]
    cs = 1 << cbits
    hlen = struct.unpack(">I", data[100:104])[0]
    off = hlen
    ext = None
    while off + 8 <= cs:
        typ, ln = struct.unpack(">II", data[off:off + 8])
        if typ == 0:
            break
        if typ == 0x23852875:
            ext = off + 8
        off += 8 + (ln + 7) // 8 * 8
    if ext is None:
        sys.exit("no bitmaps extension")
    nb, _, dsize, doff = struct.unpack(">IIQQ", data[ext:ext + 24])
    print(f"CS={cs} EXT={ext} DIR={doff} NB={nb}")
    e = doff
    for i in range(nb):
        toff, tsize, flags, typ, gbits, nsize, extra = struct.unpack(
            ">QIIBBHI", data[e:e + 24])
        print(f"ENTRY{i}={e} NAME{i}={e + 24 + extra} TABLE{i}={toff} TSIZE{i}={tsize}")
        e += (24 + extra + nsize + 7) // 8 * 8


def put(path, off, size, value):
    fmt = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}[size]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


def get(path, off, size):
    fmt = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}[size]
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(size))[0]


def refcount_entry(path, off):
    with open(path, "rb") as f:
        data = f.read(112)
    cs = 1 << struct.unpack(">I", data[20:24])[0]
    reftable = struct.unpack(">Q", data[48:56])[0]
    if struct.unpack(">I", data[96:100])[0] != 4:
        sys.exit("refcount-entry: only refcount order 4")
    per_block = cs // 2
    cluster = off // cs
    block = get(path, reftable + 8 * (cluster // per_block), 8)
    if block == 0:
        sys.exit("refcount-entry: no refcount block")
    print(f"ENTRY={block + 2 * (cluster % per_block)} REFTABLE={reftable}")


if __name__ == "__main__":
    if sys.argv[2] == "where":
        where(sys.argv[1])
    elif sys.argv[2] == "put":
        put(sys.argv[1], int(sys.argv[3], 0), int(sys.argv[4]), int(sys.argv[5], 0))
    elif sys.argv[2] == "get":
        print(get(sys.argv[1], int(sys.argv[3], 0), int(sys.argv[4])))
    elif sys.argv[2] == "refcount-entry":
        refcount_entry(sys.argv[1], int(sys.argv[3], 0))
    else:
        sys.exit(__doc__)
