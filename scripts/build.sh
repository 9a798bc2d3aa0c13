#!/usr/bin/env bash
# Installs dependencies, configures and builds one CMake preset (default:
# "default"; also "release", "asan", "tsan").
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-default}
scripts/deps.sh
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset"
