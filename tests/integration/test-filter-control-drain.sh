#!/usr/bin/env bash
# An online edit drains the changes in flight, with a bound: nbdkit's delay
# filter below cbt holds a write in the plugin for 4 s; a checkpoint sent
# meanwhile (cbt-drain-timeout=300) is refused Busy naming the change in
# flight, changes nothing, and the write completes; a checkpoint once it has
# completed succeeds. The frozen bitmap holds the slow write (it was
# answered before the checkpoint), as QEMU reads the container after stop.
source "$(dirname "$0")/lib.sh"
need python3 qemu-io jq

ctl() { ctl_call "$1" "$2"; }
in_flight_is() {
  [ "$(ctl "$T/ctl" '{"execute":"query-stats"}' | jq '.return."changes-in-flight"')" = "$1" ]
}

truncate -s 64M "$T/disk.raw"
URI="nbd+unix:///?socket=$T/sock"
start_nbdkit "$T/sock" --filter="$FILTER" --filter=delay file "$T/disk.raw" delay-write=4 \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 cbt-create=true cbt-control="$T/ctl" \
  cbt-drain-timeout=300

timeout 60 qemu-io -f raw "$URI" -c "write 1M 4k" >"$T/qio.out" 2>&1 &
qio=$!; PIDS+=("$qio")
wait_for 30 in_flight_is 1 || fail "the slow write never showed as in flight"
r=$(ctl "$T/ctl" '{"execute":"checkpoint","arguments":{"freeze":"b0","new":"b1"},"id":1}')
jq -e '.id == 1 and .error.class == "Busy" and
  (.error.desc | test("1 change\\(s\\) still in flight after 300 ms"))' <<<"$r" >/dev/null ||
  fail "checkpoint during a held write: $r"
r=$(ctl "$T/ctl" '{"execute":"query-bitmaps"}')
jq -e '[.return.bitmaps[].name] == ["b0"] and .return.bitmaps[0].recording' <<<"$r" >/dev/null ||
  fail "a refused checkpoint changed the set: $r"
wait "$qio" || fail "the slow write failed: $(cat "$T/qio.out")"
grep -q "wrote 4096/4096 bytes at offset 1048576" "$T/qio.out" ||
  fail "qemu-io: $(cat "$T/qio.out")"
r=$(ctl "$T/ctl" '{"execute":"checkpoint","arguments":{"freeze":"b0","new":"b1"},"id":2}')
[ "$(jq -c . <<<"$r")" = '{"id":2,"return":{}}' ] || fail "checkpoint after the write: $r"
stop_nbdkit "$NBDKIT_PID"

got=$(qemu_map "$T/disk.cbt" b0 | jq -c '[.[] | select(.dirty) | [.start, .length]]')
[ "$got" = '[[1048576,65536]]' ] || fail "frozen b0 as QEMU reads it: $got"
got=$(qemu_map "$T/disk.cbt" b1 | jq -c '[.[] | select(.dirty)]')
[ "$got" = '[]' ] || fail "b1 as QEMU reads it: $got"
echo "OK: an edit during a held write is Busy after cbt-drain-timeout and changes nothing;" \
  "after the write it succeeds and the frozen bitmap holds it"
