#!/usr/bin/env bash
# Runs every test: the normal build, then the ASan+UBSan build.
#   CBT_SKIP_SANITIZERS=1  only the normal build
#   CBT_SOAK=1             long torture/soak runs as well (slow)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build.sh default
echo "== tests (default build) =="
ctest --preset default

if [ "${CBT_SKIP_SANITIZERS:-0}" != 1 ]; then
  scripts/build.sh asan
  echo "== tests (ASan + UBSan build) =="
  ctest --preset asan
else
  echo "== sanitizer run skipped: CBT_SKIP_SANITIZERS=1 =="
fi
