#!/usr/bin/env python3
"""Compare extent lists ([{"start","length","dirty"}...]) as granule sets.

usage: extents.py subset A.json B.json GRANULARITY   every dirty granule of A is dirty in B
       extents.py count A.json GRANULARITY          number of dirty granules
"""
import json
import sys


def granules(path, g):
    out = set()
    for e in json.load(open(path)):
        if e["dirty"]:
            first = e["start"] // g
            last = (e["start"] + e["length"] - 1) // g
            out.update(range(first, last + 1))
    return out


def main():
    cmd = sys.argv[1]
    if cmd == "subset":
        g = int(sys.argv[4])
        a, b = granules(sys.argv[2], g), granules(sys.argv[3], g)
        missing = sorted(a - b)
        if missing:
            print(f"{len(missing)} granules missing, first: {missing[:10]}")
            return 1
        print(f"subset ok: {len(a)} of {len(b)}")
        return 0
    if cmd == "count":
        print(len(granules(sys.argv[2], int(sys.argv[3]))))
        return 0
    print(__doc__)
    return 2


sys.exit(main())
