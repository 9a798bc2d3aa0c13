#!/usr/bin/env python3
"""Helpers of bench/checkpoint_bench.sh.

checkpoint_bench.py loop SOCKET SECONDS INTERVAL OUT.json [--prefix P] [--keep]
    Every INTERVAL seconds for SECONDS, over the control socket SOCKET:
    `checkpoint` freezing the recording bitmap and starting P<n>, then (unless
    --keep) half an interval later `bitmap-remove` of the frozen one, so the
    bitmap count stays at one. Writes [{"send","reply","rtt_ms","frozen",
    "new","remove_send","remove_reply","remove_ms"}...] (send/reply: unix
    epoch seconds, as fio's --log_unix_epoch) to OUT.json.
    Any error reply is fatal.

checkpoint_bench.py report DIR ROUNDS
    Reads DIR/{plain,ckpt}.r<N>.json (fio --output-format=json),
    DIR/{plain,ckpt}.r<N>_lat.1.log (fio --write_lat_log --log_unix_epoch=1)
    and DIR/ckpt.r<N>.ckpt.json (the loop's output); prints the summary.
"""
import bisect
import json
import math
import socket
import statistics
import sys
import time


class Control:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        self.s.connect(path)
        self.buf = b""
        self.n = 0

    def call(self, execute, **arguments):
        self.n += 1
        req = {"execute": execute, "id": self.n}
        if arguments:
            req["arguments"] = arguments
        self.s.sendall(json.dumps(req).encode() + b"\n")
        while b"\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                sys.exit(f"control socket closed during {execute}")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        r = json.loads(line)
        if "error" in r or r.get("id") != self.n:
            sys.exit(f"{execute} {arguments}: {line.decode()}")
        return r["return"]


def loop(sock, seconds, interval, out, prefix, keep):
    c = Control(sock)
    rec = [b["name"] for b in c.call("query-bitmaps")["bitmaps"] if b["recording"]]
    if len(rec) != 1:
        sys.exit(f"want exactly one recording bitmap, have {rec}")
    cur = rec[0]
    res = []
    start = time.monotonic()
    i = 0
    while True:
        due = start + (i + 1) * interval
        if due > start + seconds:
            break
        time.sleep(max(0.0, due - time.monotonic()))
        new = f"{prefix}{i}"
        t0, e0 = time.monotonic(), time.time()
        c.call("checkpoint", freeze=cur, new=new)
        t1, e1 = time.monotonic(), time.time()
        r = {"send": e0, "reply": e1, "rtt_ms": (t1 - t0) * 1e3, "frozen": cur, "new": new}
        if not keep:
            # Half an interval later, so that the writes a remove holds up
            # are not counted against the checkpoint.
            time.sleep(max(0.0, due + interval / 2 - time.monotonic()))
            t2, e2 = time.monotonic(), time.time()
            c.call("bitmap-remove", name=cur)
            t3, e3 = time.monotonic(), time.time()
            r.update({"remove_send": e2, "remove_reply": e3, "remove_ms": (t3 - t2) * 1e3})
        res.append(r)
        cur = new
        i += 1
    json.dump(res, open(out, "w"))


def lat_log(path):
    """[(completion epoch ms, latency ms)] from a fio latency log."""
    out = []
    for line in open(path):
        f = line.split(",")
        out.append((int(f[0]), int(f[1]) / 1e6))
    return out


def report(d, rounds):
    med = statistics.median
    iops = {"plain": [], "ckpt": []}
    maxlat = {"plain": [], "ckpt": []}
    p99 = {"plain": [], "ckpt": []}
    rtts, removes, stalls, outside, control, remove_stalls = [], [], [], [], [], []
    control_ck = []  # the noise floor of the checkpoint windows only
    worst = None
    for r in range(1, rounds + 1):
        for n in ("plain", "ckpt"):
            j = json.load(open(f"{d}/{n}.r{r}.json"))["jobs"][0]["write"]
            iops[n].append(j["iops"])
            maxlat[n].append(j["clat_ns"]["max"] / 1e6)
            p99[n].append(j["clat_ns"]["percentile"]["99.000000"] / 1e6)
        cks = json.load(open(f"{d}/ckpt.r{r}.ckpt.json"))
        lat = sorted(lat_log(f"{d}/ckpt.r{r}_lat.1.log"))
        times = [t for t, _ in lat]
        plat = sorted(lat_log(f"{d}/plain.r{r}_lat.1.log"))
        ptimes = [t for t, _ in plat]
        in_window = [False] * len(lat)
        shift = ptimes[0] - times[0]

        def window(send, reply):
            # A write a command holds up completes between the request and
            # shortly after the reply (fio logs whole milliseconds). Returns
            # the longest latency there, and in the same window at the same
            # time into the run without checkpoints (the noise floor).
            lo_t, hi_t = send * 1e3 - 1, reply * 1e3 + 10
            lo, hi = bisect.bisect_left(times, lo_t), bisect.bisect_right(times, hi_t)
            for k in range(lo, hi):
                in_window[k] = True
            plo = bisect.bisect_left(ptimes, lo_t + shift)
            phi = bisect.bisect_right(ptimes, hi_t + shift)
            return (max((lat[k][1] for k in range(lo, hi)), default=0.0),
                    max((plat[k][1] for k in range(plo, phi)), default=0.0))

        for ck in cks:
            rtts.append(ck["rtt_ms"])
            m, floor = window(ck["send"], ck["reply"])
            stalls.append(m)
            control.append(floor)
            control_ck.append(floor)
            if worst is None or m > worst[0]:
                worst = (m, r, ck["rtt_ms"])
            if "remove_ms" in ck:
                removes.append(ck["remove_ms"])
                m, floor = window(ck["remove_send"], ck["remove_reply"])
                remove_stalls.append(m)
                control.append(floor)
        outside.append(max((l for k, (_, l) in enumerate(lat) if not in_window[k]), default=0.0))
    ratio = med(iops["ckpt"]) / med(iops["plain"])
    print(f"| run | IOPS (median) | ratio | clat p99 ms (median) | clat max ms (median; worst) |")
    print("|---|---|---|---|---|")
    for n, label in (("plain", "no checkpoints"), ("ckpt", "checkpoint every 1 s")):
        print(f"| {label} | {med(iops[n]):.0f} | {med(iops[n]) / med(iops['plain']):.3f} | "
              f"{med(p99[n]):.2f} | {med(maxlat[n]):.2f}; {max(maxlat[n]):.2f} |")
    print()
    print(f"throughput ratio (checkpoint every 1 s / none): {ratio:.3f} (target >= 0.95): "
          f"{'met' if ratio >= 0.95 else 'NOT met'}")
    print(f"checkpoints: {len(rtts)}; round trip (client) median {med(rtts):.2f} ms, "
          f"max {max(rtts):.2f} ms" +
          (f"; bitmap-remove of the frozen one median {med(removes):.2f} ms, max {max(removes):.2f} ms"
           if removes else ""))
    print(f"longest write latency completing within a checkpoint's window "
          f"[request - 1 ms, reply + 10 ms]: {max(stalls):.2f} ms "
          f"(median over checkpoints {med(stalls):.2f} ms; round {worst[1]}, that checkpoint's "
          f"round trip {worst[2]:.2f} ms); compare the noise floor below: the stall a checkpoint "
          f"itself causes is the server's longest writer pause (last lines)")
    n = len(stalls)
    print(f"checkpoint windows with a write over 10 ms: {sum(1 for m in stalls if m > 10)} of {n}; "
          f"round trip p90 {sorted(rtts)[math.ceil(0.9 * n) - 1]:.2f} ms; "
          f"the same windows without checkpoints: "
          f"{sum(1 for m in control_ck if m > 10)} of {n} over 10 ms")
    if remove_stalls:
        print(f"longest write latency within a bitmap-remove's window: {max(remove_stalls):.2f} ms "
              f"(median {med(remove_stalls):.2f} ms)")
    print(f"noise floor: the same windows at the same times in the runs without checkpoints: "
          f"longest {max(control):.2f} ms, median {med(control):.2f} ms; longest write latency "
          f"outside the windows {max(outside):.2f} ms, in the runs without checkpoints "
          f"{max(maxlat['plain']):.2f} ms")
    print(f"per-round IOPS: none {[round(x) for x in iops['plain']]}, "
          f"checkpoints {[round(x) for x in iops['ckpt']]}")


def main():
    if len(sys.argv) >= 6 and sys.argv[1] == "loop":
        args = sys.argv[2:]
        prefix, keep = "c", False
        pos = []
        k = 0
        while k < len(args):
            if args[k] == "--prefix":
                prefix = args[k + 1]
                k += 2
            elif args[k] == "--keep":
                keep = True
                k += 1
            else:
                pos.append(args[k])
                k += 1
        sock, seconds, interval, out = pos
        loop(sock, float(seconds), float(interval), out, prefix, keep)
    elif len(sys.argv) == 4 and sys.argv[1] == "report":
        report(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
