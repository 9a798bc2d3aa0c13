#!/usr/bin/env bash
# qemu-img's habits the cbt tool accepts:
#  - -f qcow2 on every subcommand (and bitmap's -F for -b), other formats
#    refused with an error naming the option;
#  - info/check/map -U (--force-share) look at a container a running writer
#    (qemu-nbd) holds, exactly when qemu-img info -U does, without stopping
#    it; without -U both refuse; -U with a repair is refused; bitmaps the
#    writer holds in use stay unreadable.
source "$(dirname "$0")/cli_lib.sh" "$@"

cbt_ok create -f qcow2 d.cbt --size 64M
cbt_ok bitmap -f qcow2 d.cbt b0 --add
cbt_ok bitmap d.cbt b1 --add --disabled
cbt_ok info -f qcow2 d.cbt
cbt_ok check -f qcow2 d.cbt
cbt_ok map -f qcow2 d.cbt -B b0
cbt_ok recover -f qcow2 d.cbt --bitmap b0
cp d.cbt before
for sub in "info d.cbt" "check d.cbt" "map d.cbt -B b0" "recover d.cbt --bitmap b0" \
           "bitmap d.cbt b0 --clear" "create n.cbt --size 1M"; do
  # shellcheck disable=SC2086
  cbt_err 1 ${sub%% *} -f raw ${sub#* }
  expect_in "$ERR" "-f raw" "qcow2 files only"
done
cbt_err 1 bitmap d.cbt b0 --merge b1 -b before -F vmdk
expect_in "$ERR" "-F vmdk" "qcow2 files only"
cbt_err 1 bitmap d.cbt b0 --clear -F qcow2
expect_in "$ERR" "-F" "-b"
cbt_ok bitmap d.cbt b0 --merge b1 -b before -F qcow2
[ ! -e n.cbt ] || fail "create -f raw created n.cbt"
echo "ok: -f/-F qcow2 accepted, other formats refused"

# A writer holds d.cbt.
qemu-io -f qcow2 -c 'write 0 64k' d.cbt >/dev/null
# -t: keep serving after the client below disconnects (without it qemu-nbd
# may exit before the kill, and the kill fails).
qemu-nbd -t -f qcow2 -k "$T/s.sock" d.cbt 2>"$T/nbd.err" &
NBD=$!; PIDS+=("$NBD")
wait_served "$T/s.sock" || fail "qemu-nbd did not start: $(cat "$T/nbd.err")"
! qemu-img info d.cbt >/dev/null 2>&1 || fail "setup: qemu-img info opens a file qemu-nbd holds"
qemu-img info -U d.cbt >/dev/null || fail "setup: qemu-img info -U refuses"
cbt_err 1 info d.cbt
expect_in "$ERR" "d.cbt" "stop it first"
cbt_ok info -U d.cbt
cbt_ok info --force-share --output=json d.cbt
q=$(qemu-img info -U --output=json d.cbt | jq -c '[."format-specific".data.bitmaps[] | {name, flags}]')
c=$(jq -c '[.bitmaps[] | {name, flags}]' "$T/out")
[ "$q" = "$c" ] || fail "info -U: qemu-img says $q, cbt $c"
qrc=0; qemu-img check -U d.cbt >/dev/null 2>&1 || qrc=$?
crc=0; "$CBT" check -U d.cbt >/dev/null 2>&1 || crc=$?
[ "$qrc" = "$crc" ] || fail "check -U: qemu-img $qrc, cbt $crc"
# qemu-nbd marks every bitmap in use while it runs: -U reads, but an in-use
# bitmap stays refused.
cbt_err 1 map -U d.cbt -B b1
expect_in "$ERR" "in use"
cbt_err 1 check -U -r all d.cbt
expect_in "$ERR" "-U"
cbt_err 1 bitmap d.cbt b0 --clear
# The writer was not disturbed: it still serves and writes.
timeout 10 qemu-io -f raw -c 'write 1M 64k' "nbd+unix:///?socket=$T/s.sock" >/dev/null ||
  fail "qemu-nbd no longer serves after cbt -U"
kill -TERM "$NBD"; wait "$NBD" 2>/dev/null || true
cbt_ok info d.cbt
expect_same_map d.cbt b0
qcheck d.cbt
echo "OK: -f qcow2 and -U as qemu-img"
