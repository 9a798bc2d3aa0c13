#!/usr/bin/env bash
# cbt-persist-threshold=SIZE and cbt-persist-idle=MS with a client that stays
# connected and never flushes (nbd_ops h:FILE holds the connection): the
# bitmap reaches the container when, and only when, the trigger fires.
# Bad values are refused at start-up; --help lists both.
source "$(dirname "$0")/lib.sh"

M2=$((2 * 1024 * 1024))
truncate -s 64M "$T/disk.raw"
# 512-byte granules and clusters: one 512-byte cluster of bitmap data covers
# 2 MiB of disk, so writes 2 MiB apart each add 512 bytes of pending bitmap
# data (what the threshold measures).
common=(--filter="$FILTER" file "$T/disk.raw" cbt-bitmap=b0 cbt-create=true
        cbt-granularity=512 cbt-cluster-size=512)

# b0_state FILE : b0's "in-use dirty-bytes" as cbt info reads the file beside
# the server, e.g. "true null" (unpersisted changes) or "false 16384".
b0_state() {
  "$CBT" info -U --output=json "$1" |
    jq -r '.bitmaps[] | select(.name == "b0") | "\(."in-use") \(."dirty-bytes")"'
}
state_is() { [ "$(b0_state "$1" 2>/dev/null)" = "$2" ]; }

# --- threshold (idle off): 3 clusters pending stay in memory, the 4th fires.
start_nbdkit "$T/sock" -v "${common[@]}" cbt-file="$T/t.cbt" cbt-persist-threshold=2K
"$NBD_OPS" "$T/sock" w:0:4096 w:$M2:4096 w:$((2 * M2)):4096 h:"$T/h1" \
  w:$((3 * M2)):4096 h:"$T/h2" >"$T/ops1.log" 2>&1 &
ops=$!; PIDS+=("$ops")
wait_for 30 [ -e "$T/h1" ] || fail "client did not write within 30 s"
# 1536 bytes pending < 2K. The trigger polls every 50 ms: let it look ~20
# times; had it fired, in-use would be clear and dirty-bytes known.
sleep 1
[ "$(b0_state "$T/t.cbt")" = "true null" ] ||
  fail "below-threshold changes were persisted: $(b0_state "$T/t.cbt")"
grep -q "persist done" "$T/nbdkit.log" && fail "a persist ran below the threshold"
rm "$T/h1"  # the fourth cluster: 2048 bytes pending
wait_for 30 state_is "$T/t.cbt" "false 16384" ||
  fail "threshold persist not on disk within 30 s: $(b0_state "$T/t.cbt")"
grep -q "threshold persist done (2048 bytes" "$T/nbdkit.log" || fail "no threshold persist logged"
rm "$T/h2"
wait "$ops" || fail "client failed: $(cat "$T/ops1.log")"
stop_nbdkit "$NBDKIT_PID"
echo "ok: threshold: 1536 bytes pending stayed in memory, 2048 persisted 16384 dirty bytes"

# --- idle (threshold off): persisted once writes stop; kill -9 afterwards
# loses nothing (QEMU reads exactly the write).
: >"$T/nbdkit.log"
start_nbdkit "$T/sock" -v "${common[@]}" cbt-file="$T/i.cbt" cbt-persist-idle=300
"$NBD_OPS" "$T/sock" w:$((5 * M2)):8192 h:"$T/h3" >"$T/ops2.log" 2>&1 &
ops=$!; PIDS+=("$ops")
wait_for 30 [ -e "$T/h3" ] || fail "client did not write within 30 s"
wait_for 30 state_is "$T/i.cbt" "false 8192" ||
  fail "idle persist not on disk within 30 s: $(b0_state "$T/i.cbt")"
grep -q "idle persist done" "$T/nbdkit.log" || fail "no idle persist logged"
kill9_nbdkit "$NBDKIT_PID"  # the client is still connected
rm "$T/h3"
rc=0; wait "$ops" || rc=$?  # its server is gone: the status is not the point
expected='[{"start":0,"length":10485760,"dirty":false},{"start":10485760,"length":8192,"dirty":true},{"start":10493952,"length":56614912,"dirty":false}]'
[ "$(qemu_map "$T/i.cbt" b0)" = "$expected" ] || fail "map differs: $(qemu_map "$T/i.cbt" b0)"
echo "ok: idle: persisted after the quiet period; exact after kill -9 (client exit $rc)"

# --- all three explicitly 0 (off): nothing persists while the client holds;
# its disconnect does.
: >"$T/nbdkit.log"
start_nbdkit "$T/sock" -v "${common[@]}" cbt-file="$T/o.cbt" cbt-persist-interval=0 \
  cbt-persist-threshold=0 cbt-persist-idle=0
"$NBD_OPS" "$T/sock" w:0:4096 w:$((9 * M2)):4096 h:"$T/h4" >"$T/ops3.log" 2>&1 &
ops=$!; PIDS+=("$ops")
wait_for 30 [ -e "$T/h4" ] || fail "client did not write within 30 s"
sleep 1
[ "$(b0_state "$T/o.cbt")" = "true null" ] || fail "persisted with every trigger off: $(b0_state "$T/o.cbt")"
rm "$T/h4"
wait "$ops" || fail "client failed: $(cat "$T/ops3.log")"
wait_for 30 state_is "$T/o.cbt" "false 8192" ||
  fail "disconnect did not persist within 30 s: $(b0_state "$T/o.cbt")"
grep -q "persist done" "$T/nbdkit.log" && fail "a trigger persisted with every trigger off"
stop_nbdkit "$NBDKIT_PID"
echo "ok: all triggers 0: unpersisted while connected, persisted at disconnect"

# --- bad values refused at start-up, naming the parameter.
refused() {
  local pattern=$1; shift
  local rc=0
  timeout 20 "${NBDKIT_ENV[@]}" nbdkit -f -U "$T/bad.sock" "${common[@]}" \
    cbt-file="$T/bad.cbt" "$@" 2>"$T/err" || rc=$?
  [ $rc -ne 0 ] || fail "nbdkit exited 0: $*"
  [ $rc -ne 124 ] || fail "nbdkit accepted (still serving after 20 s): $*"
  grep -q -- "$pattern" "$T/err" || fail "expected '$pattern', got: $(cat "$T/err")"
  [ ! -e "$T/bad.cbt" ] || fail "a container was created by: $*"
}
refused "cbt-persist-threshold=abc: must be a size" cbt-persist-threshold=abc
refused "cbt-persist-threshold=-1: must be a size" cbt-persist-threshold=-1
refused "cbt-persist-threshold=: must be a size" cbt-persist-threshold=
refused "cbt-persist-threshold=1Q: must be a size" cbt-persist-threshold=1Q
refused "cbt-persist-idle=soon: must be a number of milliseconds" cbt-persist-idle=soon
refused "cbt-persist-idle=-5: must be a number of milliseconds" cbt-persist-idle=-5
refused "cbt-persist-idle=: must be a number of milliseconds" cbt-persist-idle=
refused "cbt-persist-idle=1.5: must be a number of milliseconds" cbt-persist-idle=1.5
echo "ok: bad values refused"

help=$("${NBDKIT_ENV[@]}" nbdkit --filter="$FILTER" file --help)
for p in cbt-persist-interval=SEC cbt-persist-threshold=SIZE cbt-persist-idle=MS; do
  [[ "$help" == *"$p"* ]] || fail "--help does not list $p"
done
echo "OK: persist triggers: threshold, idle, all off, bad values, --help"
