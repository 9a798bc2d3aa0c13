#!/usr/bin/env bash
# cbt-persist-interval=1: while a client stays connected without flushing,
# the periodic persister writes the bitmap and clears in-use.
source "$(dirname "$0")/lib.sh"

truncate -s 64M "$T/disk.raw"
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-persist-interval=1
"$NBD_LOAD" --socket "$T/sock" --seed 51 --ops 200 --no-final-flush \
  --expected "$T/expected.json" --hold-file "$T/hold" &
load=$!; PIDS+=("$load")
wait_for 60 [ -e "$T/hold" ] || fail "client did not finish"
ok=0
for i in $(seq 600); do  # up to 60 s for the 1 s interval on a loaded machine
  if [ "$(bitmap_flags "$T/disk.cbt" b0)" = '["auto"]' ]; then ok=1; break; fi
  sleep 0.1
done
[ $ok = 1 ] || fail "in-use still set: periodic persist did not run"
# Kill -9 now: the periodic persist alone must have stored everything.
kill9_nbdkit "$NBDKIT_PID"
rm -f "$T/hold"; wait "$load" || true
[ "$(qemu_map "$T/disk.cbt" b0)" = "$(normalize "$T/expected.json")" ] || fail "map differs"
echo "OK: periodic persist stored the bitmap and cleared in-use"
