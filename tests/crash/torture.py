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
With --exports 2 (kill -9 only, no --power-cut): two sparse raw disks of
different sizes in one directory, served by `nbdkit file dir=DIR` with
cbt-file=CDIR/%e.cbt (one container per export); one nbd_load per export at
once, one of them killing nbdkit after its N acks while the other is still
writing; the recovery crash hits one of the two containers, the restarts
attach both exports (a client on each, in a drawn order); each disk is
judged on its own as above, plus: no dirty granule beyond its size, and
every dirty granule in a 64 MiB region one of ITS OWN requests touched (the
two disks' load windows are drawn in different regions, so a change charged
to the wrong disk shows).
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


def served(sock, export=""):
    """True once nbdkit answers a handshake on export (the filter has attached
    that export)."""
    if not os.path.exists(sock):
        return False
    r = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///{export}?socket={sock}"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


class Server:
    """nbdkit on a unix socket, killed by pid, never left running."""

    def __init__(self, args, sock, log, env, may_die=False, exports=("",)):
        if os.path.exists(sock):
            os.unlink(sock)
        self.sock = sock
        self.p = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", sock] + args,
                                  stderr=log, env=env)
        try:
            # Served, not just bound: the first client's connection makes the
            # filter attach, and recover after a crash. With several exports
            # each is attached (and recovered) by its first client, in the
            # order given.
            for e in exports:
                wait_for(lambda e=e: self.p.poll() is not None or served(sock, e), 60,
                         f"nbdkit export '{e}'")
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
    # -t: the readiness handshake below must not end the server. Served, not
    # just bound: the socket file exists a moment before qemu-nbd listens.
    q = subprocess.Popen(["qemu-nbd", "-t", "-r", "-f", "qcow2", "-B", "b0", "-k", sock, container],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: q.poll() is not None or served(sock), 30, "qemu-nbd")
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
            f"{' --power-cut' if a.power_cut else ''}"
            f"{f' --exports {a.exports}' if a.exports != 1 else ''} --seed {a.seed} --first {i}"
            f" --iterations 1 --disk-mib {a.disk_mib} --max-acks {a.max_acks}"
            f" --max-recovery-step {a.max_recovery_step}")


def recovery_outcome(rsrv, label, rec_step, steplog, figures, i, d):
    """The restart run with crash_after_writes.so: killed at its step, or
    done first (then killed idle). Returns (note, steps it took)."""
    if rsrv.alive():
        rsrv.p.kill()  # recovery needed fewer than K steps: kill it idle
        rsrv.p.wait(30)
        note = f"{label}done before step {rec_step}"
        figures["recovery_completed"] += 1
    elif rsrv.p.returncode == -signal.SIGKILL:
        note = f"{label}killed@{rec_step}"
        figures["recovery_interrupted"] += 1
    else:
        raise RuntimeError(f"iteration {i}: nbdkit exited {rsrv.p.returncode} at start "
                           f"(recovery run); kept in {d}")
    nsteps = 0
    if os.path.exists(steplog):
        with open(steplog) as f:
            nsteps = sum(1 for _ in f)
    return note, nsteps


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
    rec_note, nsteps = recovery_outcome(Server(args, sock, nlog, renv, may_die=True), "",
                                        rec_step, steplog, figures, i, d)
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


# The filter's region (docs/crash-safety.md "Region size"): 64 MiB for disks
# up to about 16 TiB. Recovery marks whole recorded regions, and a region is
# recorded only for a change the disk itself was sent.
REGION = 64 << 20


def regions_of(granules):
    return {g * G // REGION for g in granules}


def draw_windows(rng, sizes, widths):
    """One load window per disk, the windows in 64 MiB regions no other
    window touches when the disks allow it (up to 200 draws of all of them;
    else the last draw). Returns the windows and whether they are
    region-disjoint."""
    for _ in range(200):
        wins, taken, disjoint = [], set(), True
        for size, width in zip(sizes, widths):
            width = min(size, width)
            off = rng.randrange(0, size - width + 1, 4096)
            regs = regions_of(granules_of(off, width))
            disjoint = disjoint and not regs & taken
            taken |= regs
            wins.append((off, width))
        if disjoint:
            break
    return wins, disjoint


def virtual_size(container):
    r = subprocess.run(["qemu-img", "info", "--output=json", container], capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"qemu-img info {container}: {r.stderr.strip()}")
    return json.loads(r.stdout)["virtual-size"]


def judge_disk(a, name, size, disk, cont, log, qsock):
    """Judges one export's recovered container as iteration() judges the only
    one, plus the bounds of a disk among several. Returns (ok, text, dirty
    count, truth count)."""
    acked, sent = parse_log(log)
    changed = changed_granules(disk)
    dirty = dirty_granules(a.cbt, cont)
    qdirty = qemu_dirty_granules(cont, qsock)
    missed_ack = sorted(acked - dirty)
    missed_chg = sorted(changed - dirty)
    missed_q = sorted((acked | changed) - qdirty)
    state = check_container(a.cbt, cont)
    vsize = virtual_size(cont)
    # Nothing beyond the disk's own size (its last granule may be partial).
    beyond = sorted(g for g in dirty | qdirty if g * G >= size)
    # Nothing in a region none of this disk's own requests touched: the
    # other disk's changes (in other regions by draw_windows) are not
    # charged here, by the live bitmap nor by recovery.
    own = regions_of(sent)
    foreign = sorted(g for g in dirty | qdirty if g * G // REGION not in own)
    truth = acked | changed
    prec = len(dirty) / len(truth) if truth else 1.0
    ok = (not missed_ack and not missed_chg and not missed_q and qdirty == dirty
          and not beyond and not foreign and vsize == size)
    text = (f"{name}: acked {len(acked)} changed {len(changed)} dirty {len(dirty)} "
            f"precision {prec:.2f} container {state}"
            + ("" if ok else f" MISSED acked={missed_ack[:8]} changed={missed_chg[:8]} "
               f"qemu={missed_q[:8]} qemu!=cbt={sorted(qdirty ^ dirty)[:8]}"
               f" BEYOND-SIZE={beyond[:8]} OTHER-REGIONS={foreign[:8]} (own regions "
               f"{sorted(own)}) virtual-size {vsize} (disk {size})"))
    return ok, text, len(dirty), len(truth)


def count_lines(log, kind):
    """Lines of an nbd_load log of this kind: "S" (sent), "A" (answered) or
    "A 0" (answered with success; the status is the fourth field)."""
    if not os.path.exists(log):
        return 0
    n = 0
    with open(log) as f:
        for line in f:
            p = line.split()
            if kind == "A 0":
                n += len(p) >= 4 and p[0] == "A" and p[3] == "0"
            else:
                n += bool(p) and p[0] == kind
    return n


def iteration_two(a, i, work, figures):
    """--exports 2: two disks behind one server, kill -9 while both are
    written; each recovers a superset of its own changes and only those."""
    rng = random.Random(f"{a.seed}:{i}:exports2")
    d = os.path.join(work, f"it{i}")
    ddir, cdir = os.path.join(d, "disks"), os.path.join(d, "cbt")
    os.makedirs(ddir)
    os.makedirs(cdir)
    # Different sizes; the second one's last granule is partial.
    names = ["a.img", "b.img"]
    sizes = [a.disk_mib << 20, (a.disk_mib << 19) + 40960]
    disks = [os.path.join(ddir, n) for n in names]
    conts = [os.path.join(cdir, n + ".cbt") for n in names]
    logs = [os.path.join(d, n + ".load.log") for n in names]
    for p, size in zip(disks, sizes):
        with open(p, "wb") as f:
            f.truncate(size)
    wins, disjoint = draw_windows(rng, sizes, [96 << 20, 64 << 20])
    figures["windows_disjoint"] += disjoint
    sock = os.path.join(d, "sock")
    env = dict(os.environ)
    args = [f"--filter={a.filter}", "file", f"dir={ddir}", f"cbt-file={cdir}/%e.cbt",
            "cbt-bitmap=b0", "cbt-create=true", f"cbt-durability={a.mode}"]
    if rng.random() < 0.3:
        args.append("cbt-persist-interval=1")
    nlog = open(os.path.join(d, "nbdkit.log"), "w")
    flush_every = [rng.choice([0, 20, 100, 500]) for _ in names]
    load_seed = [rng.randrange(1 << 30) for _ in names]
    killer = rng.randrange(2)  # this export's client kills nbdkit
    other = 1 - killer
    kill_after = max(1, min(a.max_acks, int(math.exp(rng.uniform(0, math.log(a.max_acks))))))
    # The other client is writing when the killer starts: it has had this
    # many acks, and has many more requests to go (its in-flight ones die
    # unacknowledged with the server).
    other_head = rng.randint(1, 200)
    rec_step = rng.randint(1, a.max_recovery_step)
    rec_target = rng.randrange(2)  # the container whose recovery is crashed
    orders = [rng.sample(names, 2), rng.sample(names, 2)]
    srv = Server(args, sock, nlog, env, exports=names)

    def load(k, extra):
        return subprocess.Popen(
            [a.nbd_load, "--socket", sock, "--export", names[k], "--seed", str(load_seed[k]),
             "--ops", "1000000", "--qd", "8", "--connections", "2",
             "--region", f"{wins[k][0]}:{wins[k][1]}", "--flush-every", str(flush_every[k]),
             "--max-len", "262144", "--log", logs[k], "--allow-errors", "--no-final-flush"]
            + extra, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    procs = []
    try:
        procs.append(load(other, []))
        wait_for(lambda: procs[0].poll() is not None or count_lines(logs[other], "A") >= other_head,
                 60, f"{names[other]}'s first {other_head} acks")
        if procs[0].poll() is not None:
            raise RuntimeError(f"iteration {i}: nbd_load on {names[other]} ended early "
                               f"(exit {procs[0].returncode}: {procs[0].stderr.read().strip()})"
                               f"; kept in {d}")
        procs.append(load(killer, ["--kill-after", str(kill_after), "--kill-pid",
                                   str(srv.p.pid)]))
        procs[1].wait(120)
        procs[0].wait(60)  # the server is gone: it ends on its failed requests
    except BaseException:
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.wait(30)
        srv.p.kill()
        srv.p.wait(30)
        raise
    with open(logs[killer]) as f:
        killed = f"K {kill_after}\n" in f.read()
    if not killed:
        srv.p.kill()
        srv.p.wait(30)
        raise RuntimeError(f"iteration {i}: nbd_load on {names[killer]} did not kill after "
                           f"{kill_after} acks (exit {procs[1].returncode}: "
                           f"{procs[1].stderr.read().strip()}); kept in {d}")
    srv.wait_killed()
    # The other client's requests in flight at the kill (sent, acknowledged
    # with an error or never): they need not be covered.
    unacked = count_lines(logs[other], "S") - count_lines(logs[other], "A 0")
    # Restart killed during the recovery of one of the two containers; the
    # exports are attached in a drawn order (so the other one is recovered
    # before, or not yet).
    steplog = os.path.join(d, "recovery-steps.log")
    renv = dict(env, LD_PRELOAD=a.crash_preload, CBT_CRASH_FILE=conts[rec_target],
                CBT_CRASH_AT_STEP=str(rec_step), CBT_CRASH_LOG=steplog)
    def start(env, **kw):
        try:
            return Server(args, sock, nlog, env, **kw)
        except RuntimeError as e:
            nlog.flush()
            with open(nlog.name) as f:
                last = (f.read().strip().splitlines() or ["(empty)"])[-1]
            raise RuntimeError(f"iteration {i}: {e}; nbdkit's last words: {last}; kept in {d}"
                               f"\nreplay: {replay_command(a, i)}") from None

    rec_note, nsteps = recovery_outcome(start(renv, may_die=True, exports=orders[0]),
                                        f"{names[rec_target]} ", rec_step, steplog, figures, i, d)
    # Both must recover again (a client on each), then a clean stop.
    srv = start(env, exports=orders[1])
    rc = srv.stop()
    nlog.close()
    ok, texts, tot_dirty, tot_truth = rc == 0, [], 0, 0
    for k in range(2):
        dok, text, nd, nt = judge_disk(a, names[k], sizes[k], disks[k], conts[k], logs[k],
                                       os.path.join(d, "qemu.sock"))
        ok = ok and dok
        texts.append(text)
        tot_dirty += nd
        tot_truth += nt
    print(f"[{a.mode} 2 exports] iter {i}: {names[killer]} kill@{kill_after} acks while "
          f"{names[other]} writes ({unacked} of its requests unacknowledged), recovery {rec_note} ({nsteps} steps logged); "
          + "; ".join(texts) + ("" if rc == 0 else f" rc={rc}"), flush=True)
    if not ok:
        raise RuntimeError(f"iteration {i} failed; kept in {d}\nreplay: {replay_command(a, i)}")
    shutil.rmtree(d)
    return tot_dirty, tot_truth


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
    ap.add_argument("--exports", type=int, choices=[1, 2], default=1,
                    help="2: two disks of different sizes behind one server (file dir=, "
                         "cbt-file=DIR/%%e.cbt), kill -9 while both are written")
    a = ap.parse_args()
    if a.exports == 2 and a.power_cut:
        # The power-cut layers journal per server, not per export: the data
        # filter (tests/tools/volatile_filter.cc) keeps one journal of offsets
        # for all exports, and volatile_storage.cc one journal path
        # (CBT_TEST_VOLATILE_JOURNAL) for every container.
        ap.error("--exports 2 supports kill -9 only: drop --power-cut (the power-cut "
                 "journals are per server, not per export)")
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
          f"{', simulated power cuts' if a.power_cut else ''}"
          f"{', 2 exports' if a.exports == 2 else ''}", flush=True)
    work = tempfile.mkdtemp(prefix="cbt-crash.")
    tot_dirty = tot_truth = 0
    figures = {"recovery_interrupted": 0, "recovery_completed": 0, "windows_disjoint": 0}
    t0 = time.monotonic()  # reported only; nothing is judged by time
    try:
        for i in range(a.first, a.first + a.iterations):
            dd, tt = (iteration_two if a.exports == 2 else iteration)(a, i, work, figures)
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
          + (f"load windows in disjoint regions: {figures['windows_disjoint']}"
             f"/{a.iterations}; " if a.exports == 2 else "") +
          f"{time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
