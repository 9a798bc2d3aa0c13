#!/usr/bin/env python3
"""Crash torture for internal bitmaps (the cbt filter over cbt's qcow2 plugin,
no cbt-file=: the bitmaps live inside the served image).

The steps and judgements of tests/crash/torture.py (whose helpers this
reuses), with the image as the container, and the data checks of
tests/crash/qcow2_torture.py. Each iteration (its own random stream, from
--seed, the mode and its number: the failure message prints the command):
  1. a fresh qcow2 image (kind: iteration number modulo the list: v3 64k
     clusters, 4k, 512 B, an overlay over a qcow2 backing file with data);
     nbdkit-qcow2-plugin.so with the cbt filter on top, cbt-bitmap=b0
     cbt-create=true cbt-durability=MODE, sometimes cbt-persist-interval=1;
     with --power-cut the test build nbdkit-qcow2-powercut-plugin.so: every
     write to the image (data and bitmaps alike) stays in a volatile cache
     and a journal until the plugin flushes;
  2. nbd_load --stamp: random writes, zeroes, trims, occasional flushes (QD 8,
     two connections) in a random window, each logged when sent and acked;
  3. kill -9 of nbdkit by nbd_load after N acknowledged requests (N
     log-uniform in 1..--max-acks); with --power-cut, powercut_replay applies
     a random subset of the unflushed image writes (reordered, torn);
  4. a restart (normal plugin) killed during the filter's recovery by
     crash_after_writes.so before its Kth write or sync to the image
     (CBT_CRASH_FILE is the image: with internal bitmaps the container is
     the image); a recovery with fewer steps completes and is killed idle;
  5. a restart that recovers again, then a clean stop (SIGTERM, exit 0);
  6. verify:
     - qemu-img check of the image: no errors; leaks only if
       `qemu-img check -r leaks` brings them to zero;
     - qemu-img info lists b0, not in use;
     - zero missed granules, by `cbt map IMAGE --bitmap b0` and by QEMU
       (qemu-nbd -r -B b0, nbdinfo --map), which must agree: every granule of
       every acknowledged change, and every granule whose content (QEMU's
       read of the image) differs from before the run, is dirty;
     - the data: every byte against the log (qcow2_torture's model:
       acknowledged before the last completed flush must read back).
  Mode none (QEMU's semantics): no recovery kill; the restart must either
  refuse the bitmap with a message saying it was not closed cleanly, or
  (nothing changed after the last persist) serve it, and then it is judged
  as above.
Exit 0 when every iteration passed; 77 (reason printed) when a tool is missing.
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torture as ext  # noqa: E402  (Server, granule helpers, QEMU's map)
import qcow2_torture as q2  # noqa: E402  (the data model: parse_log, verify)

KINDS = ["v3-64k", "c4k", "c512", "overlay"]


def make_image(kind, rng, d, size):
    """Returns (image, initial content or None for zeros, backing or None)."""
    img = os.path.join(d, "disk.qcow2")
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o"]
    if kind == "overlay":
        base, data = q2.make_backing(rng, d, size)
        q2.run(create + ["compat=1.1,cluster_size=65536", "-b", base, "-F", "qcow2", img,
                         str(size)])
        return img, data, data
    cs = {"v3-64k": 65536, "c4k": 4096, "c512": 512}[kind]
    q2.run(create + [f"compat=1.1,cluster_size={cs}", img, str(size)])
    return img, None, None


def changed_granules(actual, initial):
    changed = set()
    G = ext.G
    for g in range(0, (len(actual) + G - 1) // G):
        a = actual[g * G:(g + 1) * G]
        b = initial[g * G:(g + 1) * G] if initial else bytes(len(a))
        if a != b:
            changed.add(g)
    return changed


def bitmap_info(img):
    r = q2.run(["qemu-img", "info", "--output=json", img], timeout=60)
    info = json.loads(r.stdout)
    fs = info.get("format-specific", {}).get("data", {})
    return {b["name"]: b["flags"] for b in fs.get("bitmaps", [])}


def replay_command(a, i):
    return (f"python3 {os.path.abspath(__file__)} --build {a.build} --mode {a.mode}"
            f"{' --power-cut' if a.power_cut else ''} --seed {a.seed} --first {i}"
            f" --iterations 1 --disk-mib {a.disk_mib} --max-acks {a.max_acks}"
            f" --max-recovery-step {a.max_recovery_step} --kinds {','.join(a.kinds)}")


def iteration(a, i, work, figures):
    rng = random.Random(f"{a.seed}:{i}:{a.mode}" + (":pc" if a.power_cut else ""))
    kind = a.kinds[i % len(a.kinds)]
    d = os.path.join(work, f"it{i}")
    os.makedirs(d)
    size = a.disk_mib << 20
    img, initial, backing = make_image(kind, rng, d, size)
    sock, log = os.path.join(d, "sock"), os.path.join(d, "load.log")
    # The load stays in a random window (at most 64 MiB, one recovery
    # region): most of the disk must stay clean, so that recovery marking
    # too little would show (a disk of one region is all dirty after any
    # recovery: use --disk-mib 256 or more).
    window = min(size, 64 << 20)
    woff = rng.randrange(0, size - window + 1, 4096)
    env = dict(os.environ)
    plugin = a.plugin
    if a.power_cut:
        env["CBT_TEST_VOLATILE_JOURNAL"] = img + ".journal"
        plugin = a.powercut_plugin
    opts = ["cbt-bitmap=b0", "cbt-create=true", f"cbt-durability={a.mode}"]
    if rng.random() < 0.3:
        opts.append("cbt-persist-interval=1")

    def args(p):
        return [f"--filter={a.filter}", p, f"file={img}"] + opts

    nlog = open(os.path.join(d, "nbdkit.log"), "w")
    flush_every = rng.choice([0, 5, 20, 100, 500])
    load_seed = rng.randrange(1 << 30)
    kill_after = max(1, min(a.max_acks, int(math.exp(rng.uniform(0, math.log(a.max_acks))))))
    rec_step = rng.randint(1, a.max_recovery_step)
    pc_seed = str(rng.randrange(1 << 30))
    # Often right after a completed flush: every write before it is durable
    # (data and bits), the next flush has not begun.
    on_flush = flush_every > 0 and rng.random() < 0.5
    # After recovery, in the same session: a write, a flush (a persist: the
    # filter allocates bitmap clusters), another write (the plugin allocates
    # data clusters), then the clean stop. Both outside the load's window, so
    # that the log's model of it stays as it was; both must be dirty and
    # read back. One allocator for both, or the image is corrupt.
    post = []
    if window < size:
        for pat in (0x3c, 0xc3):
            ln = rng.randrange(1, 3 * 65536)
            lo, hi = (0, woff) if rng.random() < woff / (size - window) else (woff + window, size)
            if hi - lo > ln:
                post.append((rng.randrange(lo, hi - ln), ln, pat))
    desc = f"{kind}{' ' + opts[3] if len(opts) > 3 else ''}"

    def write_more(srv):
        cmds = []
        for k, (off, ln, pat) in enumerate(post):
            cmds += ["-c", f"write -P {pat} {off} {ln}"] + (["-c", "flush"] if k == 0 else [])
        if not cmds:
            return
        r = q2.run(["qemu-io", "-f", "raw"] + cmds + [f"nbd+unix:///?socket={srv.sock}"],
                   timeout=60, check=False)
        if r.returncode != 0 or "failed" in r.stdout + r.stderr:
            srv.p.kill()
            srv.p.wait(30)
            fail(f"writes after recovery: {r.stdout}{r.stderr}")

    def fail(what):
        raise RuntimeError(f"iteration {i} [{desc}]: {what}; kept in {d}\n"
                           f"replay: {replay_command(a, i)}")

    srv = ext.Server(args(plugin), sock, nlog, env)
    try:
        load = subprocess.run([a.nbd_load, "--socket", sock, "--seed", str(load_seed),
                               "--ops", "1000000", "--qd", "8", "--connections", "2",
                               "--region", f"{woff}:{window}", "--flush-every",
                               str(flush_every), "--max-len", "262144", "--log", log,
                               "--allow-errors", "--no-final-flush", "--stamp",
                               "--kill-after", str(kill_after), "--kill-pid", str(srv.p.pid)]
                              + (["--kill-on-flush"] if on_flush else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    except BaseException:
        srv.p.kill()
        srv.p.wait(30)
        raise
    with open(log) as f:
        killed = re.search(r"^K (\d+)$", f.read(), re.M)
    if not killed:
        srv.p.kill()
        srv.p.wait(30)
        fail(f"nbd_load did not kill after {kill_after} acks (exit {load.returncode}: "
             f"{load.stderr.strip()})")
    srv.wait_killed()
    pc_note = ""
    if a.power_cut:
        r = q2.run([a.powercut, img + ".journal", pc_seed, img], timeout=60)
        m = re.search(r"(\d+) unflushed writes, (\d+) kept \((\d+) torn\)", r.stdout)
        if m:
            pc_note = f", power cut kept {m.group(2)}/{m.group(1)} ({m.group(3)} torn)"
        env.pop("CBT_TEST_VOLATILE_JOURNAL", None)
    rec_note = "none"
    nsteps = 0
    if a.mode == "none":
        # QEMU's semantics: a bitmap left in use after unpersisted changes is
        # refused (with a message that says so), not recovered.
        nlog.flush()
        start = os.path.getsize(nlog.name)
        srv = ext.Server(args(a.plugin), sock, nlog, env, may_die=True)
        if not srv.alive():
            nlog.flush()
            with open(nlog.name) as f:
                f.seek(start)
                msg = f.read()
            if srv.p.returncode == 0 or "not closed cleanly" not in msg:
                fail(f"mode none: the restart exited {srv.p.returncode} without saying the "
                     f"bitmap was not closed cleanly: {msg.strip()[-400:]}")
            flags = bitmap_info(img).get("b0")
            if flags is None or "in-use" not in flags:
                fail(f"mode none: refused, but qemu-img info does not show b0 in use: {flags}")
            nlog.close()
            figures["refused"] += 1
            print(f"[none{'+powercut' if a.power_cut else ''}] iter {i} {desc}: "
                  f"kill@{killed.group(1)} acks{' (flush)' if on_flush else ''}{pc_note}; restart refused the bitmap "
                  f"(in-use), as QEMU would", flush=True)
            shutil.rmtree(d)
            return 0, 0
        write_more(srv)
        rc = srv.stop()
        figures["none_served"] += 1
    else:
        steplog = os.path.join(d, "recovery-steps.log")
        renv = dict(env, LD_PRELOAD=a.crash_preload, CBT_CRASH_FILE=img,
                    CBT_CRASH_AT_STEP=str(rec_step), CBT_CRASH_LOG=steplog)
        rsrv = ext.Server(args(a.plugin), sock, nlog, renv, may_die=True)
        try:
            rec_note, nsteps = ext.recovery_outcome(rsrv, "", rec_step, steplog, figures, i, d)
        except RuntimeError as e:
            fail(str(e))
        srv = ext.Server(args(a.plugin), sock, nlog, env)
        write_more(srv)
        rc = srv.stop()
    nlog.close()
    if rc != 0:
        fail(f"nbdkit exited {rc} on SIGTERM")
    # The image: consistent, the bitmap stored and not in use.
    try:
        state = q2.check_image(img, figures)
    except RuntimeError as e:
        fail(str(e))
    flags = bitmap_info(img).get("b0")
    if flags is None or "in-use" in flags:
        fail(f"after a clean stop qemu-img info shows b0 as {flags}")
    # Data, as QEMU reads it.
    raw = os.path.join(d, "content.raw")
    q2.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, raw], timeout=120)
    with open(raw, "rb") as f:
        actual = bytearray(f.read())
    if len(actual) != size:
        fail(f"image size {len(actual)}, expected {size}")
    reqs, fstar, fig = q2.parse_log(log)
    if fig["early_errors"]:
        fail("requests failed with an error (A conn id errno): "
             + ", ".join(fig["early_errors"][:8]))
    post_granules = set()
    for off, ln, pat in post:
        if actual[off:off + ln] != bytes([pat]) * ln:
            fail(f"the write after recovery at {off}+{ln} does not read back")
        post_granules.update(ext.granules_of(off, ln))
    for off, ln, pat in post:  # the model of the load knows nothing of them
        actual[off:off + ln] = initial[off:off + ln] if initial else bytes(ln)
    errors, checked, _ = q2.verify(reqs, actual, initial, backing)
    if errors:
        fail("content differs from every allowed value:\n  " + "\n  ".join(errors))
    # The bitmap.
    acked, sent = ext.parse_log(log)
    acked |= post_granules
    changed = changed_granules(actual, initial)
    dirty = ext.dirty_granules(a.cbt, img)
    qdirty = ext.qemu_dirty_granules(img, os.path.join(d, "qemu.sock"))
    missed_ack = sorted(acked - dirty)
    missed_chg = sorted(changed - dirty)
    missed_q = sorted((acked | changed) - qdirty)
    truth = acked | changed
    prec = len(dirty) / len(truth) if truth else 1.0
    ok = not missed_ack and not missed_chg and not missed_q and qdirty == dirty
    print(f"[{a.mode}{'+powercut' if a.power_cut else ''}] iter {i} {desc}: kill@{killed.group(1)} "
          f"acks{' (flush)' if on_flush else ''}{pc_note}, recovery {rec_note} ({nsteps} steps logged); {fig['requests']} "
          f"requests ({fig['durable']} durable); acked {len(acked)} changed {len(changed)} "
          f"dirty {len(dirty)} precision {prec:.2f}; image {state}; {checked} bytes checked"
          + ("" if ok else f" MISSED acked={missed_ack[:8]} changed={missed_chg[:8]} "
             f"qemu={missed_q[:8]} qemu!=cbt={sorted(qdirty ^ dirty)[:8]}"), flush=True)
    if not ok:
        fail("missed granules")
    shutil.rmtree(d)
    return len(dirty), len(truth)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--mode", choices=["process", "power", "none"], action="append",
                    help="durability mode (repeatable: the iterations run in each)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--first", type=int, default=0, help="number of the first iteration")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--disk-mib", type=int, default=256)
    ap.add_argument("--max-acks", type=int, default=5000)
    ap.add_argument("--max-recovery-step", type=int, default=7)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--power-cut", action="store_true",
                    help="the powercut plugin: unflushed image writes dropped/reordered/torn")
    ap.add_argument("--power-cut-iterations", type=int, default=0,
                    help="after the kill -9 iterations, this many power-cut ones per mode "
                         "(power and none)")
    ap.add_argument("--long", action="store_true",
                    help="a long run: skipped (77) unless CBT_SOAK=1 or CBT_CRASH_LONG=1")
    a = ap.parse_args()
    a.kinds = a.kinds.split(",")
    for k in a.kinds:
        if k not in KINDS:
            ap.error(f"unknown kind {k}")
    modes = a.mode or ["process"]
    if a.long and os.environ.get("CBT_SOAK") != "1" and os.environ.get("CBT_CRASH_LONG") != "1":
        print("SKIP: long crash torture: set CBT_CRASH_LONG=1 (or CBT_SOAK=1) to run it")
        return 77
    if a.long and os.environ.get("CBT_SOAK") == "1":
        a.iterations = max(a.iterations, 1000)
    a.build = b = os.path.abspath(a.build)
    a.filter = os.path.join(b, "plugin", "nbdkit-cbt-filter.so")
    a.plugin = os.path.join(b, "plugin", "nbdkit-qcow2-plugin.so")
    a.powercut_plugin = os.path.join(b, "tests", "nbdkit-qcow2-powercut-plugin.so")
    a.cbt = os.path.join(b, "server", "cbt")
    a.nbd_load = os.path.join(b, "tests", "nbd_load")
    a.powercut = os.path.join(b, "tests", "powercut_replay")
    a.crash_preload = os.path.join(b, "tests", "crash_after_writes.so")
    for tool in ("nbdkit", "qemu-img", "qemu-nbd", "nbdinfo"):
        if shutil.which(tool) is None:
            print(f"SKIP: {tool} is not installed")
            return 77
    for f in (a.filter, a.plugin, a.powercut_plugin, a.cbt, a.nbd_load, a.powercut,
              a.crash_preload):
        if not os.path.exists(f):
            print(f"FAIL: not built: {f}")
            return 1
    # Power cuts only where the mode promises to survive them (power), or
    # to refuse the bitmap (none); process mode survives kill -9 only: a
    # power cut there may lose bits by design.
    if a.power_cut and "process" in modes:
        ap.error("--power-cut: mode process does not survive power loss (use power or none)")
    runs = []
    for m in modes:
        if a.power_cut:
            runs.append((m, True, a.iterations))
        else:
            runs.append((m, False, a.iterations))
            if a.power_cut_iterations and m != "process":
                runs.append((m, True, a.power_cut_iterations))
    print("internal-bitmaps torture: " + ", ".join(
        f"{m}{'+powercut' if pc else ''} x{n}" for m, pc, n in runs)
        + f" from #{a.first}, seed {a.seed}, kinds {','.join(a.kinds)}", flush=True)
    work = tempfile.mkdtemp(prefix="cbt-internal-crash.")
    figures = dict.fromkeys(("recovery_interrupted", "recovery_completed", "refused",
                             "none_served", "leaky", "leaked"), 0)
    tot_dirty = tot_truth = 0
    t0 = time.monotonic()  # reported only
    try:
        for m, pc, n in runs:
            a.mode, a.power_cut = m, pc
            for i in range(a.first, a.first + n):
                dd, tt = iteration(a, i, work, figures)
                tot_dirty += dd
                tot_truth += tt
    except Exception as e:  # noqa: BLE001 - report and fail
        print(f"FAIL: {e}")
        return 1
    shutil.rmtree(work, ignore_errors=True)
    recovering = sum(n for m, _, n in runs if m != "none")
    if recovering >= 8 and figures["recovery_interrupted"] == 0:
        print(f"FAIL: no restart was killed during recovery in {recovering} iterations: "
              f"{a.crash_preload} did not fire on the image")
        return 1
    print(f"OK: {sum(n for _, _, n in runs)} kill points, 0 missed granules (cbt map and "
          f"qemu-nbd agree), data as acknowledged; restarts killed during recovery: "
          f"{figures['recovery_interrupted']} (done before the step: "
          f"{figures['recovery_completed']}); none mode refused {figures['refused']}, served "
          f"{figures['none_served']}; leaky images {figures['leaky']} ({figures['leaked']} "
          f"clusters, repaired); precision {tot_dirty}/{tot_truth} = "
          f"{tot_dirty / max(1, tot_truth):.2f}; {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
