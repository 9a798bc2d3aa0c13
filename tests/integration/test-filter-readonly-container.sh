#!/usr/bin/env bash
# A container the server may not write (a read-only file system; mode 0444
# for a non-root user) serves a read-only export (nbdkit -r) and is never
# written; a writable export over it is refused when the client connects,
# naming the cause, and the server exits non-zero.
source "$(dirname "$0")/lib.sh"

truncate -s 64M "$T/disk.raw"
mkdir "$T/ro"
mount -t tmpfs -o size=8m tmpfs "$T/ro" 2>/dev/null || skip "cannot mount a tmpfs here (needs root)"
MOUNTS+=("$T/ro")
qemu-img create -q -f qcow2 "$T/ro/disk.cbt" 64M
qemu-img bitmap --add "$T/ro/disk.cbt" b0
chmod 0444 "$T/ro/disk.cbt"
mount -o remount,ro "$T/ro" || skip "cannot remount the tmpfs read-only"
before=$(stat -c '%y' "$T/ro/disk.cbt"; md5sum <"$T/ro/disk.cbt")

start_nbdkit "$T/sock" -r --filter="$FILTER" file "$T/disk.raw" cbt-file="$T/ro/disk.cbt" \
  cbt-bitmap=b0 cbt-create=true
timeout 30 nbdinfo --map "nbd+unix:///?socket=$T/sock" >/dev/null || fail "cannot read"
stop_nbdkit "$NBDKIT_PID"
[ "$(stat -c '%y' "$T/ro/disk.cbt"; md5sum <"$T/ro/disk.cbt")" = "$before" ] || fail "container changed"
if grep -i "error" "$T/nbdkit.log" >&2; then fail "-r over a read-only container logged an error"; fi
echo "ok: -r over a read-only container"

rc=0
timeout 60 "${NBDKIT_ENV[@]}" nbdkit -U - --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/ro/disk.cbt" cbt-bitmap=b0 --run 'nbdinfo --size "$uri"' >/dev/null 2>"$T/err" || rc=$?
[ $rc -ne 124 ] || fail "--run hung"
[ $rc -ne 0 ] || fail "a writable export over a read-only container was served"
grep -q "the container is read-only here.*(nbdkit -r; cbt serve: -r)" "$T/err" || fail "got: $(cat "$T/err")"
echo "ok: writable export refused: $(grep -m1 -o 'the container is read-only here[^;]*' "$T/err")"
echo "OK: a read-only container serves read-only exports"
