#!/bin/bash
# Internal bitmaps: the cbt filter over cbt's qcow2 plugin with no cbt-file=
# keeps its bitmaps inside the served image.
#  - images: qcow2 v3 64k clusters, v3 512 B clusters, and an overlay over a
#    qcow2 backing file with data; durability power, process and none;
#  - writes (unaligned), zeroes and trims with qemu-io over NBD, mirrored
#    into a raw file; a clean stop; then qemu-img check is clean, qemu-img
#    info lists b0 (not in use), the bitmap as QEMU (qemu-nbd -B) and
#    `cbt map` read it is exactly the granules touched, and the image's data
#    equals the mirror (qemu-img compare);
#  - a restart and more changes: the bits accumulate; a session that only
#    changes dirty granules leaves b0 stored clean (not in use);
#  - a read-only server (nbdkit -r) leaves the image byte-identical;
#  - the control socket: `cbt checkpoint --socket` freezes b0 and starts b1,
#    both stored in the image after the stop, each with its own changes;
#  - refusals: no cbt-file= over nbdkit's file plugin fails at start naming
#    cbt-file; a v2 (compat=0.10) image cannot hold bitmaps: the first client
#    is refused with a message that says so, nbdkit exits non-zero and the
#    image is unchanged.
source "$(dirname "$0")/lib.sh"
need qemu-io sha256sum python3
[ -f "$QCOW2_PLUGIN" ] || fail "qcow2 plugin not built: $QCOW2_PLUGIN"
[ -x "$CBT" ] || fail "cbt not built: $CBT"

SIZE=$((64 << 20))
SOCK="$T/nbd.sock"
URI="nbd+unix:///?socket=$SOCK"

# serve IMG ARGS... : plugin + filter, internal bitmaps (no cbt-file=).
serve() {
  local img=$1; shift
  start_nbdkit "$SOCK" --filter="$FILTER" "$QCOW2_PLUGIN" file="$img" cbt-bitmap=b0 "$@"
}

# apply OPSFILE MIRROR : each line "W OFF LEN PATTERN", "Z OFF LEN" or
# "T OFF LEN" sent over NBD by qemu-io, and the same change made to the raw
# mirror (a trim is a zero there: the test trims whole clusters where the
# backing file, if any, is zero).
apply() {
  local nbd=() raw=() op off len pat
  while read -r op off len pat; do
    case $op in
      W) nbd+=(-c "write -P $pat $off $len"); raw+=(-c "write -P $pat $off $len") ;;
      Z) nbd+=(-c "write -z $off $len"); raw+=(-c "write -z $off $len") ;;
      T) nbd+=(-c "discard $off $len"); raw+=(-c "write -z $off $len") ;;
    esac
  done <"$1"
  timeout 60 qemu-io -f raw "${nbd[@]}" -c flush "$URI" >"$T/qemu-io.out" 2>&1 ||
    { cat "$T/qemu-io.out" >&2; fail "qemu-io over NBD failed ($1)"; }
  # qemu-io may exit 0 after a failed command: its message says so.
  if grep -q "failed" "$T/qemu-io.out"; then cat "$T/qemu-io.out" >&2; fail "a request failed ($1)"; fi
  timeout 60 qemu-io -f raw "${raw[@]}" "$2" >/dev/null || fail "qemu-io on the mirror failed"
}

# expected GRAN OPSFILE... : the granules the ops touch, as merged extents.
expected() {
  python3 - "$SIZE" "$@" <<'EOF' | merge_runs
import json, sys
size, gran = int(sys.argv[1]), int(sys.argv[2])
dirty = set()
for path in sys.argv[3:]:
    for line in open(path):
        p = line.split()
        off, ln = int(p[1]), int(p[2])
        dirty.update(range(off // gran, (off + ln - 1) // gran + 1))
n = (size + gran - 1) // gran
print(json.dumps([{"start": g * gran, "length": min(gran, size - g * gran),
                   "dirty": g in dirty} for g in range(n)]))
EOF
}

granularity() {
  qemu-img info -U --output=json "$1" |
    jq -r --arg n "$2" '."format-specific".data.bitmaps[] | select(.name == $n) | .granularity'
}

# judge IMG MIRROR BITMAP OPSFILE... : the image after a clean stop.
judge() {
  local img=$1 mirror=$2 bm=$3 what; shift 3
  what="$(basename "$img") $bm"
  qemu-img check "$img" >"$T/check.out" 2>&1 || { cat "$T/check.out" >&2; fail "$what: qemu-img check"; }
  local flags; flags=$(bitmap_flags "$img" "$bm")
  [ -n "$flags" ] || fail "$what: qemu-img info does not list the bitmap"
  [[ "$flags" != *in-use* ]] || fail "$what: in use after a clean stop: $flags"
  local gran; gran=$(granularity "$img" "$bm")
  local want q c
  want=$(expected "$gran" "$@")
  q=$(qemu_map "$img" "$bm")
  c=$(timeout 30 "$CBT" map "$img" --bitmap "$bm" --output=json | merge_runs)
  [ "$q" = "$want" ] || fail "$what: qemu-nbd -B map $q, expected $want"
  [ "$c" = "$want" ] || fail "$what: cbt map $c, expected $want"
  qemu-img compare -q -f qcow2 -F raw "$img" "$mirror" || fail "$what: data differs from the mirror"
}

cat >"$T/ops-a" <<'EOF'
W 1000 5000 0x11
W 196608 65536 0x22
W 300000 200000 0x33
Z 1048576 65536
Z 2000000 100
T 33554432 131072
W 40000000 4096 0x44
EOF
# Overlaps the first set and adds new granules; a trim of data written above.
cat >"$T/ops-b" <<'EOF'
W 4096 4096 0x55
W 5242880 70000 0x66
Z 300000 1000
T 196608 65536
T 41943040 262144
W 67104768 4096 0x77
EOF

# Only granules the first set made dirty.
cat >"$T/ops-c" <<'EOF'
W 0 4096 0x88
Z 200000 3000
EOF

# scenario KIND MODE : create, two sessions of changes, judged after each.
scenario() {
  local kind=$1 mode=$2 img="$T/$1-$2.qcow2" mirror="$T/$1-$2.raw"
  case $kind in
    v3) qemu-img create -q -f qcow2 -o compat=1.1 "$img" "$SIZE" ;;
    c512) qemu-img create -q -f qcow2 -o compat=1.1,cluster_size=512 "$img" "$SIZE" ;;
    backing)
      # Data in the first 16 MiB of the backing file only (the trims are past it).
      truncate -s "$SIZE" "$T/base.raw"
      timeout 60 qemu-io -f raw -c "write -P 0x5a 0 8M" -c "write -P 0xa5 12M 4M" "$T/base.raw" >/dev/null
      qemu-img convert -q -f raw -O qcow2 "$T/base.raw" "$T/base.qcow2"
      qemu-img create -q -f qcow2 -o compat=1.1 -b "$T/base.qcow2" -F qcow2 "$img" "$SIZE" ;;
  esac
  if [ "$kind" = backing ]; then cp "$T/base.raw" "$mirror"; else truncate -s "$SIZE" "$mirror"; fi
  serve "$img" cbt-create=true cbt-durability="$mode"
  apply "$T/ops-a" "$mirror"
  stop_nbdkit "$NBDKIT_PID"
  judge "$img" "$mirror" b0 "$T/ops-a"
  # Restart (the bitmap exists: no cbt-create) and change more: bits accumulate.
  serve "$img" cbt-durability="$mode"
  apply "$T/ops-b" "$mirror"
  stop_nbdkit "$NBDKIT_PID"
  judge "$img" "$mirror" b0 "$T/ops-a" "$T/ops-b"
  # A session whose changes are all in dirty granules (the filter needs no
  # in-use flag for them): b0 must still be stored clean, not in use.
  serve "$img" cbt-durability="$mode"
  apply "$T/ops-c" "$mirror"
  stop_nbdkit "$NBDKIT_PID"
  judge "$img" "$mirror" b0 "$T/ops-a" "$T/ops-b"
  echo "ok: $kind, durability $mode: three sessions, map exact (qemu-nbd and cbt map), data equal"
}

scenario v3 power
scenario v3 process
scenario v3 none
scenario c512 power
scenario backing process

# A read-only server reads, refuses writes and leaves the image byte-identical.
img="$T/v3-power.qcow2"
sha256sum "$img" >"$T/ro.sum"
start_nbdkit "$SOCK" -r --filter="$FILTER" "$QCOW2_PLUGIN" file="$img" cbt-bitmap=b0
timeout 60 qemu-io -r -f raw -c "read -P 0x44 40000000 4096" "$URI" >"$T/ro.out" 2>&1 ||
  { cat "$T/ro.out" >&2; fail "read through the read-only server"; }
grep -q "Pattern verification failed" "$T/ro.out" && fail "read-only server: wrong data"
if timeout 60 qemu-io -f raw -c "write -P 1 0 4096" "$URI" >"$T/ro-w.out" 2>&1 &&
   ! grep -q "failed" "$T/ro-w.out"; then
  fail "a write through nbdkit -r succeeded"
fi
stop_nbdkit "$NBDKIT_PID"
sha256sum -c --quiet "$T/ro.sum" || fail "nbdkit -r changed the image"
echo "ok: nbdkit -r: reads, refuses writes, image byte-identical"

# The control socket: a checkpoint freezes b0 and starts b1, both in the image.
img="$T/ctl.qcow2"
mirror="$T/ctl.raw"
qemu-img create -q -f qcow2 "$img" "$SIZE"
truncate -s "$SIZE" "$mirror"
serve "$img" cbt-create=true cbt-control="$T/ctl.sock"
apply "$T/ops-a" "$mirror"
timeout 30 "$CBT" checkpoint --socket "$T/ctl.sock" --freeze b0 --new b1 >"$T/cp.out" 2>&1 ||
  { cat "$T/cp.out" >&2; fail "cbt checkpoint --socket"; }
apply "$T/ops-b" "$mirror"
stop_nbdkit "$NBDKIT_PID"
judge "$img" "$mirror" b0 "$T/ops-a"
judge "$img" "$mirror" b1 "$T/ops-b"
echo "ok: control socket: checkpoint b0 -> b1, both stored in the image, each exact"

# The plugin alone (no filter) over an image with bitmaps: nobody records
# the session's changes, so it marks them in use before the first write.
img="$T/alone.qcow2"
qemu-img create -q -f qcow2 "$img" "$SIZE"
qemu-img bitmap --add "$img" b0
start_nbdkit "$SOCK" "$QCOW2_PLUGIN" file="$img"
timeout 60 qemu-io -f raw -c "write -P 1 0 4096" "$URI" >/dev/null || fail "write through the plugin alone"
stop_nbdkit "$NBDKIT_PID"
[[ "$(bitmap_flags "$img" b0)" == *in-use* ]] ||
  fail "the plugin alone left b0 trusted after a write: $(bitmap_flags "$img" b0)"
qemu-img check -q "$img" || fail "plugin alone: qemu-img check"
echo "ok: the plugin alone marks stored bitmaps in use before a write"

# Refused: no cbt-file= over a plugin that is not cbt's qcow2 plugin.
truncate -s "$SIZE" "$T/plain.raw"
rm -f "$SOCK"
rc=0
timeout 30 "${NBDKIT_ENV[@]}" nbdkit -f -U "$SOCK" --filter="$FILTER" file "$T/plain.raw" cbt-bitmap=b0 \
  cbt-create=true >"$T/err.out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "no cbt-file= over the file plugin: exit $rc"
grep -q "cbt-file" "$T/err.out" || { cat "$T/err.out" >&2; fail "the message does not name cbt-file"; }
echo "ok: no cbt-file= over nbdkit's file plugin: refused at start: $(head -1 "$T/err.out")"

# A v2 image cannot hold bitmaps: the first client is refused, nbdkit exits
# non-zero, the image is unchanged, and the message says why.
img="$T/v2.qcow2"
qemu-img create -q -f qcow2 -o compat=0.10 "$img" "$SIZE"
sha256sum "$img" >"$T/v2.sum"
rm -f "$SOCK"
: >"$T/v2.log"
"${NBDKIT_ENV[@]}" nbdkit -f --exit-with-parent -U "$SOCK" --filter="$FILTER" "$QCOW2_PLUGIN" file="$img" \
  cbt-bitmap=b0 cbt-create=true 2>"$T/v2.log" &
pid=$!
PIDS+=("$pid")
wait_for 30 bash -c "test -S '$SOCK' || ! kill -0 $pid 2>/dev/null" ||
  fail "v2 image: nbdkit neither bound its socket nor exited within 30 s"
if kill -0 "$pid" 2>/dev/null; then
  # Started (the image is checked when the first client connects).
  if timeout 30 qemu-io -f raw -c "write -P 1 0 4096" "$URI" >"$T/v2-io.out" 2>&1 &&
     ! grep -q "failed\|can't open" "$T/v2-io.out"; then
    fail "a write over a v2 image with internal bitmaps succeeded"
  fi
  wait_for 30 bash -c "! kill -0 $pid 2>/dev/null" || { kill -9 "$pid"; fail "nbdkit still running after refusing a v2 image"; }
fi
rc=0
wait "$pid" || rc=$?
[ "$rc" -ne 0 ] || fail "v2 image: nbdkit exited 0"
grep -qi "v2" "$T/v2.log" || { cat "$T/v2.log" >&2; fail "v2 image: the message does not say v2"; }
sha256sum -c --quiet "$T/v2.sum" || fail "v2 image: changed"
echo "ok: v2 image: refused (exit $rc): $(grep -i v2 "$T/v2.log" | head -1)"
echo "PASS"
