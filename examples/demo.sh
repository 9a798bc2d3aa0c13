#!/usr/bin/env bash
# The demo run by scripts/demo.sh. $1: the build directory.
set -euo pipefail
exec "$(dirname "$0")/export-with-tracking.sh" "${1:-build/default}"
