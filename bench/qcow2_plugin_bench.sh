#!/usr/bin/env bash
# The project's qcow2 nbdkit plugin against qemu-nbd 7.2 on the same images:
# fio (nbd engine, unix socket, QD16, one job, fio's default fixed random
# seed, so every server sees the same offsets) against three servers:
#   qemu      qemu-nbd -f qcow2 --cache=writeback -t -k SOCK IMG (aio=threads)
#   plugin    nbdkit -f -U SOCK -P SOCK.pid nbdkit-qcow2-plugin.so file=IMG
#   plugin+cbt  the same with --filter=nbdkit-cbt-filter.so on top
#             (cbt-file=<external container> cbt-bitmap=b0 cbt-create=true;
#             BENCH_CBT_INTERNAL=1 drops cbt-file=, for internal bitmaps)
# Rows (every measurement gets a fresh image, one server at a time, stopped
# and checked with `qemu-img check` afterwards, then removed):
#   empty    4k randwrite, empty 64 GiB sparse qcow2 (nearly every write
#            allocates a cluster; the fraction is reported)
#   prealloc 4k randwrite, 4 GiB qcow2 with preallocation=metadata
#   overlay  4k randwrite, overlay over a fully written 1 GiB qcow2 backing
#            (first writes to a cluster copy the rest of it from the backing)
#   read     4k randread, fully written 1 GiB qcow2
#   seq      1M sequential write, empty 64 GiB sparse qcow2
# Before fio, the export's size must equal the image's virtual size.
# Each round runs every row on qemu, plugin, plugin+cbt in turn (the order
# turning by one each round). The table
# gives median IOPS and MiB/s per server and the medians of the per-round
# ratios plugin/qemu and (plugin+cbt)/plugin; for the empty row also the host
# disk usage per newly allocated cluster (du of the image after the server
# stopped minus du before, over the growth of qemu-img check's
# allocated-clusters). Numbers on a shared 2-core VM vary: compare ratios
# within one run.
#   bench/qcow2_plugin_bench.sh BUILD_DIR [SECONDS=10] [ROUNDS=3]
# Environment:
#   TMPDIR=DIR                 where the images go (default /var/tmp; a real
#                              disk; the run needs about 72 GiB free worst case)
#   BENCH_JSON=FILE            also write the results as JSON
#   BENCH_CBT_ARGS="cbt-durability=process"  more filter parameters for the
#                              plugin+cbt rows
#   BENCH_PLUGIN_STANDIN=qemu-nbd  prove the script without the plugin: the
#                              plugin rows run qemu-nbd, the plugin+cbt rows
#                              the cbt filter over nbdkit's nbd plugin over a
#                              qemu-nbd on the image
#   BENCH_EMPTY_SIZE, BENCH_PREALLOC_SIZE, BENCH_FULL_SIZE  image sizes
#                              (default 64G, 4G, 1G)
#   BENCH_ROWS="empty prealloc overlay read seq"  the rows to run
#   BENCH_VERIFY="overlay read"  the rows verified (BENCH_VERIFY= for none):
#                              after each such run on the plugin (with and
#                              without cbt), the whole export is read back
#                              (qemu-img convert from the NBD URI, not timed)
#                              and compared with the image as qemu reads it
#                              once the server stopped (qemu-img compare);
#                              the copy goes to BENCH_DUMP_DIR (/dev/shm)
# Exit status 0; 2 when some measurement failed (the table marks it and the
# failures are listed with their server log).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 1; }
build=$(realpath "$1")
secs=${2:-10}
rounds=${3:-3}
plugin="$build/plugin/nbdkit-qcow2-plugin.so"
filter="$build/plugin/nbdkit-cbt-filter.so"
standin=${BENCH_PLUGIN_STANDIN:-}
empty_size=${BENCH_EMPTY_SIZE:-64G}
prealloc_size=${BENCH_PREALLOC_SIZE:-4G}
full_size=${BENCH_FULL_SIZE:-1G}
rows=${BENCH_ROWS:-empty prealloc overlay read seq}
verify=${BENCH_VERIFY-overlay read}
# Read-back copies go to memory where there is some (removing a scattered
# file from this disk, mounted with discard, can take minutes).
dumpdir=${BENCH_DUMP_DIR:-/dev/shm}
[ -d "$dumpdir" ] && [ -w "$dumpdir" ] || dumpdir=
servers="qemu plugin pluginf"

case "$standin" in
  "") [ -f "$plugin" ] || { echo "plugin not built: $plugin (BENCH_PLUGIN_STANDIN=qemu-nbd runs qemu-nbd in its place)" >&2; exit 1; } ;;
  qemu-nbd) ;;
  *) echo "BENCH_PLUGIN_STANDIN: only qemu-nbd is known" >&2; exit 1 ;;
esac
[ -f "$filter" ] || { echo "filter not built: $filter" >&2; exit 1; }
for t in nbdkit nbdinfo qemu-nbd qemu-img fio jq python3 timeout; do
  command -v "$t" >/dev/null || { echo "$t is not installed" >&2; exit 1; }
done
bytes() { numfmt --from=iec "${1%B}"; }

base=${TMPDIR:-/var/tmp}
# Worst case on disk at once: the two 1 GiB templates (raw and qcow2), and
# one empty image filled up to its virtual size, its bitmap container aside.
need=$(( $(bytes "$empty_size") + 2 * $(bytes "$full_size") + 2 * 1024 ** 3 ))
avail=$(( $(df --output=avail -B1 "$base" | tail -1) ))
if [ "$avail" -lt "$need" ]; then
  echo "skipped: $base has $((avail >> 30)) GiB free, the run may need $((need >> 30)) GiB" \
    "(set TMPDIR, or BENCH_EMPTY_SIZE smaller)" >&2
  exit 0
fi
d=$(mktemp -d "$base/cbt-qcow2-bench.XXXXXX")
srv_pids=()  # the servers running now (each one leaves it once reaped)
# shellcheck disable=SC2317  # called by the trap
cleanup() {
  for p in "${srv_pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$d"
  [ -z "${dump:-}" ] || rm -f "$dump"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
[ "$(stat -f -c %T "$d")" != tmpfs ] || { echo "$d is on tmpfs: set TMPDIR to a real disk" >&2; exit 1; }

# Templates: a fully written qcow2 (non-zero data, every cluster allocated)
# for the read row and as the overlay row's backing file.
head -c "$(bytes "$full_size")" /dev/urandom >"$d/full.raw"
qemu-img convert -q -f raw -O qcow2 "$d/full.raw" "$d/full.qcow2"
rm -f "$d/full.raw"

# bg LOG CMD... : start a server process, its pid recorded (killed at exit)
bg() { local log=$1; shift; "$@" >>"$log" 2>&1 & srv_pids+=("$!"); }
wait_sock() {  # wait_sock SOCK LOG
  for _ in $(seq 400); do
    [ -S "$1" ] && return 0
    for p in "${srv_pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "server exited at start" >>"$2"; return 1; }; done
    sleep 0.05
  done
  echo "no socket after 20 s" >>"$2"; return 1
}
# start SERVER IMG SOCK LOG : starts it (srv_pids), 1 if it did not come up
start() {
  local s=$1 img=$2 sock=$3 log=$4
  case "$s:$standin" in
    qemu:*|plugin:qemu-nbd)
      bg "$log" qemu-nbd -f qcow2 --cache=writeback -t -k "$sock" "$img" ;;
    plugin:)
      bg "$log" nbdkit -f -U "$sock" -P "$sock.pid" "$plugin" file="$img" ;;
    pluginf:*)
      local cbt=(cbt-bitmap=b0 cbt-create=true)
      [ -n "${BENCH_CBT_INTERNAL:-}" ] || cbt+=(cbt-file="$img.bitmaps.qcow2")
      # shellcheck disable=SC2206  # words on purpose: "cbt-durability=process ..."
      [ -z "${BENCH_CBT_ARGS:-}" ] || cbt+=($BENCH_CBT_ARGS)
      if [ -n "$standin" ]; then
        bg "$log" qemu-nbd -f qcow2 --cache=writeback -t -k "$sock.inner" "$img"
        wait_sock "$sock.inner" "$log" || return 1
        bg "$log" nbdkit -f -U "$sock" -P "$sock.pid" --filter="$filter" nbd socket="$sock.inner" "${cbt[@]}"
      else
        bg "$log" nbdkit -f -U "$sock" -P "$sock.pid" --filter="$filter" "$plugin" file="$img" "${cbt[@]}"
      fi ;;
  esac
  wait_sock "$sock" "$log"
}
# stop LOG : SIGTERM the servers (last started first), wait for each; 1 if
# one had died already or exited with a failure status
stop() {
  local log=$1 rc=0 st i p
  for ((i = ${#srv_pids[@]} - 1; i >= 0; i--)); do
    p=${srv_pids[i]}
    if ! kill -0 "$p" 2>/dev/null; then echo "server pid $p died before the end" >>"$log"; rc=1; fi
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 600); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
    kill -0 "$p" 2>/dev/null && { echo "server pid $p ignored SIGTERM for 30 s: killed" >>"$log"; kill -9 "$p"; rc=1; }
    st=0; wait "$p" 2>/dev/null || st=$?
    unset 'srv_pids[i]'  # reaped: its pid may be reused, never signal it again
    [ "$st" = 0 ] || { echo "server pid $p exit status $st" >>"$log"; rc=1; }
  done
  srv_pids=()
  return $rc
}

du_b() { du -B1 "$1" | cut -f1; }
# check IMG -> "allocated-clusters check-errors corruptions leaks", status of qemu-img check
check() {
  local st=0 out v
  out=$(qemu-img check -f qcow2 --output=json "$1" 2>>"$d/check.err") || st=$?
  v=$(jq -r '"\(."allocated-clusters" // 0) \(."check-errors" // 0) \(.corruptions // 0) \(.leaks // 0)"' \
    <<<"$out" 2>/dev/null) || v=
  echo "${v:-0 1 0 0}"  # no report at all: one check error
  return $st
}

# make_image ROW IMG
make_image() {
  case "$1" in
    empty|seq) qemu-img create -q -f qcow2 "$2" "$empty_size" ;;
    prealloc) qemu-img create -q -f qcow2 -o preallocation=metadata "$2" "$prealloc_size" ;;
    overlay) qemu-img create -q -f qcow2 -b "$d/full.qcow2" -F qcow2 "$2" ;;
    read) cp --sparse=always "$d/full.qcow2" "$2" ;;
  esac
}
# fio arguments per row
row_fio() {
  case "$1" in
    empty) echo "--rw=randwrite --bs=4k --size=$empty_size" ;;
    prealloc) echo "--rw=randwrite --bs=4k --size=$prealloc_size" ;;
    overlay) echo "--rw=randwrite --bs=4k --size=$full_size" ;;
    read) echo "--rw=randread --bs=4k --size=$full_size" ;;
    seq) echo "--rw=write --bs=1M --size=$empty_size" ;;
  esac
}
dir_of() { [ "$1" = read ] && echo read || echo write; }

failed=0
# measure ROW SERVER ROUND : one fresh image, one server, one fio run; a line
# "row server round ok iops mibs ios du0 du1 cl0 cl1 checkerr corrupt leaks"
# goes to $d/results
measure() {
  local row=$1 s=$2 r=$3 tag="$1.$2.r$3"
  local img="$d/$tag.qcow2" sock="$d/$tag.sock" log="$d/$tag.log" ok=1 bad=0 vf=-
  local du0 du1 c0 c1 ce co le iops=0 mibs=0 ios=0 chk vsize esize
  local uri="nbd+unix:///?socket=$sock"
  dump=$(mktemp "${dumpdir:-$d}/cbt-qcow2-bench-dump.XXXXXX")
  make_image "$row" "$img"
  du0=$(du_b "$img")
  read -r c0 _ < <(check "$img" || true)
  vsize=$(qemu-img info -f qcow2 --output=json "$img" | jq '."virtual-size"')
  if start "$s" "$img" "$sock" "$log"; then
    esize=$(nbdinfo --size "$uri" 2>>"$log") || esize="(nbdinfo failed)"
    # shellcheck disable=SC2046  # row_fio's words are options
    if [ "$esize" != "$vsize" ]; then
      ok=0; echo "export size $esize, image virtual size $vsize: fio not run" >>"$log"
    elif timeout -k 10 $((secs + 120)) fio --name="$tag" --ioengine=nbd --uri="$uri" \
        --iodepth=16 --time_based=1 --runtime="$secs" $(row_fio "$row") \
        --output-format=json --output="$d/$tag.json" >>"$log" 2>&1 &&
        [ "$(jq '.jobs[0].error' "$d/$tag.json")" = 0 ]; then
      read -r iops mibs ios < <(jq -r --arg k "$(dir_of "$row")" \
        '.jobs[0][$k] | "\(.iops) \(.bw / 1024) \(.total_ios)"' "$d/$tag.json")
      # Verification (not timed): what the server reads back, all of it,
      # against what qemu reads from the image once the server has stopped.
      if [ "$s" != qemu ] && [[ " $verify " == *" $row "* ]]; then
        if timeout -k 10 600 qemu-img convert -q -f raw -O raw "$uri" "$dump" >>"$log" 2>&1; then
          vf=pending
        else
          vf=0; echo "reading the export back failed" >>"$log"
        fi
      fi
    else
      ok=0; echo "fio failed (status or job error); its output:" >>"$log"
      cat "$d/$tag.json" >>"$log" 2>/dev/null || true
    fi
  else
    ok=0
  fi
  stop "$log" || ok=0
  du1=$(du_b "$img")
  # A failed check or compare does not void the figures; they are listed apart.
  if ! chk=$(check "$img"); then
    bad=1; echo "qemu-img check after the run failed:" >>"$log"
    qemu-img check -f qcow2 "$img" >>"$log" 2>&1 || true
  fi
  read -r c1 ce co le <<<"$chk"
  if [ "$vf" = pending ]; then
    if qemu-img compare -q -f raw -F qcow2 "$dump" "$img" >>"$log" 2>&1; then vf=1; else
      vf=0; echo "qemu-img compare: the data read through the server differs from the image" >>"$log"
      qemu-img compare -f raw -F qcow2 "$dump" "$img" >>"$log" 2>&1 || true
    fi
  fi
  [ "$vf" != 0 ] || bad=1
  if [ "$ok" = 0 ] || [ "$bad" = 1 ]; then failed=1; cp "$log" "$d/failed.$tag.log"; fi
  echo "$row $s $r $ok $iops $mibs $ios $du0 $du1 $c0 $c1 $ce $co $le $vf" >>"$d/results"
  rm -f "$img" "$img.bitmaps.qcow2" "$sock" "$sock.inner" "$sock.pid" "$dump"
  echo "[$(date -u +%T)] $tag: ok=$ok IOPS=${iops%.*} check=$ce/$co/$le verified=$vf" >&2
}

# The servers' order turns by one each round (qemu plugin pluginf, then
# plugin pluginf qemu, ...), so that no server always runs first or last
# (page cache, the disk's own write-back, the machine's other load).
read -r -a order_base <<<"$servers"
for r in $(seq "$rounds"); do
  turned=()
  for i in "${!order_base[@]}"; do
    turned+=("${order_base[(i + r - 1) % ${#order_base[@]}]}")
  done
  for row in $rows; do
    for s in "${turned[@]}"; do measure "$row" "$s" "$r"; done
  done
done


echo "qcow2 plugin bench: fio $(fio --version | sed 's/fio-//') nbd engine QD16, ${secs}s per run," \
  "$rounds interleaved rounds, images in $base, $(nbdkit --version), $(qemu-nbd --version | head -1 | cut -d' ' -f1-2)," \
  "$(date -u '+%F %H:%M UTC')${standin:+, STAND-IN: plugin = $standin}"
envs=""
for v in BENCH_PLUGIN_STANDIN BENCH_CBT_INTERNAL BENCH_ROWS BENCH_EMPTY_SIZE BENCH_PREALLOC_SIZE BENCH_FULL_SIZE; do
  [ -z "${!v:-}" ] || envs+="$v=\"${!v}\" "
done
echo "reproduce: ${envs}TMPDIR=$base bench/qcow2_plugin_bench.sh $build $secs $rounds"
echo
python3 - "$d/results" "${BENCH_JSON:-}" "$empty_size" "$prealloc_size" "$full_size" "$standin" <<'EOF'
import json, statistics, sys
path, jpath, esz, psz, fsz, standin = sys.argv[1:]
label = {
    "empty": f"4k randwrite, empty {esz} image",
    "prealloc": f"4k randwrite, {psz} preallocation=metadata",
    "overlay": f"4k randwrite, overlay over a written {fsz} backing",
    "read": f"4k randread, fully written {fsz} image",
    "seq": f"1M seq write, empty {esz} image",
}
names = {"qemu": "qemu-nbd", "plugin": "plugin", "pluginf": "plugin+cbt"}
res = {}
order = []
for line in open(path):
    row, s, r, ok, iops, mibs, ios, du0, du1, c0, c1, ce, co, le, vf = line.split()
    if row not in order: order.append(row)
    res.setdefault(row, {}).setdefault(s, {})[int(r)] = dict(
        ok=ok == "1", iops=float(iops), mibs=float(mibs), ios=int(ios), du0=int(du0), du1=int(du1),
        clusters0=int(c0), clusters1=int(c1), check_errors=int(ce), corruptions=int(co), leaks=int(le),
        verified={"1": True, "0": False}.get(vf))
def med(v): return statistics.median(v) if v else None
def good(row, s): return {r: m for r, m in res[row].get(s, {}).items() if m["ok"]}
def ratio(row, a, b):  # median over rounds where both ran of a/b
    ga, gb = good(row, a), good(row, b)
    return med([ga[r]["iops"] / gb[r]["iops"] for r in ga if r in gb and gb[r]["iops"] > 0])
def fmt(v, f): return "FAIL" if v is None else f % v
out = {"rows": {}, "standin": standin or None}
print("| row | qemu-nbd IOPS | MiB/s | plugin IOPS | MiB/s | plugin+cbt IOPS | MiB/s | plugin / qemu-nbd | (plugin+cbt) / plugin |")
print("|---|---|---|---|---|---|---|---|---|")
for row in order:
    cells, j = [], {}
    for s in ("qemu", "plugin", "pluginf"):
        g = good(row, s)
        n = len(res[row].get(s, {}))
        iops, mibs = med([m["iops"] for m in g.values()]), med([m["mibs"] for m in g.values()])
        mark = "" if len(g) == n else f" ({n - len(g)}/{n} failed)"
        cells += [fmt(iops, "%.0f") + mark, fmt(mibs, "%.1f")]
        j[s] = dict(median_iops=iops, median_mibs=mibs, failed_runs=n - len(g),
                    rounds={r: m for r, m in sorted(res[row].get(s, {}).items())})
    r1, r2 = ratio(row, "plugin", "qemu"), ratio(row, "pluginf", "plugin")
    j["ratio_plugin_qemu"], j["ratio_pluginf_plugin"] = r1, r2
    out["rows"][row] = j
    print(f"| {label[row]} | " + " | ".join(cells) + f" | {fmt(r1, '%.2f')} | {fmt(r2, '%.2f')} |")
print()
print("ratios: medians of the per-round ratios of IOPS (MiB/s gives the same); rounds (IOPS qemu-nbd / plugin / plugin+cbt):")
for row in order:
    rs = sorted({r for s in res[row].values() for r in s})
    cells = []
    for r in rs:
        cells.append(" / ".join(
            ("%.0f" % res[row][s][r]["iops"]) if res[row].get(s, {}).get(r, {}).get("ok") else "FAIL"
            for s in ("qemu", "plugin", "pluginf")))
    print(f"  {row}: " + "; ".join(cells))
for row in ("empty", "seq"):
    if row not in res: continue
    print()
    print(f"{label[row]}: host disk usage per newly allocated cluster (du after - du before) / "
          "(allocated-clusters after - before, qemu-img check), median of the rounds:")
    for s in ("qemu", "plugin", "pluginf"):
        g = good(row, s)
        per, frac, grow = [], [], []
        for m in g.values():
            n = m["clusters1"] - m["clusters0"]
            if n > 0:
                per.append((m["du1"] - m["du0"]) / n)
                frac.append(n / m["ios"] if m["ios"] else 0)
                grow.append(n)
        j = out["rows"][row][s]
        j["du_per_new_cluster"] = med(per)
        j["new_clusters"] = med(grow)
        if per:
            extra = (f", {med(frac) * 100:.0f} % of the writes allocated one" if row == "empty" else "")
            print(f"  {names[s]}: {med(per):.0f} bytes per cluster ({med(per) / 65536:.2f} x 64 KiB), "
                  f"{med(grow):.0f} new clusters{extra}")
        else:
            print(f"  {names[s]}: no successful run with new clusters")
bad = [(row, s, r, m) for row in order for s in res[row] for r, m in res[row][s].items()
       if not m["ok"] or m["check_errors"] or m["corruptions"] or m["leaks"] or m["verified"] is False]
print()
if bad:
    print("FAILURES (their log tails follow):")
    for row, s, r, m in bad:
        print(f"  {row} {names[s]} round {r}: {'run failed' if not m['ok'] else 'ran'}; qemu-img check after: "
              f"{m['check_errors']} check errors, {m['corruptions']} corruptions, {m['leaks']} leaked clusters"
              + ("; data read back DIFFERS from the image" if m["verified"] is False else ""))
else:
    print("every run completed; qemu-img check found every image clean after its server stopped")
nv = sum(1 for row in order for s in res[row].values() for m in s.values() if m["verified"])
if nv:
    print(f"{nv} plugin runs read back identical to their image (qemu-img compare after the server stopped)")
if jpath:
    with open(jpath, "w") as f: json.dump(out, f, indent=1)
    print(f"JSON: {jpath}")
EOF
for f in "$d"/failed.*.log; do  # the server's log, fio's and the checks' complaints
  [ -e "$f" ] || continue
  echo
  echo "=== failed: $(basename "$f" .log | sed 's/^failed\.//') (last 40 lines of its log)"
  tail -40 "$f"
done
exit $((failed * 2))
