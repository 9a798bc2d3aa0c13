# What every integration test shares (sourced by lib.sh and cli_lib.sh).
# Each test gets its own temp dir $T; the EXIT trap kills only the processes
# the test started (by pid, from $PIDS), unmounts what it mounted ($MOUNTS)
# and removes the dir. A missing tool skips the test (exit 77) with the
# reason printed.
set -euo pipefail

T=$(mktemp -d "/tmp/${CBT_TEST_PREFIX:-cbt-test}.XXXXXX")
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

fail() { echo "FAIL: $*" >&2; exit 1; }
# wait_for SECONDS CMD... : polls CMD every 0.05 s until it succeeds (0) or
# SECONDS pass (1). Generous bounds: a loaded 2-core machine running the
# sanitizer build is slow, and a wait that gives up early is a flaky test.
wait_for() {
  local end=$((SECONDS + $1)); shift
  until "$@"; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.05
  done
}
# wait_served SOCK : until an NBD server on unix socket SOCK completes a
# handshake (60 s). The socket file exists a moment before qemu-nbd listens.
wait_served() {
  wait_for 60 eval "timeout 10 nbdinfo --size 'nbd+unix:///?socket=$1' >/dev/null 2>&1"
}
skip() { echo "SKIP: $*"; exit 77; }
need() { local t; for t in "$@"; do command -v "$t" >/dev/null || skip "$t is not installed"; done; }

# merge_runs : on stdin a JSON list of {"start","length","dirty"}; prints it
# compact with adjacent extents of the same state merged.
merge_runs() {
  jq -c 'reduce .[] as $e ([]; if length > 0 and .[-1].dirty == $e.dirty
                               then .[-1].length += $e.length else . + [$e] end)'
}

# qemu_map FILE BITMAP : the bitmap as QEMU reads it (qemu-nbd -r -B, nbdinfo
# --map), as merged [{"start","length","dirty"}]. nbdinfo's JSON is a list of
# {"offset","length","type","description"}; type bit 0 = dirty.
qemu_map() {
  timeout 30 nbdinfo --json --map="qemu:dirty-bitmap:$2" -- \
    [ qemu-nbd -r -f qcow2 -B "$2" "$1" ] |
    jq -c 'map({start: .offset, length: .length, dirty: ((.type % 2) == 1)})' | merge_runs
}

# ctl_call SOCKET JSON : one raw request line to a control socket
# (docs/control.md), prints the reply line; bounded (30 s).
ctl_call() {
  timeout 30 python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
buf = b""
while not buf.endswith(b"\n"):
    d = s.recv(65536)
    if not d:
        break
    buf += d
sys.stdout.write(buf.decode())
' "$1" "$2"
}
