#!/usr/bin/env bash
# cbt-control=PATH (docs/control.md): the control socket of a running filter.
# Before any client: "attached": false. Writes through qemu-io over NBD, then
# over the socket: query-bitmaps' dirty-bytes is what the writes imply (and,
# after a clean stop, what qemu-nbd -B reads), in-use is set while the
# writer is connected and `persist` clears it (in the reply and in qemu-img's
# flags), query-stats counts the persist; an edit before any client is Busy;
# a checkpoint while the writer stays connected freezes b0 and starts b1, as
# QEMU reads the container after the stop. The socket is mode 0600 and gone after a clean stop. A
# regular file (or a missing directory) at PATH: nbdkit refuses to start,
# naming the parameter, and the file is left intact; a second server on the
# live socket is refused before its fork (also as a daemon) and the first
# keeps serving.
source "$(dirname "$0")/lib.sh"
need python3 qemu-io stat

# ctl SOCKET JSON : one request line, prints the reply line (bounded).
ctl() { ctl_call "$1" "$2"; }
# dirty_bytes_is N : query-bitmaps reports N dirty bytes for b0.
dirty_bytes_is() {
  [ "$(ctl "$T/ctl" '{"execute":"query-bitmaps"}' |
       jq '.return.bitmaps[] | select(.name == "b0") | ."dirty-bytes"')" = "$1" ]
}

truncate -s 64M "$T/disk.raw"
URI="nbd+unix:///?socket=$T/sock"

# --- refused before the fork: a regular file, a missing directory ---------
echo "keep me" >"$T/ctl"
rc=0
"${NBDKIT_ENV[@]}" timeout 60 nbdkit -f -U "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$T/ctl" \
  2>"$T/refused.log" || rc=$?
[ "$rc" -ne 0 ] || fail "nbdkit started with a regular file at cbt-control"
[ "$rc" -ne 124 ] || fail "nbdkit with a regular file at cbt-control did not exit"
grep -q "cbt-control=$T/ctl: .*not a socket" "$T/refused.log" ||
  fail "refusal does not name cbt-control and the cause: $(cat "$T/refused.log")"
[ "$(cat "$T/ctl")" = "keep me" ] || fail "the regular file at cbt-control was changed"
[ ! -e "$T/disk.cbt" ] || fail "a refused start created the container"
rm "$T/ctl"

rc=0
"${NBDKIT_ENV[@]}" timeout 60 nbdkit -f -U "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$T/nodir/ctl" \
  2>"$T/refused2.log" || rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "nbdkit did not refuse cbt-control in a missing dir ($rc)"
grep -q "cbt-control=$T/nodir/ctl: " "$T/refused2.log" ||
  fail "refusal does not name cbt-control: $(cat "$T/refused2.log")"

# --- served ---------------------------------------------------------------
# Not start_nbdkit: its handshake would attach the tracker before the
# "attached": false check.
"${NBDKIT_ENV[@]}" nbdkit -f --exit-with-parent -U "$T/sock" -P "$T/sock.pid" \
  --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$T/ctl" \
  2>>"$T/nbdkit.log" &
NBDKIT_PID=$!
PIDS+=("$NBDKIT_PID")
wait_for 60 [ -S "$T/ctl" ] || fail "no control socket at $T/ctl"
[ "$(stat -c %a "$T/ctl")" = 600 ] || fail "control socket mode $(stat -c %a "$T/ctl"), want 600"

r=$(ctl "$T/ctl" '{"execute":"query-bitmaps","id":1}')
jq -e --arg c "$T/disk.cbt" '.id == 1 and .return.attached == false and
  .return.bitmaps == [] and .return."disk-size" == 0 and .return.container == $c' \
  <<<"$r" >/dev/null || fail "query-bitmaps before any client: $r"
r=$(ctl "$T/ctl" '{"execute":"persist","id":2}')
[ "$(jq -c . <<<"$r")" = '{"id":2,"return":{}}' ] || fail "persist before any client: $r"

r=$(ctl "$T/ctl" '{"execute":"bitmap-add","arguments":{"name":"x"},"id":3}')
jq -e '.id == 3 and .error.class == "Busy" and
  (.error.desc | test("first writable client"))' <<<"$r" >/dev/null ||
  fail "an edit before any writable client: $r"

# A second server on the live PATH is refused before it forks: run as a
# daemon (no -f), as users do, it still reports the error and exits
# non-zero; the first keeps serving.
truncate -s 64M "$T/other.raw"
rc=0
"${NBDKIT_ENV[@]}" timeout 60 nbdkit -U "$T/sock2" -P "$T/sock2.pid" --filter="$FILTER" \
  file "$T/other.raw" cbt-file="$T/other.cbt" cbt-bitmap=b0 cbt-create=true \
  cbt-control="$T/ctl" 2>"$T/busy.log" || rc=$?
if [ -s "$T/sock2.pid" ]; then
  kill "$(cat "$T/sock2.pid")" 2>/dev/null
  fail "a second server on a live cbt-control daemonised (pid file written)"
fi
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "a second server on a live cbt-control: rc $rc"
grep -q "cbt-control=$T/ctl: .*a server is listening on it" "$T/busy.log" ||
  fail "second server's refusal: $(cat "$T/busy.log")"
r=$(ctl "$T/ctl" '{"execute":"query-stats","id":9}')
jq -e '.id == 9 and .return.attached == false' <<<"$r" >/dev/null ||
  fail "the first server's socket after a second server was refused: $r"

# qemu-io reads its commands from a fifo and stays connected (no flush, no
# disconnect) until told to quit. It runs one line per read of its stdin, so
# each command is sent once the one before has completed. Granularity 64K:
# the writes touch granules 0; 16,17; 31,32; 160 = 6 granules.
mkfifo "$T/qio.in"
qemu-io -f raw "$URI" <"$T/qio.in" >"$T/qio.out" 2>&1 &
qio=$!; PIDS+=("$qio")
exec 3>"$T/qio.in"
for w in "0 64k 0" "1M 100k 1048576" "2047k 2k 2096128" "10M 1 10485760"; do
  set -- $w
  echo "write $1 $2" >&3
  wait_for 60 grep -qE "bytes at offset $3\$" "$T/qio.out" ||
    fail "qemu-io did not complete 'write $1 $2': $(cat "$T/qio.out")"
done
want=$((6 * 65536))
wait_for 60 dirty_bytes_is "$want" ||
  fail "dirty-bytes never reached $want: $(ctl "$T/ctl" '{"execute":"query-bitmaps"}')"

r=$(ctl "$T/ctl" '{"execute":"query-bitmaps","id":"q"}')
jq -e --argjson w "$want" '.id == "q" and .return.attached == true and
  (.return.bitmaps | length) == 1 and
  (.return.bitmaps[0] | .name == "b0" and .granularity == 65536 and .recording == true and
   .persistent == true and ."in-use" == true and ."dirty-bytes" == $w)' <<<"$r" >/dev/null ||
  fail "query-bitmaps while the writer is connected: $r"
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["in-use","auto"]' ] ||
  fail "expected in-use on disk before persist, got $(bitmap_flags "$T/disk.cbt" b0)"
persists_before=$(ctl "$T/ctl" '{"execute":"query-stats"}' | jq '.return.persists')

r=$(ctl "$T/ctl" '{"execute":"persist","id":4}')
[ "$(jq -c . <<<"$r")" = '{"id":4,"return":{}}' ] || fail "persist: $r"
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '["auto"]' ] ||
  fail "in-use on disk after persist: $(bitmap_flags "$T/disk.cbt" b0)"
r=$(ctl "$T/ctl" '{"execute":"query-bitmaps"}')
jq -e --argjson w "$want" '.return.bitmaps[0] | ."in-use" == false and ."dirty-bytes" == $w' \
  <<<"$r" >/dev/null || fail "query-bitmaps after persist: $r"
r=$(ctl "$T/ctl" '{"execute":"query-stats","id":5}')
jq -e --argjson p "$persists_before" '.id == 5 and .return.attached == true and
  .return.persists == $p + 1 and .return."bytes-written" > 0 and .return."in-use-sets" >= 1 and
  (.return | has("intent-writes") and has("recovered-granules"))' <<<"$r" >/dev/null ||
  fail "query-stats after persist (persists before: $persists_before): $r"

# Online: a checkpoint freezes b0 and starts b1 while the writer stays
# connected; the next write (granule 320) lands in b1 only.
r=$(ctl "$T/ctl" '{"execute":"checkpoint","arguments":{"freeze":"b0","new":"b1"},"id":6}')
[ "$(jq -c . <<<"$r")" = '{"id":6,"return":{}}' ] || fail "checkpoint: $r"
echo "write 20M 4k" >&3
wait_for 60 grep -qE "bytes at offset 20971520\$" "$T/qio.out" ||
  fail "qemu-io did not complete 'write 20M 4k': $(cat "$T/qio.out")"
r=$(ctl "$T/ctl" '{"execute":"query-bitmaps"}')
jq -e --argjson w "$want" '[.return.bitmaps[] | [.name, .recording, ."dirty-bytes"]] ==
  [["b0", false, $w], ["b1", true, 65536]]' <<<"$r" >/dev/null ||
  fail "query-bitmaps after the checkpoint: $r"
r=$(ctl "$T/ctl" '{"execute":"bitmap-remove","arguments":{"name":"nope"},"id":7}')
jq -e '.id == 7 and .error.class == "NotFound"' <<<"$r" >/dev/null || fail "remove nope: $r"

echo quit >&3
exec 3>&-
wait "$qio" || fail "qemu-io failed: $(cat "$T/qio.out")"
grep -qi "error\|fail" "$T/qio.out" && fail "qemu-io reported: $(cat "$T/qio.out")"

# A clean stop exits 0 and removes the socket.
kill -TERM "$NBDKIT_PID"
for i in $(seq 300); do kill -0 "$NBDKIT_PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$NBDKIT_PID" 2>/dev/null && fail "nbdkit did not stop within 30 s of SIGTERM"
rc=0; wait "$NBDKIT_PID" || rc=$?
[ "$rc" -eq 0 ] || fail "nbdkit exited $rc after SIGTERM"
[ ! -e "$T/ctl" ] || fail "control socket left after a clean stop"

# What QEMU reads from the container agrees with what the socket said.
got=$(qemu_map "$T/disk.cbt" b0 | jq '[.[] | select(.dirty) | .length] | add')
[ "$got" = "$want" ] || fail "qemu-nbd -B reads $got dirty bytes, the control socket said $want"
got=$(qemu_map "$T/disk.cbt" b1 | jq -c '[.[] | select(.dirty) | [.start, .length]]')
[ "$got" = '[[20971520,65536]]' ] || fail "qemu-nbd -B reads b1's dirty extents as $got"
[ "$(bitmap_flags "$T/disk.cbt" b0)" = '[]' ] ||
  fail "frozen b0 flags after stop: $(bitmap_flags "$T/disk.cbt" b0)"
[ "$(bitmap_flags "$T/disk.cbt" b1)" = '["auto"]' ] ||
  fail "b1 flags after stop: $(bitmap_flags "$T/disk.cbt" b1)"
echo "OK: control socket: attached false, edits Busy before a client, dirty-bytes $want =" \
  "qemu's, persist clears in-use, checkpoint b0 -> b1 as qemu reads it, mode 0600," \
  "removed at stop, regular file refused and kept"
