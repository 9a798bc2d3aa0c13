#!/usr/bin/env bash
# Configures build/fuzz with clang (libFuzzer + ASan + UBSan) and builds only
# the fuzz targets (qcow2_fuzz, qcow2_volume_fuzz, control_fuzz) and the
# libraries they need. CBT_FUZZ_BUILD_JOBS=N: build jobs (default 2).
# Used by fuzz/run.sh (its two ctests, one per target, share a lock so
# they never build this tree at the same time).
# Exit 77 (skip) with a reason when clang or libFuzzer is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in clang clang++ cmake ninja; do
  if ! command -v "$tool" >/dev/null; then
    echo "fuzz/build.sh: SKIP: $tool not found (apt-get install clang cmake ninja-build)" >&2
    exit 77
  fi
done
# libFuzzer ships with clang's compiler-rt; probe it.
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long){return 0;}\n' \
  >"$probe/p.cc"
if ! clang++ -fsanitize=fuzzer,address,undefined "$probe/p.cc" -o "$probe/p" 2>"$probe/err"; then
  echo "fuzz/build.sh: SKIP: clang++ cannot link -fsanitize=fuzzer:" >&2
  cat "$probe/err" >&2
  exit 77
fi

if [ ! -f build/fuzz/CMakeCache.txt ]; then
  CC=clang CXX=clang++ cmake -S . -B build/fuzz -G Ninja -DCBT_FUZZ=ON -DCBT_BENCH=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
cmake --build build/fuzz --target qcow2_fuzz qcow2_volume_fuzz control_fuzz \
  -j"${CBT_FUZZ_BUILD_JOBS:-2}"
