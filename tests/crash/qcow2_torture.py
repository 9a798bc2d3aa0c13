#!/usr/bin/env python3
"""Crash torture for the qcow2 plugin (data integrity).

Each iteration (its own random stream, from --seed and its number, so any
iteration can be rerun alone: the failure message prints the command):
  1. a fresh qcow2 image of one kind (iteration number modulo the list, so a
     short run covers them all): v3 64k clusters, 512 B clusters, 2 MiB
     clusters, v2 (compat=0.10), refcount_bits=1, an overlay over a qcow2
     backing file with data, a compressed image (qemu-img convert -c),
     preallocation=metadata; sometimes a tiny L2 cache (cache-size=), so
     that writes trigger write-backs and tables are evicted and reread;
  2. served by nbdkit-qcow2-plugin.so, or with --power-cut by the test build
     nbdkit-qcow2-powercut-plugin.so, whose image writes stay in a volatile
     cache (and a journal) until the plugin flushes;
  3. nbd_load --stamp: random writes, zeroes, trims and flushes (QD 8, two
     connections), each write's data naming the request and the offset;
     every request logged before it is sent and when it is acknowledged;
  4. kill -9 of nbdkit by nbd_load after N acknowledged requests (N
     log-uniform in 1..--max-acks); with --power-cut, powercut_replay then
     applies a random subset of the unflushed writes (reordered, torn at
     512-byte sectors);
  5. verify:
     - qemu-img check: exit 0, or exit 3 (leaks only) and then
       `qemu-img check -r leaks` leaves it at exit 0;
     - the content, as the plugin serves it (nbdkit -r, nbdcopy to raw),
       byte by byte against the log (see Model below);
     - QEMU reads the same: qemu-img compare of the image with that copy;
     - the plugin serves the image writable again: a write, flush and read
       back (qemu-io over NBD), a clean stop, QEMU reads the write, and
       qemu-img check is clean.

Model (per byte b; the log orders events: S = sent, A = acknowledged):
  F* is the completed flush (acknowledged with success) sent last. A write,
  zero or trim is durable if it was acknowledged with success before F* was
  sent (can_multi_conn: a flush covers the other connection's writes too).
  Among the requests covering b, one is superseded if a durable request
  covering b was sent after it was acknowledged. Allowed at b: the value of
  every request covering b that is not superseded (durable or not: a
  request not covered by F* may or may not have landed, byte by byte), and
  the initial content if no durable write or zero covers b. A write's value
  is its stamp, a zero's is 0. A trim (the plugin's: whole clusters become
  unallocated or zero, partial ones are left alone) allows 0 and, over a
  backing file, the backing data; it supersedes nothing, so the values it
  may have left in place stay allowed. (Stricter than NBD, for which a
  trimmed range is unspecified: this is what the plugin promises.)
Replay: the image, the request streams, N and the power-cut subset are
fixed by the seed; the interleaving of the connections and of nbdkit's
threads is not.
Exit status 0 when every iteration passed; 77 (reason printed) when a tool
is missing.
"""
import argparse
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from array import array

# What libnbd reports for the requests the kill cut off (ENOTCONN,
# ECONNRESET, EPIPE, ESHUTDOWN); any other error is the plugin's.
DISCONNECTED = {"0", "107", "104", "32", "108"}
KINDS = ["v3-64k", "c512", "c2m", "v2", "refcount1", "overlay", "compressed", "prealloc"]


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torture import served, wait_for  # noqa: E402  (shared with the filter's torture)


class Server:
    """nbdkit on a unix socket, killed by pid, never left running."""

    def __init__(self, args, sock, log, env=None):
        if os.path.exists(sock):
            os.unlink(sock)
        self.sock = sock
        self.uri = f"nbd+unix:///?socket={sock}"
        self.p = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", sock] + args,
                                  stderr=log, env=env)
        try:
            wait_for(lambda: self.p.poll() is not None or served(sock), 60, "nbdkit")
        except RuntimeError:
            self.kill()
            raise
        if self.p.poll() is not None:
            raise RuntimeError(f"nbdkit exited at start with {self.p.returncode}")

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(30)

    def wait_killed(self):
        """The server was sent SIGKILL by nbd_load."""
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("nbdkit still running 30 s after nbd_load's SIGKILL")
        if self.p.returncode != -signal.SIGKILL:
            raise RuntimeError(f"nbdkit exited with {self.p.returncode}, not by SIGKILL")

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("nbdkit did not stop on SIGTERM")


def run(cmd, timeout=120, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stdout}{r.stderr}")
    return r


def base_content(rng, size):
    """Initial data for a backing file or a compressed image: a random mix of
    zero, random and repetitive 64 KiB chunks (the repetitive ones compress)."""
    out = bytearray(size)
    for off in range(0, size, 65536):
        p = rng.random()
        if p < 0.35:
            out[off:off + 65536] = rng.randbytes(65536)
        elif p < 0.6:
            out[off:off + 65536] = bytes([rng.randrange(1, 256)]) * 65536
    return bytes(out)


def make_backing(rng, d, size):
    """A qcow2 backing file with data; returns (path, its content)."""
    data = base_content(rng, size)
    raw, base = os.path.join(d, "base.raw"), os.path.join(d, "base.qcow2")
    with open(raw, "wb") as f:
        f.write(data)
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o",
         f"cluster_size={rng.choice([4096, 65536])}", raw, base])
    os.unlink(raw)
    return base, data


def make_image(kind, rng, d, size):
    """Creates the image; returns (path, initial guest content or None for
    zeros, backing content or None, description). The kinds without data of
    their own sometimes get a backing file too: every first write to a
    cluster then copies backing data around it, which a write ordered wrongly
    against its L2 entry loses."""
    img = os.path.join(d, "img.qcow2")
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    opts = {"v3-64k": "cluster_size=65536", "c512": "cluster_size=512",
            "c2m": "cluster_size=2M"}.get(kind)
    desc = {"v3-64k": "v3 64k", "c512": "v3 512 B clusters", "c2m": "v3 2 MiB clusters"}.get(kind)
    if kind in ("v2", "refcount1", "prealloc"):
        cs = rng.choice([4096, 65536])
        opts = {"v2": "compat=0.10", "refcount1": "refcount_bits=1",
                "prealloc": "preallocation=metadata"}[kind] + f",cluster_size={cs}"
        desc = {"v2": "v2", "refcount1": "refcount_bits=1",
                "prealloc": "preallocation=metadata"}[kind] + f" {cs // 1024}k"
    if opts:
        if kind != "prealloc" and rng.random() < 0.3:
            base, data = make_backing(rng, d, size)
            run(create + ["-o", opts, "-b", base, "-F", "qcow2", img, str(size)])
            return img, data, data, desc + " over a qcow2 backing"
        run(create + ["-o", opts, img, str(size)])
        return img, None, None, desc
    if kind == "compressed":
        data = base_content(rng, size)
        raw = os.path.join(d, "base.raw")
        with open(raw, "wb") as f:
            f.write(data)
        cs = rng.choice([4096, 65536])
        run(["qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"cluster_size={cs}", raw, img])
        os.unlink(raw)
        return img, data, None, f"compressed {cs // 1024}k"
    assert kind == "overlay"
    base, data = make_backing(rng, d, size)
    compat = rng.choice(["1.1", "0.10"])
    cs = rng.choice([4096, 65536])
    run(create + ["-o", f"compat={compat},cluster_size={cs}", "-b", base, "-F", "qcow2", img,
                  str(size)])
    return img, data, data, f"overlay compat={compat} {cs // 1024}k over qcow2"


def stamp(tag, lo, hi):
    """What nbd_load --stamp writes at [lo, hi) for a request with this tag."""
    first, last = lo // 8, (hi - 1) // 8
    w = array("Q", range((tag << 32) | first, ((tag << 32) | last) + 1))
    if sys.byteorder != "little":
        w.byteswap()
    b = w.tobytes()
    return b[lo % 8:lo % 8 + hi - lo]


class Req:
    __slots__ = ("conn", "id", "op", "off", "len", "s", "a", "ok", "durable")

    def __init__(self, conn, rid, op, off, ln, s):
        self.conn, self.id, self.op, self.off, self.len, self.s = conn, rid, op, off, ln, s
        self.a, self.ok, self.durable = None, False, False

    def tag(self):
        return ((self.conn + 1) << 24) | self.id

    def name(self):
        return f"{self.op}#{self.conn}.{self.id}[{self.off}+{self.len}]"


def parse_log(path):
    """Returns (requests, index in the log of F*'s S line or -1, figures)."""
    reqs, flushes = {}, {}
    early_errors = []
    with open(path) as f:
        for n, line in enumerate(f):
            p = line.split()
            if len(p) >= 4 and p[0] == "A" and p[3] not in DISCONNECTED:
                early_errors.append(line.strip())
            if len(p) >= 6 and p[0] == "S":
                key = (int(p[1]), int(p[2]))
                if p[3] == "F":
                    flushes[key] = [n, None]
                else:
                    reqs[key] = Req(key[0], key[1], p[3], int(p[4]), int(p[5]), n)
            elif len(p) >= 4 and p[0] == "A":
                key = (int(p[1]), int(p[2]))
                if key in flushes:
                    flushes[key][1] = p[3] == "0"
                elif key in reqs:
                    reqs[key].a, reqs[key].ok = n, p[3] == "0"
    fstar = max((s for s, ok in flushes.values() if ok), default=-1)
    for r in reqs.values():
        r.durable = r.ok and r.a is not None and r.a < fstar
    done = sum(1 for _, ok in flushes.values() if ok)
    return list(reqs.values()), fstar, {"flushes": done, "early_errors": early_errors,
                                        "durable": sum(r.durable for r in reqs.values()),
                                        "requests": len(reqs)}


def verify(reqs, actual, initial, backing):
    """Checks every byte of `actual` (the served content) against the model
    (module docstring). Returns (errors, bytes checked, bytes a trim may
    have changed)."""
    size = len(actual)
    bounds = {0, size}
    starts, ends = {}, {}
    for r in reqs:
        bounds.update((r.off, r.off + r.len))
        starts.setdefault(r.off, []).append(r)
        ends.setdefault(r.off + r.len, []).append(r)
    bounds = sorted(bounds)
    active = set()
    errors, checked, trimmed = [], 0, 0
    for lo, hi in zip(bounds, bounds[1:]):
        for r in ends.get(lo, ()):
            active.discard(r)
        active.update(starts.get(lo, ()))
        # Only a write or a zero supersedes: a trim may leave the old data.
        durable = [r for r in active if r.durable and r.op != "T"]
        latest = max((r.s for r in durable), default=-1)
        sources = [r for r in active if r.a is None or r.a > latest]
        vals = []
        if not durable:
            vals.append(("initial", initial[lo:hi] if initial else bytes(hi - lo)))
        for r in sources:
            n = r.name() + (" durable" if r.durable else "")
            if r.op == "W":
                vals.append((n, stamp(r.tag(), lo, hi)))
            else:
                vals.append((n, bytes(hi - lo)))
                if r.op == "T" and backing:
                    vals.append((n + " (backing)", backing[lo:hi]))
        if any(r.op == "T" for r in sources):
            trimmed += hi - lo
        got = actual[lo:hi]
        checked += hi - lo
        if any(v == got for _, v in vals):
            continue
        # Mixed (a torn or concurrent write): each byte must be one of them.
        for c in range(lo, hi, 512):
            ce = min(hi, c + 512)
            g = got[c - lo:ce - lo]
            if any(v[c - lo:ce - lo] == g for _, v in vals):
                continue
            for b in range(c, ce):
                if not any(v[b - lo] == got[b - lo] for _, v in vals):
                    errors.append(f"byte {b}: {got[b - lo]:#04x}, allowed: "
                                  + ", ".join(f"{n}={v[b - lo]:#04x}" for n, v in vals))
                    break
            if errors:
                break
        if len(errors) >= 8:
            break
    return errors, checked, trimmed


def check_image(img, figures):
    """qemu-img check: clean, or leaks that -r leaks repairs. Returns a note."""
    r = run(["qemu-img", "check", img], timeout=120, check=False)
    if r.returncode == 0:
        return "clean"
    if r.returncode != 3:
        raise RuntimeError(f"qemu-img check exit {r.returncode}: {r.stdout}{r.stderr}")
    m = re.search(r"(\d+) leaked clusters", r.stdout)
    leaks = int(m.group(1)) if m else -1
    rep = run(["qemu-img", "check", "-r", "leaks", img], timeout=120, check=False)
    r2 = run(["qemu-img", "check", img], timeout=120, check=False)
    if r2.returncode != 0:
        raise RuntimeError(f"leaks not repaired: {rep.stdout}{rep.stderr}{r2.stdout}{r2.stderr}")
    figures["leaky"] += 1
    figures["leaked"] += max(leaks, 0)
    return f"{leaks} leaked, repaired"


def replay_command(a, i):
    return (f"python3 {os.path.abspath(__file__)} --build {a.build}"
            f"{' --power-cut' if a.power_cut else ''} --seed {a.seed} --first {i}"
            f" --iterations 1 --disk-mib {a.disk_mib} --max-acks {a.max_acks}"
            + (f" --kinds {','.join(a.kinds)}" if a.kinds != KINDS else ""))


def iteration(a, i, work, figures):
    # One random stream per iteration: rerunning iteration i alone (--first i
    # --iterations 1) draws the same image, options, seeds and N.
    rng = random.Random(f"{a.seed}:{i}" + (":pc" if a.power_cut else ""))
    kind = a.kinds[i % len(a.kinds)]
    d = os.path.join(work, f"it{i}")
    os.makedirs(d)
    size = a.disk_mib << 20
    img, initial, backing, desc = make_image(kind, rng, d, size)
    sock, log = os.path.join(d, "sock"), os.path.join(d, "load.log")
    nlog = open(os.path.join(d, "nbdkit.log"), "w")
    env = dict(os.environ)
    plugin = a.plugin
    if a.power_cut:
        env["CBT_TEST_VOLATILE_JOURNAL"] = img + ".journal"
        plugin = a.powercut_plugin
    extra = []
    if rng.random() < 0.25:
        # A few L2 tables: writes trigger write-backs (Flush from the write
        # path) and clean tables are evicted and read again.
        extra.append("cache-size=" + str(rng.choice([1, 2, 4]) * 65536))
    flush_every = rng.choice([0, 3, 10, 30, 100, 400])
    qd = rng.choice([2, 8, 8])
    max_len = rng.choice([16384, 262144, 1048576])
    load_seed = rng.randrange(1 << 30)
    kill_after = max(1, min(a.max_acks, int(math.exp(rng.uniform(0, math.log(a.max_acks))))))
    # Often right after a completed flush (the first one acknowledged at or
    # after N acks): every write before it must survive, while the next
    # flush, which would make up for a flush that returned too early, has
    # not begun.
    on_flush = flush_every > 0 and rng.random() < 0.5
    # One flushing connection: no flush of the other one is queued behind
    # the last one, which would make up for it at once.
    flush_conns = rng.choice([1, 2])
    pc_seed = str(rng.randrange(1 << 30))
    wr_len = rng.randrange(1, 3 * 65536)
    wr_off = rng.randrange(0, size - wr_len)
    wr_pat = rng.randrange(1, 256)

    srv = Server([plugin, f"file={img}"] + extra, sock, nlog, env)
    try:
        load = subprocess.run([a.nbd_load, "--socket", sock, "--seed", str(load_seed),
                               "--ops", "1000000", "--qd", str(qd), "--connections", "2",
                               "--flush-every", str(flush_every), "--flush-conns",
                               str(flush_conns), "--max-len", str(max_len),
                               "--log", log, "--allow-errors", "--no-final-flush", "--stamp",
                               "--kill-after", str(kill_after), "--kill-pid", str(srv.p.pid)]
                              + (["--kill-on-flush"] if on_flush else []),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    except BaseException:
        srv.kill()
        raise
    with open(log) as f:
        killed = re.search(r"^K (\d+)$", f.read(), re.M)
    if not killed:
        srv.kill()
        raise RuntimeError(f"iteration {i}: nbd_load did not kill after {kill_after} acks "
                           f"(exit {load.returncode}: {load.stderr.strip()}); kept in {d}")
    srv.wait_killed()
    kill_note = f"kill@{killed.group(1)} acks" + (f" (first flush from {kill_after})"
                                                  if on_flush else "")
    pc_note = ""
    if a.power_cut:
        r = run([a.powercut, img + ".journal", pc_seed, img], timeout=60)
        m = re.search(r"(\d+) unflushed writes, (\d+) kept \((\d+) torn\)", r.stdout)
        if m:
            pc_note = f", power cut kept {m.group(2)}/{m.group(1)} ({m.group(3)} torn)"
            figures["unflushed"] += int(m.group(1))

    def fail(what):
        raise RuntimeError(f"iteration {i} [{desc}{' ' + extra[0] if extra else ''}]: {what}; "
                           f"kept in {d}\nreplay: {replay_command(a, i)}")

    try:
        state = check_image(img, figures)
    except RuntimeError as e:
        fail(str(e))
    # The content as the plugin serves it (read-only: the image is untouched).
    out = os.path.join(d, "served.raw")
    srv = Server([a.plugin, "-r", f"file={img}"], sock, nlog)
    try:
        cp = run(["nbdcopy", srv.uri, out], timeout=120, check=False)
    finally:
        srv.kill()
    if cp.returncode != 0:
        fail(f"nbdcopy from the plugin failed: {cp.stderr.strip()}")
    reqs, fstar, fig = parse_log(log)
    if fig["early_errors"]:
        # Every request must succeed or be cut off by the kill (nbd_load runs
        # with --allow-errors only for those).
        fail("requests failed with an error of the plugin's (A conn id errno): "
             + ", ".join(fig["early_errors"][:8]))
    with open(out, "rb") as f:
        actual = f.read()
    if len(actual) != size:
        fail(f"served size {len(actual)}, expected {size}")
    errors, checked, unspec = verify(reqs, actual, initial, backing)
    if errors:
        fail("content differs from every allowed value:\n  " + "\n  ".join(errors))
    cmp_ = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, out], check=False)
    if cmp_.returncode != 0:
        fail(f"qemu-img compare with what the plugin serves: exit {cmp_.returncode}: "
             f"{cmp_.stdout.strip()} {cmp_.stderr.strip()}")
    # Writable again: a write read back, a clean stop, QEMU reads it, clean.
    # (The image as the crash left it, repaired, is kept for a failure report.)
    shutil.copyfile(img, img + ".before-session")
    pre_size = os.path.getsize(img)
    srv = Server([a.plugin, f"file={img}"], sock, nlog)
    try:
        qio = run(["qemu-io", "-f", "raw", "-c", f"write -P {wr_pat} {wr_off} {wr_len}",
                   "-c", "flush", "-c", f"read -P {wr_pat} {wr_off} {wr_len}", srv.uri],
                  timeout=60, check=False)
        rc = srv.stop()
    finally:
        srv.kill()
    nlog.close()
    if qio.returncode != 0 or "Pattern verification failed" in qio.stdout + qio.stderr:
        fail(f"write/read back through the plugin: {qio.stdout}{qio.stderr}")
    if rc != 0:
        fail(f"nbdkit exited {rc} on SIGTERM")
    qr = run(["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {wr_pat} {wr_off} {wr_len}", img],
             timeout=60, check=False)
    if qr.returncode != 0 or "Pattern verification failed" in qr.stdout + qr.stderr:
        fail(f"QEMU does not read the plugin's write back: {qr.stdout}{qr.stderr}")
    r = run(["qemu-img", "check", img], check=False)
    if r.returncode == 3:
        # Leaks after the clean session are allowed only where the first
        # check could not see them: refcounts the crash left for clusters at
        # or past the end of the file (qemu-img check counts clusters up to
        # the file's length), which became visible when the session grew it.
        with open(img, "rb") as f:
            cbits = struct.unpack(">I", f.read(24)[20:24])[0]
        leaked = [int(x) for x in re.findall(r"Leaked cluster (\d+)", r.stdout + r.stderr)]
        hidden = [c for c in leaked if (c << cbits) >= pre_size]
        if leaked and hidden == leaked:
            run(["qemu-img", "check", "-r", "leaks", img], check=False)
            r = run(["qemu-img", "check", img], check=False)
            figures["hidden_leaks"] += len(hidden)
    if r.returncode != 0:
        fail(f"qemu-img check after a clean session: exit {r.returncode}: {r.stdout}{r.stderr}")
    figures["checked"] += checked
    figures["unspecified"] += unspec
    figures["durable"] += fig["durable"]
    print(f"[{'powercut' if a.power_cut else 'kill9'}] iter {i} {desc}"
          f"{' ' + extra[0] if extra else ''}: {kill_note}, QD {qd}, flush every "
          f"{flush_every} on {flush_conns} conn, {fig['requests']} requests ({fig['durable']} durable, "
          f"{fig['flushes']} flushes){pc_note}; image {state}; {checked} bytes checked, "
          f"{unspec} under trims", flush=True)
    if not a.keep:
        shutil.rmtree(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--first", type=int, default=0, help="number of the first iteration")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--disk-mib", type=int, default=32)
    ap.add_argument("--max-acks", type=int, default=5000,
                    help="kill nbdkit after N acknowledged requests, N log-uniform in 1..this")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help="image kinds, iteration i uses kinds[i %% len]: " + ",".join(KINDS))
    ap.add_argument("--both", action="store_true",
                    help="run the iterations with kill -9, then again with power cuts")
    ap.add_argument("--long", action="store_true",
                    help="a long run: skipped (77) unless CBT_SOAK=1 or CBT_CRASH_LONG=1")
    ap.add_argument("--keep", action="store_true", help="keep every iteration's directory")
    ap.add_argument("--power-cut", action="store_true",
                    help="simulate power loss: drop/keep/reorder/tear unflushed writes")
    a = ap.parse_args()
    a.kinds = a.kinds.split(",")
    for k in a.kinds:
        if k not in KINDS:
            ap.error(f"unknown kind {k}")
    if a.long and os.environ.get("CBT_SOAK") != "1" and os.environ.get("CBT_CRASH_LONG") != "1":
        print("SKIP: long crash torture: set CBT_CRASH_LONG=1 (or CBT_SOAK=1) to run it")
        return 77
    if os.environ.get("CBT_SOAK") == "1":
        a.iterations = max(a.iterations, 1000)
    a.build = b = os.path.abspath(a.build)
    a.plugin = os.path.join(b, "plugin", "nbdkit-qcow2-plugin.so")
    a.powercut_plugin = os.path.join(b, "tests", "nbdkit-qcow2-powercut-plugin.so")
    a.nbd_load = os.path.join(b, "tests", "nbd_load")
    a.powercut = os.path.join(b, "tests", "powercut_replay")
    for tool in ("nbdkit", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy"):
        if shutil.which(tool) is None:
            print(f"SKIP: {tool} is not installed")
            return 77
    modes = [False, True] if a.both else [a.power_cut]
    for f in (a.plugin, a.nbd_load) + ((a.powercut_plugin, a.powercut) if True in modes else ()):
        if not os.path.exists(f):
            print(f"FAIL: not built: {f}")
            return 1
    print(f"qcow2 torture: {a.iterations} kill points from #{a.first}, seed {a.seed}"
          f"{' (kill -9, then simulated power cuts)' if a.both else ''}"
          f"{', simulated power cuts' if a.power_cut and not a.both else ''}", flush=True)
    work = tempfile.mkdtemp(prefix="cbt-qcow2-crash.")
    figures = dict.fromkeys(("leaky", "leaked", "hidden_leaks", "checked", "unspecified",
                             "durable", "unflushed"), 0)
    t0 = time.monotonic()  # reported only; nothing is judged by time
    try:
        for pc in modes:
            a.power_cut = pc
            for i in range(a.first, a.first + a.iterations):
                iteration(a, i, work, figures)
    except Exception as e:  # noqa: BLE001 - report and fail
        print(f"FAIL: {e}")
        return 1
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept in {work}")
    print(f"OK: {a.iterations * len(modes)} kill points; {figures['durable']} durable requests, "
          f"{figures['checked']} bytes checked ({figures['unspecified']} under trims: 0 or "
          f"backing allowed too); "
          f"leaks in {figures['leaky']} images ({figures['leaked']} clusters, repaired; "
          f"{figures['hidden_leaks']} more past the end of the file, seen after the session)"
          + (f"; {figures['unflushed']} unflushed writes cut" if a.power_cut else "")
          + f"; {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
