#!/usr/bin/env bash
# The read-write qcow2 plugin under random requests, judged by QEMU.
# For each image kind (v3 with 64 KiB, 512 B and 2 MiB clusters, v2
# (compat=0.10), refcount_bits=1 and 64, preallocation=metadata, compressed
# clusters from qemu-img convert -c), all without a backing file (the 512 B
# one's file grows past 8 MiB, where its one-cluster refcount table must
# grow):
#  1. serve it with the plugin, run nbd_mirror (3 connections, several
#     requests in flight on each: writes, zeroes, trims, flushes, reads
#     checked live, a full read-back at the end) keeping a raw mirror of what
#     the image must hold; stop the server (SIGTERM, wait); qemu-img compare
#     IMG MIRROR says identical and qemu-img check exits 0;
#  2. QEMU writes the image (qemu-io write -P / write -z / discard of whole
#     clusters, the same on the mirror, a discard as a zero), the plugin
#     serves it again and nbdcopy reads all of it back: cmp with the mirror;
#  3. the plugin writes (a second nbd_mirror run, then qemu-io as the NBD
#     client writing patterns in disjoint slots), stop; QEMU reads them back
#     (qemu-io read -P per slot), qemu-img compare and qemu-img check.
# Then nbd_mirror --stress-one-cluster (concurrent writes into disjoint pieces
# of the same fresh clusters, trims of whole neighbouring clusters racing
# them) on fresh 64 KiB, 512 B and 2 MiB cluster images: compare + check.
#
# A failure names the image, the phase and the nbd_mirror seed, and the first
# differing offset (qemu-img compare / cmp / nbd_mirror's own read checks).
#
# Environment:
#   NBD_MIRROR     the tool (default $CBT_BUILD/tests/nbd_mirror)
#   QCOW2_PLUGIN   the plugin (default $CBT_BUILD/plugin/nbdkit-qcow2-plugin.so)
#   MIRROR_SERVER  plugin (default) | qemu-nbd: the same test against
#                  qemu-nbd -f qcow2 --discard=unmap --cache=writeback -e 3,
#                  the reference the harness is proven with
#   MIRROR_SEED    base seed (default 1); image k runs seeds BASE+k, BASE+k+100
#   MIRROR_ONLY    run only the image kinds named (space-separated), e.g. v2
#   MUTATE         TEST OF THE TEST only: make the mirror wrong so the test
#                  must FAIL: drop (one write left out of the mirror),
#                  trim-partial (trims zero partial clusters in the mirror),
#                  qemu-io (one QEMU write not applied to the mirror),
#                  pattern (phase 3 reads back a pattern not written),
#                  stress (one stress write left out of the mirror)
source "$(dirname "$0")/common.sh"

: "${CBT_BUILD:?CBT_BUILD must point at the build directory}"
PLUGIN=${QCOW2_PLUGIN:-$CBT_BUILD/plugin/nbdkit-qcow2-plugin.so}
NBD_MIRROR=${NBD_MIRROR:-$CBT_BUILD/tests/nbd_mirror}
MIRROR_SERVER=${MIRROR_SERVER:-plugin}
MIRROR_SEED=${MIRROR_SEED:-1}
MIRROR_ONLY=${MIRROR_ONLY:-}
MUTATE=${MUTATE:-}
OPS=1200   # requests per nbd_mirror run (phase 1); phase 3 runs a third of it

# Failures also show the server's first errors (the cause; later ones tend
# to repeat it) and the end of its log.
fail() {
  echo "FAIL: $*" >&2
  if [ -s "$T/server.log" ]; then
    echo "server log, first errors:" >&2
    grep -m3 -i error "$T/server.log" >&2 || echo "  (none)" >&2
    echo "server log, end:" >&2
    tail -3 "$T/server.log" >&2
  fi
  exit 1
}

need qemu-img qemu-io nbdcopy nbdinfo cmp jq
[ -x "$NBD_MIRROR" ] || fail "nbd_mirror not built: $NBD_MIRROR"
NBDKIT_ENV=()
case "$MIRROR_SERVER" in
  plugin)
    need nbdkit
    [ -f "$PLUGIN" ] || fail "plugin not built: $PLUGIN"
    # A plugin built with ASan needs the runtime preloaded into nbdkit (as lib.sh).
    if [[ "$(ldd "$PLUGIN" 2>/dev/null || true)" == *libasan* ]]; then
      NBDKIT_ENV=(env "LD_PRELOAD=$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
                  "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1")
    fi
    ;;
  qemu-nbd) need qemu-nbd ;;
  *) fail "MIRROR_SERVER must be plugin or qemu-nbd, not $MIRROR_SERVER" ;;
esac
case "$MUTATE" in
  "" | drop | trim-partial | qemu-io | pattern | stress) ;;
  *) fail "unknown MUTATE=$MUTATE" ;;
esac
[ -z "$MUTATE" ] || echo "MUTATE=$MUTATE: the mirror is made wrong on purpose; this run must FAIL"

SOCK="$T/sock"
URI="nbd+unix:///?socket=$SOCK"
SERVER_PID=

# start_server IMG : serves IMG on $SOCK (background, pid in $SERVER_PID);
# returns once a handshake succeeds (bounded: 60 s).
start_server() {
  rm -f "$SOCK" "$SOCK.pid"
  echo "--- start $1" >>"$T/server.log"
  if [ "$MIRROR_SERVER" = qemu-nbd ]; then
    qemu-nbd -f qcow2 --discard=unmap --cache=writeback -e 3 -t -k "$SOCK" \
      --pid-file "$SOCK.pid" "$1" 2>>"$T/server.log" &
  else
    "${NBDKIT_ENV[@]}" nbdkit -f --exit-with-parent -U "$SOCK" -P "$SOCK.pid" "$PLUGIN" \
      file="$1" discard=unmap 2>>"$T/server.log" &
  fi
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  local end=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$end" ]; do
    [ -s "$SOCK.pid" ] && [ -S "$SOCK" ] &&
      timeout 10 nbdinfo --size "$URI" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || fail "$MIRROR_SERVER exited at start on $1"
    sleep 0.05
  done
  fail "$MIRROR_SERVER did not start on $1"
}

# stop_server : SIGTERM, wait for the pid (bounded: 30 s); it must exit 0.
stop_server() {
  local i rc=0
  kill -TERM "$SERVER_PID"
  for i in $(seq 300); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -9 "$SERVER_PID"
    fail "$MIRROR_SERVER did not stop within 30 s of SIGTERM"
  fi
  wait "$SERVER_PID" || rc=$?
  [ "$rc" = 0 ] || fail "$MIRROR_SERVER exited $rc after SIGTERM"
  SERVER_PID=
}

# touched OFFSET : the last nbd_mirror requests (of this image's traces) whose
# range meets the 512-byte sector at OFFSET (qemu-img compare reports sectors).
touched() {
  local f
  for f in "$T"/trace.*; do
    [ -e "$f" ] || continue
    awk -v o="$1" -v f="${f##*/}" '$4 < o + 512 && $4 + $5 > o { print "  " f ": " $0 }' "$f" | tail -4
  done
}

# judge WHAT IMG MIRROR : qemu-img compare says identical, qemu-img check exits 0.
judge() {
  local rc=0 off
  qemu-img compare -f qcow2 -F raw "$2" "$3" >"$T/compare.out" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    off=$(sed -n 's/^Content mismatch at offset \([0-9]*\)!$/\1/p' "$T/compare.out")
    if [ -n "$off" ]; then
      echo "last requests meeting offset $off (idx conn kind offset length flags errno):" >&2
      touched "$off" >&2
    fi
    fail "$1: qemu-img compare exit $rc: $(tr '\n' ' ' <"$T/compare.out")"
  fi
  rc=0
  qemu-img check "$2" >"$T/check.out" 2>&1 || rc=$?
  [ "$rc" = 0 ] || { cat "$T/check.out" >&2; fail "$1: qemu-img check exit $rc"; }
}

# mirror_run WHAT ARGS... : nbd_mirror on $SOCK, its summary line printed.
mirror_run() {
  local what=$1 rc=0
  shift
  timeout 120 "$NBD_MIRROR" --socket "$SOCK" --conns 3 "$@" >"$T/mirror.out" 2>&1 || rc=$?
  sed 's/^/  /' "$T/mirror.out"
  [ "$rc" = 0 ] || fail "$what: nbd_mirror $* exited $rc"
}

# rnd : R = a 30-bit random number from $RANDOM (seeded per image; not in a
# $(...) subshell, whose RANDOM would not advance ours).
rnd() { R=$(((RANDOM << 15) | RANDOM)); }

# qemu_writes CLUSTER SIZE : fills QW (qemu-io -c arguments for the qcow2
# image) and MW (the same effect on the raw mirror): unaligned pattern writes
# across cluster boundaries, unaligned zeroes, discards of whole clusters
# (a zero on the mirror).
qemu_writes() {
  local cl=$1 size=$2 n=$(($2 / $1)) i off len pat R
  QW=() MW=()
  for i in $(seq 12); do
    case $((i % 3)) in
      0)
        rnd; off=$((R % (n - 1) * cl + cl - 1))
        rnd; off=$((off - R % 3000))
        [ "$off" -ge 0 ] || off=0
        rnd; len=$((1 + R % (2 * cl + 9000)))
        rnd; pat=$(printf 0x%02x $((1 + R % 254)))
        [ $((off + len)) -le "$size" ] || len=$((size - off))
        QW+=(-c "write -P $pat $off $len") MW+=(-c "write -P $pat $off $len")
        ;;
      1)
        rnd; off=$((R % (size - 1)))
        rnd; len=$((1 + R % (3 * cl + 5000)))
        [ $((off + len)) -le "$size" ] || len=$((size - off))
        if [ $((i % 2)) = 0 ]; then
          QW+=(-c "write -z -u $off $len")
        else
          QW+=(-c "write -z $off $len")
        fi
        MW+=(-c "write -z $off $len")
        ;;
      2)
        rnd; off=$((R % n * cl))
        rnd; len=$(((1 + R % 4) * cl))
        [ $((off + len)) -le "$size" ] || len=$((size - off))
        QW+=(-c "discard $off $len") MW+=(-c "write -z $off $len")
        ;;
    esac
  done
  # TEST OF THE TEST: the last QEMU write does not reach the mirror.
  if [ "$MUTATE" = qemu-io ]; then
    MW=("${MW[@]:0:${#MW[@]}-2}")
  fi
}

# run_image NAME CLUSTER SIZE KIND [qemu-img create -o OPTIONS] : the three
# phases on one image kind. KIND: fresh (qemu-img create) or compressed
# (qemu-img convert -c of a raw image with data).
IMAGE_NO=0
run_image() {
  local name=$1 cl=$2 size=$3 kind=$4 opts=${5:-} img="$T/$1.qcow2" mir="$T/$1.raw"
  IMAGE_NO=$((IMAGE_NO + 1))
  if [ -n "$MIRROR_ONLY" ] && [[ " $MIRROR_ONLY " != *" $name "* ]]; then return 0; fi
  local seed=$((MIRROR_SEED + IMAGE_NO)) t0=$SECONDS
  if [ "$kind" = compressed ]; then
    # Compressible patterns, incompressible random data and holes.
    truncate -s "$size" "$mir"
    qemu-io -f raw -c "write -P 0x11 0 $((size / 4))" -c "write -P 0x5c $((size / 2)) 3M" \
      -c "write -P 0xe7 $((size - 200000)) 200000" "$mir" >/dev/null
    head -c 1M /dev/urandom | dd of="$mir" bs=64k seek=$((size / 4 / 65536 - 8)) conv=notrunc \
      status=none
    qemu-img convert -q -c -f raw -O qcow2 -o "cluster_size=$cl" "$mir" "$img"
    local comp
    comp=$(qemu-img check --output=json "$img" | jq '."compressed-clusters" // 0')
    [ "$comp" -gt 0 ] || fail "$name: qemu-img convert -c made no compressed cluster"
  else
    qemu-img create -q -f qcow2 -o "cluster_size=$cl${opts:+,$opts}" "$img" "$size"
    truncate -s "$size" "$mir"
  fi

  # Phase 1: our plugin under random requests, judged by QEMU.
  local extra=(--verify)
  case "$MUTATE" in
    drop) extra=(--read-pct 0 --mutate-drop $((OPS - 40))) ;;
    trim-partial) extra=(--read-pct 0 --mutate-trim-partial) ;;
  esac
  rm -f "$T"/trace.*
  start_server "$img"
  mirror_run "$name phase 1 (seed $seed)" --mirror "$mir" --seed "$seed" --ops "$OPS" \
    --cluster "$cl" --trace "$T/trace.phase1" "${extra[@]}"
  stop_server
  judge "$name phase 1: random requests over the plugin (nbd_mirror seed $seed)" "$img" "$mir"

  # Phase 2: QEMU writes, our plugin reads everything back.
  RANDOM=$seed
  qemu_writes "$cl" "$size"
  qemu-io -f qcow2 "${QW[@]}" "$img" >"$T/qemu-io.out" ||
    { cat "$T/qemu-io.out" >&2; fail "$name phase 2: qemu-io writes failed"; }
  qemu-io -f raw "${MW[@]}" "$mir" >/dev/null
  start_server "$img"
  rm -f "$T/back.raw"
  timeout 60 nbdcopy "$URI" "$T/back.raw" || fail "$name phase 2: nbdcopy failed"
  local rc=0
  cmp "$T/back.raw" "$mir" >"$T/cmp.out" 2>&1 || rc=$?
  [ "$rc" = 0 ] || fail "$name phase 2: plugin's read-back after qemu-io writes ($(printf '%s ' "${QW[@]}")) differs from the mirror: $(cat "$T/cmp.out") (cmp counts bytes from 1)"

  # Phase 3: our plugin writes, QEMU reads. A shorter random run, then
  # qemu-io as the NBD client writes a pattern into each of 6 disjoint slots.
  mirror_run "$name phase 3 (seed $((seed + 100)))" --mirror "$mir" --seed $((seed + 100)) \
    --ops $((OPS / 3)) --cluster "$cl" --trace "$T/trace.phase3"
  local slot=$((size / 6)) i off len pat pw=() pr=() mw=()
  for i in $(seq 0 5); do
    rnd; off=$((i * slot + R % (slot / 2)))
    rnd; len=$((1 + R % (slot / 2 < 3 * cl ? slot / 2 : 3 * cl)))
    pat=$(printf 0x%02x $((0xa0 + i)))
    pw+=(-c "write -P $pat $off $len") mw+=(-c "write -P $pat $off $len")
    [ "$MUTATE" = pattern ] && [ "$i" = 3 ] && pat=0x01
    pr+=(-c "read -P $pat $off $len")
  done
  qemu-io -f raw "${pw[@]}" "$URI" >"$T/qemu-io.out" ||
    { cat "$T/qemu-io.out" >&2; fail "$name phase 3: qemu-io writes over NBD failed"; }
  qemu-io -f raw "${mw[@]}" "$mir" >/dev/null
  stop_server
  rc=0
  qemu-io -f qcow2 -r "${pr[@]}" "$img" >"$T/qemu-io.out" 2>&1 || rc=$?
  if [ "$rc" != 0 ] || grep -q "verification failed" "$T/qemu-io.out"; then
    grep -B1 "verification failed" "$T/qemu-io.out" >&2
    fail "$name phase 3: QEMU reads back other data than the plugin wrote (qemu-io exit $rc)"
  fi
  judge "$name phase 3: plugin writes (nbd_mirror seed $((seed + 100)) + qemu-io over NBD)" \
    "$img" "$mir"
  echo "ok $name: plugin writes == QEMU reads, QEMU writes == plugin reads," \
    "qemu-img check clean ($((SECONDS - t0)) s)"
}

# run_stress NAME CLUSTER SIZE : --stress-one-cluster on a fresh image.
run_stress() {
  local name=$1 cl=$2 size=$3 img="$T/$1.qcow2" mir="$T/$1.raw"
  IMAGE_NO=$((IMAGE_NO + 1))
  if [ -n "$MIRROR_ONLY" ] && [[ " $MIRROR_ONLY " != *" $name "* ]]; then return 0; fi
  local seed=$((MIRROR_SEED + IMAGE_NO)) extra=(--verify)
  [ "$MUTATE" = stress ] && extra=(--mutate-drop 3000)
  qemu-img create -q -f qcow2 -o "cluster_size=$cl" "$img" "$size"
  truncate -s "$size" "$mir"
  rm -f "$T"/trace.*
  start_server "$img"
  mirror_run "$name (seed $seed)" --mirror "$mir" --seed "$seed" --qd 8 --ops 4000 \
    --cluster "$cl" --stress-one-cluster --trace "$T/trace.stress" "${extra[@]}"
  stop_server
  judge "$name: concurrent writes into the same fresh clusters (nbd_mirror seed $seed)" \
    "$img" "$mir"
  echo "ok $name: no lost update, qemu-img check clean"
}

run_image v3-64k 65536 $((32 << 20)) fresh
run_image v3-512 512 $((16 << 20)) fresh
run_image v3-2m 2097152 $((64 << 20)) fresh
run_image v2 65536 $((32 << 20)) fresh compat=0.10
run_image refcount1 65536 $((32 << 20)) fresh refcount_bits=1
run_image refcount64 65536 $((32 << 20)) fresh refcount_bits=64
run_image prealloc-metadata 65536 $((32 << 20)) fresh preallocation=metadata
run_image compressed 65536 $((32 << 20)) compressed
run_stress stress-64k 65536 $((32 << 20))
run_stress stress-512 512 $((4 << 20))
run_stress stress-2m 2097152 $((64 << 20))
echo "OK: random requests over $MIRROR_SERVER agree with QEMU on every image kind (${SECONDS} s)"
