#!/usr/bin/env bash
# What an open backup session costs live writes (copy-before-write, engine/
# fleece.h): fio (nbd engine, unix socket, 4k randwrite, QD16, a fresh random
# seed per run) against the cbt filter over the file plugin. Three servers run
# side by side, each on its own preallocated 1 GiB raw disk (in $TMPDIR,
# default /tmp: a real disk, not tmpfs) filled with fio's non-zero data (so
# preserved blocks are stored, not just remembered as zero), b0 warm (every
# granule dirty):
#   a   server A, never a session: SECONDS
#   a'  server A, bursts of N writes (the same fio start-up per burst as b)
#   b   server B, first overwrites: BURSTS bursts of N writes, each in a new
#       session (backup-begin, fio, query-backup, backup-end, bitmap-remove
#       of the session's new bitmap), so every burst starts with nothing
#       preserved; N = 4096 keeps most writes first overwrites of their
#       64 KiB block (1 GiB = 16384 blocks; after N random writes about
#       16384 * (1 - exp(-N / 16384)) are preserved). The fraction of writes
#       that copied a block is reported from query-backup's copied-blocks.
#   c   server C, one session open all along whose every block was preserved
#       first (a 1M sequential fio pass over the whole disk): SECONDS
# Each round runs a, a', b, c in turn; the table shows the median IOPS of each
# and the median of the per-round ratios b/a (target >= 0.5) and c/a (target
# >= 0.95). Numbers on a shared
# 2-core VM vary by tens of percent from run to run: compare within one run.
# FLEECE_DIR=DIR in the environment puts the session stores there
# (cbt-fleece-dir=; default: next to the container, in the run's directory).
#   bench/backup_cbw_bench.sh [BUILD_DIR] [SECONDS=10] [ROUNDS=3] [BURSTS=5] [N=4096]
set -euo pipefail
build=$(realpath "${1:-build/default}")
secs=${2:-10}
rounds=${3:-3}
bursts=${4:-5}
n=${5:-4096}
filter="$build/plugin/nbdkit-cbt-filter.so"
[ -f "$filter" ] || { echo "filter not built: $filter" >&2; exit 1; }
for t in nbdkit fio jq python3; do
  command -v "$t" >/dev/null || { echo "$t is not installed" >&2; exit 1; }
done
d=$(mktemp -d "${TMPDIR:-/tmp}/cbt-cbw-bench.XXXXXX")
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
ctl() {  # ctl SERVER COMMAND [ARGS_JSON] -> the reply's "return"
  python3 -c '
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(60); s.connect(sys.argv[1])
req = {"execute": sys.argv[2]}
if len(sys.argv) > 3: req["arguments"] = json.loads(sys.argv[3])
s.sendall(json.dumps(req).encode() + b"\n"); b = b""
while not b.endswith(b"\n"):
    c = s.recv(65536)
    if not c: break
    b += c
r = json.loads(b)
if "error" in r: sys.exit("control error: %s" % r["error"])
print(json.dumps(r["return"]))' "$d/$1.ctl" "${@:2}"
}
# fio_run NAME SERVER RW BS [fio args] -> "total_ios runtime_ms" appended to $d/NAME.res
fio_run() {
  local name=$1 s=$2 rw=$3 bs=$4; shift 4
  fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$d/$s.sock" --rw="$rw" --bs="$bs" \
    --iodepth=16 --size=1G --randrepeat=0 --output-format=json --output="$d/$name.json" "$@" \
    >>"$d/fio.log" 2>&1 || { echo "fio $name failed:" >&2; tail -20 "$d/fio.log" >&2; exit 1; }
  jq -r '.jobs[0].write | "\(.total_ios) \(.runtime)"' "$d/$name.json" >>"$d/$name.res"
}
timed() { fio_run "$1" "$2" randwrite 4k --time_based=1 --runtime="$secs"; }
burst() { fio_run "$1" "$2" randwrite 4k --number_ios="$n"; }
iops() { awk '{ i += $1; t += $2 } END { printf "%.0f", i * 1000 / t }' "$d/$1.res"; }

extra=()
[ -z "${FLEECE_DIR:-}" ] || extra=("cbt-fleece-dir=$FLEECE_DIR")
for s in A B C; do
  truncate -s 1G "$d/$s.raw"
  start "$d/$s.sock" nbdkit -f -U "$d/$s.sock" --filter="$filter" file "$d/$s.raw" \
    cbt-file="$d/$s.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$d/$s.ctl" "${extra[@]}"
  fio_run "warm$s" "$s" write 1M  # allocates and fills the disk (non-zero), b0 all dirty
done
ctl C backup-begin '{"new": "c"}' >/dev/null
fio_run preserve C write 1M
ctl C query-backup | jq -r '."copied-blocks"' >"$d/c.before"

k=0
for r in $(seq "$rounds"); do
  timed "a.r$r" A
  for _ in $(seq "$bursts"); do burst "ab.r$r" A; done
  for _ in $(seq "$bursts"); do
    k=$((k + 1))
    ctl B backup-begin "{\"new\": \"s$k\"}" >/dev/null
    burst "b.r$r" B
    ctl B query-backup | jq -r '"\(."copied-blocks") \(."zero-blocks") \(."write-waits") \(.broken)"' >>"$d/b.cbw"
    ctl B backup-end >/dev/null
    ctl B bitmap-remove "{\"name\": \"s$k\"}" >/dev/null
  done
  timed "c.r$r" C
  echo "$(iops "a.r$r") $(iops "ab.r$r") $(iops "b.r$r") $(iops "c.r$r")" >>"$d/rounds"
done
ctl C query-backup | jq -r '"\(."copied-blocks") \(."stored-bytes") \(.broken)"' >"$d/c.after"
ctl C backup-end >/dev/null

if grep -qv ' null$' "$d/b.cbw"; then echo "a session broke during (b):" >&2; cat "$d/b.cbw" >&2; exit 1; fi
read -r cafter cstored cbroken <"$d/c.after"
[ "$cbroken" = null ] || { echo "session (c) broke: $cbroken" >&2; exit 1; }
# Medians per column; each ratio is the median of the per-round ratios.
colmed() { awk -v c="$1" '{ print $c }' "$d/rounds" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ratmed() { awk -v c="$1" '{ print $c / $1 }' "$d/rounds" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
A=$(colmed 1); AB=$(colmed 2); B=$(colmed 3); C=$(colmed 4)
RAB=$(ratmed 2); RB=$(ratmed 3); RC=$(ratmed 4)
RBAB=$(awk '{ print $3 / $2 }' "$d/rounds" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
blocks=$((1024 * 1024 * 1024 / 65536))
bw=$(cat "$d"/b.r*.res | awk '{ i += $1 } END { print i }')
bc=$(awk '{ c += $1 } END { print c }' "$d/b.cbw")
bz=$(awk '{ c += $2 } END { print c }' "$d/b.cbw")
bwait=$(awk '{ c += $3 } END { print c }' "$d/b.cbw")
echo "backup copy-before-write bench: fio nbd engine, 4k randwrite QD16, 1 GiB raw disks, 64 KiB copy" \
  "blocks, stores in ${FLEECE_DIR:-$d}; a and c ${secs}s, b and a' $bursts bursts of $n writes per round; median of $rounds rounds, $(date -u +%F)"
echo
echo "| run | IOPS | ratio to a |"
echo "|---|---|---|"
row() { awk -v l="$1" -v v="$2" -v r="$3" 'BEGIN { printf "| %s | %.0f | %.2f |\n", l, v, r }'; }
row "a: no session (${secs} s)" "$A" 1
row "a': no session, bursts of $n writes" "$AB" "$RAB"
row "b: first overwrites (a new session per burst of $n writes)" "$B" "$RB"
row "c: session open, every block already preserved (${secs} s)" "$C" "$RC"
echo
echo "rounds (IOPS a a' b c): $(awk '{ printf "[%s] ", $0 }' "$d/rounds")"
awk -v w="$bw" -v c="$bc" -v z="$bz" -v k="$bwait" -v n="$n" -v nb="$blocks" 'BEGIN {
  printf "b: %d writes, %d copied a block first (%.1f %% first overwrites; expected about %.1f %%), %d of the copies read as zeros, %d writes waited\n",
    w, c, 100 * c / w, 100 * nb * (1 - exp(-n / nb)) / n, z, k }'
echo "c: $(cat "$d/c.before") blocks preserved by the pass, $cafter at the end (of $blocks), $cstored bytes stored"
awk -v b="$RB" -v bab="$RBAB" -v c="$RC" 'BEGIN {
  printf "b/a = %.2f (target >= 0.5: %s), b/a'"'"' = %.2f; c/a = %.2f (target >= 0.95: %s) (medians of the per-round ratios)\n",
    b, (b >= 0.5 ? "met" : "NOT met"), bab, c, (c >= 0.95 ? "met" : "NOT met") }'
