# Helpers for the filter's integration tests (sourced, bash): nbdkit start
# and stop, the built tools. Temp dir, cleanup and maps: common.sh.
set -euo pipefail

: "${CBT_BUILD:?CBT_BUILD must point at the build directory}"
FILTER="$CBT_BUILD/plugin/nbdkit-cbt-filter.so"
# Our read-write qcow2 plugin.
QCOW2_PLUGIN="${QCOW2_PLUGIN:-$CBT_BUILD/plugin/nbdkit-qcow2-plugin.so}"
CBT="$CBT_BUILD/server/cbt"
NBD_LOAD="$CBT_BUILD/tests/nbd_load"
NBD_OPS="$CBT_BUILD/tests/nbd_ops"

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# Filter tests also show the end of nbdkit's log when they fail.
fail() { echo "FAIL: $*" >&2; [ -s "$T/nbdkit.log" ] && tail -5 "$T/nbdkit.log" >&2; exit 1; }

# A filter built with ASan needs the runtime preloaded into nbdkit.
# (No `ldd | grep -q`: with pipefail, grep exiting early can SIGPIPE ldd and
# make the test silently run without the preload.)
NBDKIT_ENV=()
if [[ "$(ldd "$FILTER" "$QCOW2_PLUGIN" 2>/dev/null || true)" == *libasan* ]]; then
  NBDKIT_ENV=(env "LD_PRELOAD=$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
              "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1")
fi

# start_nbdkit SOCK ARGS... : starts nbdkit in the foreground (background job),
# waits for its pid file; the pid is in $NBDKIT_PID. START_EXPORT=NAME: the
# export the readiness probe connects to (default: the default export).
start_nbdkit() {
  local sock=$1; shift
  rm -f "$sock" "$sock.pid"
  "${NBDKIT_ENV[@]}" nbdkit -f --exit-with-parent -U "$sock" -P "$sock.pid" "$@" \
    2>>"$T/nbdkit.log" &
  NBDKIT_PID=$!
  PIDS+=("$NBDKIT_PID")
  local end=$((SECONDS + 60))
  # The pid file is written before .after_fork; a served handshake means the
  # filter has attached (and done any start-up writes). 60 s: the sanitizer
  # build on a loaded machine starts slowly.
  while [ "$SECONDS" -lt "$end" ]; do
    [ -s "$sock.pid" ] && [ -S "$sock" ] &&
      timeout 10 nbdinfo --size "nbd+unix:///${START_EXPORT:-}?socket=$sock" >/dev/null 2>&1 &&
      return 0
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

# normalize FILE : an extents file (nbd_load --expected) merged like qemu_map
normalize() { merge_runs <"$1"; }

# bitmap_flags FILE BITMAP : qemu-img's flags list, e.g. ["auto"] (-U: we may hold it)
bitmap_flags() {
  qemu-img info -U --output=json "$1" |
    jq -c --arg n "$2" '."format-specific".data.bitmaps[] | select(.name == $n) | .flags'
}

need nbdkit qemu-img qemu-nbd nbdinfo jq
# A test of the qcow2 plugin alone sets LIB_NO_FILTER=1 before sourcing.
[ -n "${LIB_NO_FILTER:-}" ] || [ -f "$FILTER" ] || fail "filter not built: $FILTER"

# preload_env LIB : CBT_ENV=(the environment that runs cbt with the test
# library LIB.so from the build's tests/ preloaded, after the sanitizer
# runtime when cbt is a sanitizer build: it must come first).
preload_env() {
  local lib="$CBT_BUILD/tests/$1.so"
  [ -f "$lib" ] || fail "not built: $lib"
  if [[ "$(ldd "$CBT" 2>/dev/null || true)" == *libasan* ]]; then
    CBT_ENV=("LD_PRELOAD=$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so) $lib"
             "ASAN_OPTIONS=detect_leaks=0")
  else
    CBT_ENV=("LD_PRELOAD=$lib")
  fi
}
