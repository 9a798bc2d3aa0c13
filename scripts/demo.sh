#!/usr/bin/env bash
# The main job: builds cbt and runs the demo (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh default >/dev/null
exec examples/demo.sh build/default
