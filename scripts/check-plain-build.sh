#!/usr/bin/env bash
# What users and packagers build: a plain `cmake -DCMAKE_BUILD_TYPE=Release`,
# no preset. Cheap enough for the default ctest run (one configure, three
# translation units; a full -O3 build is scripts/test.sh's job):
#  1. configure in a temp dir without options: warnings must not be errors
#     (CBT_WERROR OFF, no -Werror in any compile command), so a compiler we
#     have not tried cannot break the build;
#  2. turn -Werror on in that tree and compile, at -O3, the files where GCC 12
#     reported its -Wrestrict false positive (see CMakeLists.txt), so that
#     Release stays warning-clean.
#   scripts/check-plain-build.sh [CXX]   (CXX: the compiler to use)
# Exit: 0 ok; 1 a check failed; 77 cmake or ninja missing (reason printed).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
for t in cmake ninja; do
  command -v "$t" >/dev/null || { echo "SKIP: $t is not installed"; exit 77; }
done
cxx=()
[ -n "${1:-}" ] && cxx=(-DCMAKE_CXX_COMPILER="$1")

T=$(mktemp -d /tmp/cbt-plain-build.XXXXXX)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

if ! cmake -S "$src" -B "$T" -G Ninja -DCMAKE_BUILD_TYPE=Release "${cxx[@]}" >"$T/configure.log" 2>&1; then
  cat "$T/configure.log" >&2
  fail "plain Release configure failed"
fi
grep -q '^CBT_WERROR:BOOL=OFF$' "$T/CMakeCache.txt" ||
  fail "CBT_WERROR is not OFF by default: $(grep '^CBT_WERROR' "$T/CMakeCache.txt")"
if grep -q -- '-Werror' "$T/compile_commands.json"; then
  fail "a plain build compiles with -Werror: $(grep -m1 -o -- '-Werror[^ ]*' "$T/compile_commands.json")"
fi
echo "ok: plain Release configure, warnings are not errors"

cmake -DCBT_WERROR=ON "$T" >"$T/configure2.log" 2>&1 || { cat "$T/configure2.log" >&2; fail "reconfigure"; }
targets=$(ninja -C "$T" -t targets all)
objs=()
for f in qcow2/image_test.cc qcow2/refcount_test.cc server/cli_info.cc; do
  o=$(awk -F: -v want="/${f##*/}.o" 'substr($1, length($1) - length(want) + 1) == want {print $1; exit}' \
      <<<"$targets")
  [ -n "$o" ] || fail "no object for $f in the build"
  objs+=("$o")
done
if ! ninja -C "$T" -j2 "${objs[@]}" >"$T/build.log" 2>&1; then
  grep -E 'warning|error' "$T/build.log" | head -20 >&2
  fail "-O3 with -Werror: ${objs[*]}"
fi
echo "ok: -O3 -Werror: ${objs[*]}"
