#!/usr/bin/env bash
# Any plugin: the same map check over the memory plugin, and over the nbd
# plugin chained to a qemu-nbd that serves a qcow2 data image (external
# container).
source "$(dirname "$0")/lib.sh"

# memory plugin
start_nbdkit "$T/sock" --filter="$FILTER" memory 96M \
  cbt-file="$T/mem.cbt" cbt-bitmap=b0 cbt-create=true
"$NBD_LOAD" --socket "$T/sock" --seed 31 --ops 1500 --expected "$T/mem.json"
stop_nbdkit "$NBDKIT_PID"
[ "$(qemu_map "$T/mem.cbt" b0)" = "$(normalize "$T/mem.json")" ] || fail "memory plugin map differs"
echo "ok: memory plugin"

# nbd plugin -> qemu-nbd serving a qcow2 image
qemu-img create -q -f qcow2 "$T/data.qcow2" 80M
qemu-nbd -t -f qcow2 --cache=writeback -k "$T/qsock" "$T/data.qcow2" 2>>"$T/qemu-nbd.log" &
qpid=$!; PIDS+=("$qpid")
wait_served "$T/qsock" || fail "qemu-nbd did not start"
start_nbdkit "$T/sock" --filter="$FILTER" nbd socket="$T/qsock" \
  cbt-file="$T/q.cbt" cbt-bitmap=b0 cbt-create=true cbt-granularity=128K
"$NBD_LOAD" --socket "$T/sock" --seed 32 --ops 1500 --granularity 131072 --expected "$T/q.json"
stop_nbdkit "$NBDKIT_PID"
[ "$(qemu_map "$T/q.cbt" b0)" = "$(normalize "$T/q.json")" ] || fail "nbd plugin map differs"
kill "$qpid"; wait "$qpid" 2>/dev/null || true
qemu-img check "$T/data.qcow2" >/dev/null || fail "data image damaged"
echo "OK: memory and nbd->qemu-nbd(qcow2) plugins"
