#!/usr/bin/env bash
# The demo run by scripts/demo.sh. $1: the build directory.
set -euo pipefail
build=${1:-build/default}
echo "== cbt demo: the in-memory dirty bitmap =="
"$build/examples/bitmap_demo"
