#!/usr/bin/env bash
# Errors found after nbdkit forks (when the first client connects: the disk
# size is known only per export) fail that client and stop the server with
# a non-zero exit status: a --run command never hangs, a server never exits
# 0 over a disk it could not track. Errors that can be found before the
# fork still stop nbdkit before any --run command starts.
source "$(dirname "$0")/lib.sh"

truncate -s 32M "$T/small.raw"
qemu-img create -q -f qcow2 "$T/disk.cbt" 64M
qemu-img bitmap --add "$T/disk.cbt" b0
sum=$(md5sum <"$T/disk.cbt")

# run_captive PATTERN NBDKIT-ARGS... : nbdkit --run 'nbdinfo "$uri"' must
# exit non-zero within 60 s (124 = timeout = hung) printing PATTERN, and
# nbdkit's socket dir (-U -) must be gone.
run_captive() {
  local pattern=$1; shift
  local rc=0
  rm -f "$T/sockpath"
  timeout 60 "${NBDKIT_ENV[@]}" nbdkit -U - "$@" \
    --run "echo \"\$unixsocket\" >'$T/sockpath'; nbdinfo \"\$uri\"" >/dev/null 2>"$T/err" || rc=$?
  [ $rc -ne 124 ] || fail "--run command hung (killed by timeout): $*"
  [ $rc -ne 0 ] || fail "exit status 0: $*"
  grep -q -- "$pattern" "$T/err" || fail "expected '$pattern', got: $(cat "$T/err")"
  [ -s "$T/sockpath" ] || fail "the --run command did not start"
  [ ! -e "$(dirname "$(cat "$T/sockpath")")" ] || fail "nbdkit left its socket dir behind"
  echo "ok (rc $rc): $(grep -m1 -- "$pattern" "$T/err")"
}

# 1. Size mismatch, under --run.
run_captive "size mismatch" --filter="$FILTER" file "$T/small.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0
[ "$(md5sum <"$T/disk.cbt")" = "$sum" ] || fail "container changed by a refused attach"

# 2. Create failure after the fork (this disk is too big for 512-byte
# clusters): nothing is left behind.
run_captive "too large for cluster size" --filter="$FILTER" memory 1P \
  cbt-file="$T/big.cbt" cbt-bitmap=b0 cbt-create=true cbt-cluster-size=512
[ ! -e "$T/big.cbt" ] || fail "a half-created container was left behind"

# 3. A long-lived server (-f): the client is refused, and the server exits
# non-zero by itself.
rm -f "$T/sock"
"${NBDKIT_ENV[@]}" nbdkit -f --exit-with-parent -U "$T/sock" --filter="$FILTER" file \
  "$T/small.raw" cbt-file="$T/disk.cbt" cbt-bitmap=b0 2>"$T/nbdkit.log" &
npid=$!; PIDS+=("$npid")
wait_for 60 [ -S "$T/sock" ] || fail "nbdkit did not start"
if timeout 30 nbdinfo --size "nbd+unix:///?socket=$T/sock" >/dev/null 2>&1; then
  fail "a client was served over a mismatched container"
fi
for i in $(seq 300); do kill -0 "$npid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$npid" 2>/dev/null && fail "server still running 30 s after its attach failed"
rc=0; wait "$npid" || rc=$?
[ $rc -ne 0 ] || fail "server exited 0 after its attach failed"
grep -q "size mismatch" "$T/nbdkit.log" || fail "no size mismatch logged: $(cat "$T/nbdkit.log")"
echo "ok: -f server refused its client and exited $rc"

# 4. Found before the fork: the container cannot be created there. nbdkit
# stops at once; the --run command never starts.
rc=0
timeout 60 "${NBDKIT_ENV[@]}" nbdkit -U - --filter="$FILTER" memory 64M \
  cbt-file="$T/nodir/x.cbt" cbt-bitmap=b0 cbt-create=true --run "touch '$T/ran'" \
  2>"$T/err" || rc=$?
[ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "missing directory: exit status $rc"
[ ! -e "$T/ran" ] || fail "the --run command started although the container cannot be created"
grep -q "cbt-file=$T/nodir/x.cbt: cannot create it" "$T/err" || fail "got: $(cat "$T/err")"
echo "ok: $(head -1 "$T/err")"
echo "OK: late errors stop the server non-zero, --run never hangs"
