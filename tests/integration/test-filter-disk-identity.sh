#!/usr/bin/env bash
# Changes made while no tracker runs (docs/crash-safety.md): a clean stop
# records the raw disk's identity (device, inode, size, mtime) in the
# container; the next start compares it for every enabled bitmap.
#  (c) clean stop/start with no outside change: starts and tracks as before
#  (a) the raw file written directly (dd): refused with the fix, container
#      unchanged (qemu-img check clean, bitmap bits unchanged)
#  (d) cbt-trust-disk=true accepts and records anew
#  (b) the file only touched: refused
#  (e) after 'cbt recover --mark-all' the start succeeds
#  (f) a plugin without identity (memory): said once in the log, works
#  (g) kill -9, then restart: crash recovery as before, no false refusal
#      caused by the session's own writes
#  (h) another disk (path and inode) with this container: the refusal says
#      so first, the recovery only for a moved and changed disk
source "$(dirname "$0")/lib.sh"
need dd touch

truncate -s 64M "$T/disk.raw"
args=(--filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" cbt-bitmap=b0)

# write OFFSET LENGTH PATTERN : through the filter (qemu-io flushes at exit)
write() {
  timeout 60 qemu-io -f raw -c "write -P $3 $1 $2" "nbd+unix:///?socket=$T/sock" >/dev/null ||
    fail "write $1 $2 failed"
}
# session ARGS... : start, write 64k at 1M, stop cleanly
session() {
  start_nbdkit "$T/sock" "${args[@]}" "$@"
  write 1M 64k 0x11
  stop_nbdkit "$NBDKIT_PID"
}
# refused PATTERN : a start over the disk as it is now fails at the first
# client, naming PATTERN and the fix; the container is left as it was
refused() {
  local sum rc=0 map
  sum=$(md5sum <"$T/disk.cbt")
  map=$(qemu_map "$T/disk.cbt" b0)
  timeout 60 "${NBDKIT_ENV[@]}" nbdkit -U - "${args[@]}" \
    --run 'nbdinfo "$uri"' >/dev/null 2>"$T/err" || rc=$?
  [ $rc -ne 124 ] || fail "hung (timeout)"
  [ $rc -ne 0 ] || fail "started over a disk changed while no tracker ran"
  local line
  line=$(grep -m1 "changed while no tracker ran" "$T/err") || fail "no refusal: $(cat "$T/err")"
  for want in "$T/disk.raw" "$1" "cbt recover $T/disk.cbt --bitmap b0 --compare BACKUP" \
      "--mark-all" "cbt-trust-disk=true"; do
    [[ "$line" == *"$want"* ]] || fail "refusal does not name '$want': $line"
  done
  [ "$(md5sum <"$T/disk.cbt")" = "$sum" ] || fail "a refused start changed the container"
  qemu-img check -q "$T/disk.cbt" || fail "qemu-img check after a refused start"
  [ "$(qemu_map "$T/disk.cbt" b0)" = "$map" ] || fail "bitmap bits changed by a refused start"
  echo "ok: refused: $line"
}

session cbt-create=true
id=$("$CBT" info --output=json "$T/disk.cbt" | jq -c '.bitmaps[0]."disk-identity"')
[ "$(jq -r .path <<<"$id")" = "$T/disk.raw" ] || fail "no identity recorded: $id"
[ "$(jq -r .inode <<<"$id")" = "$(stat -c %i "$T/disk.raw")" ] || fail "wrong inode: $id"
[ "$(jq -r .size <<<"$id")" = 67108864 ] || fail "wrong size: $id"
[ "$(jq -r '."mtime-sec"' <<<"$id")" = "$(stat -c %Y "$T/disk.raw")" ] || fail "wrong mtime: $id"
"$CBT" info "$T/disk.cbt" | grep -q "b0: $T/disk.raw (dev" || fail "cbt info shows no identity"
echo "ok: clean stop recorded $id"

# (c)
start_nbdkit "$T/sock" "${args[@]}"
write 8M 64k 0x22
stop_nbdkit "$NBDKIT_PID"
qemu_map "$T/disk.cbt" b0 | grep -q '"start":8388608' || fail "(c) the write was not tracked"
echo "ok: (c) clean stop/start with no outside change tracks as before"

# (a)
dd if=/dev/urandom of="$T/disk.raw" bs=64k seek=512 count=1 conv=notrunc status=none
refused "mtime"

# (d)
start_nbdkit "$T/sock" "${args[@]}" cbt-trust-disk=true
grep -q "accepted for bitmap(s) 'b0' (cbt-trust-disk=true)" "$T/nbdkit.log" ||
  fail "(d) no notice of the trusted change"
write 16M 64k 0x33
stop_nbdkit "$NBDKIT_PID"
session  # recorded anew: accepted without the parameter
echo "ok: (d) cbt-trust-disk=true accepted and recorded anew"

# (b)
touch "$T/disk.raw"
refused "mtime"

# (e)
"$CBT" recover "$T/disk.cbt" --bitmap b0 --mark-all >/dev/null || fail "recover --mark-all"
[ "$(qemu_map "$T/disk.cbt" b0)" = '[{"start":0,"length":67108864,"dirty":true}]' ] ||
  fail "(e) not all dirty: $(qemu_map "$T/disk.cbt" b0)"
session
echo "ok: (e) after cbt recover --mark-all the start succeeds"

# (f)
: >"$T/nbdkit.log"
margs=(-v --filter="$FILTER" memory 64M cbt-file="$T/mem.cbt" cbt-bitmap=b0)
start_nbdkit "$T/sock" "${margs[@]}" cbt-create=true
write 0 64k 0x44
write 1M 64k 0x44
stop_nbdkit "$NBDKIT_PID"
n=$(grep -c "identity cannot be known" "$T/nbdkit.log" || true)
[ "$n" = 1 ] || fail "(f) the notice appeared $n times: $(cat "$T/nbdkit.log")"
"$CBT" info --output=json "$T/mem.cbt" | jq -e '.bitmaps[0]."disk-identity" == null' >/dev/null ||
  fail "(f) an identity recorded for the memory plugin"
start_nbdkit "$T/sock" "${margs[@]}"
stop_nbdkit "$NBDKIT_PID"
echo "ok: (f) memory plugin: one notice, works"

# (g) power mode (the default): a write, kill -9, restart. b0 is all dirty
# since (e): the write needs no mark (the path that must still drop the
# record before the disk changes).
start_nbdkit "$T/sock" "${args[@]}"
# (its writes change the disk's mtime: a stale record would refuse below)
timeout 60 qemu-io -f raw -c "write -P 0x55 40M 64k" \
  "nbd+unix:///?socket=$T/sock" >/dev/null || fail "write"
kill9_nbdkit "$NBDKIT_PID"
: >"$T/nbdkit.log"
start_nbdkit "$T/sock" -v "${args[@]}"
stop_nbdkit "$NBDKIT_PID"
grep -q "no disk identity recorded for bitmap(s) 'b0'" "$T/nbdkit.log" ||
  fail "(g) no notice that outside changes went undetected: $(cat "$T/nbdkit.log")"
# nbdkit -v also says which filter it loaded: cbt's version, as cbt --version's.
ver=$("$CBT" --version | awk '{print $2}')
[ -n "$ver" ] || fail "cbt --version: $("$CBT" --version)"
grep -qF "cbt filter $ver (changed block tracking)" "$T/nbdkit.log" ||
  fail "(g) nbdkit -v does not show the filter's version $ver: $(head -5 "$T/nbdkit.log")"
qemu-img check -q "$T/disk.cbt" || fail "(g) qemu-img check"
session  # and the clean stop recorded it again
echo "ok: (g) kill -9 then restart: no false refusal"

# (h) the container of another disk: g.raw, same size, another file and
# mtime, served with disk.cbt. The refusal leads with the wrong container
# (recovering would hand disk.raw's bitmaps to g.raw), the recovery after.
truncate -s 64M "$T/g.raw"
touch -d 2001-01-01 "$T/g.raw"
sum=$(md5sum <"$T/disk.cbt")
rc=0
timeout 60 "${NBDKIT_ENV[@]}" nbdkit -U - --filter="$FILTER" file "$T/g.raw" \
  cbt-file="$T/disk.cbt" cbt-bitmap=b0 --run 'nbdinfo "$uri"' >/dev/null 2>"$T/err" || rc=$?
[ $rc -ne 124 ] || fail "(h) hung (timeout)"
[ $rc -ne 0 ] || fail "(h) started with another disk's container"
line=$(grep -m1 "this container was made for" "$T/err") || fail "(h) no refusal: $(cat "$T/err")"
lead="$T/disk.cbt: this container was made for disk $T/disk.raw (inode $(stat -c %i "$T/disk.raw")), not for $T/g.raw: use $T/g.raw's own container (or create one); only if $T/g.raw is $T/disk.raw moved and changed since (mtime "
[[ "$line" == *"cbt: $lead"* ]] || fail "(h) does not lead with the wrong container: $line"
[[ "${line#*"$lead"}" == *"cbt recover $T/disk.cbt --bitmap b0 --compare BACKUP' (or --mark-all"* ]] ||
  fail "(h) no recovery after the lead: $line"
[[ "$line" != *"cbt-trust-disk"* ]] || fail "(h) suggests trusting another disk: $line"
[ "$(md5sum <"$T/disk.cbt")" = "$sum" ] || fail "(h) a refused start changed the container"
echo "ok: (h) another disk's container: $line"
echo "OK"
