#!/usr/bin/env bash
# An incremental backup of one dirty set: `cbt backup` (online, through the
# filter) against a baseline built from QEMU's own servers.
#
# Setup: the cbt filter over nbdkit's file plugin on a SIZE raw disk (in
# $TMPDIR, default /tmp: a real disk, not tmpfs), filled by fio (non-zero),
# then a first `cbt backup` (000-full.qcow2); then fio (fixed seed, random
# map: no block twice) writes DIRTY % of the disk in 64 KiB blocks, once each,
# and nbdkit is stopped (the chain's recording bitmap is stored in the
# container). Each of ROUNDS rounds (a new dirty set, seed 1 + round, each
# incremental on the one before) measures, on the same disk and dirty set:
#   baseline  QEMU's servers and a thin libnbd client: the chain's bitmap is copied
#             (qemu-img bitmap --merge) into a container linked to the raw
#             disk (cbt create --data-file) and served by
#             `qemu-nbd -r -f qcow2 -B b0 -e 8`; an overlay on
#             the previous layer (`qemu-img create -f qcow2 -b PREV -F qcow2`) is served
#             writable by `qemu-nbd -f qcow2 -e 9`; bench/backup_bench_client
#             copy reads the dirty extents (qemu:dirty-bitmap:b0, block
#             status), rounds them to 64 KiB clusters, and with 8 threads
#             (as cbt backup's default --jobs 8), each with its own pair of
#             connections, reads pieces of up to 4 MiB and writes them to the
#             overlay (zeros as write-zeroes), then flushes. Timed: the
#             client (extents, copy, flush), not the servers' start.
#             (QEMU ships no pull-mode backup client: qemu-img convert with
#             x-dirty-bitmap copies the wrong ranges, see
#             shared/reference/backup-export.md; qemu-storage-daemon's
#             push-mode blockdev-backup is not installed here.)
#   ours      nbdkit started again on the same container, then
#             `cbt backup --dir DIR` (a first connection that makes the
#             filter load its bitmaps, session, checkpoint, extents over the
#             control socket, copy from the point-in-time export, layer
#             writer, flush, rename, session end). Timed: the whole command
#             (wall) and its own "seconds" (the copy and the layer's finish).
# Both results are checked: each chain is compared with the disk
# (qemu-img compare), and their dirty bytes must agree. A wrong backup is an
# error, not a figure. The table shows the medians. The baseline runs first;
# both read the dirty blocks from the page cache (just written). Numbers on a
# shared 2-core VM vary: compare within one run.
#   bench/backup_incremental_bench.sh [BUILD_DIR] [SIZE=4G] [DIRTY=5%] [ROUNDS=3]
set -euo pipefail
build=$(realpath "${1:-build/default}")
size=${2:-4G}
dirty=${3:-5%}
dirty=${dirty%\%}
rounds=${4:-3}
filter="$build/plugin/nbdkit-cbt-filter.so"
cbt="$build/server/cbt"
client="$build/bench/backup_bench_client"
for f in "$filter" "$cbt" "$client"; do [ -f "$f" ] || { echo "not built: $f" >&2; exit 1; }; done
for t in nbdkit qemu-nbd qemu-img fio jq; do
  command -v "$t" >/dev/null || { echo "$t is not installed" >&2; exit 1; }
done
d=$(mktemp -d "${TMPDIR:-/tmp}/cbt-inc-bench.XXXXXX")
pids=()
trap 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$d"' EXIT
[ "$(stat -f -c %T "$d")" != tmpfs ] || { echo "$d is on tmpfs: set TMPDIR to a real disk" >&2; exit 1; }

start() {  # start SOCK CMD... ; waits for the socket, sets $srv
  rm -f "$1"; local s=$1; shift
  "$@" >>"$d/server.log" 2>&1 &
  srv=$!; pids+=("$srv"); disown "$srv" 2>/dev/null || true
  for _ in $(seq 200); do [ -S "$s" ] && return 0; sleep 0.05; done
  echo "server did not start: $*" >&2; cat "$d/server.log" >&2; exit 1
}
stop() { kill -TERM "$1"; while kill -0 "$1" 2>/dev/null; do sleep 0.05; done; }
now() { date +%s.%N; }
nbdkit_up() {
  start "$d/sock" nbdkit -f -U "$d/sock" --filter="$filter" file "$d/disk.raw" \
    cbt-file="$d/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$d/ctl"
}
fio_run() {  # fio_run NAME [fio args]
  local name=$1; shift
  fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$d/sock" --iodepth=16 \
    --size="$bytes" --output-format=json --output="$d/$name.json" "$@" >>"$d/fio.log" 2>&1 ||
    { echo "fio $name failed:" >&2; tail -20 "$d/fio.log" >&2; exit 1; }
}

bytes=$(numfmt --from=iec "$size")
nblocks=$(awk -v s="$bytes" -v p="$dirty" 'BEGIN { printf "%d", s / 65536 * p / 100 }')
want=$((nblocks * 65536))
truncate -s "$bytes" "$d/disk.raw"
nbdkit_up
fio_run fill --rw=write --bs=1M
mkdir "$d/ours" "$d/base"
t0=$(now)
"$cbt" backup --socket "$d/ctl" --dir "$d/ours" --output=json >"$d/full.json"
t1=$(now)
prev=$(jq -r .file "$d/full.json")      # the layer the next ones are backed by
bitmap=$(jq -r .bitmap "$d/full.json")  # the chain's recording bitmap

for r in $(seq "$rounds"); do
  fio_run "dirty$r" --rw=randwrite --bs=64k --number_ios="$nblocks" --randseed=$((r + 1))
  [ "$(jq '.jobs[0].write.total_ios' "$d/dirty$r.json")" = "$nblocks" ] ||
    { echo "fio wrote too little" >&2; exit 1; }
  stop "$srv"

  # Baseline: the chain's bitmap, copied into a container linked to the raw
  # disk; an overlay on the same previous layer.
  rm -f "$d/base.cbt"
  "$cbt" create "$d/base.cbt" --data-file "$d/disk.raw" >/dev/null
  qemu-img bitmap --add "$d/base.cbt" b0 --granularity 65536 --disable
  qemu-img bitmap --merge "$bitmap" -b "$d/disk.cbt" -F qcow2 "$d/base.cbt" b0
  inc=$(printf '%03d-inc.qcow2' "$r")
  qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "$d/base/$inc"
  start "$d/base.sock" qemu-nbd -r -t -e 8 -f qcow2 -x disk -B b0 -k "$d/base.sock" "$d/base.cbt"
  src=$srv
  start "$d/inc.sock" qemu-nbd -t -e 9 -f qcow2 -x inc -k "$d/inc.sock" "$d/base/$inc"
  dst=$srv
  "$client" copy "nbd+unix:///disk?socket=$d/base.sock" qemu:dirty-bitmap:b0 \
    "nbd+unix:///inc?socket=$d/inc.sock" 8 65536 >"$d/base$r.json"
  stop "$dst"; stop "$src"

  # Ours. No client is connected: cbt backup connects once itself so that
  # the filter loads its bitmaps (timed with the rest).
  nbdkit_up
  t2=$(now)
  "$cbt" backup --socket "$d/ctl" --dir "$d/ours" --output=json >"$d/inc$r.json"
  t3=$(now)
  [ "$(jq -r .type "$d/inc$r.json")" = incremental ] ||
    { echo "not an incremental:" >&2; cat "$d/inc$r.json" >&2; exit 1; }
  [ "$(jq -r .file "$d/inc$r.json")" = "$d/ours/$inc" ] || { echo "unexpected layer name" >&2; exit 1; }

  # Checks (no writes now): both chains equal the disk; same dirty set.
  ob=$(jq '."dirty-bytes"' "$d/inc$r.json"); bb=$(jq '."dirty-bytes"' "$d/base$r.json")
  [ "$ob" = "$want" ] && [ "$bb" = "$want" ] ||
    { echo "round $r: dirty bytes: ours $ob, baseline $bb, written $want" >&2; exit 1; }
  qemu-img compare -q -f qcow2 -F raw "$d/ours/$inc" "$d/disk.raw" ||
    { echo "WRONG (round $r): cbt backup's chain differs from the disk" >&2; exit 1; }
  qemu-img compare -q -f qcow2 -F raw "$d/base/$inc" "$d/disk.raw" ||
    { echo "WRONG (round $r): the baseline's chain differs from the disk" >&2; exit 1; }
  qemu-img check -q "$d/ours/$inc"
  echo "$(jq .seconds "$d/base$r.json") $(echo "$t2 $t3" | awk '{ print $2 - $1 }') $(jq .seconds "$d/inc$r.json")" \
    >>"$d/times"
  prev=$d/ours/$inc
  bitmap=$(jq -r .bitmap "$d/inc$r.json")
done
stop "$srv"

med() { sort -g -k"$1" "$d/times" | awk -v c="$1" '{ v[NR] = $c } END { print v[int((NR + 1) / 2)] }'; }
bs=$(med 1); ow=$(med 2); os=$(med 3)
mib=$(awk -v b="$want" 'BEGIN { print b / 1048576 }')
echo "incremental backup bench: $size disk, $dirty % dirty ($nblocks random 64 KiB blocks per round)," \
  "median of $rounds rounds, $(date -u +%F)"
echo
echo "| run | seconds | MiB/s of dirty data | speed ratio to baseline |"
echo "|---|---|---|---|"
awk -v s="$bs" -v m="$mib" 'BEGIN { printf "| baseline: qemu-nbd -B (source) + qemu-nbd (qcow2 overlay) + libnbd client, 8 threads | %.3f | %.0f | 1.00 |\n", s, m / s }'
awk -v s="$ow" -v m="$mib" -v b="$bs" 'BEGIN { printf "| cbt backup, whole command (wall) | %.3f | %.0f | %.2f |\n", s, m / s, b / s }'
awk -v s="$os" -v m="$mib" -v b="$bs" 'BEGIN { printf "| cbt backup, its own \"seconds\" (copy + layer finish) | %.3f | %.0f | %.2f |\n", s, m / s, b / s }'
echo
echo "per round (baseline s, cbt backup wall s, its own s): $(awk '{ printf "[%.3f %.3f %.3f] ", $1, $2, $3 }' "$d/times")"
echo "dirty per round: $mib MiB; last round: ours $(jq '."data-clusters"' "$d/inc$rounds.json") data +" \
  "$(jq '."zero-clusters"' "$d/inc$rounds.json") zero clusters, baseline $(jq '."bytes-copied"' "$d/base$rounds.json")" \
  "bytes in $(jq .pieces "$d/base$rounds.json") pieces, its extents $(jq '."extent-seconds"' "$d/base$rounds.json") s"
echo "every round: both chains compared equal to the disk (qemu-img compare), same dirty bytes;" \
  "full backup first: $(echo "$t0 $t1" | awk '{ printf "%.1f", $2 - $1 }') s wall for $size"
awk -v o="$ow" -v b="$bs" 'BEGIN { printf "target >= 1.0x (whole command): %s (%.2fx)\n", (b / o >= 1 ? "met" : "NOT met"), b / o }'
