#!/usr/bin/env bash
# cbt --socket PATH (docs/cli.md): every verb of the cbt tool against a real
# nbdkit running the filter with cbt-control=PATH, judged by QEMU after a
# clean stop.
#  - info / map / bitmap (--add [-g] [--disabled] [--transient], --remove,
#    --clear, --enable, --disable, --merge, --persistent, --transient) and
#    checkpoint, with writes from qemu-io over NBD in between; several
#    operations in one call are one transaction: a failing one changes nothing.
#  - after a persist, `cbt info --socket` JSON = offline `cbt info -U` JSON on
#    every field both know;
#  - after SIGTERM (exit 0): qemu-img info's bitmap names, granularities and
#    flags are what the socket said (the transient bitmap gone), and
#    qemu-nbd -B + nbdinfo --map read exactly what `cbt map --socket`
#    reported before the stop;
#  - one-line errors, exit 1: no socket, a stale socket, a client of another
#    uid (setpriv: refused by the 0600 mode, and by SO_PEERCRED when the mode
#    is opened up), an unknown bitmap, an unknown command (the real filter's
#    reply), FILE with --socket, -b with --socket, --transient offline.
source "$(dirname "$0")/lib.sh"
[ -x "$CBT" ] || fail "cbt not built: $CBT"
need qemu-io python3 setpriv stat

# cbt_ok ARGS... : cbt must exit 0; stdout in $T/out.
cbt_ok() {
  local rc=0
  "$CBT" "$@" >"$T/out" 2>"$T/err" || rc=$?
  [ "$rc" = 0 ] || fail "cbt $* exited $rc: $(cat "$T/err")"
}
# cbt_err WANT ARGS... : cbt must exit WANT with exactly one stderr line
# starting "cbt", left in $ERR.
cbt_err() {
  local want=$1 rc=0; shift
  "$CBT" "$@" >"$T/out" 2>"$T/err" || rc=$?
  [ "$rc" = "$want" ] || fail "cbt $* exited $rc, want $want: $(cat "$T/err")"
  [ "$(wc -l <"$T/err")" = 1 ] || fail "cbt $*: want one stderr line, got: $(cat "$T/err")"
  ERR=$(cat "$T/err")
  case "$ERR" in cbt*) ;; *) fail "cbt $*: stderr does not start with 'cbt': $ERR" ;; esac
}
expect_in() {
  local text=$1 n; shift
  for n in "$@"; do
    case "$text" in *"$n"*) ;; *) fail "'$n' missing from: $text" ;; esac
  done
}
# ctl JSON : one raw request line to the filter, prints the reply (bounded).
ctl() { ctl_call "$CTL" "$1"; }
# live FIELD BITMAP : a field of the bitmap in `cbt info --socket --output=json`.
live() {
  "$CBT" info --socket "$CTL" --output=json |
    jq -c --arg n "$2" "[.bitmaps[] | select(.name == \$n)] | if length == 0 then \"absent\" else .[0].\"$1\" end"
}
# smap BITMAP : `cbt map --socket`, compact.
smap() { "$CBT" map --socket "$CTL" --bitmap "$1" --output=json | jq -c .; }
# write OFFSET LENGTH : one write over NBD, completed (qemu-io flushes and
# disconnects at exit).
write() {
  timeout 60 qemu-io -f raw -c "write $1 $2" "$URI" >"$T/qio.out" 2>&1 ||
    fail "qemu-io write $1 $2: $(cat "$T/qio.out")"
}

truncate -s 64M "$T/disk.raw"
URI="nbd+unix:///?socket=$T/sock"
CTL="$T/ctl.sock"

# --- errors without a server ------------------------------------------------
cbt_err 1 info --socket "$T/none.sock"
expect_in "$ERR" "no control socket at '$T/none.sock'" "cbt-control=$T/none.sock"
python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' "$T/stale.sock"
[ -S "$T/stale.sock" ] || fail "no stale socket made"
cbt_err 1 map --socket "$T/stale.sock" --bitmap b0
expect_in "$ERR" "'$T/stale.sock': no server is listening on it"
cbt_err 1 info "$T/disk.cbt" --socket "$CTL"
expect_in "$ERR" "cbt info: FILE and --socket PATH together"
cbt_err 1 map "$T/disk.cbt" --socket "$CTL" --bitmap b0
expect_in "$ERR" "cbt map: FILE and --socket PATH together"
cbt_err 1 bitmap "$T/disk.cbt" b0 --socket "$CTL" --clear
expect_in "$ERR" "cbt bitmap: FILE and --socket PATH together"
cbt_err 1 bitmap --socket "$CTL" b1 --merge b0 -b "$T/other.qcow2"
expect_in "$ERR" "-b SRCFILE cannot be used with --socket"
cbt_err 1 bitmap "$T/disk.cbt" b1 --add --transient
expect_in "$ERR" "need --socket PATH"
cbt_err 1 checkpoint --freeze b0 --new b1
expect_in "$ERR" "cbt checkpoint: missing --socket PATH"
cbt_err 1 info --socket "$CTL" -U
expect_in "$ERR" "-U applies to FILE"
echo "ok: errors without a server"

# --- served -----------------------------------------------------------------
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" \
  cbt-bitmap=b0 cbt-create=true cbt-control="$CTL"
wait_for 30 [ -S "$CTL" ] || fail "no control socket at $CTL"


# Granularity 64K: granules 0; 16,17 -> 196608 dirty bytes.
write 0 64k
write 1M 100k
cbt_ok info --socket "$CTL" --output=json
jq -e --arg c "$CTL" '.socket == $c and .attached == true and ."virtual-size" == 67108864 and
  ."data-file" == null and .format == "qcow2" and (.bitmaps | length) == 1 and
  (.bitmaps[0] | .name == "b0" and .granularity == 65536 and .enabled == true and
   .persistent == true and .consistent == true and ."dirty-bytes" == 196608)' "$T/out" >/dev/null ||
  fail "info --socket: $(cat "$T/out")"
cbt_ok info --socket "$CTL"
expect_in "$(cat "$T/out")" "socket: $CTL" "virtual size: 64 MiB (67108864 bytes)" "b0" \
  "192 KiB" "enabled"
cbt_ok map --socket "$CTL" --bitmap b0
expect_in "$(cat "$T/out")" "0x0                 0x10000             yes" \
  "0x100000            0x20000             yes" "192 KiB dirty in 2 extents (of 64 MiB from 0x0)"
[ "$(smap b0)" = '[{"start":0,"length":65536,"dirty":true},{"start":65536,"length":983040,"dirty":false},{"start":1048576,"length":131072,"dirty":true},{"start":1179648,"length":65929216,"dirty":false}]' ] ||
  fail "map --socket b0: $(smap b0)"
# A range, clipped at the end of the disk, as offline.
[ "$("$CBT" map --socket "$CTL" --bitmap b0 --offset 1M --length 1G --output=json | jq -c .)" = \
  '[{"start":1048576,"length":131072,"dirty":true},{"start":1179648,"length":65929216,"dirty":false}]' ] ||
  fail "map --socket --offset 1M --length 1G"

# add (-g, --transient), then a write lands in every recording bitmap.
cbt_ok bitmap --socket "$CTL" b1 --add -g 1M --output=json
jq -e --arg c "$CTL" '.socket == $c and .bitmap == "b1" and .operations == ["--add"] and
  .result == {"name": "b1", "granularity": 1048576, "flags": ["auto"], "enabled": true,
              "consistent": true, "persistent": true}' "$T/out" >/dev/null ||
  fail "bitmap --add -g 1M: $(cat "$T/out")"
cbt_ok bitmap --socket "$CTL" t1 --add --transient
expect_in "$(cat "$T/out")" "bitmap 't1' added: granularity 65536, enabled, transient"
[ "$(live persistent t1)" = false ] || fail "t1 is not transient"
write 8M 4k
[ "$(live dirty-bytes b1)" = 1048576 ] || fail "b1 after one write: $(live dirty-bytes b1)"
[ "$(live dirty-bytes t1)" = 65536 ] || fail "t1 after one write: $(live dirty-bytes t1)"
[ "$(live dirty-bytes b0)" = $((196608 + 65536)) ] || fail "b0: $(live dirty-bytes b0)"

# --disable freezes; --enable resumes.
cbt_ok bitmap --socket "$CTL" b1 --disable
expect_in "$(cat "$T/out")" "bitmap 'b1' disabled: granularity 1048576, disabled"
write 20M 4k
[ "$(live dirty-bytes b1)" = 1048576 ] || fail "disabled b1 recorded a write"
cbt_ok bitmap --socket "$CTL" b1 --enable
[ "$(live enabled b1)" = true ] || fail "b1 not enabled again"

# Several operations: one transaction. A failing one changes nothing...
cbt_err 1 bitmap --socket "$CTL" b2 --add --merge nope
expect_in "$ERR" "(nothing was changed)"
[ "$(live name b2)" = '"absent"' ] || fail "a failed transaction left b2 behind"
before=$("$CBT" info --socket "$CTL" --output=json | jq -c .bitmaps)
cbt_err 1 bitmap --socket "$CTL" b0 --clear --disable --add
[ "$("$CBT" info --socket "$CTL" --output=json | jq -c .bitmaps)" = "$before" ] ||
  fail "a failed transaction (clear, disable, add existing) changed something"
# ... and a good one does all (b2 := disabled copy of b0).
cbt_ok bitmap --socket "$CTL" b2 --add --disabled --merge b0 --output=json
jq -e '.operations == ["--add", "--merge b0"] and .result.enabled == false' "$T/out" >/dev/null ||
  fail "bitmap b2 --add --disabled --merge b0: $(cat "$T/out")"
[ "$(smap b2)" = "$(smap b0)" ] || fail "b2 is not a copy of b0"

# --clear, --remove, --persistent / --transient.
cbt_ok bitmap --socket "$CTL" t1 --clear
[ "$(live dirty-bytes t1)" = 0 ] || fail "t1 not cleared"
cbt_ok bitmap --socket "$CTL" t1 --persistent
[ "$(live persistent t1)" = true ] || fail "t1 not persistent"
cbt_ok bitmap --socket "$CTL" b1 --transient --output=json
jq -e '.result.persistent == false' "$T/out" >/dev/null || fail "b1 --transient: $(cat "$T/out")"
cbt_ok bitmap --socket "$CTL" b1 --persistent
cbt_ok bitmap --socket "$CTL" gone --add
cbt_ok bitmap --socket "$CTL" gone --remove --output=json
jq -e '.result == null' "$T/out" >/dev/null || fail "--remove: $(cat "$T/out")"
cbt_ok bitmap --socket "$CTL" tx --add --transient --disabled
[ "$(live persistent tx)" = false ] && [ "$(live enabled tx)" = false ] ||
  fail "tx: --add --transient --disabled"

# checkpoint: b0 frozen, b3 starts empty and gets what comes next.
cbt_ok checkpoint --socket "$CTL" --freeze b0 --new b3 --output=json
jq -e '.frozen.name == "b0" and .frozen.enabled == false and
  (."frozen"."dirty-bytes" | type) == "number" and ."frozen"."dirty-bytes" > 0 and .new.name == "b3" and
  .new.enabled == true and .new.granularity == 65536' "$T/out" >/dev/null ||
  fail "checkpoint: $(cat "$T/out")"
b0_before=$(smap b0)
write 30M 4k
[ "$(smap b0)" = "$b0_before" ] || fail "frozen b0 recorded a write"
[ "$(live dirty-bytes b3)" = 65536 ] || fail "b3 after one write: $(live dirty-bytes b3)"
cbt_err 1 checkpoint --socket "$CTL" --freeze b0 --new b4
expect_in "$ERR" "(nothing was changed)"
[ "$(live name b4)" = '"absent"' ] || fail "a refused checkpoint added b4"
echo "ok: every verb over the socket"

# --- errors from a live server ----------------------------------------------
cbt_err 1 bitmap --socket "$CTL" nope --clear
expect_in "$ERR" "nope" "list bitmaps with 'cbt info --socket $CTL'"
cbt_err 1 map --socket "$CTL" --bitmap nope
expect_in "$ERR" "nope"
cbt_err 1 bitmap --socket "$CTL" b0 --frobnicate
expect_in "$ERR" "cbt bitmap: "
r=$(ctl '{"execute":"no-such-command","id":5}')
[ "$(jq -c . <<<"$r")" = \
  '{"error":{"class":"InvalidArgument","desc":"execute: unknown command '"'"'no-such-command'"'"'"},"id":5}' ] ||
  fail "unknown command: $r"
# Another uid: nobody may search $T, but the 0600 socket refuses it; opened
# up, the server's SO_PEERCRED check does (one PermissionDenied line, EOF).
# Needs root to run a client as uid 65534 (the server runs as root).
if [ "$(id -u)" != 0 ]; then
  echo "note: not root: the other-uid checks are not run"
else
  chmod 0711 "$T"
  nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups)
  "${nobody[@]}" "$CBT" --version >/dev/null 2>&1 ||
    { cp "$CBT" "$T/cbt" && chmod 0755 "$T/cbt" && CBT_NOBODY="$T/cbt"; }
  CBT_NOBODY=${CBT_NOBODY:-$CBT}
  rc=0; "${nobody[@]}" "$CBT_NOBODY" info --socket "$CTL" >"$T/out" 2>"$T/err" || rc=$?
  [ "$rc" = 1 ] && [ "$(wc -l <"$T/err")" = 1 ] || fail "nobody, mode 0600: rc $rc: $(cat "$T/err")"
  expect_in "$(cat "$T/err")" "cbt: control socket '$CTL': permission denied"
  chmod 0666 "$CTL"
  rc=0; "${nobody[@]}" "$CBT_NOBODY" info --socket "$CTL" >"$T/out" 2>"$T/err" || rc=$?
  chmod 0600 "$CTL"
  [ "$rc" = 1 ] && [ "$(wc -l <"$T/err")" = 1 ] || fail "nobody, mode 0666: rc $rc: $(cat "$T/err")"
  [ "$(cat "$T/err")" = "cbt: control socket: peer uid 65534 is neither the server's nor root" ] ||
    fail "nobody, mode 0666: $(cat "$T/err")"
  chmod 0700 "$T"
fi
echo "ok: one-line errors"

# --- the live view = the stored one after a persist ---------------------------
r=$(ctl '{"execute":"persist","id":1}')
[ "$(jq -c . <<<"$r")" = '{"id":1,"return":{}}' ] || fail "persist: $r"
common='{format, "virtual-size", "cluster-size", "data-file",
         bitmaps: ([.bitmaps[] | select(.persistent) | del(."disk-identity", ."disk-identity-error")] | sort_by(.name))}'
online=$("$CBT" info --socket "$CTL" --output=json | jq -c "$common")
offline=$("$CBT" info -U --output=json "$T/disk.cbt" | jq -c "$common")
[ "$online" = "$offline" ] || { echo "online:  $online" >&2; echo "offline: $offline" >&2;
  fail "cbt info --socket differs from offline cbt info after a persist"; }
container=$("$CBT" info --socket "$CTL" --output=json | jq -r .filename)
[ "$(readlink -f "$container")" = "$(readlink -f "$T/disk.cbt")" ] ||
  fail "info --socket filename $container is not the container $T/disk.cbt"

# --- clean stop; QEMU judges the container ----------------------------------
for b in b0 b1 b2 b3; do smap "$b" | merge_runs >"$T/live-$b.json"; done
want_bitmaps=$("$CBT" info --socket "$CTL" --output=json |
  jq -c '[.bitmaps[] | select(.persistent) | {name, granularity, flags}] | sort_by(.name)')
kill -TERM "$NBDKIT_PID"
for i in $(seq 300); do kill -0 "$NBDKIT_PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$NBDKIT_PID" 2>/dev/null && fail "nbdkit did not stop within 30 s of SIGTERM"
rc=0; wait "$NBDKIT_PID" || rc=$?
[ "$rc" -eq 0 ] || fail "nbdkit exited $rc after SIGTERM"
[ ! -e "$CTL" ] || fail "control socket left after a clean stop"

got_bitmaps=$(qemu-img info --output=json "$T/disk.cbt" |
  jq -c '[."format-specific".data.bitmaps[] | {name, granularity, flags}] | sort_by(.name)')
[ "$got_bitmaps" = "$want_bitmaps" ] ||
  fail "qemu-img info: $got_bitmaps; the socket said $want_bitmaps"
[ "$(jq -c 'map(.name)' <<<"$got_bitmaps")" = '["b0","b1","b2","b3","t1"]' ] ||
  fail "stored bitmaps: $got_bitmaps (the transient tx must be gone)"
for b in b0 b1 b2 b3; do
  q=$(qemu_map "$T/disk.cbt" "$b")
  [ "$q" = "$(cat "$T/live-$b.json")" ] ||
    fail "qemu-nbd -B $b reads $q; cbt map --socket said $(cat "$T/live-$b.json")"
done
echo "OK: cbt --socket: info/map/bitmap/checkpoint live, = offline after persist, = QEMU after stop"
