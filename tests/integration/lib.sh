# Shared helpers for the integration tests (sourced, bash).
# Every test gets its own temp dir; the EXIT trap kills only the processes
# this test started (by pid) and removes the dir.
set -euo pipefail

: "${CBT_BUILD:?CBT_BUILD must point at the build directory}"
FILTER="$CBT_BUILD/plugin/nbdkit-cbt-filter.so"
CBT="$CBT_BUILD/server/cbt"
NBD_LOAD="$CBT_BUILD/tests/nbd_load"
NBD_OPS="$CBT_BUILD/tests/nbd_ops"

T=$(mktemp -d /tmp/cbt-test.XXXXXX)
PIDS=()
MOUNTS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  for p in "${MOUNTS[@]}"; do umount "$p" 2>/dev/null || true; done
  rm -rf "$T"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; [ -s "$T/nbdkit.log" ] && tail -5 "$T/nbdkit.log" >&2; exit 1; }
skip() { echo "SKIP: $*"; exit 77; }
need() { for t in "$@"; do command -v "$t" >/dev/null || skip "$t is not installed"; done; }

# A filter built with ASan needs the runtime preloaded into nbdkit.
# (No `ldd | grep -q`: with pipefail, grep exiting early can SIGPIPE ldd and
# make the test silently run without the preload.)
NBDKIT_ENV=()
if [[ "$(ldd "$FILTER" 2>/dev/null || true)" == *libasan* ]]; then
  NBDKIT_ENV=(env "LD_PRELOAD=$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
              "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1")
fi

# start_nbdkit SOCK ARGS... : starts nbdkit in the foreground (background job),
# waits for its pid file; the pid is in $NBDKIT_PID.
start_nbdkit() {
  local sock=$1; shift
  rm -f "$sock" "$sock.pid"
  "${NBDKIT_ENV[@]}" nbdkit -f --exit-with-parent -U "$sock" -P "$sock.pid" "$@" \
    2>>"$T/nbdkit.log" &
  NBDKIT_PID=$!
  PIDS+=("$NBDKIT_PID")
  local i
  # The pid file is written before .after_fork; a served handshake means the
  # filter has attached (and done any start-up writes).
  for i in $(seq 200); do
    [ -s "$sock.pid" ] && [ -S "$sock" ] &&
      timeout 10 nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && return 0
    kill -0 "$NBDKIT_PID" 2>/dev/null || { cat "$T/nbdkit.log" >&2; fail "nbdkit exited at start"; }
    sleep 0.05
  done
  fail "nbdkit did not start"
}

# stop_nbdkit PID : clean shutdown (SIGTERM), bounded wait.
stop_nbdkit() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  fail "nbdkit did not stop within 30 s of SIGTERM"
}

# kill9_nbdkit PID
kill9_nbdkit() {
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# qemu_map FILE BITMAP : the bitmap as QEMU reads it, as merged
# [{"start","length","dirty"}] (qemu-nbd -r -B, nbdinfo --map).
qemu_map() {
  timeout 60 nbdinfo --json --map="qemu:dirty-bitmap:$2" -- \
    [ qemu-nbd -r -f qcow2 -B "$2" "$1" ] |
    jq -c 'map({start: .offset, length: .length, dirty: (.type == 1)})
           | reduce .[] as $e ([]; if length > 0 and .[-1].dirty == $e.dirty
                                    then .[-1].length += $e.length else . + [$e] end)'
}

# normalize FILE : the same merge on an extents file
normalize() {
  jq -c 'reduce .[] as $e ([]; if length > 0 and .[-1].dirty == $e.dirty
                               then .[-1].length += $e.length else . + [$e] end)' "$1"
}

# bitmap_flags FILE BITMAP : qemu-img's flags list, e.g. ["auto"] (-U: we may hold it)
bitmap_flags() {
  qemu-img info -U --output=json "$1" |
    jq -c --arg n "$2" '."format-specific".data.bitmaps[] | select(.name == $n) | .flags'
}

need nbdkit qemu-img qemu-nbd nbdinfo jq
[ -f "$FILTER" ] || fail "filter not built: $FILTER"
