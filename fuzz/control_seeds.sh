#!/usr/bin/env bash
# Seeds and a dictionary for control_fuzz (the control protocol parser):
#   fuzz/control_seeds.sh SEED_DIR DICT_FILE
# One valid request per seed file; the dictionary holds the protocol's words.
set -euo pipefail
out=$1 dict=$2
mkdir -p "$out"
i=0
while IFS= read -r line; do
  printf '%s' "$line" >"$out/seed$i"
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
for w in execute arguments id return error class desc type data actions name granularity \
         persistent disabled target sources source new-name freeze new query-bitmaps \
         query-stats bitmap-add bitmap-remove bitmap-clear bitmap-enable bitmap-disable \
         bitmap-merge bitmap-copy bitmap-rename bitmap-set-persistent persist transaction \
         checkpoint; do
  printf '"\\"%s\\""\n' "$w"
done >"$dict"

