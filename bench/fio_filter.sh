#!/usr/bin/env bash
# fio (nbd engine, unix socket, QD16) against nbdkit's file plugin with and
# without the cbt filter (each durability mode), and against qemu-nbd serving a qcow2 with an
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
  srv=$!; pids+=("$srv"); disown "$srv" 2>/dev/null || true
  for _ in $(seq 200); do [ -S "$s" ] && return 0; sleep 0.05; done
  echo "server did not start: $*" >&2; cat "$d/server.log" >&2; exit 1
}
stop() { kill -TERM "$1"; while kill -0 "$1" 2>/dev/null; do sleep 0.05; done; }

# fio_run NAME SOCK RW BS [fio args] -> appends "iops MiB/s" to $d/NAME.res
fio_run() {
  local name=$1 sock=$2 rw=$3 bs=$4; shift 4
  fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw="$rw" --bs="$bs" \
    --iodepth=16 --size=1G --time_based=1 --runtime="$secs" --output-format=json \
    --output="$d/$name.json" "$@" >>"$d/fio.log" 2>&1
  jq -r '.jobs[0].write | "\(.iops) \(.bw / 1024)"' "$d/$name.json" >>"$d/$name.res"
}
warm() { fio_run warm "$1" write 1M --runtime=0 --time_based=0; }

for n in bare none process power qemu; do
  truncate -s 1G "$d/$n.raw"
  dd if=/dev/zero of="$d/$n.raw" bs=1M count=1024 conv=notrunc status=none
done
start "$d/bare.sock" nbdkit -f -U "$d/bare.sock" file "$d/bare.raw"
for m in none process power; do  # one steady-state cbt server per durability mode
  start "$d/$m.sock" nbdkit -f -U "$d/$m.sock" --filter="$filter" file "$d/$m.raw" \
    cbt-file="$d/$m.cbt" cbt-bitmap=b0 cbt-create=true cbt-durability=$m
  warm "$d/$m.sock"  # every granule dirty and persisted
done
qemu-img create -q -f qcow2 -o preallocation=metadata "$d/q.qcow2" 1G
qemu-img bitmap --add "$d/q.qcow2" b0
start "$d/qemu.sock" qemu-nbd -t -f qcow2 -k "$d/qemu.sock" "$d/q.qcow2"
warm "$d/qemu.sock"

# First touches: a new container on a fresh 64 GiB sparse disk (1M granules,
# 1024 intent regions), so most writes of the run hit a clean granule.
fresh() {  # fresh NAME [filter args...]
  local name=$1; shift
  rm -f "$d/fresh.cbt" "$d/fresh.raw" "$d/fresh.sock"; truncate -s 64G "$d/fresh.raw"
  if [ $# -gt 0 ]; then
    start "$d/fresh.sock" nbdkit -f -U "$d/fresh.sock" --filter="$filter" file "$d/fresh.raw" \
      cbt-file="$d/fresh.cbt" cbt-bitmap=b0 cbt-create=true "$@"
  else
    start "$d/fresh.sock" nbdkit -f -U "$d/fresh.sock" file "$d/fresh.raw"
  fi
  fio_run "$name" "$d/fresh.sock" randwrite 4k --size=64G
  stop "$srv"
}

for r in $(seq "$rounds"); do
  fio_run bare_rand "$d/bare.sock" randwrite 4k
  for m in none process power; do fio_run ${m}_rand "$d/$m.sock" randwrite 4k; done
  fio_run qemu_rand "$d/qemu.sock" randwrite 4k
  fio_run bare_seq "$d/bare.sock" write 1M
  fio_run power_seq "$d/power.sock" write 1M
  fio_run bare_fsync "$d/bare.sock" randwrite 4k --fsync=8
  fio_run none_fsync "$d/none.sock" randwrite 4k --fsync=8
  fio_run power_fsync "$d/power.sock" randwrite 4k --fsync=8
  fresh freshbare_rand
  for m in none process power; do fresh fresh${m}_rand cbt-durability=$m; done
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
for m in none process power; do row "cbt $m, steady state, 4k randwrite" ${m}_rand bare_rand; done
row "qemu-nbd qcow2 + persistent bitmap, 4k randwrite" qemu_rand bare_rand
row "bare, fresh 64 GiB sparse disk, 4k randwrite" freshbare_rand freshbare_rand
for m in none process power; do
  row "cbt $m, first touches (fresh bitmap), 4k randwrite" fresh${m}_rand freshbare_rand
done
row "bare, 1M seq write" bare_seq bare_seq
row "cbt power, 1M seq write" power_seq bare_seq
row "bare, 4k randwrite, fsync=8" bare_fsync bare_fsync
row "cbt none, 4k randwrite, fsync=8" none_fsync bare_fsync
row "cbt power, 4k randwrite, fsync=8" power_fsync bare_fsync
echo
awk -v a="$(med power_rand 1)" -v b="$(med qemu_rand 1)" 'BEGIN { printf "cbt power steady / qemu-nbd: %.2f\n", a / b }'
echo "per-round raw results: $(for f in "$d"/*.res; do printf '%s=[%s] ' "$(basename "$f" .res)" "$(cut -d' ' -f1 "$f" | xargs | tr ' ' ',')"; done)"
