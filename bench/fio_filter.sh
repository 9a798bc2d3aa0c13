#!/usr/bin/env bash
# fio (nbd engine, unix socket, QD16) against nbdkit's file plugin with and
# without the cbt filter, and against qemu-nbd serving a qcow2 with an
# enabled persistent bitmap. All servers run side by side on their own
# preallocated disks; each round runs every workload on every server in turn,
# and the table reports the median of the rounds, with ratios to the bare
# plugin. Numbers on a shared 2-core VM still vary: compare ratios only.
#   bench/fio_filter.sh [BUILD_DIR] [SECONDS_PER_RUN] [ROUNDS]
set -euo pipefail
build=$(realpath "${1:-build/default}")
secs=${2:-5}
rounds=${3:-3}
filter="$build/plugin/nbdkit-cbt-filter.so"
d=$(mktemp -d /tmp/cbt-bench.XXXXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$d"' EXIT

start() {  # start SOCK CMD... ; waits for the socket, sets $srv
  rm -f "$1"; local s=$1; shift
  "$@" >>"$d/server.log" 2>&1 &
  srv=$!; pids+=("$srv")
  for _ in $(seq 200); do [ -S "$s" ] && return 0; sleep 0.05; done
  echo "server did not start: $*" >&2; cat "$d/server.log" >&2; exit 1
}
stop() { kill -TERM "$1"; wait "$1" 2>/dev/null || true; }

# fio_run NAME SOCK RW BS [fio args] -> appends "iops MiB/s" to $d/NAME.res
fio_run() {
  local name=$1 sock=$2 rw=$3 bs=$4; shift 4
  fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw="$rw" --bs="$bs" \
    --iodepth=16 --size=1G --time_based=1 --runtime="$secs" --output-format=json \
    --output="$d/$name.json" "$@" >>"$d/fio.log" 2>&1
  jq -r '.jobs[0].write | "\(.iops) \(.bw / 1024)"' "$d/$name.json" >>"$d/$name.res"
}
warm() { fio_run warm "$1" write 1M --runtime=0 --time_based=0; }

for n in bare cbt qemu; do
  truncate -s 1G "$d/$n.raw"
  dd if=/dev/zero of="$d/$n.raw" bs=1M count=1024 conv=notrunc status=none
done
start "$d/bare.sock" nbdkit -f -U "$d/bare.sock" file "$d/bare.raw"
start "$d/cbt.sock" nbdkit -f -U "$d/cbt.sock" --filter="$filter" file "$d/cbt.raw" \
  cbt-file="$d/cbt.cbt" cbt-bitmap=b0 cbt-create=true
warm "$d/cbt.sock"  # steady state: every granule already dirty and persisted
qemu-img create -q -f qcow2 -o preallocation=metadata "$d/q.qcow2" 1G
qemu-img bitmap --add "$d/q.qcow2" b0
start "$d/q.sock" qemu-nbd -t -f qcow2 -k "$d/q.sock" "$d/q.qcow2"
warm "$d/q.sock"

for r in $(seq "$rounds"); do
  fio_run bare_rand "$d/bare.sock" randwrite 4k
  fio_run cbt_rand "$d/cbt.sock" randwrite 4k
  fio_run qemu_rand "$d/q.sock" randwrite 4k
  fio_run bare_seq "$d/bare.sock" write 1M
  fio_run cbt_seq "$d/cbt.sock" write 1M
  fio_run bare_fsync "$d/bare.sock" randwrite 4k --fsync=8
  fio_run cbt_fsync "$d/cbt.sock" randwrite 4k --fsync=8
  # First touches: a new container on a 64 GiB sparse disk per round.
  rm -f "$d/fresh.cbt" "$d/fresh.raw"; truncate -s 64G "$d/fresh.raw"
  start "$d/fresh.sock" nbdkit -f -U "$d/fresh.sock" --filter="$filter" file "$d/fresh.raw" \
    cbt-file="$d/fresh.cbt" cbt-bitmap=b0 cbt-create=true
  fio_run fresh_rand "$d/fresh.sock" randwrite 4k --size=64G
  stop "$srv"
  rm -f "$d/fresh.sock" "$d/fresh.raw"; truncate -s 64G "$d/fresh.raw"
  start "$d/fresh.sock" nbdkit -f -U "$d/fresh.sock" file "$d/fresh.raw"
  fio_run freshbare_rand "$d/fresh.sock" randwrite 4k --size=64G
  stop "$srv"
done

med() {  # median of column $2 in $d/$1.res
  sort -g -k"$2" "$d/$1.res" | awk -v c="$2" '{ v[NR] = $c } END { print v[int((NR + 1) / 2)] }'
}
row() {  # row LABEL NAME BASE COL
  local v b; v=$(med "$2" 1); b=$(med "$3" 1)
  awk -v l="$1" -v v="$v" -v w="$(med "$2" 2)" -v b="$b" \
    'BEGIN { printf "| %s | %.0f | %.1f | %.2f |\n", l, v, w, v / b }'
}
echo "fio nbd engine, QD16, ${secs}s per run, median of $rounds rounds, $(date -u +%F)"
echo
echo "| run | IOPS | MiB/s | ratio to bare |"
echo "|---|---|---|---|"
row "bare file plugin, 4k randwrite" bare_rand bare_rand
row "cbt, steady state, 4k randwrite" cbt_rand bare_rand
row "qemu-nbd qcow2 + persistent bitmap, 4k randwrite" qemu_rand bare_rand
row "bare, 64 GiB sparse disk, 4k randwrite" freshbare_rand freshbare_rand
row "cbt, fresh bitmap (first touches), 64 GiB sparse disk" fresh_rand freshbare_rand
row "bare, 1M seq write" bare_seq bare_seq
row "cbt, 1M seq write" cbt_seq bare_seq
row "bare, 4k randwrite, fsync=8" bare_fsync bare_fsync
row "cbt, 4k randwrite, fsync=8" cbt_fsync bare_fsync
echo
awk -v a="$(med cbt_rand 1)" -v b="$(med qemu_rand 1)" 'BEGIN { printf "cbt steady / qemu-nbd: %.2f\n", a / b }'
echo "per-round raw results: $(for f in "$d"/*.res; do printf '%s=[%s] ' "$(basename "$f" .res)" "$(cut -d' ' -f1 "$f" | xargs | tr ' ' ',')"; done)"
