#!/usr/bin/env bash
# Start-up messages: a bad parameter value names the parameter and what it
# allows; the refusal of a bitmap left in use names 'cbt recover --mark-all'
# and suggests the crash-safe modes only to a server not running in one.
source "$(dirname "$0")/lib.sh"

truncate -s 64M "$T/disk.raw"
# refused PATTERN ARGS... : nbdkit exits non-zero at once printing PATTERN.
refused() {
  local pattern=$1; shift
  local rc=0
  timeout 30 "${NBDKIT_ENV[@]}" nbdkit -U - --filter="$FILTER" file "$T/disk.raw" "$@" \
    --run 'true' 2>"$T/err" || rc=$?
  [ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "exit status $rc: $*"
  grep -q -- "$pattern" "$T/err" || fail "expected '$pattern' for $*, got: $(cat "$T/err")"
  echo "ok: $(grep -m1 -- "$pattern" "$T/err")"
}
ok=(cbt-file="$T/d.cbt" cbt-bitmap=b0)
refused "cbt-create=maybe: must be true or false" "${ok[@]}" cbt-create=maybe
refused "cbt-granularity=abc: must be a size: a power of two from 512 to 2G" "${ok[@]}" \
  cbt-granularity=abc
refused "cbt-cluster-size=x: must be a size" "${ok[@]}" cbt-cluster-size=x
refused "cbt-file=: the path must not be empty" cbt-file= cbt-bitmap=b0
refused "cbt-persist-interval=soon: must be a number of seconds" "${ok[@]}" \
  cbt-persist-interval=soon

# A bitmap left in use by a crash in mode none (no crash-safety record).
start_nbdkit "$T/sock" --filter="$FILTER" file "$T/disk.raw" "${ok[@]}" cbt-create=true \
  cbt-durability=none
"$NBD_LOAD" --socket "$T/sock" --ops 5 --no-final-flush --hold-file "$T/hold" &
load=$!; PIDS+=("$load")
wait_for 60 [ -e "$T/hold" ] || fail "client did not finish its writes"
kill9_nbdkit "$NBDKIT_PID"
rm -f "$T/hold"; wait "$load" 2>/dev/null || true  # its server died: it fails
[ "$(bitmap_flags "$T/d.cbt" b0)" = '["in-use","auto"]' ] || fail "no in-use after kill -9"
refused "cbt recover $T/d.cbt --bitmap b0 --mark-all" "${ok[@]}"
if grep -q "cbt-durability=" "$T/err"; then fail "suggests a mode to a power-mode server"; fi
refused "cbt recover $T/d.cbt --bitmap b0 --mark-all.*cbt-durability=power (the default)" \
  "${ok[@]}" cbt-durability=none
echo "OK: messages name the parameter and the fix"
