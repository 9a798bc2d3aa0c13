#!/usr/bin/env bash
# The filter over every kind of nbdkit 1.32 plugin: per-export plugins (file
# dir=, ondemand, info), remote ones (nbd to qemu-nbd and to a second
# nbdkit), scripted ones (eval, sh), and the in-memory and read-only ones. It
# starts, logs no error, tracks exactly what a client wrote, and stops with
# exit status 0. Per-export plugins track the first export a client opens; a
# second, different export is refused at connect, naming both.
source "$(dirname "$0")/lib.sh"

MiB=1048576
# The one write each writable case makes: 64 KiB at 1 MiB.
expect_map() {  # SIZE DIRTY(0/1); qcow2 sizes are multiples of 512
  set -- $(( ($1 + 511) / 512 * 512 )) "$2"
  if [ "$2" = 1 ]; then
    jq -nc --argjson s "$1" '[{start:0,length:1048576,dirty:false},
      {start:1048576,length:65536,dirty:true},
      {start:1114112,length:($s - 1114112),dirty:false}]'
  else
    jq -nc --argjson s "$1" '[{start:0,length:$s,dirty:false}]'
  fi
}

# serve LOG ARGS... : nbdkit -f in the background, on $T/sock; waits for its
# socket and pid file only (no probe connection: the first client decides the
# tracked export). The pid is in $NBDKIT_PID.
serve() {
  local log=$1; shift
  rm -f "$T/sock" "$T/sock.pid"
  : >"$log"
  "${NBDKIT_ENV[@]}" nbdkit -f --exit-with-parent -U "$T/sock" -P "$T/sock.pid" \
    --filter="$FILTER" "$@" 2>>"$log" &
  NBDKIT_PID=$!
  PIDS+=("$NBDKIT_PID")
  local end=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$end" ]; do
    [ -s "$T/sock.pid" ] && [ -S "$T/sock" ] && return 0
    kill -0 "$NBDKIT_PID" 2>/dev/null || { cat "$log" >&2; fail "nbdkit exited at start: $*"; }
    sleep 0.05
  done
  fail "nbdkit did not start: $*"
}

# stop LABEL LOG : SIGTERM; nbdkit must exit 0 within 30 s.
stop() {
  local rc=0 i
  kill -TERM "$NBDKIT_PID"
  for i in $(seq 300); do kill -0 "$NBDKIT_PID" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$NBDKIT_PID" 2>/dev/null && fail "$1: nbdkit did not stop within 30 s of SIGTERM"
  wait "$NBDKIT_PID" || rc=$?
  [ $rc -eq 0 ] || { cat "$2" >&2; fail "$1: nbdkit exited $rc"; }
}

# check LABEL EXPORT WRITE(0/1) PLUGIN ARGS... : one plugin, one client (two
# when writing: qemu-io, then nbdinfo), then the map QEMU reads.
check() {
  local label=$1 export=$2 write=$3; shift 3
  local log="$T/$label.log" cbt="$T/$label.cbt" uri size
  serve "$log" "$@" cbt-file="$cbt" cbt-bitmap=b0 cbt-create=true
  uri="nbd+unix:///$export?socket=$T/sock"
  size=$(timeout 30 nbdinfo --size "$uri") || { cat "$log" >&2; fail "$label: nbdinfo failed"; }
  if [ "$write" = 1 ]; then
    timeout 30 qemu-io -f raw -t writeback -c 'write -P 0x5a 1M 64k' -c flush "$uri" \
      >"$T/qio.out" || { cat "$log" >&2; fail "$label: qemu-io write failed"; }
    grep -q "wrote 65536/65536" "$T/qio.out" || fail "$label: no write: $(cat "$T/qio.out")"
  fi
  stop "$label" "$log"
  if grep -i "error" "$log" >&2; then fail "$label: nbdkit logged an error"; fi
  [ -f "$cbt" ] || fail "$label: no container created"
  local got want
  got=$(qemu_map "$cbt" b0)
  want=$(expect_map "$size" "$write")
  [ "$got" = "$want" ] || fail "$label: map $got, expected $want"
  echo "ok: $label ($size bytes, $([ "$write" = 1 ] && echo "write tracked" || echo "read-only"))"
}

truncate -s 64M "$T/disk.raw"
mkdir "$T/dir" "$T/od"
truncate -s 64M "$T/dir/a.raw"
truncate -s 32M "$T/dir/b.raw"

check memory "" 1 memory 64M
check file "" 1 file file="$T/disk.raw"
check file-dir a.raw 1 file dir="$T/dir"
check ondemand "" 1 ondemand dir="$T/od" size=64M
check info-time "" 0 info mode=time
check info-exportname hello 0 info mode=exportname
check null "" 1 null 64M
check pattern "" 0 pattern 64M
check data "" 1 data data="1 2 3" size=64M
check eval "" 1 eval get_size='echo 67108864' \
  pread='dd if=/dev/zero bs=1 count=0 status=none; head -c $3 /dev/zero' \
  pwrite='cat >/dev/null'
cat >"$T/plugin.sh" <<'SH'
#!/usr/bin/env bash
case "$1" in
  get_size) echo 67108864 ;;
  pread) head -c "$3" /dev/zero ;;
  pwrite) cat >/dev/null ;;
  can_write) exit 0 ;;
  *) exit 2 ;;
esac
SH
chmod +x "$T/plugin.sh"
check sh "" 1 sh "$T/plugin.sh"

# zero: a zero-sized disk cannot change: served, nothing created.
serve "$T/zero.log" zero cbt-file="$T/zero.cbt" cbt-bitmap=b0 cbt-create=true
[ "$(timeout 30 nbdinfo --size "nbd+unix:///?socket=$T/sock")" = 0 ] || fail "zero: not served"
stop zero "$T/zero.log"
if grep -i "error" "$T/zero.log" >&2; then fail "zero: nbdkit logged an error"; fi
[ ! -e "$T/zero.cbt" ] || fail "zero: a container was created for a zero-sized disk"
echo "ok: zero (0 bytes, nothing to track, nothing created)"

# nbd plugin: to qemu-nbd, and to a second nbdkit, on unix sockets.
qemu-img create -q -f raw "$T/q.raw" 64M
qemu-nbd -t -f raw -k "$T/qsock" "$T/q.raw" 2>>"$T/qemu-nbd.log" &
PIDS+=("$!")
"${NBDKIT_ENV[@]}" nbdkit -f --exit-with-parent -U "$T/nsock" memory 64M 2>>"$T/inner.log" &
PIDS+=("$!")
both_up() { [ -S "$T/qsock" ] && [ -S "$T/nsock" ]; }
wait_for 60 both_up || fail "qemu-nbd or the inner nbdkit did not start"
check nbd-qemu "" 1 nbd socket="$T/qsock"
check nbd-nbdkit "" 1 nbd socket="$T/nsock"

# Per-export plugins: the first export opened is tracked; another is refused
# at connect, naming both, and changes nothing; the tracked one still works.
# expect_refused LOG EXPORT TRACKED
expect_refused() {
  if timeout 30 nbdinfo --size "nbd+unix:///$2?socket=$T/sock" >/dev/null 2>&1; then
    fail "export '$2' was served next to '$3'"
  fi
  grep -q "export \"$2\" refused: this server tracks the changes of export \"$3\" only" "$1" ||
    fail "no refusal naming both exports: $(cat "$1")"
}
serve "$T/dir2.log" file dir="$T/dir" cbt-file="$T/dir2.cbt" cbt-bitmap=b0 cbt-create=true
timeout 30 qemu-io -f raw -t writeback -c 'write 1M 64k' "nbd+unix:///a.raw?socket=$T/sock" \
  >/dev/null || fail "write to a.raw failed"
expect_refused "$T/dir2.log" b.raw a.raw
timeout 30 qemu-io -f raw -t writeback -c 'write 8M 64k' "nbd+unix:///a.raw?socket=$T/sock" \
  >/dev/null || fail "a.raw refused after b.raw"
stop dir2 "$T/dir2.log"
[ "$(qemu_map "$T/dir2.cbt" b0)" = "$(jq -nc '[{start:0,length:1048576,dirty:false},
  {start:1048576,length:65536,dirty:true},{start:1114112,length:7274496,dirty:false},
  {start:8388608,length:65536,dirty:true},{start:8454144,length:58654720,dirty:false}]')" ] ||
  fail "file dir=: map $(qemu_map "$T/dir2.cbt" b0)"
echo "ok: file dir=: b.raw refused while a.raw is tracked"

# ondemand: "" is its default export "default", the same one; "other" is not.
serve "$T/od2.log" ondemand dir="$T/od" size=64M cbt-file="$T/od2.cbt" cbt-bitmap=b0 \
  cbt-create=true
timeout 30 nbdinfo --size "nbd+unix:///?socket=$T/sock" >/dev/null || fail "ondemand ''"
timeout 30 nbdinfo --size "nbd+unix:///default?socket=$T/sock" >/dev/null ||
  fail "ondemand: 'default' refused after '' (the same export)"
expect_refused "$T/od2.log" other default
stop od2 "$T/od2.log"
echo "ok: ondemand: '' and 'default' are one export, 'other' refused"
echo "OK: the filter runs over every plugin kind"
