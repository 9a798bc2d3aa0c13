#!/usr/bin/env bash
# What a checkpoint every second costs the writers (issue 9): fio (nbd
# engine, unix socket, 4k randwrite, QD16) against the cbt filter over the
# file plugin (default durability, power), on two servers side by side, each
# with its own preallocated 1 GiB raw disk (in $TMPDIR, default /tmp: must be
# a real disk, not tmpfs) warmed so every granule of b0 is dirty:
#   plain  no checkpoints
#   ckpt   bench/checkpoint_bench.py loop: every second `checkpoint` freezes
#          the recording bitmap and starts the next (b0 -> r1c0 -> r1c1 ...),
#          and half a second later `bitmap-remove` drops the frozen one (one
#          bitmap at a time; the remove's own pause is reported apart)
# Rounds are interleaved (plain, ckpt, plain, ckpt ...); the summary gives the
# medians, the throughput ratio (target >= 0.95), the checkpoint round trip
# as the client sees it, and the longest write latency (fio's per-I/O latency
# log, unix-epoch timestamps) completing around a checkpoint (target < 10 ms).
# Numbers on a shared 2-core VM vary: compare within one run.
#   bench/checkpoint_bench.sh [BUILD_DIR] [SECONDS_PER_RUN] [ROUNDS]
set -euo pipefail
build=$(realpath "${1:-build/default}")
secs=${2:-10}
rounds=${3:-3}
here=$(dirname "$(realpath "$0")")
filter="$build/plugin/nbdkit-cbt-filter.so"
[ -f "$filter" ] || { echo "filter not built: $filter" >&2; exit 1; }
for t in nbdkit fio jq python3; do
  command -v "$t" >/dev/null || { echo "$t is not installed" >&2; exit 1; }
done
d=$(mktemp -d "${TMPDIR:-/tmp}/cbt-ckpt-bench.XXXXXX")
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

# fio_run NAME SOCK RW BS [fio args]
fio_run() {
  local name=$1 sock=$2 rw=$3 bs=$4; shift 4
  fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw="$rw" --bs="$bs" \
    --iodepth=16 --size=1G --time_based=1 --runtime="$secs" --output-format=json \
    --output="$d/$name.json" "$@" >>"$d/fio.log" 2>&1 ||
    { echo "fio $name failed:" >&2; tail -20 "$d/fio.log" >&2; exit 1; }
}

for n in plain ckpt; do
  truncate -s 1G "$d/$n.raw"
  dd if=/dev/zero of="$d/$n.raw" bs=1M count=1024 conv=notrunc status=none
  start "$d/$n.sock" nbdkit -f -U "$d/$n.sock" --filter="$filter" file "$d/$n.raw" \
    cbt-file="$d/$n.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$d/$n.ctl"
  fio_run "warm-$n" "$d/$n.sock" write 1M --runtime=0 --time_based=0  # b0 all dirty
done

for r in $(seq "$rounds"); do
  fio_run "plain.r$r" "$d/plain.sock" randwrite 4k \
    --write_lat_log="$d/plain.r$r" --log_unix_epoch=1
  # The loop's last checkpoint falls inside fio's run.
  python3 "$here/checkpoint_bench.py" loop "$d/ckpt.ctl" "$(awk -v s="$secs" 'BEGIN { print s - 0.5 }')" 1 \
    "$d/ckpt.r$r.ckpt.json" --prefix "r${r}c" &
  loop=$!; pids+=("$loop")
  fio_run "ckpt.r$r" "$d/ckpt.sock" randwrite 4k \
    --write_lat_log="$d/ckpt.r$r" --log_unix_epoch=1
  wait "$loop" || { echo "checkpoint loop failed (round $r)" >&2; exit 1; }
done

echo "checkpoint bench: fio nbd engine, 4k randwrite QD16, ${secs}s per run, $rounds interleaved" \
  "rounds, cbt-durability=power (default), $(date -u +%F)"
echo
python3 "$here/checkpoint_bench.py" report "$d" "$rounds"
python3 -c '
import json, socket, sys
def call(path, cmd):
    s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(path)
    s.sendall(json.dumps({"execute": cmd}).encode() + b"\n"); b = b""
    while not b.endswith(b"\n"): b += s.recv(65536)
    return json.loads(b)["return"]
st = call(sys.argv[1], "query-stats")
ms = st["longest-drain-us"] / 1e3
print("server side (query-stats): %d edits (checkpoints and removes), longest pause of the writers "
      "by an edit (drain and swap; the store runs while writes go on) %.2f ms (target < 10 ms): %s"
      % (st["edits"], ms, "met" if ms < 10 else "NOT met"))
print("bitmaps on the checkpointed server at the end:",
      [b["name"] for b in call(sys.argv[1], "query-bitmaps")["bitmaps"]])' "$d/ckpt.ctl"
