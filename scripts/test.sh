#!/usr/bin/env bash
# Runs every test: the normal build, then a Release (-O3) build as packagers
# make it, then the ASan+UBSan build.
#   CBT_SKIP_RELEASE=1     no Release build
#   CBT_SKIP_SANITIZERS=1  no sanitizer build
#   CBT_SOAK=1             long torture/soak runs as well (slow)
# Every preset builds with -Werror (CBT_WERROR=ON); a plain cmake build does
# not. `ctest --preset default` checks the plain configure cheaply
# (build-plain-release-no-werror); the Release build here proves that -O3,
# where GCC's optimiser warnings differ, is warning-clean too.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build.sh default
echo "== tests (default build) =="
ctest --preset default

if [ "${CBT_SKIP_RELEASE:-0}" != 1 ]; then
  echo "== Release build (-O3, warnings as errors) =="
  scripts/build.sh release
else
  echo "== Release build skipped: CBT_SKIP_RELEASE=1 =="
fi

if [ "${CBT_SKIP_SANITIZERS:-0}" != 1 ]; then
  scripts/build.sh asan
  echo "== tests (ASan + UBSan build) =="
  ctest --preset asan
else
  echo "== sanitizer run skipped: CBT_SKIP_SANITIZERS=1 =="
fi
