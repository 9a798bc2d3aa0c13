#!/usr/bin/env bash
# Short fuzz run of control_fuzz (the control protocol parser): builds
# build/fuzz through fuzz/build.sh if needed (shared with fuzz/run.sh),
# writes seed requests, fuzzes for SECONDS (default 10) with the command
# names as a dictionary.
#   fuzz/control_run.sh [SECONDS]
# Exit: 0 no finding; 1 a crash/leak/timeout/OOM (reproducer path printed);
# 77 skip (clang/libFuzzer missing), with the reason.
#   CBT_FUZZ_KEEP=DIR   keep the corpus and findings in DIR instead of a temp dir
set -uo pipefail
secs=${1:-10}
src=$(cd "$(dirname "$0")/.." && pwd)
cd "$src"

blog=$(mktemp /tmp/cbt-control-fuzz-build.XXXXXX)
fuzz/build.sh >"$blog" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  cat "$blog" >&2
  rm -f "$blog"
  [ $rc -eq 77 ] && exit 77
  echo "control_run.sh: build failed" >&2
  exit 1
fi
rm -f "$blog"
bin=$src/build/fuzz/fuzz/control_fuzz

if [ -n "${CBT_FUZZ_KEEP:-}" ]; then
  dir=$CBT_FUZZ_KEEP
  mkdir -p "$dir"
else
  dir=$(mktemp -d /tmp/cbt-control-fuzz.XXXXXX)
fi
seeds=$dir/seeds corpus=$dir/corpus artifacts=$dir/artifacts
mkdir -p "$seeds" "$corpus" "$artifacts"
i=0
while IFS= read -r line; do
  printf '%s' "$line" >"$seeds/seed$i"
  i=$((i + 1))
done <<'SEEDS'
{"execute":"query-bitmaps","id":1}
{"execute":"bitmap-add","arguments":{"name":"b1","granularity":65536,"persistent":false,"disabled":true},"id":"x"}
{"execute":"bitmap-merge","arguments":{"target":"t","sources":["a","b"]}}
{"execute":"bitmap-copy","arguments":{"source":"a","target":"b"}}
{"execute":"bitmap-rename","arguments":{"name":"a","new-name":"b"}}
{"execute":"bitmap-set-persistent","arguments":{"name":"a","persistent":false}}
{"execute":"checkpoint","arguments":{"freeze":"b0","new":"b1"},"id":null}
{"execute":"transaction","arguments":{"actions":[{"type":"bitmap-disable","data":{"name":"b0"}},{"type":"bitmap-add","data":{"name":"b1"}}]}}
SEEDS
dict=$dir/control.dict
for w in execute arguments id return error class desc type data actions name granularity \
         persistent disabled target sources source new-name freeze new query-bitmaps \
         query-stats bitmap-add bitmap-remove bitmap-clear bitmap-enable bitmap-disable \
         bitmap-merge bitmap-copy bitmap-rename bitmap-set-persistent persist transaction \
         checkpoint; do
  printf '"\\"%s\\""\n' "$w"
done >"$dict"

log=$dir/fuzz.log
echo "control_run.sh: fuzzing ${secs}s; corpus $corpus, findings $artifacts, log $log"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:allocator_may_return_null=0 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$bin" "$corpus" "$seeds" -dict="$dict" \
  -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=70000 \
  -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1
rc=$?
execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
cov=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -o 'cov: [0-9]*')
echo "control_run.sh: executions: ${execs:-?}; ${cov:-cov: ?}"
found=$(find "$artifacts" -type f | head -20)
if [ $rc -ne 0 ] || [ -n "$found" ]; then
  echo "control_run.sh: FAILED (fuzzer exit $rc); last lines of $log:" >&2
  tail -n 40 "$log" >&2
  echo "control_run.sh: reproducers (rerun: $bin FILE):" >&2
  echo "$found" >&2
  exit 1
fi
[ -z "${CBT_FUZZ_KEEP:-}" ] && rm -rf "$dir"
exit 0
