#!/usr/bin/env bash
# kill -9 during a backup session (default durability: power). Writes A go
# to b0; backup-begin freezes b0 and starts b1; writes B (write, zero,
# discard, unaligned) go on during the session; then nbdkit is SIGKILLed.
# The session lives in memory only, so after a restart (cbt-bitmap=b1: b0
# is frozen) the backup export is refused with a clear message and
# query-backup shows no session; nothing is lost: query-bitmap-extents of
# b1 covers every granule of B, b0 is exactly A's granules (frozen by the
# checkpoint) and b0 ∪ b1 covers everything written. The next backup is
# right: backup-begin freezing b1, new b2, under more writes, serves the disk
# as it was at that moment; after a clean stop QEMU reads b1 and b2 with
# the same contents.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/backup_lib.sh"

K=1024
M=$((1024 * K))
truncate -s 64M "$T/disk.raw"
qio "$T/disk.raw" "write -q -P 0x11 0 16M" "write -q -P 0x12 40M 8M" >/dev/null
start_backup_server cbt-bitmap=b0 cbt-create=true

A=("0 1M" "$((8 * M)) 64K" "$((20 * M + 100)) 1000")
B=("$((2 * M)) 128K" "$((10 * M + 1)) 64K" "$((63 * M)) 4K")
BZ=("$((24 * M)) 64K")           # write -z
BD=("$((41 * M)) 128K")          # discard
C=("0 64K" "$((30 * M)) 1M")     # after the restart, in the next session

cmds=()
for r in "${A[@]}"; do cmds+=("write -q -P 0xa1 $r"); done
qio "$LIVE" "${cmds[@]}" >/dev/null || fail "writes A"
backup_begin b1 b0
cmds=()
for r in "${B[@]}"; do cmds+=("write -q -P 0xb1 $r"); done
for r in "${BZ[@]}"; do cmds+=("write -q -z $r"); done
for r in "${BD[@]}"; do cmds+=("discard -q $r"); done
qio "$LIVE" "${cmds[@]}" >"$T/qio.out" 2>&1 || fail "writes B: $(cat "$T/qio.out")"
query_backup '."copied-blocks" > 0' || fail "no copy-before-write during the session"

kill9_nbdkit "$NBDKIT_PID"
# The store was an unlinked file (O_TMPFILE, else unlinked at once): gone.
[ -z "$(find "$T" -maxdepth 1 -name '.cbt-tmp-*')" ] || fail "a store file was left in $T"
echo "killed nbdkit mid-session: b0 $(bitmap_flags "$T/disk.cbt" b0), b1 $(bitmap_flags "$T/disk.cbt" b1)"

: >"$T/nbdkit.log"
start_backup_server cbt-bitmap=b1
rc=0
timeout 30 nbdinfo --size "$VIEW" >"$T/out" 2>&1 || rc=$?
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "backup export served after the restart (rc $rc): $(cat "$T/out")"
grep -q 'export "backup" refused: no backup session is open' "$T/nbdkit.log" ||
  fail "no clear refusal of the backup export after the restart: $(cat "$T/nbdkit.log")"
query_backup '.active == false' || fail "query-backup after the restart shows a session"

# bitmap_check NAME MODE RANGE... : query-bitmap-extents of NAME against the
# granules of the ranges ("OFFSET LENGTH", sizes with K/M): MODE covers
# (every granule dirty) or exact (those and no others).
bitmap_check() {
  local name=$1 mode=$2; shift 2
  ctl "{\"execute\":\"query-bitmap-extents\",\"arguments\":{\"name\":\"$name\"}}" >"$T/ext.json"
  python3 - "$T/ext.json" "$mode" "$@" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
if "return" not in r:
    sys.exit(f"query-bitmap-extents: {r}")
r = r["return"]
if r["next"] is not None:
    sys.exit("extents paginated: not expected for this disk")
g = r["granularity"]
dirty = set()
for e in r["extents"]:
    if e["dirty"]:
        dirty.update(range(e["start"] // g, (e["start"] + e["length"] - 1) // g + 1))
def size(s):
    mult = {"K": 1024, "M": 1024 * 1024}.get(s[-1], 1)
    return int(s[:-1] if mult != 1 else s) * mult
want = set()
for a in sys.argv[3:]:
    off, ln = (size(x) for x in a.split())
    want.update(range(off // g, (off + ln - 1) // g + 1))
missing = sorted(want - dirty)
if missing:
    sys.exit(f"{r['name']}: granules written but not dirty: {[m * g for m in missing]}")
extra = sorted(dirty - want)
if sys.argv[2] == "exact" and extra:
    sys.exit(f"{r['name']}: dirty granules never written: {[x * g for x in extra]}")
print(f"{r['name']}: {len(dirty)} dirty granules, {len(want)} written ({sys.argv[2]})")
EOF
}
bitmap_check b1 covers "${B[@]}" "${BZ[@]}" "${BD[@]}" || fail "b1 lost a change made during the session"
bitmap_check b0 exact "${A[@]}" || fail "b0 is not exactly the changes before the session"

# The next backup: b1 frozen, b2 new, under more writes.
backup_begin b2 b1
cp --sparse=always "$T/disk.raw" "$T/snap.raw"
cmds=()
for r in "${C[@]}"; do cmds+=("write -q -P 0xc1 $r"); done
qio "$LIVE" "${cmds[@]}" "discard -q $((2 * M)) 64K" >/dev/null || fail "writes C"
copy_export "$VIEW" "$T/view.raw" || fail "reading the next session's view failed"
cmp "$T/view.raw" "$T/snap.raw" || fail "the next session's view is not the disk at its start"
map_vouches "$VIEW" "$T/snap.raw" || fail "the next session's map hides data"
bitmap_check b1 covers "${B[@]}" "${BZ[@]}" "${BD[@]}" || fail "frozen b1 lost a change"
bitmap_check b2 covers "${C[@]}" "$((2 * M)) 64K" || fail "b2 lost a change"
backup_end
stop_nbdkit "$NBDKIT_PID"

# After the clean stop, QEMU reads the same: b1 covers B, b2 covers C.
qemu_map "$T/disk.cbt" b1 >"$T/b1.map"
python3 - "$T/b1.map" <<EOF || fail "b1 as QEMU reads it lost a change: $(cat "$T/b1.map")"
import json, sys
dirty = [e for e in json.load(open(sys.argv[1])) if e["dirty"]]
for off, ln in [($((2 * M)), 131072), ($((10 * M + 1)), 65536), ($((63 * M)), 4096),
                ($((24 * M)), 65536), ($((41 * M)), 131072)]:
    if not any(e["start"] <= off and off + ln <= e["start"] + e["length"] for e in dirty):
        sys.exit(f"[{off}, +{ln}) not dirty")
EOF
echo "PASS"
