#!/usr/bin/env bash
# Many disks in one server (issue 12): nbdkit's file plugin in dir= mode
# serves three raw disks of different sizes as three exports; the filter
# with a per-export container template (cbt-file=DIR/%e.cbt) tracks each on
# its own. Checked:
#  - every export gets its own container, sized to its disk, named by the
#    export (encoded: "c d.img" -> c%20d.img.cbt), qemu-img check clean;
#  - each disk's bitmap holds exactly its own writes, as QEMU reads it
#    (qemu-nbd -B b0 + nbdinfo --map);
#  - the control socket addresses a disk by export (query-exports; an
#    un-addressed request on a server tracking several is refused; cbt
#    --socket --export; a bitmap added to one disk only);
#  - a backup session per disk: its view is "backup/EXPORT", and reads that
#    disk's point-in-time data while the disk takes writes;
#  - kill -9 while two disks are written: each recovers a superset of its
#    own writes, and only its own;
#  - cbt exports --socket (human, json): the exports as clients connect,
#    and the one export of a one-container server (read-only, then writable);
#  - refusals: a bad template at start; the empty export name; a container
#    of another size (the control socket then names that refusal).
source "$(dirname "$0")/lib.sh"

D="$T/disks"
mkdir -p "$D" "$T/bm"
truncate -s 64M "$D/a.img"
truncate -s 32M "$D/b.img"
truncate -s 16M "$D/c d.img"
CTL="$T/ctl"
URI_SOCK="$T/sock"
uri() { echo "nbd+unix:///$1?socket=$URI_SOCK"; }
qio() {  # qio EXPORT CMD : one qemu-io command on that export
  timeout 60 qemu-io -f raw -c "$2" "$(uri "$1")" >"$T/qio.out" 2>&1 ||
    fail "qemu-io $1 $2: $(cat "$T/qio.out")"
}
start() {
  START_EXPORT=a.img start_nbdkit "$URI_SOCK" --filter="$FILTER" file dir="$D" \
    cbt-file="$T/bm/%e.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$CTL" "$@"
}
# map_of FILE : bitmap b0 of container FILE as QEMU reads it
map_of() { qemu_map "$1" b0; }
# expect_map FILE SIZE START LEN : b0 is dirty exactly on [START, START+LEN)
expect_map() {
  local want got
  want=$(jq -nc --argjson s "$3" --argjson l "$4" --argjson z "$2" \
    '[if $s > 0 then {start: 0, length: $s, dirty: false} else empty end,
      {start: $s, length: $l, dirty: true},
      if $s + $l < $z then {start: ($s + $l), length: ($z - $s - $l), dirty: false} else empty end]')
  got=$(map_of "$1")
  [ "$got" = "$want" ] || fail "$(basename "$1"): map $got, want $want"
}

# --- three disks, three containers -------------------------------------------
start
# cbt exports: only what a client connected to (the start probe's a.img).
"$CBT" exports --socket "$CTL" --output=json >"$T/out" || fail "cbt exports"
jq -e --arg c "$T/bm/a.img.cbt" --arg s "$CTL" '.socket == $s and .exports ==
    [{"name": "a.img", "container": $c, "attached": true, "read-only": false, "disk-size": 67108864}]' \
  "$T/out" >/dev/null || fail "cbt exports after one connection: $(cat "$T/out")"
qio a.img 'write -P 1 0 4k'
qio b.img 'write -P 2 1M 4k'
qio "c%20d.img" 'write -P 3 8M 64k'
ls "$T/bm" >"$T/ls"
[ "$(cat "$T/ls")" = "$(printf '%s\n' a.img.cbt b.img.cbt 'c%20d.img.cbt')" ] ||
  fail "containers: $(cat "$T/ls")"

# The control socket: which disks, and addressing one.
ctl_call "$CTL" '{"execute":"query-exports"}' >"$T/r"
jq -e '.return.exports | length == 3' "$T/r" >/dev/null || fail "query-exports: $(cat "$T/r")"
jq -e --arg c "$T/bm/b.img.cbt" \
  '.return.exports[] | select(.name == "b.img") | .container == $c and ."disk-size" == 33554432 and .attached' \
  "$T/r" >/dev/null || fail "query-exports b.img: $(cat "$T/r")"
"$CBT" exports --socket "$CTL" --output=json >"$T/out" || fail "cbt exports --output=json"
jq -e --arg d "$T/bm" '[.exports[] | [.name, .container, .attached, ."read-only", ."disk-size"]] | sort ==
    [["a.img", "\($d)/a.img.cbt", true, false, 67108864], ["b.img", "\($d)/b.img.cbt", true, false, 33554432],
     ["c d.img", "\($d)/c%20d.img.cbt", true, false, 16777216]]' "$T/out" >/dev/null ||
  fail "cbt exports, three disks: $(cat "$T/out")"
"$CBT" exports --socket "$CTL" >"$T/out" || fail "cbt exports"
grep -qx "socket: $CTL" "$T/out" || fail "cbt exports: no socket line: $(cat "$T/out")"
grep -E '^  b\.img +32 MiB +attached +.*/bm/b\.img\.cbt$' "$T/out" >/dev/null &&
  grep -E '^  c d\.img +16 MiB +attached +.*/bm/c%20d\.img\.cbt$' "$T/out" >/dev/null &&
  [ "$(grep -c ' attached ' "$T/out")" = 3 ] || fail "cbt exports, human: $(cat "$T/out")"
rc=0; "$CBT" exports "$T/bm/a.img.cbt" >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && grep -q "running filter only" "$T/err" || fail "cbt exports FILE: rc $rc $(cat "$T/err")"
ctl_call "$CTL" '{"execute":"query-bitmaps"}' >"$T/r"
jq -e '.error.class == "InvalidArgument"' "$T/r" >/dev/null || fail "unaddressed request: $(cat "$T/r")"
grep -q 'name one with \\"export\\"' "$T/r" || fail "unaddressed request, message: $(cat "$T/r")"
ctl_call "$CTL" '{"execute":"query-bitmaps","export":"nope.img"}' >"$T/r"
jq -e '.error.class == "NotFound"' "$T/r" >/dev/null || fail "unknown export: $(cat "$T/r")"
rc=0; "$CBT" info --socket "$CTL" >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && grep -q -- "--export" "$T/err" || fail "cbt info without --export: rc $rc $(cat "$T/err")"
grep -qF "list the tracked exports with 'cbt exports --socket $CTL'" "$T/err" ||
  fail "cbt info without --export does not name cbt exports: $(cat "$T/err")"
rc=0; "$CBT" info --socket "$CTL" --export nope.img >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && grep -qF "export 'nope.img' is not tracked: no client has connected to it" "$T/err" &&
  grep -qF "list the tracked exports with 'cbt exports --socket $CTL'" "$T/err" ||
  fail "cbt info --export nope.img: rc $rc $(cat "$T/err")"
"$CBT" info --socket "$CTL" --export b.img --output=json >"$T/out" || fail "cbt info --export b.img"
jq -e --arg c "$T/bm/b.img.cbt" '.filename == $c' "$T/out" >/dev/null ||
  jq -e --arg c "$T/bm/b.img.cbt" '.. | strings | select(. == $c)' "$T/out" >/dev/null ||
  fail "cbt info --export b.img names another container: $(cat "$T/out")"
"$CBT" bitmap --socket "$CTL" --export "c d.img" b1 --add || fail "bitmap add on c d.img"
"$CBT" map --socket "$CTL" --export "c d.img" --bitmap b0 --output=json >"$T/out" ||
  fail "cbt map --export"
jq -e '[.[] | select(.dirty)] == [{"start": 8388608, "length": 65536, "dirty": true}]' "$T/out" \
  >/dev/null || fail "cbt map --export 'c d.img': $(cat "$T/out")"

# A backup session on b.img: its view is backup/b.img and stays frozen.
ctl_call "$CTL" '{"execute":"backup-begin","export":"b.img","arguments":{"new":"s1"}}' >"$T/r"
jq -e '.return.export == "backup/b.img"' "$T/r" >/dev/null || fail "backup-begin: $(cat "$T/r")"
cp "$D/b.img" "$T/b.snap"
qio b.img 'write -P 9 1M 64k'
timeout 60 nbdinfo --list "$(uri "")" >"$T/list" 2>&1 || fail "nbdinfo --list: $(cat "$T/list")"
grep -q 'export="backup/b.img"' "$T/list" || fail "the view is not listed: $(cat "$T/list")"
timeout 60 qemu-img convert -f raw -O raw "$(uri backup/b.img)" "$T/b.view" ||
  fail "reading backup/b.img"
cmp "$T/b.view" "$T/b.snap" || fail "backup/b.img is not b.img at the session's start"
ctl_call "$CTL" '{"execute":"backup-end","export":"b.img"}' >"$T/r"
jq -e '.return' "$T/r" >/dev/null || fail "backup-end: $(cat "$T/r")"
rc=0; timeout 30 nbdinfo --size "$(uri backup/a.img)" >/dev/null 2>"$T/err" || rc=$?
[ "$rc" != 0 ] || fail "a view of a.img without a session was served"
stop_nbdkit "$NBDKIT_PID"

for f in a.img b.img "c%20d.img"; do
  timeout 60 qemu-img check -q "$T/bm/$f.cbt" || fail "qemu-img check $f.cbt"
done
[ "$(qemu-img info --output=json "$T/bm/b.img.cbt" | jq '."virtual-size"')" = 33554432 ] ||
  fail "b.img.cbt is not sized to b.img"
expect_map "$T/bm/a.img.cbt" 67108864 0 65536
expect_map "$T/bm/b.img.cbt" 33554432 1048576 65536
expect_map "$T/bm/c%20d.img.cbt" 16777216 8388608 65536
qemu-img info --output=json "$T/bm/c%20d.img.cbt" |
  jq -e '[."format-specific".data.bitmaps[].name] | sort == ["b0", "b1"]' >/dev/null ||
  fail "b1 is not in c d.img's container"
qemu-img info --output=json "$T/bm/a.img.cbt" |
  jq -e '[."format-specific".data.bitmaps[].name] == ["b0"]' >/dev/null ||
  fail "a.img's container gained a bitmap"
# b.img's backup checkpoint (s1) exists in its container only.
qemu-img info --output=json "$T/bm/b.img.cbt" |
  jq -e '[."format-specific".data.bitmaps[].name] | index("s1") != null' >/dev/null ||
  fail "s1 is not in b.img's container"

# --- kill -9 while two disks are written: each recovers its own ----------------
for f in a.img b.img; do "$CBT" bitmap "$T/bm/$f.cbt" b0 --clear || fail "clear $f"; done
start
# Each writer stays connected (qemu-io sleeps), so nothing is persisted by a
# disconnect: the crash finds both disks with unstored changes.
holders=()
for e in a.img:16M b.img:20M; do
  timeout 120 stdbuf -oL qemu-io -f raw -c "write -P 4 ${e#*:} 4k" -c 'sleep 60000' "$(uri "${e%%:*}")" \
    >"$T/hold.${e%%:*}" 2>&1 &
  holders+=("$!"); PIDS+=("$!")
done
for e in a.img b.img; do
  wait_for 60 grep -q "^wrote 4096/4096" "$T/hold.$e" || fail "no write on $e: $(cat "$T/hold.$e")"
done
kill9_nbdkit "$NBDKIT_PID"
for p in "${holders[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
start
qio b.img 'read 0 4k'  # attaches (and recovers) b.img too
stop_nbdkit "$NBDKIT_PID"
# power mode: a recorded 64 MiB region -> the whole disk of these sizes.
for f in a.img b.img; do
  map_of "$T/bm/$f.cbt" >"$T/m"
  jq -e 'all(.[]; .dirty)' "$T/m" >/dev/null || fail "$f after kill -9: $(cat "$T/m")"
done
# c d.img was not written in that session: its bitmap is as it was.
expect_map "$T/bm/c%20d.img.cbt" 16777216 8388608 65536

# --- refusals ----------------------------------------------------------------
rc=0
timeout 30 "${NBDKIT_ENV[@]}" nbdkit -f -U "$T/bad.sock" --filter="$FILTER" file dir="$D" cbt-file="$T/bm/%e-%x.cbt" \
  cbt-bitmap=b0 >"$T/bad.log" 2>&1 || rc=$?
[ "$rc" != 0 ] && grep -q "must be %e (the export name) or %%" "$T/bad.log" || fail "bad template: $(cat "$T/bad.log")"
truncate -s 0 "$T/nbdkit.log"
# mem-y.cbt tracks a disk of another size: export y's attach is refused.
"$CBT" create "$T/bm/mem-y.cbt" --size 2M >/dev/null || fail "cbt create mem-y.cbt"
cp "$T/bm/mem-y.cbt" "$T/mem-y.before"
START_EXPORT=x start_nbdkit "$URI_SOCK" --filter="$FILTER" memory 1M allocator=sparse \
  cbt-file="$T/bm/mem-%e.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$CTL"
[ -f "$T/bm/mem-x.cbt" ] || fail "memory export x has no container"
rc=0; timeout 30 nbdinfo --size "$(uri "")" >/dev/null 2>&1 || rc=$?
[ "$rc" != 0 ] || fail "the empty export name was served"
grep -q "empty export name has no container" "$T/nbdkit.log" || fail "empty name: no reason logged"
rc=0; timeout 30 nbdinfo --size "$(uri y)" >/dev/null 2>&1 || rc=$?
[ "$rc" != 0 ] || fail "export y was served with a container of another size"
cmp "$T/bm/mem-y.cbt" "$T/mem-y.before" || fail "the refused attach changed mem-y.cbt"
# The control socket says why y is not tracked: its connection's error.
ctl_call "$CTL" '{"execute":"query-bitmaps","export":"y"}' >"$T/r"
jq -e '.error.class == "NotFound"' "$T/r" >/dev/null || fail "refused export y: $(cat "$T/r")"
jq -e '.error.desc | startswith("export '"'y'"' is not tracked: its last connection was refused: ") and
    contains("size mismatch")' "$T/r" >/dev/null || fail "refused export y, message: $(cat "$T/r")"
rc=0; "$CBT" map --socket "$CTL" --export y --bitmap b0 >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && grep -qF "export 'y' is not tracked: its last connection was refused: " "$T/err" &&
  grep -qF "size mismatch" "$T/err" && grep -qF "'cbt exports --socket $CTL'" "$T/err" ||
  fail "cbt map --export y: rc $rc $(cat "$T/err")"
ctl_call "$CTL" '{"execute":"query-bitmaps","export":"z"}' >"$T/r"
jq -e '.error.desc | contains("no client has connected to it")' "$T/r" >/dev/null ||
  fail "export z (never connected): $(cat "$T/r")"
"$CBT" exports --socket "$CTL" --output=json >"$T/out" || fail "cbt exports (memory)"
jq -e '[.exports[].name] == ["x"]' "$T/out" >/dev/null ||
  fail "cbt exports lists a refused export: $(cat "$T/out")"
stop_nbdkit "$NBDKIT_PID"
# A refusal before any export is tracked: the server says which and why.
# (--run's $unixsocket is a variable of its shell: passed on as $1)
printf '%s\n' 'nbdinfo --size "nbd+unix:///y?socket=$1" >/dev/null 2>&1 && exit 3' \
  '"$CBT" info --socket "$T/ctl2" >"$T/out" 2>"$T/err"; echo $? >"$T/rc"' >"$T/run.sh"
CBT=$CBT T=$T timeout 60 "${NBDKIT_ENV[@]}" nbdkit -U - --filter="$FILTER" memory 1M \
  cbt-file="$T/bm/mem-%e.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$T/ctl2" --run "bash $T/run.sh \$unixsocket" \
  2>>"$T/nbdkit.log" || fail "nbdkit --run (refused first export)"
[ "$(cat "$T/rc")" = 1 ] &&
  grep -qF "no export is tracked yet: the last connection (to export 'y') was refused: " "$T/err" &&
  grep -qF "size mismatch" "$T/err" || fail "no export tracked, y refused: $(cat "$T/err")"

# --- one container: cbt exports lists its one export ------------------------
truncate -s 4M "$T/one.raw"
"$CBT" create "$T/one.cbt" --size 4M >/dev/null || fail "cbt create one.cbt"
"$CBT" bitmap "$T/one.cbt" b0 --add >/dev/null || fail "cbt bitmap one.cbt b0 --add"
start_nbdkit "$URI_SOCK" -r --filter="$FILTER" file "$T/one.raw" cbt-file="$T/one.cbt" \
  cbt-bitmap=b0 cbt-control="$CTL"
"$CBT" exports --socket "$CTL" --output=json >"$T/out" || fail "cbt exports (one, read-only)"
jq -e --arg c "$T/one.cbt" '.exports ==
    [{"name": "", "container": $c, "attached": false, "read-only": true, "disk-size": 4194304}]' \
  "$T/out" >/dev/null || fail "cbt exports, one read-only export: $(cat "$T/out")"
"$CBT" exports --socket "$CTL" >"$T/out" || fail "cbt exports (one, human)"
grep -E '^  "" +4 MiB +read-only +.*/one\.cbt$' "$T/out" >/dev/null ||
  fail "cbt exports, one read-only export, human: $(cat "$T/out")"
# A read-only server never loads the bitmaps: an edit or a map over it says
# so, and where to do it instead (offline), not "wait for a writable client".
rc=0; "$CBT" bitmap --socket "$CTL" x --add >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] || fail "cbt bitmap --socket --add on a read-only server exited $rc"
grep -qF "serves the disk read-only (nbdkit -r or cbt serve -r" "$T/err" &&
  grep -qF "change them offline with 'cbt bitmap $T/one.cbt NAME ...'" "$T/err" ||
  fail "cbt bitmap --socket --add, read-only server: $(cat "$T/err")"
grep -q "first writable client" "$T/err" && fail "promises a writable client: $(cat "$T/err")"
rc=0; "$CBT" map --socket "$CTL" --bitmap b0 >"$T/out" 2>"$T/err" || rc=$?
[ "$rc" = 1 ] && grep -qF "which it never changes, with 'cbt map -U $T/one.cbt --bitmap b0'" "$T/err" ||
  fail "cbt map --socket, read-only server (exit $rc): $(cat "$T/err")"
"$CBT" map -U "$T/one.cbt" --bitmap b0 >/dev/null || fail "the map it suggests fails"
stop_nbdkit "$NBDKIT_PID"
start_nbdkit "$URI_SOCK" --filter="$FILTER" file "$T/one.raw" cbt-file="$T/one.cbt" \
  cbt-bitmap=b0 cbt-control="$CTL"
"$CBT" exports --socket "$CTL" --output=json >"$T/out" || fail "cbt exports (one)"
jq -e '[.exports[] | [.name, .attached, ."read-only", ."disk-size"]] == [["", true, false, 4194304]]' \
  "$T/out" >/dev/null || fail "cbt exports, one export: $(cat "$T/out")"
stop_nbdkit "$NBDKIT_PID"
echo PASS
