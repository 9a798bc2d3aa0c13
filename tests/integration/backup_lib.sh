# Helpers for the backup-session tests (test-filter-backup-*.sh; sourced
# after lib.sh): the control calls, the two exports, copying the view and
# judging its extents against the point-in-time copy.
need python3 qemu-io cmp

# start_backup_server EXTRA... : nbdkit with the filter on $T/disk.raw
# (container $T/disk.cbt, control socket $T/ctl.sock, NBD socket $T/sock)
# and EXTRA filter parameters; start_nbdkit's handshake attaches the tracker.
start_backup_server() {
  rm -f "$T/ctl.sock"
  start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" \
    cbt-file="$T/disk.cbt" cbt-control="$T/ctl.sock" "$@"
  wait_for 60 [ -S "$T/ctl.sock" ] || fail "no control socket at $T/ctl.sock"
}

LIVE="nbd+unix:///?socket=$T/sock"
VIEW="nbd+unix:///backup?socket=$T/sock"

# ctl JSON : one control request, prints the reply line.
ctl() { ctl_call "$T/ctl.sock" "$1"; }

# backup_begin NEW [FREEZE] : begins a session; fails the test unless it did.
backup_begin() {
  local args r
  if [ $# -ge 2 ]; then
    args=$(jq -cn --arg n "$1" --arg f "$2" '{new: $n, freeze: $f}')
  else
    args=$(jq -cn --arg n "$1" '{new: $n}')
  fi
  r=$(ctl "{\"execute\":\"backup-begin\",\"arguments\":$args}")
  jq -e '.return.active == true and .return.id > 0' <<<"$r" >/dev/null ||
    fail "backup-begin $args: $r"
}

# backup_end : ends the open session; fails the test unless it did.
backup_end() {
  local r
  r=$(ctl '{"execute":"backup-end"}')
  jq -e '.return.active == false and .return.id > 0' <<<"$r" >/dev/null || fail "backup-end: $r"
}

# query_backup FILTER : jq -e FILTER on query-backup's return value.
query_backup() {
  local r
  r=$(ctl '{"execute":"query-backup"}')
  jq -e ".return | $1" <<<"$r" >/dev/null || { echo "query-backup: $r" >&2; return 1; }
}

# copy_export URI OUT : the whole export to a raw file (bounded).
copy_export() {
  rm -f "$2"
  timeout 60 qemu-img convert -f raw -O raw "$1" "$2"
}

# qio URI|FILE CMD... : qemu-io (raw, discards allowed) with one -c per CMD.
qio() {
  local target=$1 c args=(); shift
  for c in "$@"; do args+=(-c "$c"); done
  timeout 60 qemu-io -f raw -d unmap "${args[@]}" "$target"
}

# map_vouches URI SNAP : nbdinfo --map of the export covers it contiguously
# and reports no hole or zero extent where SNAP (the point-in-time copy) has
# a non-zero byte.
map_vouches() {
  timeout 60 nbdinfo --json --map "$1" >"$T/map.json" || { echo "nbdinfo --map $1 failed" >&2; return 1; }
  python3 - "$T/map.json" "$2" <<'EOF'
import json, os, sys
extents = json.load(open(sys.argv[1]))
size = os.path.getsize(sys.argv[2])
pos = 0
bad = []
with open(sys.argv[2], "rb") as f:
    for e in extents:
        if e["offset"] != pos or e["length"] <= 0:
            sys.exit(f"map not contiguous at {pos}: {e}")
        if e["type"] & 3:  # hole and/or zero: must read as zeros
            f.seek(e["offset"])
            left = e["length"]
            while left:
                chunk = f.read(min(left, 1 << 20))
                if chunk.count(0) != len(chunk):
                    bad.append(e)
                    break
                left -= len(chunk)
        pos += e["length"]
if pos != size:
    sys.exit(f"map covers {pos} bytes, the disk has {size}")
if bad:
    sys.exit(f"hole/zero reported over non-zero data of the point-in-time copy: {bad[:5]}")
print(f"map: {len(extents)} extents, none hides data")
EOF
}
