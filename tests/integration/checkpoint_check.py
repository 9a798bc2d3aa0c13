#!/usr/bin/env python3
"""Judge a checkpoint under load (tests/tools/checkpoint_load.cc's log)
against the two bitmaps read offline after the run.

usage: checkpoint_check.py --log LOG --frozen B0.json --new B1.json
                           [--granularity 65536] [--mode clean|kill]
                           [--min-before 100] [--min-after 100] [--min-concurrent 1]

B0.json/B1.json: `cbt map ... --output=json` of the frozen and the new bitmap.
Each write of the log touches exactly one granule (the log says which, by its
offset). With C = the checkpoint's send time and R = its reply time:
  before      acknowledged before C            must be in b0
  after       sent after R                     must be in b1 (if acknowledged)
  concurrent  the rest (in flight across C..R) must be in b0 or b1
  every acknowledged write                     must be in b0 or b1
and b0 is exact: it holds no write sent after R (it is frozen) and no granule
that no write touched. The checkpoint persists b0 before it replies, so this
holds after a crash too.
--mode clean (a clean stop after the run): b1 is exact as well: it holds no
write acknowledged before C (it started empty) and no untouched granule.
--mode kill (the server was SIGKILLed after the reply and restarted):
recovery may have made b1 a superset, so b1 is only checked to hold what it
must. Writes that never completed (in flight at the kill) need be nowhere.
Prints the count of each category; exits 1 on a violation or when a category
has fewer writes than its minimum.
"""
import argparse
import json
import sys


def granules(path, g):
    out = set()
    for e in json.load(open(path)):
        if e["dirty"]:
            out.update(range(e["start"] // g, (e["start"] + e["length"] - 1) // g + 1))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True)
    ap.add_argument("--frozen", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--granularity", type=int, default=65536)
    ap.add_argument("--mode", choices=["clean", "kill"], default="clean")
    ap.add_argument("--min-before", type=int, default=100)
    ap.add_argument("--min-after", type=int, default=100)
    ap.add_argument("--min-concurrent", type=int, default=1)
    a = ap.parse_args()
    g = a.granularity

    ckpt = None
    kill_ns = None
    writes = []  # (seq, granule, send, ack, status)
    for line in open(a.log):
        f = line.split(" ", 3)
        if f[0] == "C":
            ckpt = (int(f[1]), int(f[2]), f[3].strip())
        elif f[0] == "K":
            kill_ns = int(f[1])
        elif f[0] == "W":
            w = line.split()
            seq, off, length = int(w[1]), int(w[3]), int(w[4])
            first, last = off // g, (off + length - 1) // g
            if first != last:
                sys.exit(f"FAIL: write {seq} spans granules {first}..{last}")
            writes.append((seq, first, int(w[5]), int(w[6]), int(w[7])))
    if ckpt is None:
        sys.exit("FAIL: the log has no checkpoint")
    c_send, c_reply, reply = ckpt
    r = json.loads(reply)
    if not (isinstance(r, dict) and r.get("id") == 1 and isinstance(r.get("return"), dict)
            and "error" not in r):
        sys.exit(f"FAIL: the checkpoint did not succeed: {reply}")
    if len({w[1] for w in writes}) != len(writes):
        sys.exit("FAIL: two writes share a granule")
    if a.mode == "kill" and kill_ns is None:
        sys.exit("FAIL: --mode kill, but the log has no kill")

    b0, b1 = granules(a.frozen, g), granules(a.new, g)
    cats = {"before": [], "concurrent": [], "after": []}
    unacked = 0
    for seq, gr, send, ack, status in writes:
        if status != 0:
            unacked += 1
            if a.mode == "clean":
                sys.exit(f"FAIL: write {seq} failed (status {status}) in a clean run")
            continue
        if ack < c_send:
            cats["before"].append((seq, gr))
        elif send > c_reply:
            cats["after"].append((seq, gr))
        else:
            cats["concurrent"].append((seq, gr))

    errors = []

    def need(cond_list, what):
        if cond_list:
            errors.append(f"{len(cond_list)} {what}, first (seq, granule): {cond_list[:5]}")

    acked = [w for c in cats.values() for w in c]
    need([w for w in acked if w[1] not in b0 and w[1] not in b1],
         "acknowledged writes in neither bitmap")
    need([w for w in cats["after"] if w[1] not in b1],
         "writes sent after the checkpoint reply missing from the new bitmap")
    need([w for w in cats["before"] if w[1] not in b0],
         "writes acknowledged before the checkpoint request missing from the frozen bitmap")
    need([w for w in cats["after"] if w[1] in b0],
         "writes sent after the checkpoint reply recorded in the frozen bitmap")
    touched = {w[1] for w in writes}
    need(sorted(b0 - touched), "granules dirty in the frozen bitmap that no write touched")
    if a.mode == "clean":
        need([w for w in cats["before"] if w[1] in b1],
             "writes acknowledged before the checkpoint request recorded in the new bitmap")
        need(sorted(b1 - touched), "granules dirty in the new bitmap that no write touched")

    conc = cats["concurrent"]
    print(f"checkpoint round trip {(c_reply - c_send) / 1e6:.3f} ms; "
          f"writes: {len(cats['before'])} acknowledged before it, "
          f"{len(conc)} concurrent (in b0 only {sum(1 for w in conc if w[1] in b0 and w[1] not in b1)}, "
          f"b1 only {sum(1 for w in conc if w[1] in b1 and w[1] not in b0)}, "
          f"both {sum(1 for w in conc if w[1] in b0 and w[1] in b1)}), "
          f"{len(cats['after'])} sent after its reply, {unacked} never acknowledged; "
          f"b0 {len(b0)} granules, b1 {len(b1)}")
    if kill_ns is not None:
        print(f"server killed {(kill_ns - c_reply) / 1e6:.3f} ms after the checkpoint reply")
    for name, minimum in (("before", a.min_before), ("concurrent", a.min_concurrent),
                          ("after", a.min_after)):
        if len(cats[name]) < minimum:
            errors.append(f"only {len(cats[name])} '{name}' writes, want at least {minimum}")
    for e in errors:
        print(f"FAIL: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
