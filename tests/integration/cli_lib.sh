# Shared helpers for the `cbt` tool's integration tests (sourced, bash).
# Usage in a test: source "$(dirname "$0")/cli_lib.sh" "$@"   ($1 = cbt binary,
# or none with CBT_BUILD set: tests registered by cbt_integration_test)
# Each test runs in its own temp dir $T; the EXIT trap kills only the
# processes this test started (by pid, from $PIDS) and removes the dir.
# A missing tool skips the test (exit 77) with the reason printed.
set -euo pipefail

CBT=${1:-${CBT_BUILD:+$CBT_BUILD/server/cbt}}
[ -n "$CBT" ] || { echo "usage: $0 PATH/TO/cbt (or set CBT_BUILD)" >&2; exit 2; }
CBT=$(readlink -f "$CBT")
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

CBT_TEST_PREFIX=cbt-cli-test
source "$HERE/common.sh"
cd "$T"
[ -x "$CBT" ] || fail "cbt binary not found: $CBT"

# cbt_ok ARGS... : runs cbt, fails the test if it does not exit 0.
cbt_ok() {
  local rc=0
  "$CBT" "$@" >"$T/out" 2>"$T/err" || rc=$?
  [ "$rc" = 0 ] || { cat "$T/err" >&2; fail "cbt $* exited $rc"; }
  check_no_sanitizer "$T/err"
}

# cbt_err WANT_CODE ARGS... : runs cbt, expects exit code WANT_CODE and
# exactly one stderr line starting "cbt" (no crash, no sanitizer report).
# The line is left in $ERR.
cbt_err() {
  local want=$1 rc=0; shift
  "$CBT" "$@" >"$T/out" 2>"$T/err" || rc=$?
  check_no_sanitizer "$T/err"
  [ "$rc" = "$want" ] || { cat "$T/err" >&2; fail "cbt $* exited $rc, want $want"; }
  [ "$(wc -l <"$T/err")" = 1 ] || { cat "$T/err" >&2; fail "cbt $*: want one stderr line"; }
  ERR=$(cat "$T/err")
  case "$ERR" in cbt*) ;; *) fail "cbt $*: stderr does not start with 'cbt': $ERR" ;; esac
}

check_no_sanitizer() {
  if grep -qE 'AddressSanitizer|LeakSanitizer|runtime error:|UndefinedBehaviorSanitizer' "$1"; then
    cat "$1" >&2
    fail "sanitizer report"
  fi
}

# expect_in TEXT NEEDLE... : every NEEDLE occurs in TEXT.
expect_in() {
  local text=$1 n; shift
  for n in "$@"; do
    case "$text" in *"$n"*) ;; *) fail "'$n' missing from: $text" ;; esac
  done
}

# cbt_map FILE BITMAP [ARGS...] : cbt's map, compact.
cbt_map() {
  local f=$1 b=$2; shift 2
  "$CBT" map "$f" --bitmap "$b" --output=json "$@" | jq -c "map({start, length, dirty})"
}

# expect_same_map FILE BITMAP : cbt map equals QEMU's.
expect_same_map() {
  local q c
  q=$(qemu_map "$1" "$2")
  c=$(cbt_map "$1" "$2")
  [ "$q" = "$c" ] || { echo "qemu: ${q:0:800}" >&2; echo "cbt:  ${c:0:800}" >&2; fail "map of $1 $2 differs"; }
}

# qbitmap FILE BITMAP FIELD : a field of qemu-img info's bitmap entry (jq -c).
qbitmap() {
  qemu-img info -U --output=json "$1" |
    jq -c --arg n "$2" "[.\"format-specific\".data.bitmaps // [] | .[] | select(.name == \$n)] | if length == 0 then \"absent\" else .[0].$3 end"
}
# qnames FILE : bitmap names in qemu-img info order, one JSON list.
qnames() {
  qemu-img info -U --output=json "$1" | jq -c '[."format-specific".data.bitmaps // [] | .[].name]'
}

# qcheck FILE : qemu-img check must exit 0 with no leaks and no corruption.
qcheck() {
  local rc=0
  qemu-img check --output=json "$1" >"$T/check.json" 2>"$T/check.err" || rc=$?
  [ "$rc" = 0 ] || { cat "$T/check.json" "$T/check.err" >&2; fail "qemu-img check $1 exited $rc"; }
  [ "$(jq '(.leaks // 0) + (.corruptions // 0) + (."check-errors" // 0)' "$T/check.json")" = 0 ] ||
    { cat "$T/check.json" >&2; fail "qemu-img check $1 found problems"; }
}

# cinfo FILE BITMAP FIELD : a field of cbt info's bitmap entry.
cinfo() {
  "$CBT" info --output=json "$1" |
    jq -c --arg n "$2" "[.bitmaps[] | select(.name == \$n)] | if length == 0 then \"absent\" else .[0].\"$3\" end"
}

need qemu-img qemu-io qemu-nbd nbdinfo jq
