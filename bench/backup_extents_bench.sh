#!/usr/bin/env bash
# All dirty extents of a large disk over NBD block status, as the metadata
# context qemu:dirty-bitmap:NAME (the backup endpoint, docs/backup.md), against
# qemu-nbd serving the same bitmap straight from a qcow2.
#
# Setup: the cbt filter over nbdkit's null plugin (SIZE, writes discarded),
# b0 recording; fio (nbd engine, fixed seed, random map: no block twice)
# writes PERCENT of the disk's 64 KiB granules once each, at scattered random
# offsets. Then, measured:
#   ours      `cbt backup begin --freeze b0 --new b1 --nbd-socket EP` (the
#             endpoint: qemu-nbd over a carrier, data from the filter's
#             point-in-time export); its start is timed too
#   baseline  after `cbt backup end` and a stop of nbdkit (b0 is stored,
#             disabled, in the container): `qemu-nbd -r -f qcow2 -B b0` on the
#             container itself, a qcow2 holding that bitmap
# On each: nbdinfo --map=qemu:dirty-bitmap:b0 (to a file, its dirty bytes
# summed afterwards) and bench/backup_bench_client count (libnbd block status
# loop), ROUNDS times each, alternating; the table shows the medians. Every
# answer is checked against the dirty bytes the filter reports for b0: a
# wrong count is an error, not a figure. Numbers on a shared 2-core VM vary:
# compare within one run.
#   bench/backup_extents_bench.sh [BUILD_DIR] [SIZE=1T] [PERCENT=1] [ROUNDS=3]
set -euo pipefail
build=$(realpath "${1:-build/default}")
size=${2:-1T}
percent=${3:-1}
rounds=${4:-3}
filter="$build/plugin/nbdkit-cbt-filter.so"
cbt="$build/server/cbt"
client="$build/bench/backup_bench_client"
for f in "$filter" "$cbt" "$client"; do [ -x "$f" ] || [ -f "$f" ] || { echo "not built: $f" >&2; exit 1; }; done
for t in nbdkit qemu-nbd nbdinfo fio jq python3; do
  command -v "$t" >/dev/null || { echo "$t is not installed" >&2; exit 1; }
done
d=$(mktemp -d "${TMPDIR:-/tmp}/cbt-extents-bench.XXXXXX")
pids=()
cleanup() {
  # The endpoint's qemu-nbd is a daemon (not our child): end it by its pid
  # file, only while that pid is a qemu-nbd serving our socket.
  if [ -f "$d/ep.sock.pid" ]; then
    local p; p=$(cat "$d/ep.sock.pid" 2>/dev/null || true)
    if [ -n "$p" ] && tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q "qemu-nbd.*$d/ep.sock"; then
      kill -9 "$p" 2>/dev/null || true
    fi
  fi
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$d"
}
trap cleanup EXIT

start() {  # start SOCK CMD... ; waits for the socket, sets $srv
  rm -f "$1"; local s=$1; shift
  "$@" >>"$d/server.log" 2>&1 &
  srv=$!; pids+=("$srv"); disown "$srv" 2>/dev/null || true
  for _ in $(seq 200); do [ -S "$s" ] && return 0; sleep 0.05; done
  echo "server did not start: $*" >&2; cat "$d/server.log" >&2; exit 1
}
stop() { kill -TERM "$1"; while kill -0 "$1" 2>/dev/null; do sleep 0.05; done; }
now() { date +%s.%N; }
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

bytes=$(numfmt --from=iec "$size")
granules=$((bytes / 65536))
ndirty=$(awk -v g="$granules" -v p="$percent" 'BEGIN { printf "%d", g * p / 100 }')

start "$d/src.sock" nbdkit -f -U "$d/src.sock" --filter="$filter" null "$bytes" \
  cbt-file="$d/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$d/ctl"
t0=$(now)
fio --name=dirty --ioengine=nbd --uri="nbd+unix:///?socket=$d/src.sock" --rw=randwrite --bs=64k \
  --iodepth=16 --size="$bytes" --number_ios="$ndirty" --randseed=1 --output-format=json \
  --output="$d/dirty.json" >>"$d/fio.log" 2>&1 || { tail -20 "$d/fio.log" >&2; exit 1; }
t1=$(now)
written=$(jq '.jobs[0].write.total_ios' "$d/dirty.json")
expect=$(ctl query-bitmaps | jq '.bitmaps[] | select(.name == "b0") | ."dirty-bytes"')
[ "$written" = "$ndirty" ] || { echo "fio wrote $written blocks, not $ndirty" >&2; exit 1; }
[ "$expect" = $((ndirty * 65536)) ] ||
  { echo "b0 has $expect dirty bytes, fio wrote $ndirty distinct 64 KiB blocks" >&2; exit 1; }

t2=$(now)
"$cbt" backup begin --socket "$d/ctl" --freeze b0 --new b1 --nbd-socket "$d/ep.sock" \
  --output=json >"$d/begin.json"
t3=$(now)
ours_uri=$(jq -r .uri "$d/begin.json")
ctx=$(jq -r .context "$d/begin.json")
[ "$ctx" = "qemu:dirty-bitmap:b0" ] || { echo "endpoint context is $ctx" >&2; exit 1; }

measure() {  # measure NAME URI: one round of both clients -> $d/NAME.{nbdinfo,client}
  local a b sum
  a=$(now)
  nbdinfo --map="$ctx" "$2" >"$d/map.txt"
  b=$(now)
  sum=$(awk '$3 == 1 { s += $2 } END { printf "%.0f", s }' "$d/map.txt")
  [ "$sum" = "$expect" ] || { echo "$1: nbdinfo shows $sum dirty bytes, expected $expect" >&2; exit 1; }
  echo "$a $b $(wc -l <"$d/map.txt")" | awk '{ printf "%.6f %d\n", $2 - $1, $3 }' >>"$d/$1.nbdinfo"
  "$client" count "$2" "$ctx" "$expect" >"$d/count.json" ||
    { echo "$1: the libnbd loop counted wrong" >&2; exit 1; }
  jq -r '"\(.seconds) \(.extents) \(.requests)"' "$d/count.json" >>"$d/$1.client"
}

for _ in $(seq "$rounds"); do measure ours "$ours_uri"; done
"$cbt" backup end --socket "$d/ctl" >/dev/null
stop "$srv"

# Baseline: the same bitmap, stored in the container by the filter (frozen,
# disabled), served by qemu-nbd from the qcow2 directly (the container has no
# data clusters: the data reads as zeros, which block status never reads).
start "$d/base.sock" qemu-nbd -r -t -f qcow2 -x backup -B b0 -k "$d/base.sock" "$d/disk.cbt"
base_uri="nbd+unix:///backup?socket=$d/base.sock"
for _ in $(seq "$rounds"); do measure base "$base_uri"; done
stop "$srv"

med() { sort -g -k"$2" "$d/$1" | awk -v c="$2" '{ v[NR] = $c } END { print v[int((NR + 1) / 2)] }'; }
on=$(med ours.nbdinfo 1); bn=$(med base.nbdinfo 1)
oc=$(med ours.client 1); bc=$(med base.client 1)
echo "backup extents bench: $size disk, $percent % of its 64 KiB granules dirty" \
  "($ndirty, fio seed 1), median of $rounds rounds, $(date -u +%F)"
echo
echo "| run | ours: endpoint (cbt backup begin --nbd-socket) | baseline: qemu-nbd -B on a qcow2 | ratio ours / baseline |"
echo "|---|---|---|---|"
awk -v o="$on" -v b="$bn" 'BEGIN { printf "| nbdinfo --map=qemu:dirty-bitmap:b0, whole disk | %.3f s | %.3f s | %.2f |\n", o, b, o / b }'
awk -v o="$oc" -v b="$bc" 'BEGIN { printf "| libnbd block status loop (backup_bench_client count) | %.3f s | %.3f s | %.2f |\n", o, b, o / b }'
echo
echo "extents (dirty and clean descriptors, libnbd loop): $(med ours.client 2) ours, $(med base.client 2) baseline;" \
  "block status requests: $(med ours.client 3) / $(med base.client 3); nbdinfo map lines: $(med ours.nbdinfo 2) / $(med base.nbdinfo 2)"
echo "dirty bytes: $expect, equal in every answer of both servers"
awk -v s="$(echo "$t2 $t3" | awk '{ print $2 - $1 }')" -v f="$(echo "$t0 $t1" | awk '{ print $2 - $1 }')" \
  'BEGIN { printf "cbt backup begin --nbd-socket (session, extents over the control socket, carrier, qemu-nbd start): %.3f s; making the dirty set (fio): %.1f s\n", s, f }'
awk -v o="$on" -v c="$oc" 'BEGIN { m = o > c ? o : c; printf "target < 1 s for ours: %s (slowest client %.3f s)\n", (m < 1 ? "met" : "NOT met"), m }'
echo "raw rounds (s): ours nbdinfo [$(cut -d' ' -f1 "$d/ours.nbdinfo" | xargs | tr ' ' ,)]" \
  "client [$(cut -d' ' -f1 "$d/ours.client" | xargs | tr ' ' ,)];" \
  "baseline nbdinfo [$(cut -d' ' -f1 "$d/base.nbdinfo" | xargs | tr ' ' ,)]" \
  "client [$(cut -d' ' -f1 "$d/base.client" | xargs | tr ' ' ,)]"
