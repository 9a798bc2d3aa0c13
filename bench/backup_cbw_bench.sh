#!/usr/bin/env bash
# What an open backup session costs live writes (copy-before-write, engine/
# fleece.h): fio (nbd engine, unix socket, 4k randwrite, QD16, fresh random
# seed per run) against the cbt filter over the file plugin, on a
# preallocated 1 GiB raw disk (in $TMPDIR, default /tmp: a real disk, not
# tmpfs) filled with fio's non-zero data (so preserved blocks are stored, not
# just remembered as zero) and warmed (every granule of b0 dirty):
#   a   no session open, SECONDS
#   a'  no session, bursts of N writes (as b: same fio start-up per burst)
#   b   first overwrites: R bursts of N writes, each in a new session
#       (backup-begin, fio, query-backup, backup-end), so every burst starts
#       with nothing preserved; N = 4096 keeps most writes first overwrites
#       of their 64 KiB block (1 GiB = 16384 blocks; after N random writes
#       about 16384 * (1 - exp(-N / 16384)) are preserved). The fraction of
#       writes that copied a block is reported from query-backup's
#       copied-blocks.
#   c   in a session whose every block is already preserved (a 1M sequential
#       fio pass over the whole disk first), SECONDS
#   a2  no session again, SECONDS (the run's drift)
# Ratios b/a (target >= 0.5) and c/a (target >= 0.95). Numbers on a shared
# 2-core VM vary: compare within one run.
#   bench/backup_cbw_bench.sh [BUILD_DIR] [SECONDS=10] [BURSTS=10] [N=4096]
set -euo pipefail
build=$(realpath "${1:-build/default}")
secs=${2:-10}
bursts=${3:-10}
n=${4:-4096}
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
ctl() {  # ctl COMMAND [ARGS_JSON] -> the reply's "return"
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
print(json.dumps(r["return"]))' "$d/ctl" "$@"
}
# fio_run NAME RW BS [fio args] -> "total_ios runtime_ms" appended to $d/NAME.res
fio_run() {
  local name=$1 rw=$2 bs=$3; shift 3
  fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$d/sock" --rw="$rw" --bs="$bs" \
    --iodepth=16 --size=1G --randrepeat=0 --output-format=json --output="$d/$name.json" "$@" \
    >>"$d/fio.log" 2>&1 || { echo "fio $name failed:" >&2; tail -20 "$d/fio.log" >&2; exit 1; }
  jq -r '.jobs[0].write | "\(.total_ios) \(.runtime)"' "$d/$name.json" >>"$d/$name.res"
}
timed() { fio_run "$1" randwrite 4k --time_based=1 --runtime="$secs"; }
burst() { fio_run "$1" randwrite 4k --number_ios="$n"; }
iops() { awk '{ i += $1; t += $2 } END { printf "%.0f", i * 1000 / t }' "$d/$1.res"; }

truncate -s 1G "$d/disk.raw"
start "$d/sock" nbdkit -f -U "$d/sock" --filter="$filter" file "$d/disk.raw" \
  cbt-file="$d/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$d/ctl"
fio_run warm write 1M  # allocates and fills the disk (non-zero), b0 all dirty

timed a
for i in $(seq "$bursts"); do burst aburst; done
for i in $(seq "$bursts"); do
  ctl backup-begin "{\"new\": \"s$i\"}" >/dev/null
  burst b
  ctl query-backup | jq -r '"\(."copied-blocks") \(."zero-blocks") \(."write-waits") \(.broken)"' >>"$d/b.cbw"
  ctl backup-end >/dev/null
  ctl bitmap-remove "{\"name\": \"s$i\"}" >/dev/null
done
ctl backup-begin '{"new": "c"}' >/dev/null
fio_run preserve write 1M
ctl query-backup | jq -r '."copied-blocks"' >"$d/c.before"
timed c
ctl query-backup | jq -r '"\(."copied-blocks") \(."stored-bytes") \(.broken)"' >"$d/c.after"
ctl backup-end >/dev/null
timed a2

blocks=$((1024 * 1024 * 1024 / 65536))
A=$(iops a); AB=$(iops aburst); B=$(iops b); C=$(iops c); A2=$(iops a2)
bw=$(awk '{ i += $1 } END { print i }' "$d/b.res")
bc=$(awk '{ c += $1 } END { print c }' "$d/b.cbw")
bz=$(awk '{ c += $2 } END { print c }' "$d/b.cbw")
bwait=$(awk '{ c += $3 } END { print c }' "$d/b.cbw")
grep -qv ' null$' "$d/b.cbw" && { echo "a session broke during (b):" >&2; cat "$d/b.cbw" >&2; exit 1; }
read -r cafter cstored cbroken <"$d/c.after"
[ "$cbroken" = null ] || { echo "session (c) broke: $cbroken" >&2; exit 1; }
echo "backup copy-before-write bench: fio nbd engine, 4k randwrite QD16, 1 GiB raw disk," \
  "64 KiB copy blocks; a/c/a2 ${secs}s each, b and a' $bursts bursts of $n writes, $(date -u +%F)"
echo
echo "| run | IOPS | ratio to a |"
echo "|---|---|---|"
row() { awk -v l="$1" -v v="$2" -v b="$A" 'BEGIN { printf "| %s | %.0f | %.2f |\n", l, v, v / b }'; }
row "a: no session (${secs} s)" "$A"
row "a': no session, bursts of $n writes" "$AB"
row "b: first overwrites (new session per burst of $n writes)" "$B"
row "c: session open, every block already preserved (${secs} s)" "$C"
row "a2: no session again (${secs} s)" "$A2"
echo
awk -v w="$bw" -v c="$bc" -v z="$bz" -v k="$bwait" -v n="$n" -v nb="$blocks" -v r="$bursts" 'BEGIN {
  printf "b: %d writes, %d copied a block first (%.1f %% first overwrites; expected about %.1f %%), %d of the copies read as zeros, %d writes waited\n",
    w, c, 100 * c / w, 100 * nb * (1 - exp(-n / nb)) / n, z, k }'
echo "c: $(cat "$d/c.before") blocks preserved by the pass, $cafter at the end (of $blocks), $cstored bytes stored"
awk -v a="$A" -v ab="$AB" -v b="$B" -v c="$C" 'BEGIN {
  printf "b/a = %.2f (target >= 0.5: %s), b/a'"'"' = %.2f; c/a = %.2f (target >= 0.95: %s)\n",
    b / a, (b / a >= 0.5 ? "met" : "NOT met"), b / ab, c / a, (c / a >= 0.95 ? "met" : "NOT met") }'
