#!/usr/bin/env python3
"""Crash torture for the cbt filter.

Each iteration:
  1. a fresh sparse disk and container; nbdkit + cbt in the given
     durability mode, sometimes with cbt-persist-interval=1;
  2. nbd_load: random writes, zeroes and trims (mixed sizes, unaligned,
     QD 8, two connections, occasional flushes), logging each request before
     it is sent and when it is acknowledged;
  3. kill -9 of nbdkit at a random instant (optionally followed by a
     simulated power cut, see --power-cut);
  4. restart, one client (the filter recovers when it attaches) and clean stop;
  5. verify:
     - zero missed granules: every granule of every acknowledged change, and
       every granule whose content differs from before the run, is dirty;
     - qemu-img check on the container: no errors; leaks only if
       `cbt check --repair` brings them to zero;
     - precision: dirty granules / granules truly changed (printed).
Exit status 0 when every iteration passed.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

G = 65536


def wait_for(pred, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timeout waiting for {what}")


class Server:
    def __init__(self, args, sock, log, env):
        if os.path.exists(sock):
            os.unlink(sock)
        self.sock = sock
        self.p = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", sock] + args,
                                  stderr=log, env=env)
        try:
            wait_for(lambda: os.path.exists(sock) or self.p.poll() is not None, 30, "nbdkit")
        except RuntimeError:
            self.p.kill()
            raise
        if self.p.poll() is not None:
            raise RuntimeError(f"nbdkit exited at start with {self.p.returncode}")

    def kill9(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(30)

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise RuntimeError("nbdkit did not stop on SIGTERM")


def granules_of(off, length):
    return range(off // G, (off + length - 1) // G + 1)


def parse_log(path):
    """Returns (acked, sent) granule sets of successful / all changes."""
    sent, acked = {}, set()
    ack_ok = set()
    if not os.path.exists(path):  # killed before the client connected: no requests
        return acked, set()
    with open(path) as f:
        for line in f:
            p = line.split()
            if len(p) >= 6 and p[0] == "S" and p[3] in "WZT":
                sent[(p[1], p[2])] = (int(p[4]), int(p[5]))
            elif len(p) >= 4 and p[0] == "A" and p[3] == "0":
                ack_ok.add((p[1], p[2]))
    all_sent = set()
    for key, (off, ln) in sent.items():
        gs = granules_of(off, ln)
        all_sent.update(gs)
        if key in ack_ok:
            acked.update(gs)
    return acked, all_sent


def changed_granules(disk_path):
    """Granules that are no longer all zeros (the disk started sparse)."""
    changed = set()
    zero = bytes(G)
    with open(disk_path, "rb") as f:
        g = 0
        while True:
            b = f.read(G)
            if not b:
                break
            if b != zero[:len(b)]:
                changed.add(g)
            g += 1
    return changed


def dirty_granules(cbt, container):
    out = subprocess.run([cbt, "map", container, "--bitmap", "b0", "--output=json"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"cbt map failed: {out.stderr.strip()}")
    dirty = set()
    for e in json.loads(out.stdout):
        if e["dirty"]:
            dirty.update(granules_of(e["start"], e["length"]))
    return dirty


def check_container(cbt, container):
    r = subprocess.run(["qemu-img", "check", container], capture_output=True, text=True,
                       timeout=60)
    if r.returncode == 0:
        return "clean"
    if r.returncode == 3:
        rep = subprocess.run([cbt, "check", container, "--repair"], capture_output=True,
                             text=True, timeout=60)
        r2 = subprocess.run(["qemu-img", "check", container], capture_output=True,
                            text=True, timeout=60)
        if r2.returncode == 0:
            return "leaks repaired"
        raise RuntimeError(f"leaks not repaired: {rep.stdout}{rep.stderr}{r2.stdout}")
    raise RuntimeError(f"qemu-img check exit {r.returncode}: {r.stdout}{r.stderr}")


def iteration(a, i, rng, work):
    d = os.path.join(work, f"it{i}")
    os.makedirs(d)
    disk, cont = os.path.join(d, "disk.raw"), os.path.join(d, "disk.cbt")
    sock, log = os.path.join(d, "sock"), os.path.join(d, "load.log")
    # A sparse disk (zeros before the run); the load stays in a random window
    # so that most granules stay clean and a miss would show.
    size = a.disk_mib << 20
    with open(disk, "wb") as f:
        f.truncate(size)
    window = min(size, 96 << 20)
    woff = rng.randrange(0, size - window + 1, 4096)
    env = dict(os.environ)
    if a.power_cut:
        env["CBT_TEST_VOLATILE_JOURNAL"] = cont + ".journal"
    # Power cuts: the test build of the filter, its containers behind a
    # volatile cache (tests/tools/volatile_storage.cc).
    args = [f"--filter={a.powercut_filter if a.power_cut else a.filter}"]
    if a.power_cut:
        args += [f"--filter={a.volatile}", "file", disk, f"volatile-journal={disk}.journal"]
    else:
        args += ["file", disk]
    args += [f"cbt-file={cont}", "cbt-bitmap=b0", "cbt-create=true",
             f"cbt-durability={a.mode}"]
    if rng.random() < 0.3:
        args.append("cbt-persist-interval=1")
    nlog = open(os.path.join(d, "nbdkit.log"), "w")
    srv = Server(args, sock, nlog, env)
    flush_every = rng.choice([0, 20, 100, 500])
    load = subprocess.Popen([a.nbd_load, "--socket", sock, "--seed", str(rng.randrange(1 << 30)),
                             "--ops", "1000000", "--qd", "8", "--connections", "2",
                             "--region", f"{woff}:{window}",
                             "--flush-every", str(flush_every), "--max-len", "262144",
                             "--log", log, "--allow-errors", "--no-final-flush"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.02, a.max_delay))
    srv.kill9()
    load.wait(60)
    if a.power_cut:
        seed = str(rng.randrange(1 << 30))
        for j in (cont + ".journal", disk + ".journal"):
            subprocess.run([a.powercut, j, seed], check=True, timeout=60)
    # Restart: the filter recovers when the first client connects; then a
    # clean stop persists.
    if a.power_cut:
        args = [x for x in args if not x.startswith("--filter=" + a.volatile)
                and not x.startswith("volatile-journal=")]
        args[0] = f"--filter={a.filter}"  # the filter users run recovers
        env.pop("CBT_TEST_VOLATILE_JOURNAL", None)
    srv = Server(args, sock, nlog, env)
    # The filter attaches (and recovers) when the first client connects.
    subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"], check=True,
                   timeout=60, stdout=subprocess.DEVNULL)
    rc = srv.stop()
    nlog.close()
    acked, sent = parse_log(log)
    changed = changed_granules(disk)
    dirty = dirty_granules(a.cbt, cont)
    missed_ack = sorted(acked - dirty)
    missed_chg = sorted(changed - dirty)
    state = check_container(a.cbt, cont)
    truth = acked | changed
    prec = len(dirty) / len(truth) if truth else 1.0
    ok = not missed_ack and not missed_chg and rc == 0
    print(f"[{a.mode}{'+powercut' if a.power_cut else ''}] iter {i}: acked {len(acked)} "
          f"changed {len(changed)} dirty {len(dirty)} precision {prec:.2f} container {state}"
          + ("" if ok else f" MISSED acked={missed_ack[:8]} changed={missed_chg[:8]} rc={rc}"),
          flush=True)
    if not ok:
        raise RuntimeError(f"iteration {i} failed; kept in {d}")
    shutil.rmtree(d)
    return len(dirty), len(truth)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--mode", choices=["process", "power"], required=True)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--disk-mib", type=int, default=512)
    ap.add_argument("--max-delay", type=float, default=0.4)
    ap.add_argument("--power-cut", action="store_true",
                    help="simulate power loss: drop/keep/reorder/tear unflushed writes")
    a = ap.parse_args()
    if os.environ.get("CBT_SOAK") == "1":
        a.iterations = max(a.iterations, 1000)
    b = os.path.abspath(a.build)
    a.filter = os.path.join(b, "plugin", "nbdkit-cbt-filter.so")
    a.cbt = os.path.join(b, "server", "cbt")
    a.nbd_load = os.path.join(b, "tests", "nbd_load")
    a.volatile = os.path.join(b, "tests", "nbdkit-volatile-filter.so")
    a.powercut_filter = os.path.join(b, "tests", "nbdkit-cbt-powercut-filter.so")
    a.powercut = os.path.join(b, "tests", "powercut_replay")
    for tool in ("nbdkit", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"SKIP: {tool} is not installed")
            return 77
    print(f"torture: mode {a.mode}, {a.iterations} kill points, seed {a.seed}"
          f"{', simulated power cuts' if a.power_cut else ''}", flush=True)
    rng = random.Random(a.seed)
    work = tempfile.mkdtemp(prefix="cbt-crash.")
    tot_dirty = tot_truth = 0
    try:
        for i in range(a.iterations):
            dd, tt = iteration(a, i, rng, work)
            tot_dirty += dd
            tot_truth += tt
    except Exception as e:  # noqa: BLE001 - report and fail
        print(f"FAIL: {e}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print(f"OK: {a.iterations} kill points, 0 missed granules; precision "
          f"{tot_dirty}/{tot_truth} = {tot_dirty / max(1, tot_truth):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
