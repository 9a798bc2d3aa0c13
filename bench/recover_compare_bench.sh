#!/usr/bin/env bash
# cbt recover --compare (docs/cli.md): how fast the disk is compared with its
# last backup, against the raw read speed of the same two files.
#
# Setup, in DIR (default /var/tmp: a real disk, not tmpfs): a SIZE raw disk
# of random data and a copy as the raw backup, in which PERCENT of the
# 64 KiB granules, scattered at random, are then changed; a bitmaps-only
# container with bitmap b0. Measured, ROUNDS times, alternating, with both
# files dropped from the page cache (sync, posix_fadvise DONTNEED) before
# each timed run:
#   baseline  both files read at once, sequentially, as a fast reader would:
#             two concurrent `dd bs=4M of=/dev/null`
#   ours      `cbt recover disk.cbt --bitmap b0 --compare backup.raw
#             --compare-format raw --disk disk.raw --output=json`
# Every recover result is checked: its dirty-granules must equal the
# granules changed. Prints per round and the medians; ratio = baseline time /
# compare time (1.0 = as fast as just reading both files). The machine is
# shared: the load average is printed with each round.
#   bench/recover_compare_bench.sh [BUILD_DIR] [SIZE_GIB=2] [PERCENT=5] [ROUNDS=3] [DIR=/var/tmp]
set -euo pipefail
build=$(realpath "${1:-build/default}")
size_gib=${2:-2}
percent=${3:-5}
rounds=${4:-3}
base=${5:-/var/tmp}
cbt="$build/server/cbt"
[ -x "$cbt" ] || { echo "not built: $cbt" >&2; exit 1; }
for t in python3 jq dd awk; do command -v "$t" >/dev/null || { echo "$t is not installed" >&2; exit 1; }; done
d=$(mktemp -d "$base/cbt-compare-bench.XXXXXX")
trap 'rm -rf "$d"' EXIT
[ "$(stat -f -c %T "$d")" != tmpfs ] || echo "warning: $d is on tmpfs: the figures are memory speed" >&2

echo "setup: ${size_gib} GiB disk, ${percent}% of the granules changed, in $d" >&2
changed=$(python3 - "$d" "$size_gib" "$percent" <<'EOF'
import os, random, sys
d, gib, pct = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
size, g, chunk = gib << 30, 65536, 16 << 20
with open(os.path.join(d, "disk.raw"), "wb") as a, open(os.path.join(d, "backup.raw"), "wb") as b:
    for _ in range(size // chunk):
        x = os.urandom(chunk)
        a.write(x)
        b.write(x)
n = size // g
rng = random.Random(7)
picked = rng.sample(range(n), int(n * pct / 100))
with open(os.path.join(d, "backup.raw"), "r+b") as b:
    for i in picked:  # one byte per picked granule, inverted: it differs
        off = i * g + rng.randrange(g)
        b.seek(off)
        x = b.read(1)
        b.seek(off)
        b.write(bytes([x[0] ^ 0xFF]))
print(len(picked))
EOF
)
"$cbt" create "$d/disk.cbt" --size "$((size_gib << 30))" >/dev/null
"$cbt" bitmap "$d/disk.cbt" b0 --add

drop() {  # drop FILE... : out of the page cache
  sync
  python3 -c '
import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
' "$@"
}
now() { date +%s.%N; }
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

bases=() ours=() ratios=()
for r in $(seq "$rounds"); do
  drop "$d/disk.raw" "$d/backup.raw"
  t0=$(now)
  dd if="$d/disk.raw" of=/dev/null bs=4M status=none &
  p1=$!
  dd if="$d/backup.raw" of=/dev/null bs=4M status=none &
  p2=$!
  wait "$p1" "$p2"
  t1=$(now)
  b=$(awk "BEGIN { print $t1 - $t0 }")

  drop "$d/disk.raw" "$d/backup.raw"
  t0=$(now)
  "$cbt" recover "$d/disk.cbt" --bitmap b0 --compare "$d/backup.raw" --compare-format raw \
    --disk "$d/disk.raw" --output=json >"$d/out.json"
  t1=$(now)
  o=$(awk "BEGIN { print $t1 - $t0 }")
  got=$(jq '."dirty-granules"' "$d/out.json")
  [ "$got" = "$changed" ] || { echo "wrong result: $got dirty granules, $changed changed" >&2; exit 1; }
  ratio=$(awk "BEGIN { print $b / $o }")
  bases+=("$b") ours+=("$o") ratios+=("$ratio")
  printf 'round %d: baseline %.2f s, compare %.2f s (%.0f MiB/s of both files), ratio %.2f, load %s\n' \
    "$r" "$b" "$o" "$(awk "BEGIN { print 2 * $size_gib * 1024 / $o }")" "$ratio" \
    "$(cut -d' ' -f1-3 /proc/loadavg)"
done
printf 'median: baseline %.2f s, compare %.2f s, ratio %.2f (%d rounds, %d GiB, %d changed granules)\n' \
  "$(printf '%s\n' "${bases[@]}" | median)" "$(printf '%s\n' "${ours[@]}" | median)" \
  "$(printf '%s\n' "${ratios[@]}" | median)" "$rounds" "$size_gib" "$changed"
