#!/usr/bin/env bash
# nbdkit -r: nothing is ever written to the container.
source "$(dirname "$0")/lib.sh"

truncate -s 64M "$T/disk.raw"
qemu-img create -q -f qcow2 "$T/disk.cbt" 64M
qemu-img bitmap --add "$T/disk.cbt" b0
sum=$(md5sum <"$T/disk.cbt")
start_nbdkit "$T/sock" -r --filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" cbt-bitmap=b0
timeout 30 nbdinfo --map "nbd+unix:///?socket=$T/sock" >/dev/null || fail "cannot read"
if timeout 30 qemu-io -f raw -c 'write 0 4k' "nbd+unix:///?socket=$T/sock" 2>/dev/null | grep -q wrote; then
  fail "a write succeeded on a read-only export"
fi
stop_nbdkit "$NBDKIT_PID"
[ "$(md5sum <"$T/disk.cbt")" = "$sum" ] || fail "container written under -r"
echo "OK: container unchanged under nbdkit -r"

# Every -r case below: checksum and mtime of every file in $T/c unchanged,
# no file added. snap; ...; unchanged WHAT
files() { (cd "$T/c" && find . -type f -printf '%p %TY%Tm%Td%TT ' -exec md5sum {} + | sort); }
snap() { files >"$T/snap"; }
unchanged() { files >"$T/snap2"; diff "$T/snap" "$T/snap2" >&2 || fail "$1: files written under -r"; }
mkdir "$T/c"
ro=(-r --filter="$FILTER" file "$T/disk.raw" cbt-bitmap=b0 cbt-create=true)

# A missing container is not created under -r, even with cbt-create=true:
# the export cannot change, so there is nothing to track.
snap
start_nbdkit "$T/sock" "${ro[@]}" cbt-file="$T/c/new.cbt"
timeout 30 nbdinfo --map "nbd+unix:///?socket=$T/sock" >/dev/null || fail "cannot read"
stop_nbdkit "$NBDKIT_PID"
[ ! -e "$T/c/new.cbt" ] || fail "container created under -r"
unchanged "missing container"
echo "ok: -r cbt-create=true creates no container"

# A missing bitmap is not added under -r.
qemu-img create -q -f qcow2 "$T/c/one.cbt" 64M
qemu-img bitmap --add "$T/c/one.cbt" other
snap
start_nbdkit "$T/sock" "${ro[@]}" cbt-file="$T/c/one.cbt"
stop_nbdkit "$NBDKIT_PID"
unchanged "missing bitmap"
echo "ok: -r cbt-create=true adds no bitmap"

# An unknown autoclear bit: a writable qcow2 open clears it (the spec says a
# writer must); under -r it stays.
qemu-img create -q -f qcow2 "$T/c/ac.cbt" 64M
qemu-img bitmap --add "$T/c/ac.cbt" b0
python3 - "$T/c/ac.cbt" <<'PY'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(88); v = struct.unpack(">Q", f.read(8))[0]
    f.seek(88); f.write(struct.pack(">Q", v | (1 << 40)))
PY
snap
start_nbdkit "$T/sock" "${ro[@]}" cbt-file="$T/c/ac.cbt"
stop_nbdkit "$NBDKIT_PID"
unchanged "unknown autoclear bit"
echo "ok: -r leaves an unknown autoclear bit alone"

# A bitmap left in use by a crash (power mode: recoverable). Under -r it is
# left as found; the next writable server recovers it, with a warning (not
# an error) that counts the recorded regions (64 MiB each: the writes span
# two adjacent ones).
truncate -s 256M "$T/big.raw"
rw=(--filter="$FILTER" file "$T/big.raw" cbt-file="$T/c/crash.cbt" cbt-bitmap=b0 cbt-create=true)
start_nbdkit "$T/sock" "${rw[@]}"
# One client (another one's disconnect would persist and empty the record).
"$NBD_LOAD" --socket "$T/sock" --seed 5 --ops 40 --max-len 65536 --region 65011712:4194304 \
  --no-final-flush --hold-file "$T/hold" &
load=$!; PIDS+=("$load")
wait_for 60 [ -e "$T/hold" ] || fail "client did not finish its writes"
kill9_nbdkit "$NBDKIT_PID"
rm -f "$T/hold"; wait "$load" 2>/dev/null || true  # its server died: it fails
[ "$(bitmap_flags "$T/c/crash.cbt" b0)" = '["in-use","auto"]' ] || fail "kill -9 left no in-use"
snap
start_nbdkit "$T/sock" -r "${rw[@]}"
stop_nbdkit "$NBDKIT_PID"
unchanged "in-use bitmap"
[ "$(bitmap_flags "$T/c/crash.cbt" b0)" = '["in-use","auto"]' ] || fail "-r recovered the bitmap"
echo "ok: -r leaves a bitmap to recover as found"
: >"$T/nbdkit.log"
start_nbdkit "$T/sock" "${rw[@]}"
stop_nbdkit "$NBDKIT_PID"
grep -q "cbt: warning: .*recovered from an unclean stop: [0-9]* granules added from 2 recorded region(s)" \
  "$T/nbdkit.log" || fail "no recovery warning for 2 regions: $(cat "$T/nbdkit.log")"
if grep "error" "$T/nbdkit.log" >&2; then fail "a successful recovery logged an error"; fi
[ "$(bitmap_flags "$T/c/crash.cbt" b0)" = '["auto"]' ] || fail "not recovered"
echo "ok: the writable server recovers it: $(grep -o 'recovered.*' "$T/nbdkit.log")"
echo "OK: nothing written under -r"
