#!/usr/bin/env bash
# Runs every test: the normal build, then the ASan+UBSan build.
#   CBT_RELEASE=1          also a full Release (-O3) build with -Werror
#   CBT_SKIP_SANITIZERS=1  no sanitizer build
#   CBT_SOAK=1             long torture/soak runs as well (slow)
# Every preset builds with -Werror (CBT_WERROR=ON); a plain cmake build does
# not. `ctest --preset default` checks the plain Release configure cheaply
# (build-plain-release-no-werror: no -Werror, and the files GCC 12's -O3
# false positive hit compile clean). The full -O3 build costs about as much
# as the whole default test run on a 2-core machine, so it is opt-in.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build.sh default
echo "== tests (default build) =="
ctest --preset default

if [ "${CBT_RELEASE:-0}" = 1 ]; then
  echo "== Release build (-O3, warnings as errors) =="
  scripts/build.sh release
fi

if [ "${CBT_SKIP_SANITIZERS:-0}" != 1 ]; then
  scripts/build.sh asan
  echo "== tests (ASan + UBSan build) =="
  ctest --preset asan
else
  echo "== sanitizer run skipped: CBT_SKIP_SANITIZERS=1 =="
fi
