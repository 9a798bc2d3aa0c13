#!/usr/bin/env bash
# cbt recover --compare BACKUP (docs/cli.md): a bitmap left inconsistent by a
# kill -9 in cbt-durability=none is recomputed from content, and is then
# exactly the set of granules in which the disk differs from the last backup:
#  - qcow2 chain: full + incremental made by `cbt backup`, random writes over
#    NBD, kill -9; recover --compare the last layer (--compare-format qcow2);
#    the bitmap (qemu-nbd -B + nbdinfo, and cbt map) equals a reference
#    computed by a python granule-by-granule compare of the disk with the
#    chain flattened by qemu-img convert; the filter starts again, the next
#    incremental restores a byte-identical disk (cbt restore, qemu-img
#    convert);
#  - raw backup (the disk at the last backup, its first bytes the qcow2
#    magic: refused without --compare-format, read as raw with it), the
#    same checks;
#  - bad input, each one error line, the container unchanged (cmp) and the
#    bitmap still in use: missing --disk, a disk of another size, a qcow2
#    backup without --compare-format, an unknown bitmap, a backup larger
#    than the disk, the disk as its own backup;
#  - the disk found through a data-file link (cbt create --data-file), and a
#    qcow2 image with internal bitmaps (FILE is the disk) whose bitmap was
#    not in use.
source "$(dirname "$0")/lib.sh"
[ -x "$CBT" ] || fail "cbt not built: $CBT"
need python3 qemu-io
# cli_lib.sh's checks of the cbt tool (it is not sourced with lib.sh: both
# set up $T).
cbt_ok() {
  local rc=0
  "$CBT" "$@" >"$T/out" 2>"$T/err" || rc=$?
  [ "$rc" = 0 ] || { cat "$T/err" >&2; fail "cbt $* exited $rc"; }
  ! grep -qE 'AddressSanitizer|runtime error:' "$T/err" || fail "sanitizer report: $(cat "$T/err")"
}
cbt_err() {  # cbt_err CODE ARGS... : that exit code, one stderr line starting "cbt", in $ERR
  local want=$1 rc=0; shift
  "$CBT" "$@" >"$T/out" 2>"$T/err" || rc=$?
  [ "$rc" = "$want" ] || { cat "$T/err" >&2; fail "cbt $* exited $rc, want $want"; }
  [ "$(wc -l <"$T/err")" = 1 ] || { cat "$T/err" >&2; fail "cbt $*: want one stderr line"; }
  ERR=$(cat "$T/err")
  case "$ERR" in cbt*) ;; *) fail "cbt $*: stderr does not start with 'cbt': $ERR" ;; esac
}
expect_in() {
  local text=$1 n; shift
  for n in "$@"; do case "$text" in *"$n"*) ;; *) fail "'$n' missing from: $text" ;; esac; done
}

G=65536
SIZE=$((64 * 1024 * 1024 + 20 * 1024))  # the last granule is partial
CTL="$T/ctl.sock"
DIR="$T/backups"
URI="nbd+unix:///?socket=$T/sock"

# ref_map DISK BACKUP : the merged extents of the granules where DISK and
# BACKUP differ (bytes past BACKUP's end read as zeros), over DISK's size
# rounded up to 512, as qemu_map prints them.
ref_map() {
  python3 - "$1" "$2" "$G" <<'EOF'
import json, os, sys
disk, backup, g = sys.argv[1], sys.argv[2], int(sys.argv[3])
size = os.path.getsize(disk)
vsize = (size + 511) // 512 * 512
out = []
with open(disk, "rb") as a, open(backup, "rb") as b:
    off = 0
    while off < size:
        x = a.read(g)
        y = b.read(g)
        y = y[:len(x)] + bytes(max(0, len(x) - len(y)))
        dirty = x != y
        length = min(g, vsize - off)
        if out and out[-1]["dirty"] == dirty:
            out[-1]["length"] += length
        else:
            out.append({"start": off, "length": length, "dirty": dirty})
        off += g
print(json.dumps(out, separators=(",", ":")))
EOF
}

start_filter() {
  start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" cbt-file="$T/disk.cbt" \
    cbt-bitmap=b0 cbt-create=true cbt-durability=none cbt-control="$CTL"
}
backup() {
  timeout 120 "$CBT" backup --socket "$CTL" --dir "$DIR" --output=json >"$T/bk.json" 2>"$T/bk.err" ||
    fail "cbt backup: $(cat "$T/bk.err")"
}
writes() {  # writes SEED OPS : random writes, zeroes and trims, no flush
  "$NBD_LOAD" --socket "$T/sock" --seed "$1" --ops "$2" --no-final-flush --qd 8 >/dev/null ||
    fail "nbd_load failed"
}
crash_after_writes() {  # crash_after_writes SEED : writes, then kill -9 while connected
  "$NBD_LOAD" --socket "$T/sock" --seed "$1" --ops 300 --no-final-flush --hold-file "$T/hold" &
  local load=$!
  PIDS+=("$load")
  wait_for 60 [ -e "$T/hold" ] || fail "client did not finish"
  kill9_nbdkit "$NBDKIT_PID"
  rm -f "$T/hold"
  wait "$load" || true  # its connection died with the server
}
recording() { jq -r .recording "$DIR/cbt-backup.json"; }
last_layer() { jq -r '.layers[-1].file' "$DIR/cbt-backup.json"; }
# expect_exact BITMAP REFERENCE : QEMU's view and cbt map of the bitmap equal
# REFERENCE; in-use clear; qemu-img check clean.
expect_exact() {
  local q c
  [ "$(bitmap_flags "$T/disk.cbt" "$1")" = '["auto"]' ] ||
    fail "flags after recover: $(bitmap_flags "$T/disk.cbt" "$1")"
  qemu-img check -q "$T/disk.cbt" || fail "qemu-img check after recover"
  q=$(qemu_map "$T/disk.cbt" "$1")
  [ "$q" = "$2" ] || { echo "qemu: ${q:0:600}" >&2; echo "ref:  ${2:0:600}" >&2; fail "bitmap is not the changed set"; }
  c=$("$CBT" map "$T/disk.cbt" --bitmap "$1" --output=json | jq -c 'map({start, length, dirty})' | merge_runs)
  [ "$c" = "$2" ] || fail "cbt map differs from the reference: ${c:0:600}"
}
# restart_and_verify : the filter starts with the recovered bitmap; the next
# incremental backup restores the disk byte for byte.
restart_and_verify() {
  # b0 (the filter's own) was in use too: --mark-all is enough for it.
  [ "$(bitmap_flags "$T/disk.cbt" b0)" = '["auto"]' ] ||
    cbt_ok recover "$T/disk.cbt" --bitmap b0 --mark-all
  start_filter
  backup
  [ "$(jq -r .type "$T/bk.json")" = incremental ] || fail "not incremental: $(cat "$T/bk.json")"
  stop_nbdkit "$NBDKIT_PID"
  rm -f "$T/restored.raw"
  timeout 120 "$CBT" restore "$DIR" --to "$T/restored.raw" >/dev/null || fail "cbt restore"
  cmp "$T/restored.raw" "$T/disk.raw" || fail "restored disk differs"
  timeout 120 qemu-img convert -f qcow2 -O raw "$DIR/$(last_layer)" "$T/plain.raw"
  cmp "$T/plain.raw" "$T/disk.raw" || fail "qemu-img convert of the chain differs"
}

# --- the disk: data in the first half, holes after ---------------------------
truncate -s "$SIZE" "$T/disk.raw"
qemu-io -f raw -c 'write -P 0x11 0 24M' -c 'write -P 0x22 40M 1M' "$T/disk.raw" >/dev/null

# --- 1. qcow2 chain: full + incremental, crash, recover against the last layer
start_filter
writes 1 50
backup                      # 000-full
writes 2 100
backup                      # 001-inc
[ "$(last_layer)" = 001-inc.qcow2 ] || fail "no incremental layer: $(last_layer)"
NAME=$(recording)
crash_after_writes 3
[ "$(bitmap_flags "$T/disk.cbt" "$NAME")" = '["in-use","auto"]' ] || fail "kill -9 left the bitmap consistent"
timeout 120 qemu-img convert -f qcow2 -O raw "$DIR/001-inc.qcow2" "$T/at-backup.raw"
REF=$(ref_map "$T/disk.raw" "$T/at-backup.raw")
[ "$(jq '[.[] | select(.dirty)] | length' <<<"$REF")" -gt 3 ] || fail "the writes changed too little: $REF"

# bad input first: each refused with one line, nothing changed
cp "$T/disk.cbt" "$T/before.cbt"
unchanged() {
  cmp "$T/disk.cbt" "$T/before.cbt" || fail "refused recover changed the container"
  [ "$(bitmap_flags "$T/disk.cbt" "$NAME")" = '["in-use","auto"]' ] || fail "refused recover changed the flags"
}
cbt_err 1 recover "$T/disk.cbt" --bitmap "$NAME" --compare "$DIR/001-inc.qcow2" --compare-format qcow2
expect_in "$ERR" "--disk PATH" "no data-file link"
unchanged
cbt_err 1 recover "$T/disk.cbt" --bitmap "$NAME" --compare "$DIR/001-inc.qcow2" --disk "$T/disk.raw"
expect_in "$ERR" "qcow2 magic" "--compare-format qcow2" "--compare-format raw"
unchanged
truncate -s 32M "$T/small.raw"
cbt_err 1 recover "$T/disk.cbt" --bitmap "$NAME" --compare "$DIR/001-inc.qcow2" --compare-format qcow2 \
  --disk "$T/small.raw"
expect_in "$ERR" "33554432 bytes" "$SIZE" "--disk PATH"
unchanged
cbt_err 1 recover "$T/disk.cbt" --bitmap nosuch --compare "$T/at-backup.raw" --disk "$T/disk.raw"
expect_in "$ERR" "'nosuch' not found" "cbt info"
unchanged
truncate -s $((SIZE + 4096)) "$T/big.raw"
cbt_err 1 recover "$T/disk.cbt" --bitmap "$NAME" --compare "$T/big.raw" --disk "$T/disk.raw"
expect_in "$ERR" "more than the disk" "not a backup of this disk"
unchanged
cbt_err 1 recover "$T/disk.cbt" --bitmap "$NAME" --compare "$T/disk.raw" --disk "$T/disk.raw"
expect_in "$ERR" "is the disk itself"
unchanged
cbt_err 1 recover "$T/disk.cbt" --bitmap "$NAME" --compare "$T/at-backup.raw" --compare-format vmdk \
  --disk "$T/disk.raw"
expect_in "$ERR" "--compare-format 'vmdk'" "raw or qcow2"
unchanged
cbt_err 1 recover "$T/disk.cbt" --bitmap "$NAME" --mark-all --compare-format raw
expect_in "$ERR" "--compare-format goes with --compare BACKUP"
unchanged
# --disk also names the disk whose identity --mark-all and the record path
# record: one of another size is refused before anything changes.
for how in --mark-all ""; do
  cbt_err 1 recover "$T/disk.cbt" --bitmap "$NAME" $how --disk "$T/small.raw"
  expect_in "$ERR" "--disk $T/small.raw has 33554432 bytes" "$SIZE bytes" "name the disk the bitmap tracks"
  unchanged
done
"$CBT" check "$T/disk.cbt" >/dev/null || fail "cbt check after the refused recovers"

cbt_ok recover "$T/disk.cbt" --bitmap "$NAME" --compare "$DIR/001-inc.qcow2" --compare-format qcow2 \
  --disk "$T/disk.raw" --output=json
jq -e --argjson size "$SIZE" '.method == "compare" and ."was-in-use" == true and
  ."bytes-compared" == $size and .granules == (($size + 65535) / 65536 | floor) and
  ."dirty-granules" > 0 and (.seconds | type) == "number"' "$T/out" >/dev/null ||
  fail "unexpected summary: $(cat "$T/out")"
[ "$(jq '."dirty-granules"' "$T/out")" = "$(jq '[.[] | select(.dirty) | (.length + 65535) / 65536 | floor] | add' <<<"$REF")" ] ||
  fail "dirty-granules does not count the reference: $(cat "$T/out")"
expect_exact "$NAME" "$REF"
"$CBT" info "$T/disk.cbt" >/dev/null || fail "cbt info after recover"
restart_and_verify
echo "ok: qcow2 chain (full + incremental) compare is exact; next incremental restores"

# --- 2. raw backup whose data starts with the qcow2 magic --------------------
start_filter
printf 'QFI\xfb' >"$T/magic.bin"
timeout 60 qemu-io -f raw -c "write -s $T/magic.bin 0 4" -c flush "$URI" >/dev/null ||
  fail "could not write the magic over NBD"
backup                      # 002-inc: the disk as the raw backup has it
cp "$T/disk.raw" "$T/raw-backup.raw"
head -c 4 "$T/raw-backup.raw" | cmp -s - <(printf 'QFI\xfb') || fail "the raw backup does not start with the magic"
NAME=$(recording)
crash_after_writes 4
REF=$(ref_map "$T/disk.raw" "$T/raw-backup.raw")
cp "$T/disk.cbt" "$T/before.cbt"
cbt_err 1 recover "$T/disk.cbt" --bitmap "$NAME" --compare "$T/raw-backup.raw" --disk "$T/disk.raw"
expect_in "$ERR" "qcow2 magic" "--compare-format raw"
unchanged
cbt_ok recover "$T/disk.cbt" --bitmap "$NAME" --compare "$T/raw-backup.raw" --compare-format raw \
  --disk "$T/disk.raw"
expect_in "$(cat "$T/out")" "was in use" "in-use cleared"
expect_exact "$NAME" "$REF"
restart_and_verify
echo "ok: raw backup compare is exact; next incremental restores"

# --- 3. the disk through a data-file link; a bitmap not in use ---------------
cp "$T/disk.raw" "$T/d3.raw"
printf 'ABCD' | dd of="$T/d3.raw" conv=notrunc status=none
cbt_ok create "$T/linked.cbt" --data-file "$T/d3.raw"
cbt_ok bitmap "$T/linked.cbt" x --add
cp "$T/d3.raw" "$T/d3-backup.raw"
dd if=/dev/urandom of="$T/d3-backup.raw" conv=notrunc bs=4096 seek=5000 count=3 status=none
printf 'z' | dd of="$T/d3-backup.raw" conv=notrunc bs=1 seek=$((SIZE - 1)) status=none
cbt_ok recover "$T/linked.cbt" --bitmap x --compare "$T/d3-backup.raw" --output=json
jq -e '."was-in-use" == false and ."dirty-granules" == 2' "$T/out" >/dev/null || fail "linked: $(cat "$T/out")"
REF=$(ref_map "$T/d3.raw" "$T/d3-backup.raw")
[ "$(qemu_map "$T/linked.cbt" x)" = "$REF" ] || fail "data-file link: $(qemu_map "$T/linked.cbt" x) != $REF"
qemu-img check -q "$T/linked.cbt" || fail "qemu-img check linked.cbt"

# --- 4. a qcow2 image with internal bitmaps: FILE is the disk ----------------
qemu-img create -q -f qcow2 "$T/img.qcow2" 8M
qemu-io -f qcow2 -c 'write -P 0x5a 0 3M' "$T/img.qcow2" >/dev/null
qemu-img bitmap --add "$T/img.qcow2" q0
cp "$T/img.qcow2" "$T/img-backup.qcow2"
qemu-io -f qcow2 -c 'write -P 0x5b 1M 100k' -c 'write -z 2M 64k' -c 'write -P 0x5a 4M 64k' \
  "$T/img.qcow2" >/dev/null
cbt_ok recover "$T/img.qcow2" --bitmap q0 --compare "$T/img-backup.qcow2" --compare-format qcow2
qemu-img convert -O raw "$T/img.qcow2" "$T/img.raw"
qemu-img convert -O raw "$T/img-backup.qcow2" "$T/img-backup.raw"
REF=$(ref_map "$T/img.raw" "$T/img-backup.raw")
[ "$(qemu_map "$T/img.qcow2" q0)" = "$REF" ] || fail "internal: $(qemu_map "$T/img.qcow2" q0) != $REF"
qemu-img check -q "$T/img.qcow2" || fail "qemu-img check img.qcow2"
echo "OK"
