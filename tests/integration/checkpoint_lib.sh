# Shared by test-filter-checkpoint-*.sh (sourced after lib.sh).
CKPT_LOAD="$CBT_BUILD/tests/checkpoint_load"
CKPT_CHECK="$(dirname "${BASH_SOURCE[0]}")/checkpoint_check.py"
[ -x "$CKPT_LOAD" ] || fail "not built: $CKPT_LOAD"

# stop_nbdkit_checked PID : SIGTERM, bounded wait; nbdkit must exit 0.
stop_nbdkit_checked() {
  local pid=$1 i rc=0
  kill -TERM "$pid"
  for i in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && fail "nbdkit did not stop within 30 s of SIGTERM"
  wait "$pid" || rc=$?
  [ "$rc" -eq 0 ] || fail "nbdkit exited $rc after SIGTERM"
}

# judge_bitmaps CONTAINER : after a clean stop, $T/b0.json and $T/b1.json
# (cbt map); qemu-img check clean; b0 frozen (no flags), b1 recording
# (["auto"]); qemu-nbd -B serves the same extents as cbt map.
judge_bitmaps() {
  local c=$1 b
  qemu-img check "$c" >"$T/qemu-check.out" 2>&1 ||
    fail "qemu-img check: $(cat "$T/qemu-check.out")"
  [ "$(bitmap_flags "$c" b0)" = '[]' ] ||
    fail "b0 flags after the checkpoint: $(bitmap_flags "$c" b0), want [] (disabled)"
  [ "$(bitmap_flags "$c" b1)" = '["auto"]' ] ||
    fail "b1 flags after the checkpoint: $(bitmap_flags "$c" b1), want [\"auto\"]"
  for b in b0 b1; do
    "$CBT" map "$c" --bitmap "$b" --output=json >"$T/$b.json" ||
      fail "cbt map --bitmap $b failed"
    [ "$(jq -c "map({start, length, dirty})" "$T/$b.json")" = "$(qemu_map "$c" "$b")" ] ||
      fail "cbt map and qemu-nbd -B disagree on $b"
  done
}
