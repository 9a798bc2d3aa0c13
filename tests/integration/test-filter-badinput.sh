#!/usr/bin/env bash
# Bad input at start-up: each gives a clear nbdkit error naming the problem,
# a non-zero exit, and leaves the container byte-identical.
source "$(dirname "$0")/lib.sh"

truncate -s 64M "$T/disk.raw"
snapshot() { cp "$T/disk.cbt" "$T/before.cbt"; sum=$(md5sum <"$T/disk.cbt"); }
truncate -s 32M "$T/small.raw"
qemu-img create -q -f qcow2 "$T/disk.cbt" 64M
qemu-img bitmap --add "$T/disk.cbt" b0
snapshot

# expect_refusal PATTERN NBDKIT-ARGS... : nbdkit must exit non-zero within 30 s
# printing PATTERN, and disk.cbt must be unchanged.
expect_refusal() {
  local pattern=$1; shift
  rm -f "$T/s"
  # No --run: it could start before a late start-up error. A refusal exits
  # at once; acceptance keeps serving until timeout kills it (124).
  local rc=0
  timeout 20 "${NBDKIT_ENV[@]}" nbdkit -f -U "$T/s" "$@" 2>"$T/err" || rc=$?
  [ $rc -ne 0 ] || fail "nbdkit exited 0: $*"
  [ $rc -ne 124 ] || fail "nbdkit accepted (still serving after 20 s): $*"
  grep -q -- "$pattern" "$T/err" || fail "expected '$pattern', got: $(cat "$T/err")"
  [ "$(md5sum <"$T/disk.cbt")" = "$sum" ] ||
    fail "container changed by: $* (changed bytes: $(cmp -l "$T/before.cbt" "$T/disk.cbt" | head -5 | tr '\n' ' '))"
  echo "ok: $(grep -m1 -- "$pattern" "$T/err")"
}

base=(--filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt")
# (the hints also name cbt serve's option: its users never type cbt-create=)
expect_refusal "cbt-bitmap=b9: no such bitmap in .*; add cbt-create=true (cbt serve: --create) to create it" \
  "${base[@]}" cbt-bitmap=b9
expect_refusal "cbt-granularity=3000" "${base[@]}" cbt-bitmap=b0 cbt-granularity=3000
expect_refusal "cbt-granularity=4G" "${base[@]}" cbt-bitmap=b0 cbt-granularity=4G
expect_refusal "cbt-file=PATH is required" --filter="$FILTER" file "$T/disk.raw" cbt-bitmap=b0
expect_refusal "cbt-bitmap=NAME is required" "${base[@]}"
expect_refusal "cbt-durability=fast" "${base[@]}" cbt-bitmap=b0 cbt-durability=fast
expect_refusal "no such file; add cbt-create=true (cbt serve: --create) to create it" --filter="$FILTER" file "$T/disk.raw" cbt-file="$T/none.cbt" cbt-bitmap=b0
# A size mismatch shows only when a client connects (the size is per export):
# test-filter-late-errors.sh.

# Already opened for writing by another nbdkit ...
start_nbdkit "$T/sock" "${base[@]}" cbt-bitmap=b0
snapshot
expect_refusal "writ" "${base[@]}" cbt-bitmap=b0
stop_nbdkit "$NBDKIT_PID"
snapshot
# ... or by qemu-nbd.
qemu-nbd -t -f qcow2 -k "$T/qsock" "$T/disk.cbt" 2>/dev/null &
qpid=$!; PIDS+=("$qpid")
wait_served "$T/qsock" || fail "timed out (60 s)"
snapshot  # qemu-nbd's own open sets in_use
expect_refusal "writ" "${base[@]}" cbt-bitmap=b0
kill "$qpid"; wait "$qpid" 2>/dev/null || true

# A corrupt container (bad bitmap directory offset).
python3 - "$T/disk.cbt" <<'PY'
import struct, sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
hl = struct.unpack(">I", b[100:104])[0]
off = hl
while off + 8 <= 65536:
    t, n = struct.unpack(">II", b[off:off + 8])
    if t == 0x23852875:
        b[off + 24:off + 32] = struct.pack(">Q", 0x1234)  # misaligned directory offset
        break
    if t == 0:
        sys.exit("no bitmaps extension")
    off += 8 + (n + 7) // 8 * 8
open(p, "wb").write(b)
PY
snapshot
expect_refusal "not cluster aligned\\|directory" "${base[@]}" cbt-bitmap=b0
echo "OK: all bad input refused, container unchanged"
