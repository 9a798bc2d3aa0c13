#!/usr/bin/env bash
# The qcow2 plugin against QEMU on a corpus of images made by qemu-img and
# qemu-io: v2 and v3, cluster sizes 512 B - 2 MiB, refcount_bits 1..64, every
# preallocation mode, zero clusters (ZERO_ALLOC, ZERO_PLAIN), compressed
# clusters (zlib, zstd), a depth-3 chain mixing raw and qcow2 backing with
# relative names (served from another directory holding decoys under the
# same relative names), a backing file shorter than its overlay, a raw
# backing that holds a qcow2 image (never probed), lazy refcounts, internal
# snapshots, the corrupt bit.
# For each image, served read-only and read-write where allowed:
#   - every byte read through NBD (nbdcopy without extents; read-only also
#     with extents) equals `qemu-img convert -O raw` of the image;
#   - `nbdinfo --map --json` (base:allocation, adjacent equal extents merged)
#     equals what qemu-nbd -r serves for the same image, the two taken back
#     to back (read-only: before and after the reads);
#   - read-write: after a clean stop the image is unchanged and passes
#     qemu-img check; then a second copy is rewritten through NBD (nbdcopy of
#     a changed raw: data, zero requests) and QEMU must read exactly that raw.
# Refusals: encryption (LUKS; legacy AES by patching crypt_method),
# extended_l2, external data file (also data_file_raw), the corrupt bit
# (read-write), the dirty bit, an unknown incompatible bit, internal
# snapshots (read-write), backing=refuse on an overlay: nbdkit must exit
# non-zero at start with a message naming the reason.
#
# Environment:
#   CORPUS_SERVER=qemu-nbd  serve with `qemu-nbd -f qcow2` instead of the
#                           plugin (proves the harness on the oracle; the
#                           refusal checks are then skipped)
#   CORPUS_ONLY=REGEX       only the cases whose name matches
#   CORPUS_MUTATE=flip-ref|flip-new|data-byte|map-only|refuse-clean
#                           deliberately break the harness's inputs, to prove
#                           the checks can fail: a bit of each expected raw
#                           flipped (flip-new: of the raw written through NBD,
#                           after the write); each image changed after its
#                           reference raw was taken (512 bytes of 0xfe); or
#                           served from a copy with zero bytes written as data
#                           over a zero extent (same bytes, other map);
#                           refusals handed a clean image
# Each case prints "PASS name" or "FAIL name: first difference"; the test
# fails if any case failed.
LIB_NO_FILTER=1
source "$(dirname "$0")/lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
POKE=(python3 "$HERE/qcow2_poke.py")
SERVER=${CORPUS_SERVER:-plugin}
ONLY=${CORPUS_ONLY:-}
MUTATE=${CORPUS_MUTATE:-}
need qemu-io nbdcopy cmp python3 od
case $SERVER in
  plugin) [ -f "$QCOW2_PLUGIN" ] || fail "qcow2 plugin not built: $QCOW2_PLUGIN" ;;
  qemu-nbd) echo "NOTE: serving with qemu-nbd (CORPUS_SERVER=qemu-nbd): refusal checks skipped" ;;
  *) fail "CORPUS_SERVER must be plugin or qemu-nbd, not '$SERVER'" ;;
esac
case $MUTATE in ''|flip-ref|flip-new|data-byte|map-only|refuse-clean) ;; *) fail "unknown CORPUS_MUTATE '$MUTATE'" ;; esac

I=$T/img
mkdir -p "$I" "$T/cwd" "$T/out"
# Every server and qemu tool runs from $T/cwd: relative backing names must be
# resolved against the overlay's directory, never the cwd.
cd "$T/cwd"
head -c 5M /dev/urandom >"$T/rand.bin"

PASSED=()
FAILED=()
pass() { PASSED+=("$1"); echo "PASS $1"; }
bad() { FAILED+=("$1"); echo "FAIL $1: $2"; }
wanted() { [ -z "$ONLY" ] || [[ "$1" =~ $ONLY ]]; }

# fill IMG CS SIZE [FMT] : the data pattern, one qemu-io run. Needs SIZE >=
# 16 clusters. Unaligned and cluster-crossing writes, position-dependent
# random data, a single byte, zeroes over data (v3: ZERO_ALLOC), zeroes with
# unmap over data (ZERO_PLAIN), zeroes over nothing, a discard inside data, a
# partial-cluster zero inside data, a write ending at the last byte.
fill() {
  local img=$1 cs=$2 sz=$3 fmt=${4:-qcow2}
  local n=$((sz / cs))
  local m=$((n / 2 * cs)) q=$((n * 3 / 4 * cs))
  [ "$n" -ge 16 ] || fail "fill: $img has $n clusters, needs 16"
  qemu-io -f "$fmt" \
    -c "write -P 0x11 0 $((cs / 2 + 3))" \
    -c "write -P 0x22 $((cs - 100)) 300" \
    -c "write -s $T/rand.bin $((3 * cs + 17)) $((2 * cs + 5))" \
    -c "write -P 0x77 $((7 * cs + 1)) 1" \
    -c "write -P 0x44 $((m - cs)) $((4 * cs))" \
    -c "write -z $m $cs" \
    -c "write -z -u $((m + cs)) $cs" \
    -c "write -z $((m + 4 * cs)) $((2 * cs))" \
    -c "write -P 0x55 $q $((3 * cs))" \
    -c "discard $((q + cs)) $cs" \
    -c "write -z $((q + 2 * cs + 10)) 100" \
    -c "write -P 0x66 $((sz - 777)) 777" \
    "$img" >/dev/null || fail "qemu-io fill $img"
}

# mk NAME SIZE CS [qemu-img -o options] : $I/NAME.qcow2, filled.
mk() {
  local name=$1 sz=$2 cs=$3 opts=${4:-}
  qemu-img create -q -f qcow2 -o "cluster_size=$cs${opts:+,$opts}" "$I/$name.qcow2" "$sz"
  fill "$I/$name.qcow2" "$cs" "$sz"
}

# serve SOCK ro|rw IMG [PLUGIN-ARGS...] : starts the server under test (a
# foreground background job, pid in $SRV_PID and $PIDS); 0 once it answers,
# 1 when it exits first (rc in $SRV_RC, stderr in $T/serve.log), keeps
# listening but fails handshakes with an error logged (SRV_RC=listening,
# killed) or does not answer within 60 s (SRV_RC=hung, killed).
serve() {
  local sock=$1 mode=$2 img=$3 a bfile='' bfmt=raw
  shift 3
  rm -f "$sock" "$sock.pid"
  : >"$T/serve.log"
  if [ "$SERVER" = qemu-nbd ]; then
    local qa=()
    [ "$mode" = ro ] && qa+=(-r)
    for a in "$@"; do
      case $a in
        backing=refuse) ;;
        backing=*) bfile=${a#backing=} ;;
        backing-format=*) bfmt=${a#backing-format=} ;;
        discard=unmap) qa+=(--discard=unmap) ;;
      esac
    done
    if [ -n "$bfile" ]; then
      qa+=(--image-opts "driver=qcow2,file.driver=file,file.filename=$img,backing.driver=$bfmt,backing.file.driver=file,backing.file.filename=$bfile")
    else
      qa+=(-f qcow2 "$img")
    fi
    qemu-nbd -t -e 16 -k "$sock" "${qa[@]}" 2>>"$T/serve.log" &
  else
    local ro=()
    [ "$mode" = ro ] && ro=(-r)
    "${NBDKIT_ENV[@]}" nbdkit -f --exit-with-parent "${ro[@]}" -U "$sock" -P "$sock.pid" \
      "$QCOW2_PLUGIN" file="$img" "$@" 2>>"$T/serve.log" &
  fi
  SRV_PID=$!
  PIDS+=("$SRV_PID")
  SRV_RC=
  local end=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$end" ]; do
    if [ -S "$sock" ]; then
      timeout 10 nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>"$T/probe.err" && return 0
      # Listening but refusing the handshake: the image was refused per
      # connection while nbdkit keeps running.
      if grep -q handshake "$T/probe.err" && grep -q 'error' "$T/serve.log"; then
        kill -9 "$SRV_PID" 2>/dev/null || true
        wait "$SRV_PID" 2>/dev/null || true
        SRV_RC=listening
        return 1
      fi
    fi
    if ! kill -0 "$SRV_PID" 2>/dev/null; then
      SRV_RC=0
      wait "$SRV_PID" || SRV_RC=$?
      return 1
    fi
    sleep 0.05
  done
  kill -9 "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  SRV_RC=hung
  return 1
}

# qview IMG : the --image-opts string that makes QEMU see IMG the way the
# case serves it ($QOPTS overrides the default qcow2-over-file), into $QV.
# file.locking=off: the reference is taken while the server under test holds
# the image (a qemu-nbd serving read-write locks it).
qview() {
  QV="${QOPTS:-driver=qcow2,file.driver=file,file.filename=$1},file.locking=off"
}

# merge_types : nbdinfo --map --json on stdin; compact {offset,length,type}
# with adjacent extents of the same type merged.
merge_types() {
  jq -c 'map({offset, length, type}) |
         reduce .[] as $e ([]; if length > 0 and .[-1].type == $e.type
                               then .[-1].length += $e.length else . + [$e] end)'
}

# first_diff A B : the first offset where files A and B differ, with 16 bytes
# of each from there (or cmp's EOF line).
first_diff() {
  local line off
  line=$(cmp "$1" "$2" 2>&1 | head -1)
  case $line in
    *"differ: byte "*)
      off=${line#*differ: byte }; off=$(( ${off%%,*} - 1 ))
      echo "offset $off: want $(od -A n -t x1 -j "$off" -N 16 "$1" | tr -s ' ') got $(od -A n -t x1 -j "$off" -N 16 "$2" | tr -s ' ')" ;;
    *) echo "$line" ;;
  esac
}

# map_diff WANT GOT : the first differing extent of two merged maps.
map_diff() {
  jq -nc --argjson a "$1" --argjson b "$2" '
    [range(0; [($a | length), ($b | length)] | max)] | map(select($a[.] != $b[.])) | .[0] as $i
    | {index: $i, qemu_nbd: $a[$i], served: $b[$i]}'
}

# maps_agree SOCK IMG : nbdinfo --map of SOCK equals qemu-nbd's for IMG,
# both taken back to back: ext4 reports unwritten extents as holes until a
# read fills the page cache, and qemu-nbd's map follows SEEK_HOLE (raw
# backing files; qcow2 data clusters when QEMU's metadata-preallocation
# guess is on), so the two maps must see the same page-cache state.
maps_agree() {
  local m w
  m=$(timeout 60 nbdinfo --map --json "nbd+unix:///?socket=$1" | merge_types) ||
    { echo "nbdinfo --map failed"; return 1; }
  qview "$2"
  w=$(timeout 60 nbdinfo --map --json -- [ qemu-nbd -r --image-opts "$QV" ] | merge_types) ||
    fail "qemu-nbd map of $2"
  if [ "$m" != "$w" ]; then
    echo "map differs: first $(map_diff "$w" "$m")"
    echo "    qemu-nbd: ${w:0:1500}"
    echo "    served:   ${m:0:1500}"
    return 1
  fi
}

# check_served SOCK IMG WANT_RAW [quick] : the map, then every byte read
# through SOCK without extents equals WANT_RAW; unless quick, also read with
# extents (nbdcopy skips what the map calls zero) and the map again after
# the reads. Prints nothing and returns 0 when all agree; else prints the
# first difference.
check_served() {
  local want=$3 got=$T/out/got.raw uri="nbd+unix:///?socket=$1" why
  why=$(maps_agree "$1" "$2") || { echo "$why"; return 1; }
  rm -f "$got"
  timeout 120 nbdcopy --no-extents "$uri" "$got" 2>"$T/copy.err" ||
    { echo "nbdcopy --no-extents failed: $(head -3 "$T/copy.err")"; return 1; }
  cmp -s "$want" "$got" || { echo "bytes (no extents): $(first_diff "$want" "$got")"; return 1; }
  [ "${4:-}" != quick ] || return 0
  rm -f "$got"
  timeout 120 nbdcopy "$uri" "$got" 2>"$T/copy.err" ||
    { echo "nbdcopy failed: $(head -3 "$T/copy.err")"; return 1; }
  cmp -s "$want" "$got" || { echo "bytes (with extents): $(first_diff "$want" "$got")"; return 1; }
  why=$(maps_agree "$1" "$2") || { echo "after reading: $why"; return 1; }
}

# qemu_ref IMG OUT_RAW : QEMU's bytes of IMG (as qview sees it) into OUT_RAW.
qemu_ref() {
  qview "$1"
  rm -f "$2"
  qemu-img convert -O raw --image-opts "$QV" "$2" || fail "qemu-img convert $1"
  [ "$MUTATE" != flip-ref ] || flip_bit "$2"
}

# flip_bit FILE : flips the low bit of the byte at a third of FILE (mutations).
flip_bit() {
  python3 -c '
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(0, 2); n = f.tell(); f.seek(n // 3); b = f.read(1); f.seek(n // 3)
    f.write(bytes([b[0] ^ 0x01]))' "$1"
}

# mutate IMG : for CORPUS_MUTATE=data-byte|map-only, changes IMG in place:
# 512 bytes of 0xfe at a third of the disk (shifted per call, as images serve
# several cases; IMG's reference raw was taken before), or zero bytes written
# as data over the first zero extent (same bytes, other map; IMG is then a
# copy that is served while qemu-nbd maps another copy).
MUT_N=0
mutate() {
  local img=$1 off
  MUT_N=$((MUT_N + 1))
  if [ "$MUTATE" = data-byte ]; then
    off=$(( $(qemu-img info --output=json "$img" | jq '."virtual-size"') / 3 + 512 * MUT_N ))
  else
    off=$(qemu-img map --output=json -f qcow2 "$img" |
          jq '[.[] | select(.zero and (.data | not) and .length >= 512)][0].start // empty')
  fi
  if [ -z "$off" ] || ! qemu-io -c "write -P $([ "$MUTATE" = data-byte ] && echo 0xfe || echo 0) $off 512" "$img" >/dev/null 2>&1; then
    echo "NOTE: no $MUTATE mutation of $img"
  fi
}

# check NAME IMG MODES [PLUGIN-ARGS...] : one corpus case. MODES: "ro" or
# "ro rw". Read-write adds: the image is unchanged after a clean stop and
# passes qemu-img check, and a rewrite through NBD (see rewrite).
check() {
  local name=$1 img=$2 modes=$3 mode why qimg served
  shift 3
  wanted "$name" || return 0
  qemu_ref "$img" "$T/out/want.raw"
  qimg=$img served=$img
  case $MUTATE in
    data-byte) mutate "$img" ;;
    map-only)
      qimg=$(dirname "$img")/mref-$(basename "$img") served=$(dirname "$img")/mut-$(basename "$img")
      cp --sparse=always "$img" "$qimg"
      cp --sparse=always "$img" "$served"
      mutate "$served" ;;
  esac
  for mode in $modes; do
    if ! serve "$T/s" "$mode" "$served" "$@"; then
      bad "$name/$mode" "server did not start (rc $SRV_RC): $(head -3 "$T/serve.log" | tr '\n' ' ')"
      return 0
    fi
    # The read-only session does the full check; read-write the quick one.
    if ! why=$(check_served "$T/s" "$qimg" "$T/out/want.raw" "$([ "$mode" = rw ] && echo quick)"); then
      stop_nbdkit "$SRV_PID"
      bad "$name/$mode" "$why"
      return 0
    fi
    stop_nbdkit "$SRV_PID"
    if [ "$mode" = rw ]; then
      qemu_ref "$img" "$T/out/after.raw"
      cmp -s "$T/out/want.raw" "$T/out/after.raw" ||
        { bad "$name/rw" "image changed by a session that only read: $(first_diff "$T/out/want.raw" "$T/out/after.raw")"; return 0; }
      if ! qemu-img check -q "$img" >"$T/check.out" 2>&1; then
        bad "$name/rw" "qemu-img check after serving: $(head -3 "$T/check.out" | tr '\n' ' ')"; return 0
      fi
      rewrite "$img" "$@" || { bad "$name/rw-write" "$WHY"; return 0; }
    fi
  done
  pass "$name [$modes]"
}

# rewrite IMG [PLUGIN-ARGS...] : a copy of IMG beside it (relative
# backing names still resolve) is served read-write and overwritten by
# nbdcopy from a raw that differs from QEMU's view (patterns, random data, a
# long zero run that nbdcopy sends as zero requests, the last bytes). After a
# clean stop: qemu-img check passes, QEMU reads exactly that raw, and the
# copy's map still matches qemu-nbd's. On failure the reason is in $WHY.
rewrite() {
  local img=$1 w sz why
  shift
  WHY=
  w=$(dirname "$img")/w-$(basename "$img")
  cp --sparse=always "$img" "$w"
  cp --sparse=always "$T/out/want.raw" "$T/out/new.raw"
  sz=$(stat -c %s "$T/out/new.raw")
  qemu-io -f raw \
    -c "write -P 0xa1 5000 70000" \
    -c "write -s $T/rand.bin $((sz / 3 + 3)) 200000" \
    -c "write -z $((sz / 2 - 300000)) 600000" \
    -c "write -P 0xa2 $((sz - 1000)) 1000" \
    "$T/out/new.raw" >/dev/null || fail "qemu-io on new.raw"
  serve "$T/w" rw "$w" "$@" ||
    { WHY="server did not start (rc $SRV_RC): $(head -3 "$T/serve.log" | tr '\n' ' ')"; return 1; }
  if ! timeout 120 nbdcopy "$T/out/new.raw" "nbd+unix:///?socket=$T/w" 2>"$T/copy.err"; then
    stop_nbdkit "$SRV_PID"
    WHY="nbdcopy into the served copy failed: $(head -3 "$T/copy.err" | tr '\n' ' ')"; return 1
  fi
  stop_nbdkit "$SRV_PID"
  [ "$MUTATE" != flip-new ] || flip_bit "$T/out/new.raw"
  qemu-img check -q "$w" >"$T/check.out" 2>&1 ||
    { WHY="qemu-img check: $(head -3 "$T/check.out" | tr '\n' ' ')"; return 1; }
  qemu_ref "$w" "$T/out/after.raw"
  cmp -s "$T/out/new.raw" "$T/out/after.raw" ||
    { WHY="QEMU reads other bytes than were written: $(first_diff "$T/out/new.raw" "$T/out/after.raw")"; return 1; }
  serve "$T/w" ro "$w" "$@" ||
    { WHY="rewritten copy: server did not start: $(head -3 "$T/serve.log" | tr '\n' ' ')"; return 1; }
  why=$(check_served "$T/w" "$w" "$T/out/new.raw" quick) ||
    { stop_nbdkit "$SRV_PID"; WHY="rewritten copy: $why"; return 1; }
  stop_nbdkit "$SRV_PID"
  rm -f "$w"
}

# refused NAME WORD-REGEX IMG ro|rw [PLUGIN-ARGS...] : nbdkit must exit
# non-zero at start, stderr matching WORD-REGEX (grep -iE).
refused() {
  local name=$1 re=$2 img=$3 mode=$4
  shift 4
  wanted "$name" || return 0
  [ "$SERVER" = plugin ] || return 0
  [ "$MUTATE" != refuse-clean ] || img=$I/v3-64k.qcow2
  if serve "$T/s" "$mode" "$img" "$@"; then
    stop_nbdkit "$SRV_PID"
    bad "$name/$mode" "served; want a refusal matching /$re/"; return 0
  fi
  case $SRV_RC in
    0) bad "$name/$mode" "nbdkit exited 0; want non-zero"; return 0 ;;
    hung) bad "$name/$mode" "nbdkit neither served nor exited in 60 s: $(head -3 "$T/serve.log" | tr '\n' ' ')"; return 0 ;;
    listening) bad "$name/$mode" "nbdkit kept running and refused each connection instead of exiting at start: $(head -3 "$T/serve.log" | tr '\n' ' ')"; return 0 ;;
  esac
  grep -qiE "$re" "$T/serve.log" ||
    { bad "$name/$mode" "message lacks /$re/: $(head -3 "$T/serve.log" | tr '\n' ' ')"; return 0; }
  pass "$name/$mode refused: $(grep -iE "$re" "$T/serve.log" | head -1)"
}

# served_read_only NAME WORD-REGEX IMG : an image that may be read but not
# written, served without -r: nbdkit tells a plugin about -r only per
# connection, so it starts, warns (stderr matching WORD-REGEX) and serves
# every client read-only (docs/qcow2-plugin.md).
served_read_only() {
  local name=$1 re=$2 img=$3 ro
  wanted "$name" || return 0
  [ "$SERVER" = plugin ] || return 0
  [ "$MUTATE" != refuse-clean ] || img=$I/v3-64k.qcow2
  serve "$T/s" rw "$img" ||
    { bad "$name" "server did not start: $(head -3 "$T/serve.log" | tr '\n' ' ')"; return 0; }
  ro=$(timeout 30 nbdinfo --json "nbd+unix:///?socket=$T/s" | jq -r '.exports[0].is_read_only')
  stop_nbdkit "$SRV_PID"
  [ "$ro" = true ] || { bad "$name" "a client may write (is_read_only=$ro)"; return 0; }
  grep -qiE "read-only.*($re)|($re).*read-only" "$T/serve.log" ||
    { bad "$name" "no warning matching /$re/: $(head -3 "$T/serve.log" | tr '\n' ' ')"; return 0; }
  pass "$name served read-only: $(grep -iE "$re" "$T/serve.log" | head -1)"
}

# set_bit IMG OFFSET BIT : ORs bit BIT into the big-endian u64 at OFFSET.
set_bit() {
  local v
  v=$("${POKE[@]}" "$1" get "$2" 8)
  "${POKE[@]}" "$1" put "$2" 8 $((v | (1 << $3)))
}

M=1048576
# ---- the corpus ----------------------------------------------------------
mk v3-64k $((4 * M)) 65536
mk v3-odd-size $((4 * M + 1536)) 65536
mk v2-64k $((4 * M)) 65536 compat=0.10
mk v2-512 $((2 * M)) 512 compat=0.10
mk v3-512 $((8 * M)) 512
mk v3-4k $((4 * M)) 4096
mk v3-2M $((32 * M)) $((2 * M))
for b in 1 2 4 8 32 64; do mk "refcount$b" $((4 * M)) 65536 "refcount_bits=$b"; done
mk refcount64-4k $((4 * M)) 4096 refcount_bits=64
for p in metadata falloc full; do mk "prealloc-$p" $((4 * M)) 65536 "preallocation=$p"; done
mk prealloc-metadata-v2 $((4 * M)) 65536 preallocation=metadata,compat=0.10
# Half-preallocated: only the first part of the image is written by fill's
# pattern; the rest stays preallocated-and-never-written.
qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=4096 "$I/prealloc-metadata-4k.qcow2" $((4 * M))
qemu-io -c "write -P 0x31 12345 100000" -c "write -z 1M 64k" -c "write -z -u 2M 64k" \
  -c "discard 3M 64k" "$I/prealloc-metadata-4k.qcow2" >/dev/null
mk lazy $((4 * M)) 65536 lazy_refcounts=on
# The same image with holes punched in the host file wherever it holds
# zeros, inside allocated clusters too: qemu-nbd reports such ranges as
# "zero" (type 2) at the host file's granularity.
cp --sparse=always "$I/v3-64k.qcow2" "$I/v3-64k-sparse-host.qcow2"

# Compressed: a raw with the pattern (compressible runs and random data),
# converted with -c; then a copy overwritten in part (COW of compressed
# clusters, zeroes over them, qemu-io's own compressed writes).
truncate -s $((4 * M)) "$I/src.raw"
fill "$I/src.raw" 65536 $((4 * M)) raw
qemu-img convert -q -c -O qcow2 "$I/src.raw" "$I/compressed-zlib.qcow2"
qemu-img convert -q -c -O qcow2 -o compression_type=zstd "$I/src.raw" "$I/compressed-zstd.qcow2"
qemu-img convert -q -c -O qcow2 -o compression_type=zstd,cluster_size=4096 "$I/src.raw" "$I/compressed-zstd-4k.qcow2"
qemu-img convert -q -c -O qcow2 -o compat=0.10,cluster_size=512 "$I/src.raw" "$I/compressed-v2-512.qcow2"
qemu-img convert -q -c -O qcow2 -o cluster_size=2M "$I/src.raw" "$I/compressed-2M.qcow2"
for c in zlib zstd; do
  cp "$I/compressed-$c.qcow2" "$I/compressed-$c-cow.qcow2"
  qemu-io -c "write -P 0x99 $((65536 + 7)) 100" -c "write -z $((3 * 65536)) 65536" \
    -c "write -z -u $((4 * 65536)) 65536" -c "write -c -P 0x5c $((40 * 65536)) 131072" \
    -c "write -c -z $((42 * 65536)) 65536" "$I/compressed-$c-cow.qcow2" >/dev/null
done

# Chain of depth 3: raw base (3 MiB) <- mid (qcow2 v3 64k, 4 MiB, backing_fmt
# raw) <- top (qcow2 v3 4k, 5 MiB, backing_fmt qcow2); relative names. Decoys
# at the same names relative to the cwd hold other data.
C=$I/chain
mkdir -p "$C/base" "$C/mid" "$C/top" "$T/base" "$T/mid"
truncate -s $((3 * M)) "$C/base/base.raw"
qemu-io -f raw -c "write -P 0xb1 0 $((3 * M))" -c "write -s $T/rand.bin 100000 300000" \
  -c "write -z $((2 * M)) 65536" "$C/base/base.raw" >/dev/null
(cd "$C/mid" && qemu-img create -q -f qcow2 -b ../base/base.raw -F raw mid.qcow2 $((4 * M)))
qemu-io -c "write -P 0xc1 $((65536 - 10)) 20" -c "write -z $((4 * 65536)) 65536" \
  -c "write -z -u $((6 * 65536)) 65536" -c "discard $((8 * 65536)) 131072" \
  -c "write -P 0xc2 $((3 * M - 5000)) 10000" -c "write -P 0xc3 $((4 * M - 512)) 512" \
  "$C/mid/mid.qcow2" >/dev/null
(cd "$C/top" && qemu-img create -q -f qcow2 -o cluster_size=4096 -b ../mid/mid.qcow2 -F qcow2 top.qcow2 $((5 * M)))
qemu-io -c "write -P 0xd1 4000 200" -c "write -z $((5 * 65536)) 4096" -c "write -z -u $((9 * 65536)) 8192" \
  -c "write -s $T/rand.bin $((2 * M + 1)) 70000" -c "write -P 0xd2 $((4 * M + 100)) 1000" \
  -c "write -P 0xd3 $((5 * M - 3)) 3" "$C/top/top.qcow2" >/dev/null
truncate -s $((5 * M)) "$T/base/base.raw"
qemu-io -f raw -c "write -P 0xee 0 $((5 * M))" "$T/base/base.raw" >/dev/null
qemu-img create -q -f qcow2 "$T/mid/mid.qcow2" $((5 * M))
qemu-io -c "write -P 0xef 0 $((5 * M))" "$T/mid/mid.qcow2" >/dev/null

# A v2 512 B-cluster qcow2 base (2 MiB) under a v3 64k overlay (4 MiB).
mk chain2-base $((2 * M)) 512 compat=0.10
(cd "$I" && qemu-img create -q -f qcow2 -b chain2-base.qcow2 -F qcow2 chain2-over.qcow2 $((4 * M)))
qemu-io -c "write -P 0xe1 $((65536 + 1)) 65536" -c "write -z $((3 * 65536)) 65536" \
  -c "write -P 0xe2 $((2 * M - 256)) 512" "$I/chain2-over.qcow2" >/dev/null

# backing_fmt=raw over a file that is a qcow2 image: read as raw bytes.
(cd "$I" && qemu-img create -q -f qcow2 -b v3-4k.qcow2 -F raw rawprobe.qcow2 $((4 * M)))
qemu-io -c "write -P 0xf1 65536 4096" "$I/rawprobe.qcow2" >/dev/null
# Another raw to serve mid over with backing= / backing-format=.
truncate -s $((3 * M)) "$I/alt.raw"
qemu-io -f raw -c "write -P 0xa7 0 $((3 * M))" "$I/alt.raw" >/dev/null

# Internal snapshots: data, snapshot, more data.
mk snapshot $((4 * M)) 65536
qemu-img snapshot -c s1 "$I/snapshot.qcow2"
qemu-io -c "write -P 0x12 0 100000" -c "write -z $((2 * M)) 65536" "$I/snapshot.qcow2" >/dev/null
qemu-img snapshot -c s2 "$I/snapshot.qcow2"

# Header bits patched with qcow2_poke.py (incompatible = u64 at 72,
# compatible = u64 at 80, crypt_method = u32 at 32).
for n in corrupt dirty unknown-incompat compat-unknown aes; do cp "$I/v3-64k.qcow2" "$I/$n.qcow2"; done
set_bit "$I/corrupt.qcow2" 72 1
set_bit "$I/dirty.qcow2" 72 0
set_bit "$I/unknown-incompat.qcow2" 72 9
set_bit "$I/compat-unknown.qcow2" 80 7
"${POKE[@]}" "$I/aes.qcow2" put 32 4 1

qemu-img create -q -f qcow2 --object secret,id=sec0,data=corpus-pw \
  -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 "$I/luks.qcow2" $((4 * M))
qemu-img create -q -f qcow2 -o extended_l2=on "$I/extl2.qcow2" $((4 * M))
qemu-io -c "write -P 0x13 1000 100000" "$I/extl2.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o data_file="$I/ext.data" "$I/datafile.qcow2" $((4 * M))
qemu-img create -q -f qcow2 -o data_file="$I/ext2.data",data_file_raw=on "$I/datafile-raw.qcow2" $((4 * M))
# The refused images are otherwise valid: QEMU reads them (the unknown bit
# excepted, which QEMU refuses too).
for n in corrupt dirty compat-unknown extl2 datafile datafile-raw; do
  qemu-img info "$I/$n.qcow2" >/dev/null || fail "QEMU cannot open corpus image $n"
done
qemu-img info "$I/luks.qcow2" | grep -q '^encrypted: yes' || fail "luks.qcow2 is not encrypted"
# The corpus holds what it claims (qemu-img map/check/info).
qmap() { qemu-img map --output=json -f qcow2 "$1" | jq -c "$2"; }
has() { [ "$(qmap "$1" "[.[] | select($2)] | length")" -gt 0 ] || fail "corpus: $1 has no extent with $2"; }
for n in v3-64k v3-512 v3-2M refcount1 lazy compressed-zlib-cow; do
  has "$I/$n.qcow2" '.zero and .present and .offset != null'   # ZERO_ALLOC
  has "$I/$n.qcow2" '.zero and .present and .offset == null'   # ZERO_PLAIN
done
has "$I/chain/mid/mid.qcow2" '.zero and .present and .depth == 0'  # zero over backing data
has "$I/chain/top/top.qcow2" '.depth == 2 and .data'               # data from the raw base
has "$I/chain/top/top.qcow2" '.depth == 1 and .data'
has "$I/chain/top/top.qcow2" '.depth == 0 and .data'
for n in compressed-zlib compressed-zstd compressed-zstd-4k compressed-v2-512 compressed-2M compressed-zlib-cow compressed-zstd-cow; do
  [ "$(qemu-img check --output=json "$I/$n.qcow2" | jq '."compressed-clusters"')" -gt 0 ] ||
    fail "corpus: $n has no compressed cluster"
done
qemu-img info --output=json "$I/compressed-zstd.qcow2" | jq -e '."format-specific".data."compression-type" == "zstd"' >/dev/null ||
  fail "corpus: compressed-zstd is not zstd"
[ "$(qemu-img info --output=json "$C/top/top.qcow2" | jq -c '[."backing-filename", ."backing-filename-format"]')" = '["../mid/mid.qcow2","qcow2"]' ] ||
  fail "corpus: top's backing name is not relative"
[ "$(qemu-img info --output=json "$C/mid/mid.qcow2" | jq -c '[."backing-filename", ."backing-filename-format"]')" = '["../base/base.raw","raw"]' ] ||
  fail "corpus: mid's backing name is not relative"
[ -e "$T/cwd/../base/base.raw" ] && [ -e "$T/cwd/../mid/mid.qcow2" ] || fail "corpus: decoys missing"
[ "$(qemu-img info --output=json "$I/v2-64k.qcow2" | jq -r '."format-specific".data.compat')" = 0.10 ] || fail "corpus: v2-64k is not v2"
[ "$(qemu-img snapshot -l "$I/snapshot.qcow2" | grep -c ' s[12] ')" = 2 ] || fail "corpus: snapshots missing"
echo "corpus built ($(du -sh "$I" | cut -f1)), ${SECONDS}s"

# ---- served and compared --------------------------------------------------
RW="ro rw"
for n in v3-64k v3-odd-size v2-64k v2-512 v3-512 v3-4k v3-2M \
         refcount1 refcount2 refcount4 refcount8 refcount32 refcount64 refcount64-4k \
         prealloc-metadata prealloc-falloc prealloc-full prealloc-metadata-v2 prealloc-metadata-4k \
         lazy v3-64k-sparse-host compressed-zlib compressed-zstd compressed-zstd-4k compressed-v2-512 compressed-2M \
         compressed-zlib-cow compressed-zstd-cow chain2-base chain2-over rawprobe compat-unknown; do
  check "$n" "$I/$n.qcow2" "$RW"
done
check v3-512-small-cache "$I/v3-512.qcow2" "$RW" cache-size=65536
check v3-64k-discard-ignore "$I/v3-64k.qcow2" "$RW" discard=ignore
check v3-64k-discard-unmap "$I/v3-64k.qcow2" "$RW" discard=unmap
check chain-top "$C/top/top.qcow2" "$RW"
check chain-mid "$C/mid/mid.qcow2" "$RW"
QOPTS="driver=qcow2,file.driver=file,file.filename=$C/mid/mid.qcow2,backing.driver=raw,backing.file.driver=file,backing.file.filename=$I/alt.raw" \
  check chain-mid-backing-override "$C/mid/mid.qcow2" ro backing="$I/alt.raw" backing-format=raw
check snapshot "$I/snapshot.qcow2" ro
check corrupt-ro "$I/corrupt.qcow2" ro
# QEMU reads an image with the dirty bit (only its refcounts are stale).
check dirty-ro "$I/dirty.qcow2" ro

# ---- refusals -------------------------------------------------------------
for mode in ro rw; do
  refused luks encrypt "$I/luks.qcow2" $mode
  refused aes encrypt "$I/aes.qcow2" $mode
  refused extended-l2 extended "$I/extl2.qcow2" $mode
  refused data-file 'data.?file' "$I/datafile.qcow2" $mode
  refused data-file-raw 'data.?file' "$I/datafile-raw.qcow2" $mode
  refused unknown-incompat 'incompatible|unknown' "$I/unknown-incompat.qcow2" $mode
  refused backing-refuse backing "$C/top/top.qcow2" $mode backing=refuse
done
served_read_only corrupt-rw corrupt "$I/corrupt.qcow2"
served_read_only snapshot-rw snapshot "$I/snapshot.qcow2"
served_read_only dirty-rw dirty "$I/dirty.qcow2"

echo "---- ${#PASSED[@]} passed, ${#FAILED[@]} failed (server: $SERVER${MUTATE:+, mutation: $MUTATE}), ${SECONDS}s"
[ "${#PASSED[@]}" -gt 0 ] || fail "no case ran (CORPUS_ONLY='$ONLY')"
[ "${#FAILED[@]}" = 0 ] || fail "${#FAILED[@]} case(s) failed: ${FAILED[*]}"
echo "OK"
