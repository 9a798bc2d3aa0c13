#!/usr/bin/env bash
# Installation and packaging (issue 13): build the Debian package with CPack
# from the build tree (or, without dpkg-deb, install with DESTDIR), unpack it
# into a temporary root and run what it installed from there:
#  - the package's name, Conflicts (Google's Bigtable cbt) and Depends;
#  - every file where it belongs (the filter and the plugin in nbdkit's
#    filterdir/plugindir, from `nbdkit --dump-config`);
#  - $ROOT/usr/bin/cbt --version: the project's version, says what it is;
#    cbt create; the installed filter with nbdkit by path records a write
#    (judged by the installed cbt map and by qemu-img); the installed qcow2
#    plugin serves an image (nbdinfo) and reports the project's version;
#  - the man pages render without warnings and name every parameter and
#    option of the docs tables and of the --help outputs (no silent drift);
#  - the systemd unit example: its ExecStart (the installed cbt serve), with
#    the example env file, runs the same way systemd would (Type=notify:
#    READY=1 once it serves), SIGTERM stops it cleanly: the bitmap holds
#    the write and is not left in use.
set -euo pipefail
source "$(dirname "$0")/lib.sh" || exit 1
[ -d "${T:-}" ] || exit 1   # the temp dir from common.sh: everything goes under it
need cmake groff qemu-io
SRC=${CBT_SRC:-$(cd "$(dirname "$0")/../.." && pwd)}
VERSION=$(sed -n 's/^CMAKE_PROJECT_VERSION:STATIC=//p' "$CBT_BUILD/CMakeCache.txt")
[ -n "$VERSION" ] || fail "no CMAKE_PROJECT_VERSION in $CBT_BUILD/CMakeCache.txt"
FILTERDIR=$(nbdkit --dump-config | sed -n 's/^filterdir=//p')
PLUGINDIR=$(nbdkit --dump-config | sed -n 's/^plugindir=//p')
[ -n "$FILTERDIR" ] && [ -n "$PLUGINDIR" ] || fail "nbdkit --dump-config names no filterdir/plugindir"

ROOT=$T/root
# CBT_INSTALL_DESTDIR=1: test a DESTDIR install instead (no package build).
if [ -z "${CBT_INSTALL_DESTDIR:-}" ] && command -v dpkg-deb >/dev/null && command -v cpack >/dev/null; then
  # The package, as `cmake --build BUILD --target package` makes it, but
  # written into $T (the build tree stays as it was).
  (cd "$T" && timeout 120 cpack --config "$CBT_BUILD/CPackConfig.cmake" -B "$T/pkg" \
    >"$T/cpack.log" 2>&1) || { tail -20 "$T/cpack.log" >&2; fail "cpack failed"; }
  DEB=$(ls "$T"/pkg/*.deb)
  [ "$(basename "$DEB")" = "nbdkit-cbt_${VERSION}_$(dpkg --print-architecture).deb" ] ||
    fail "package file is $(basename "$DEB")"
  field() { dpkg-deb -f "$DEB" "$1"; }
  [ "$(field Package)" = nbdkit-cbt ] || fail "package name: $(field Package)"
  for c in google-cloud-cli-cbt google-cloud-sdk-cbt; do
    [[ ", $(field Conflicts), " == *", $c, "* ]] || fail "Conflicts lacks $c: $(field Conflicts)"
  done
  [ -z "$(field Replaces)" ] || fail "the package Replaces $(field Replaces)"
  deps=$(field Depends)
  nbdkit_version=$(pkg-config --modversion nbdkit)
  for d in "nbdkit (>= $nbdkit_version)" "nbdkit (<< $nbdkit_version.~)" libnbd0 libstdc++6; do
    [[ "$deps" == *"$d"* ]] || fail "Depends lacks '$d': $deps"
  done
  dpkg-deb -x "$DEB" "$ROOT"
  echo "ok: $(basename "$DEB") ($(stat -c %s "$DEB") bytes), Depends: $deps"
else
  echo "note: installing with DESTDIR instead of building the package (no dpkg-deb/cpack, or CBT_INSTALL_DESTDIR)"
  DESTDIR=$ROOT timeout 120 cmake --install "$CBT_BUILD" --prefix /usr >"$T/install.log" 2>&1 ||
    { tail -20 "$T/install.log" >&2; fail "cmake --install failed"; }
fi

# Every file where it belongs; nothing else under usr/bin or the nbdkit dirs.
want=(usr/bin/cbt "${FILTERDIR#/}/nbdkit-cbt-filter.so" "${PLUGINDIR#/}/nbdkit-qcow2-plugin.so"
      usr/share/bash-completion/completions/cbt
      usr/share/doc/nbdkit-cbt/examples/systemd/cbt@.service
      usr/share/doc/nbdkit-cbt/examples/systemd/disk.env usr/share/doc/nbdkit-cbt/README.md)
# The documents the man pages name.
for d in "$SRC"/docs/*.md; do want+=("usr/share/doc/nbdkit-cbt/$(basename "$d")"); done
PAGES=(nbdkit-cbt-filter nbdkit-qcow2-plugin cbt)
[ -f "$SRC/docs/serve.md" ] && PAGES+=(cbt-serve)
for p in "${PAGES[@]}"; do
  f=$(ls "$ROOT/usr/share/man/man1/$p.1"* 2>/dev/null | head -1)
  [ -n "$f" ] || fail "man page $p(1) not installed"
  want+=("${f#"$ROOT"/}")
done
for f in "${want[@]}"; do [ -f "$ROOT/$f" ] || fail "not installed: /$f"; done
(cd "$ROOT" && find . -type f | sed 's|^\./||' | sort) >"$T/files"
printf '%s\n' "${want[@]}" | sort >"$T/want"
extra=$(comm -23 "$T/files" "$T/want")
[ -z "$extra" ] || fail "unexpected files installed: $extra"
echo "ok: installed files: $(tr '\n' ' ' <"$T/files")"
ICBT=$ROOT/usr/bin/cbt
IFILTER=$ROOT$FILTERDIR/nbdkit-cbt-filter.so
IPLUGIN=$ROOT$PLUGINDIR/nbdkit-qcow2-plugin.so
NBDKIT_ENV=()
if [[ "$(ldd "$IFILTER" 2>/dev/null || true)" == *libasan* ]]; then
  NBDKIT_ENV=(env "LD_PRELOAD=$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
              "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1")
fi

# The tool: its version, and it says what it is (not Google's Bigtable cbt).
v=$("$ICBT" --version)
[ "$v" = "cbt $VERSION (changed block tracking for nbdkit)" ] || fail "cbt --version: $v"
"$ICBT" create "$T/c.cbt" --size 1M >/dev/null || fail "installed cbt create"
"$ICBT" bitmap "$T/c.cbt" b0 --add >/dev/null || fail "installed cbt bitmap --add"

# The installed bash completion: subcommands and a subcommand's options.
got=$(bash -c 'source "$1"; COMP_WORDS=("$2" ""); COMP_CWORD=1; _cbt; echo "${COMPREPLY[*]}"
               COMP_WORDS=("$2" bitmap --gr); COMP_CWORD=2; _cbt; echo "${COMPREPLY[*]}"' _ \
      "$ROOT/usr/share/bash-completion/completions/cbt" "$ICBT")
[ "$got" = "create info bitmap map check recover checkpoint exports backup restore serve
--granularity" ] || fail "bash completion offers: $got"

# The installed filter, by path, over nbdkit's memory plugin: a write is
# recorded in the container.
timeout 60 "${NBDKIT_ENV[@]}" nbdkit -U - --filter="$IFILTER" memory 1M \
  cbt-file="$T/c.cbt" cbt-bitmap=b0 \
  --run 'qemu-io -f raw -c "write -P 0x5a 128k 64k" "$uri" >/dev/null' 2>"$T/nbdkit.log" ||
  fail "nbdkit with the installed filter"
map=$("$ICBT" map "$T/c.cbt" --bitmap b0 --output=json | jq -c '[.[] | select(.dirty) | [.start, .length]]')
[ "$map" = "[[131072,65536]]" ] || fail "installed filter recorded $map, want [[131072,65536]]"
qemu-img check -q "$T/c.cbt" || fail "qemu-img check of the container written by the installed filter"
# Its version: in the long name (nbdkit's --version shows nbdkit's own for
# a filter: it refuses filters built against another nbdkit).
"${NBDKIT_ENV[@]}" nbdkit --filter="$IFILTER" memory --help >"$T/fhelp" 2>&1 || fail "nbdkit --filter=cbt memory --help"
grep -q "^filter: cbt (nbdkit changed block tracking filter, cbt $VERSION)" "$T/fhelp" ||
  fail "filter --help does not show cbt $VERSION: $(grep '^filter:' "$T/fhelp")"
echo "ok: installed cbt and filter work; filter reports cbt $VERSION"

# The installed qcow2 plugin: its version, and it serves an image.
qemu-img create -q -f qcow2 "$T/d.qcow2" 2M
"${NBDKIT_ENV[@]}" nbdkit "$IPLUGIN" --version >"$T/pver" 2>&1 || fail "plugin --version: $(cat "$T/pver")"
grep -qx "qcow2 $VERSION" "$T/pver" || fail "plugin --version: $(cat "$T/pver")"
size=$(timeout 60 "${NBDKIT_ENV[@]}" nbdkit -U - "$IPLUGIN" file="$T/d.qcow2" \
  --run 'nbdinfo --size "$uri"' 2>>"$T/nbdkit.log") || fail "nbdkit with the installed plugin"
[ "$size" = 2097152 ] || fail "installed plugin serves $size bytes, want 2097152"
echo "ok: installed qcow2 plugin serves the image, reports $VERSION"

# The man pages render without warnings; each names what the docs tables
# and the --help outputs list.
render() {
  local f=$1
  [[ $f == *.gz ]] && { zcat "$f" >"$T/page.1"; f=$T/page.1; }
  groff -man -Tutf8 -ww -z "$f" 2>"$T/groff.err" || fail "groff failed on $1"
  [ ! -s "$T/groff.err" ] || fail "groff warns on $1: $(head -3 "$T/groff.err")"
  # Plain text, hyphenation off, one long line per paragraph: words are found
  # whole.
  groff -man -Tutf8 -rLL=2000n -rHY=0 -P-cbou "$f" 2>/dev/null
}
MISSING=()
has() { # has PAGE-TEXT-FILE WORD... : notes each WORD not in the page
  local page=$1 w; shift
  for w in "$@"; do grep -qF -- "$w" "$page" || MISSING+=("$(basename "$page" .txt): $w"); done
}
for p in "${PAGES[@]}"; do render "$(ls "$ROOT/usr/share/man/man1/$p.1"*)" >"$T/$p.txt"; done
# Each page's SEE ALSO names the others as man references (and nbdkit(1)).
for p in "${PAGES[@]}"; do
  sed -n '/^SEE ALSO/,/^[A-Z]/p' "$T/$p.txt" >"$T/$p.see"
  grep -q '^SEE ALSO' "$T/$p.see" || fail "$p(1) has no SEE ALSO section"
  for o in "${PAGES[@]}" nbdkit; do
    [ "$o" = "$p" ] || grep -qF "$o(1)" "$T/$p.see" || fail "$p(1): SEE ALSO does not name $o(1): $(cat "$T/$p.see")"
  done
done
if command -v man >/dev/null; then
  man -l "$ROOT/usr/share/man/man1/cbt.1"* 2>/dev/null | grep -q "^NAME" || fail "man -l cbt.1"
fi
# Filter: the parameters of docs/filter.md's table and of the filter's --help.
mapfile -t fparams < <({ grep -oE '^\| `cbt-[a-z-]+=' "$SRC/docs/filter.md" | sed 's/^| `//'
                         grep -oE '^cbt-[a-z-]+=' "$T/fhelp"; } | sort -u)
[ "${#fparams[@]}" -ge 10 ] || fail "found only ${#fparams[@]} filter parameters"
has "$T/nbdkit-cbt-filter.txt" "${fparams[@]}"
# Plugin: docs/qcow2-plugin.md's table and the plugin's --help.
"${NBDKIT_ENV[@]}" nbdkit "$IPLUGIN" --help >"$T/phelp" 2>&1 || fail "nbdkit qcow2 --help"
mapfile -t pparams < <({ grep -oE '^\| `[a-z-]+=' "$SRC/docs/qcow2-plugin.md" | sed 's/^| `//'
                         sed -n '/^qcow2 /,$p' "$T/phelp" | grep -oE '^[a-z][a-z-]*=' ; } | sort -u)
[ "${#pparams[@]}" -ge 4 ] || fail "found only ${#pparams[@]} plugin parameters"
has "$T/nbdkit-qcow2-plugin.txt" "${pparams[@]}"
# Tool: every subcommand of cbt --help, every option of cbt SUB --help.
mapfile -t subs < <("$ICBT" --help | awk '/^Subcommands:/{on=1; next} on && /^  [a-z]/{print $1}')
[ "${#subs[@]}" -ge 9 ] || fail "found only ${#subs[@]} subcommands in cbt --help"
n=0
for s in "${subs[@]}"; do
  has "$T/cbt.txt" "cbt $s"
  # The option column of boost's table ("  -g [ --granularity ] SIZE   text").
  mapfile -t opts < <("$ICBT" "$s" --help | grep -E '^  +-' | sed -E 's/^ +//; s/ {2,}.*//' |
                      grep -oE -- '--?[a-zA-Z][a-zA-Z0-9-]*' | sort -u)
  [ "${#opts[@]}" -ge 2 ] || fail "cbt $s --help lists ${#opts[@]} options"
  # A subcommand with a page of its own (cbt-serve(1)) is checked there;
  # the options every subcommand takes (-h, -v, --output) may be in cbt(1).
  if [ -f "$T/cbt-$s.txt" ]; then
    for o in "${opts[@]}"; do
      grep -qF -- "$o" "$T/cbt-$s.txt" || grep -qF -- "$o" "$T/cbt.txt" || MISSING+=("cbt-$s: $o")
    done
  else
    has "$T/cbt.txt" "${opts[@]}"
  fi
  n=$((n + ${#opts[@]}))
done
[ "${#MISSING[@]}" -eq 0 ] || fail "not in the man pages (document them in docs/): ${MISSING[*]}"
echo "ok: man pages render; filter ${#fparams[@]} params, plugin ${#pparams[@]}, cbt ${#subs[@]} subcommands / $n options all documented"

# The unit example names the installed cbt: /usr/bin/cbt here (prefix
# /usr), PREFIX/bin/cbt after `cmake --install --prefix PREFIX` (not
# /usr/bin/cbt, which may be Google's Bigtable client or nothing).
grep -q '^ExecStart=/usr/bin/cbt serve ' "$ROOT/usr/share/doc/nbdkit-cbt/examples/systemd/cbt@.service" ||
  fail "the packaged unit does not run /usr/bin/cbt: $(grep ExecStart "$ROOT/usr/share/doc/nbdkit-cbt/examples/systemd/cbt@.service")"
DESTDIR=$T/opt-root timeout 120 cmake --install "$CBT_BUILD" --prefix /opt/cbt >"$T/install-opt.log" 2>&1 ||
  { tail -20 "$T/install-opt.log" >&2; fail "cmake --install --prefix /opt/cbt failed"; }
grep -q '^ExecStart=/opt/cbt/bin/cbt serve ' "$T/opt-root/opt/cbt/share/doc/nbdkit-cbt/examples/systemd/cbt@.service" ||
  fail "installed under /opt/cbt, the unit runs: $(grep ExecStart "$T/opt-root/opt/cbt/share/doc/nbdkit-cbt/examples/systemd/cbt@.service")"
[ -x "$T/opt-root/opt/cbt/bin/cbt" ] || fail "no /opt/cbt/bin/cbt after cmake --install --prefix /opt/cbt"
echo "ok: the unit example runs the installed cbt (/usr/bin/cbt, /opt/cbt/bin/cbt)"

# The systemd unit example: its ExecStart with the example env file (paths
# moved into $T), run as systemd runs it (Type=notify: in the foreground,
# READY=1 to $NOTIFY_SOCKET once it serves; stop: SIGTERM to cbt).
UNIT=$ROOT/usr/share/doc/nbdkit-cbt/examples/systemd/cbt@.service
if command -v systemd-analyze >/dev/null; then
  mkdir -p "$T/units"
  sed "s|/usr/bin/cbt|$ICBT|" "$UNIT" >"$T/units/cbt@.service"
  SYSTEMD_LOG_LEVEL=err systemd-analyze verify --man=no "$T/units/cbt@.service" >"$T/verify.log" 2>&1 ||
    { grep -v 'EnvironmentFile' "$T/verify.log" | grep -q . && fail "systemd-analyze verify: $(cat "$T/verify.log")"; }
fi
qemu-img create -q -f raw "$T/vm1.raw" 1M
mkdir -p "$T/run/vm1"
sed -e "s|/var/lib/images/vm1.raw|$T/vm1.raw|; s|/var/lib/cbt/vm1.cbt|$T/vm1.cbt|" \
  "$ROOT/usr/share/doc/nbdkit-cbt/examples/systemd/disk.env" >"$T/vm1.env"
set -a; source "$T/vm1.env"; set +a
exec_start=$(sed -n '/^ExecStart=/,/[^\\]$/p' "$UNIT" | sed 's/^ExecStart=//; s/\\$//' | tr '\n' ' ')
exec_start=${exec_start//\/run\/cbt\/%i/$T/run/vm1}
exec_start=${exec_start//\/usr\/bin\/cbt/$ICBT}
# systemd: ${VAR} is one argument, $VAR is split at spaces.
exec_start=$(sed -E 's/\$\{([A-Z_]+)\}/"$\1"/g' <<<"$exec_start")
[[ "$exec_start" == "$ICBT serve "* ]] || fail "ExecStart not understood: $exec_start"
# The installed cbt serve runs the installed filter (not nbdkit's filterdir
# here: the package is unpacked into $T).
export CBT_FILTER=$IFILTER CBT_QCOW2_PLUGIN=$IPLUGIN
timeout 60 python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1]); s.settimeout(55)
print(s.recv(4096).decode())' "$T/notify.sock" >"$T/notify.out" 2>&1 &
LISTENER=$!
PIDS+=("$LISTENER")
for _ in $(seq 300); do [ -S "$T/notify.sock" ] && break; sleep 0.1; done
# No `timeout` around it: the cleanup's kill -9 must reach cbt itself.
eval "cmd=($exec_start)"
NOTIFY_SOCKET=$T/notify.sock "${NBDKIT_ENV[@]}" "${cmd[@]}" >"$T/unit.out" 2>>"$T/nbdkit.log" &
pid=$!
PIDS+=("$pid")
wait "$LISTENER" || fail "the unit's ExecStart sent no READY=1: $(cat "$T/nbdkit.log")"
[ "$(cat "$T/notify.out")" = READY=1 ] || fail "NOTIFY_SOCKET got: $(cat "$T/notify.out")"
[ -S "$T/run/vm1/nbd.sock" ] || fail "no NBD socket once READY=1 was sent"
qemu-io -f raw -c "write -P 1 0 4k" "nbd+unix:///?socket=$T/run/vm1/nbd.sock" >/dev/null ||
  fail "write through the unit's export"
"$ICBT" info --socket "$T/run/vm1/control.sock" --output=json | jq -e '.bitmaps[] | select(.name == "b0")' \
  >/dev/null || fail "cbt info over the unit's control socket"
kill -TERM "$pid"   # what systemctl stop sends to the main process (KillMode=mixed)
rc=0
wait "$pid" || rc=$?
[ "$rc" = 0 ] || fail "the unit's cbt serve exited $rc after SIGTERM: $(cat "$T/nbdkit.log")"
[ "$(bitmap_flags "$T/vm1.cbt" b0)" = '["auto"]' ] ||
  fail "after SIGTERM b0's flags are $(bitmap_flags "$T/vm1.cbt" b0), want [\"auto\"] (not in use)"
map=$("$ICBT" map "$T/vm1.cbt" --bitmap b0 --output=json | jq -c '[.[] | select(.dirty) | [.start, .length]]')
[ "$map" = "[[0,65536]]" ] || fail "after SIGTERM the bitmap holds $map, want [[0,65536]]"
# qemu-io flushes before it exits, so b0 is written either way; what only a
# clean stop does (kill -9 does not: mutation-tested) is remove the socket.
[ ! -e "$T/run/vm1/control.sock" ] || fail "control socket left after a clean stop"
echo "ok: the unit's ExecStart serves, says READY=1; SIGTERM persists b0 and clears in-use"
