#!/usr/bin/env bash
# Short fuzz run of one target: builds build/fuzz if needed (fuzz/build.sh,
# both targets), generates the target's seed corpus in a temp dir, fuzzes for
# SECONDS (default 30).
#   fuzz/run.sh [SECONDS] [TARGET]
# TARGET: qcow2 (default; qcow2_fuzz, the qcow2 parsers, seeds from
# make_corpus.sh) or control (control_fuzz, the control request parser,
# seeds and dictionary from control_seeds.sh) or volume (qcow2_volume_fuzz,
# the qcow2::Volume data path, seeds from make_corpus.sh + volume_seeds.sh).
# Exit: 0 no finding; 1 a crash/leak/timeout/OOM (reproducer kept, path
# printed); 77 skip (clang/libFuzzer or qemu-img missing), with the reason.
#   CBT_FUZZ_KEEP=DIR   keep the corpus and findings in DIR instead of a temp dir
#   CBT_FUZZ_JOBS=N     run N fuzzer processes (default 1; the box is shared)
set -uo pipefail
secs=${1:-30}
target=${2:-qcow2}
src=$(cd "$(dirname "$0")/.." && pwd)
cd "$src"
case $target in
  qcow2) max_len=1048576 ;;
  control) max_len=70000 ;;  # the protocol refuses lines over 64 KiB
  volume) max_len=16777216 ;;  # seeds with 2 MiB clusters are ~10 MiB
  *) echo "run.sh: unknown target '$target' (qcow2, control or volume)" >&2; exit 1 ;;
esac

blog=$(mktemp /tmp/cbt-fuzz-build.XXXXXX)
fuzz/build.sh >"$blog" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  cat "$blog" >&2
  rm -f "$blog"
  [ $rc -eq 77 ] && exit 77
  echo "run.sh: build failed" >&2
  exit 1
fi
rm -f "$blog"
bin=$src/build/fuzz/fuzz/${target}_fuzz
[ "$target" = volume ] && bin=$src/build/fuzz/fuzz/qcow2_volume_fuzz

if [ -n "${CBT_FUZZ_KEEP:-}" ]; then
  dir=$CBT_FUZZ_KEEP
  mkdir -p "$dir"
else
  dir=$(mktemp -d /tmp/cbt-fuzz.XXXXXX)
fi
seeds=$dir/seeds corpus=$dir/corpus artifacts=$dir/artifacts
mkdir -p "$corpus" "$artifacts"
rm -rf "$seeds"
dict=()
if [ "$target" = qcow2 ]; then
  fuzz/make_corpus.sh "$seeds"
elif [ "$target" = volume ]; then
  fuzz/make_corpus.sh "$seeds" && fuzz/volume_seeds.sh "$seeds"
else
  fuzz/control_seeds.sh "$seeds" "$dir/control.dict" && dict=(-dict="$dir/control.dict")
fi
rc=$?
[ $rc -eq 77 ] && exit 77
[ $rc -ne 0 ] && { echo "run.sh: seed generation failed" >&2; exit 1; }

log=$dir/fuzz.log
jobs=${CBT_FUZZ_JOBS:-1}
extra=()
[ "$jobs" -gt 1 ] && extra=(-fork="$jobs" -ignore_crashes=0)
echo "run.sh: fuzzing $target ${secs}s; corpus $corpus, findings $artifacts, log $log"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:allocator_may_return_null=0 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$bin" "$corpus" "$seeds" "${extra[@]}" "${dict[@]}" \
  -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len="$max_len" \
  -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1
rc=$?

execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
eps=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
last=$(grep -E '^#[0-9]+' "$log" | tail -1)
cov=$(echo "$last" | grep -o 'cov: [0-9]*')
ft=$(echo "$last" | grep -o 'ft: [0-9]*')
n=$(find "$corpus" -type f | wc -l)
bytes=$(find "$corpus" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
corp=$(echo "$last" | grep -o 'corp: [^ ]*')
echo "run.sh: executions: ${execs:-?} (${eps:-?}/s); ${cov:-cov: ?} ${ft:-};" \
  "libFuzzer ${corp:-corp: ?} (units/size); corpus dir: $n files, $bytes bytes"

found=$(find "$artifacts" -type f | head -20)
if [ $rc -ne 0 ] || [ -n "$found" ]; then
  echo "run.sh: FAILED (fuzzer exit $rc); last lines of $log:" >&2
  grep -E 'ERROR|SUMMARY|invariant|==[0-9]+==|Test unit written|#[0-9]+ *in ' "$log" | head -30 >&2
  tail -n 40 "$log" >&2
  echo "run.sh: reproducers (rerun: $bin FILE):" >&2
  echo "$found" >&2
  exit 1
fi
[ -z "${CBT_FUZZ_KEEP:-}" ] && rm -rf "$dir"
exit 0
