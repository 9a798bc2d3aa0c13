#!/usr/bin/env python3
"""Crash torture for the cbt filter.

Each iteration (its own random stream, from --seed and its number, so any
iteration can be rerun alone: the failure message prints the command):
  1. a fresh sparse disk and container; nbdkit + cbt in the given
     durability mode, sometimes with cbt-persist-interval=1;
  2. nbd_load: random writes, zeroes and trims (mixed sizes, unaligned,
     QD 8, two connections, occasional flushes), logging each request before
     it is sent and when it is acknowledged;
  3. kill -9 of nbdkit by nbd_load itself after N acknowledged requests (N
     drawn log-uniformly from 1..--max-acks; not a wall-clock instant),
     optionally followed by a simulated power cut (--power-cut);
  4. a restart that is itself killed during the filter's recovery (which
     runs when the first client connects and the filter attaches):
     crash_after_writes.so kills nbdkit before its Kth write or sync to the
     container (K drawn from 1..--max-recovery-step; a recovery with fewer
     steps completes and the server is killed idle);
  5. a restart that must recover again, and a clean stop;
  6. verify:
     - zero missed granules, judged twice: by `cbt map` and by QEMU
       (qemu-nbd -r -B b0 on a unix socket, nbdinfo --map=qemu:dirty-bitmap:b0),
       which must also agree with each other: every granule of every
       acknowledged change, and every granule whose content differs from
       before the run, is dirty;
     - qemu-img check on the container: no errors; leaks only if
       `cbt check --repair` brings them to zero;
     - precision: dirty granules / granules truly changed (printed).
Replay: the request streams, N and K are fixed by the seed; the interleaving
of the two connections and of nbdkit's threads is not.
Exit status 0 when every iteration passed; 77 (reason printed) when a tool
is missing.
"""
import argparse
import json
import math
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


def served(sock):
    """True once nbdkit answers a handshake (the filter has attached)."""
    if not os.path.exists(sock):
        return False
    r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


class Server:
    """nbdkit on a unix socket, killed by pid, never left running."""

    def __init__(self, args, sock, log, env, may_die=False):
        if os.path.exists(sock):
            os.unlink(sock)
        self.sock = sock
        self.p = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", sock] + args,
                                  stderr=log, env=env)
        try:
            # Served, not just bound: the first client's connection makes the
            # filter attach, and recover after a crash.
            wait_for(lambda: self.p.poll() is not None or served(sock), 60, "nbdkit")
        except RuntimeError:
            self.p.kill()
            self.p.wait()
            raise
        if self.p.poll() is not None and not may_die:
            raise RuntimeError(f"nbdkit exited at start with {self.p.returncode}")

    def alive(self):
        return self.p.poll() is None

    def wait_killed(self):
        """The server was sent SIGKILL by someone else (nbd_load)."""
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise RuntimeError("nbdkit still running 30 s after nbd_load's SIGKILL")
        if self.p.returncode != -signal.SIGKILL:
            raise RuntimeError(f"nbdkit exited with {self.p.returncode}, not by SIGKILL")

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


def qemu_dirty_granules(container, sock):
    """The bitmap as QEMU reads it: qemu-nbd -r -B b0, nbdinfo --map."""
    if os.path.exists(sock):
        os.unlink(sock)
    q = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", "b0", "-k", sock, container],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(sock) or q.poll() is not None, 30, "qemu-nbd")
        if q.poll() is not None:
            raise RuntimeError(f"qemu-nbd exited {q.returncode}: {q.stderr.read().decode().strip()}")
        r = subprocess.run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:b0",
                            f"nbd+unix:///?socket={sock}"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"nbdinfo --map failed: {r.stderr.strip()}")
    finally:
        if q.poll() is None:
            q.kill()
        q.wait(30)
    dirty = set()
    for e in json.loads(r.stdout):
        if e["type"] & 1:
            dirty.update(granules_of(e["offset"], e["length"]))
    return dirty


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


def replay_command(a, i):
    return (f"python3 {os.path.abspath(__file__)} --build {a.build} --mode {a.mode}"
            f"{' --power-cut' if a.power_cut else ''} --seed {a.seed} --first {i}"
            f" --iterations 1 --disk-mib {a.disk_mib} --max-acks {a.max_acks}"
            f" --max-recovery-step {a.max_recovery_step}")


def iteration(a, i, work, figures):
    # One random stream per iteration: rerunning iteration i alone (--first i
    # --iterations 1) draws the same disk window, options, seeds, N and K.
    rng = random.Random(f"{a.seed}:{i}")
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
    flush_every = rng.choice([0, 20, 100, 500])
    load_seed = rng.randrange(1 << 30)
    # The crash point: after N acknowledged requests, log-uniform in
    # 1..max_acks, so that the first writes (record armed, in-use set) are
    # hit as often as the steady state and persists.
    kill_after = max(1, min(a.max_acks, int(math.exp(rng.uniform(0, math.log(a.max_acks))))))
    rec_step = rng.randint(1, a.max_recovery_step)
    pc_seed = str(rng.randrange(1 << 30))
    srv = Server(args, sock, nlog, env)
    try:
        load = subprocess.run([a.nbd_load, "--socket", sock, "--seed", str(load_seed),
                               "--ops", "1000000", "--qd", "8", "--connections", "2",
                               "--region", f"{woff}:{window}",
                               "--flush-every", str(flush_every), "--max-len", "262144",
                               "--log", log, "--allow-errors", "--no-final-flush",
                               "--kill-after", str(kill_after), "--kill-pid", str(srv.p.pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    except BaseException:
        srv.p.kill()
        srv.p.wait(30)
        raise
    with open(log) as f:
        killed = f"K {kill_after}\n" in f.read()
    if not killed:
        srv.p.kill()
        srv.p.wait(30)
        raise RuntimeError(f"iteration {i}: nbd_load did not kill after {kill_after} acks "
                           f"(exit {load.returncode}: {load.stderr.strip()}); kept in {d}")
    srv.wait_killed()
    if a.power_cut:
        for j in (cont + ".journal", disk + ".journal"):
            subprocess.run([a.powercut, j, pc_seed], check=True, timeout=60,
                           stdout=subprocess.DEVNULL)
        args = [x for x in args if not x.startswith("--filter=" + a.volatile)
                and not x.startswith("volatile-journal=")]
        args[0] = f"--filter={a.filter}"  # the filter users run recovers
        env.pop("CBT_TEST_VOLATILE_JOURNAL", None)
    # Restart killed during recovery (at attach): before its Kth container write
    # or sync (kill -9 semantics: steps 1..K-1 landed, in the page cache).
    steplog = os.path.join(d, "recovery-steps.log")
    renv = dict(env, LD_PRELOAD=a.crash_preload, CBT_CRASH_FILE=cont,
                CBT_CRASH_AT_STEP=str(rec_step), CBT_CRASH_LOG=steplog)
    rsrv = Server(args, sock, nlog, renv, may_die=True)
    if rsrv.alive():
        rsrv.p.kill()  # recovery needed fewer than K steps: kill it idle
        rsrv.p.wait(30)
        rec_note = f"done before step {rec_step}"
        figures["recovery_completed"] += 1
    elif rsrv.p.returncode == -signal.SIGKILL:
        rec_note = f"killed@{rec_step}"
        figures["recovery_interrupted"] += 1
    else:
        raise RuntimeError(f"iteration {i}: nbdkit exited {rsrv.p.returncode} at start "
                           f"(recovery run); kept in {d}")
    nsteps = 0
    if os.path.exists(steplog):
        with open(steplog) as f:
            nsteps = sum(1 for _ in f)
    # Must recover again (a superset), then a clean stop persists.
    srv = Server(args, sock, nlog, env)
    rc = srv.stop()
    nlog.close()
    acked, sent = parse_log(log)
    changed = changed_granules(disk)
    dirty = dirty_granules(a.cbt, cont)
    qdirty = qemu_dirty_granules(cont, os.path.join(d, "qemu.sock"))
    missed_ack = sorted(acked - dirty)
    missed_chg = sorted(changed - dirty)
    missed_q = sorted((acked | changed) - qdirty)
    state = check_container(a.cbt, cont)
    truth = acked | changed
    prec = len(dirty) / len(truth) if truth else 1.0
    ok = not missed_ack and not missed_chg and not missed_q and qdirty == dirty and rc == 0
    print(f"[{a.mode}{'+powercut' if a.power_cut else ''}] iter {i}: kill@{kill_after} acks, "
          f"recovery {rec_note} ({nsteps} steps logged); acked {len(acked)} changed {len(changed)} "
          f"dirty {len(dirty)} precision {prec:.2f} container {state}"
          + ("" if ok else f" MISSED acked={missed_ack[:8]} changed={missed_chg[:8]} "
             f"qemu={missed_q[:8]} qemu!=cbt={sorted(qdirty ^ dirty)[:8]} rc={rc}"),
          flush=True)
    if not ok:
        raise RuntimeError(f"iteration {i} failed; kept in {d}\nreplay: {replay_command(a, i)}")
    shutil.rmtree(d)
    return len(dirty), len(truth)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--mode", choices=["process", "power"], required=True)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--first", type=int, default=0, help="number of the first iteration")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--disk-mib", type=int, default=512)
    ap.add_argument("--max-acks", type=int, default=20000,
                    help="kill nbdkit after N acknowledged requests, N log-uniform in 1..this")
    ap.add_argument("--max-recovery-step", type=int, default=7,
                    help="kill the recovering restart before its Kth container write or "
                         "sync, K uniform in 1..this")
    ap.add_argument("--power-cut", action="store_true",
                    help="simulate power loss: drop/keep/reorder/tear unflushed writes")
    a = ap.parse_args()
    if os.environ.get("CBT_SOAK") == "1":
        a.iterations = max(a.iterations, 1000)
    a.build = b = os.path.abspath(a.build)
    a.filter = os.path.join(b, "plugin", "nbdkit-cbt-filter.so")
    a.cbt = os.path.join(b, "server", "cbt")
    a.nbd_load = os.path.join(b, "tests", "nbd_load")
    a.volatile = os.path.join(b, "tests", "nbdkit-volatile-filter.so")
    a.powercut_filter = os.path.join(b, "tests", "nbdkit-cbt-powercut-filter.so")
    a.powercut = os.path.join(b, "tests", "powercut_replay")
    a.crash_preload = os.path.join(b, "tests", "crash_after_writes.so")
    for tool in ("nbdkit", "qemu-img", "qemu-nbd", "nbdinfo"):
        if shutil.which(tool) is None:
            print(f"SKIP: {tool} is not installed")
            return 77
    for f in (a.filter, a.cbt, a.nbd_load, a.volatile, a.powercut, a.powercut_filter,
              a.crash_preload):
        if not os.path.exists(f):
            print(f"FAIL: not built: {f}")
            return 1
    print(f"torture: mode {a.mode}, {a.iterations} kill points from #{a.first}, seed {a.seed}"
          f"{', simulated power cuts' if a.power_cut else ''}", flush=True)
    work = tempfile.mkdtemp(prefix="cbt-crash.")
    tot_dirty = tot_truth = 0
    figures = {"recovery_interrupted": 0, "recovery_completed": 0}
    t0 = time.monotonic()  # reported only; nothing is judged by time
    try:
        for i in range(a.first, a.first + a.iterations):
            dd, tt = iteration(a, i, work, figures)
            tot_dirty += dd
            tot_truth += tt
    except Exception as e:  # noqa: BLE001 - report and fail
        print(f"FAIL: {e}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    # Coverage, not luck: K is drawn from the steps a recovery takes, so a
    # run of 10 or more in which no restart died means the preload did not
    # intercept the container's writes, and the recovery crash was never
    # tested.
    if a.iterations >= 10 and figures["recovery_interrupted"] == 0:
        print(f"FAIL: no restart was killed during recovery in {a.iterations} iterations: "
              f"{a.crash_preload} did not fire")
        return 1
    print(f"OK: {a.iterations} kill points, 0 missed granules (cbt map and qemu-nbd agree); "
          f"restarts killed during recovery: {figures['recovery_interrupted']} "
          f"(recovery done before the chosen step: {figures['recovery_completed']}); "
          f"precision {tot_dirty}/{tot_truth} = {tot_dirty / max(1, tot_truth):.2f}; "
          f"{time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
