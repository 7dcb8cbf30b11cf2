#!/usr/bin/env bash
# Packaging checks, run by .ci/run (as root, on Debian). Every failure is
# fatal and says what broke.
#   1. the .deb (built by packaging/build-deb.sh, or $LFM_DEB): files, modes,
#      control fields, conffile, maintainer scripts, man pages;
#   2. sysusers.d / tmpfiles.d applied to an empty root;
#   3. `systemd-analyze verify` on every unit as packaged;
#   4. `systemd-analyze security`: lfmd.service exposure <= 2.0;
#   5. the D-Bus policy on a private system bus, with real users: the lfmd
#      user owns org.lfm.Daemon1, root and group lfm call methods, anyone
#      else only reads properties, all against the real `lfmd serve --dbus`
#      (dbus-send, gdbus, lfmctl, Python); the activation files are accepted;
#   6. dpkg -i and dpkg --purge (only without systemd as PID 1 and with no
#      lfmd package installed).
# It creates the lfmd user and lfm group (from our sysusers.d file) and a
# test member of lfm, lfmtest, on the machine, and installs then purges the
# package (step 6); nothing else outside a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() {
  echo "packaging: FAIL: $*" >&2
  exit 1
}
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# --- 1. the .deb --------------------------------------------------------------
echo "== packaging: .deb"
if [ -n "${LFM_DEB:-}" ]; then
  deb=$LFM_DEB
else
  deb=$(packaging/build-deb.sh | tail -n 1)
fi
[ -f "$deb" ] || fail "no .deb at '$deb'"
echo "$deb"

# Mode and path of every file we ship (dpkg-deb -c: "MODE OWNER SIZE DATE TIME PATH").
dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { print $1, $2, $6 }' | sort >"$tmp/contents"
expect() { # MODE PATH
  grep -qxF -e "$1 0/0 ./$2" "$tmp/contents" || fail "the .deb lacks $2 (mode $1, owner 0/0); it has:
$(cat "$tmp/contents")"
}
for f in usr/bin/lfmd usr/bin/lfmctl; do expect -rwxr-xr-x "$f"; done
for f in \
  usr/lib/systemd/system/lfmd.service usr/lib/systemd/system/lfmd.socket \
  usr/lib/systemd/user/lfmd.service usr/lib/systemd/user/lfmd.socket \
  usr/share/dbus-1/system.d/org.lfm.Daemon1.conf \
  usr/share/dbus-1/system-services/org.lfm.Daemon1.service \
  usr/share/dbus-1/services/org.lfm.Daemon1.service \
  usr/lib/sysusers.d/lfmd.conf usr/lib/tmpfiles.d/lfmd.conf \
  etc/lfmd/lfmd.toml usr/share/doc/lfmd/examples/lfmd-tcp.conf \
  usr/share/doc/lfmd/examples/lfmd-http.socket \
  usr/share/man/man1/lfmd.1.gz usr/share/man/man1/lfmd-serve.1.gz \
  usr/share/man/man1/lfmctl.1.gz usr/share/man/man1/lfmctl-ask.1.gz; do
  expect -rw-r--r-- "$f"
done
# The hidden man generators get no pages of their own.
! grep -qE 'man1/(lfmd|lfmctl)-man\.1\.gz$' "$tmp/contents" || fail "a man page for the hidden 'man' command was packaged"

root=$tmp/root
dpkg-deb -x "$deb" "$root"
for m in "$root"/usr/share/man/man1/*.1.gz; do
  gzip -dc "$m" | grep -q '^\.TH ' || fail "$m is not a gzipped man page"
done
for b in lfmd lfmctl; do
  [ "$(readelf -SW "$root/usr/bin/$b" | grep -cE '\.debug_(info|line) ')" = 0 ] || fail "usr/bin/$b is not stripped (build-deb.sh moves debug info to the -dbgsym .ddeb)"
done
cmp -s packaging/lfmd.toml "$root/etc/lfmd/lfmd.toml" || fail "etc/lfmd/lfmd.toml differs from packaging/lfmd.toml"

[ "$(dpkg-deb -f "$deb" Package)" = lfmd ] || fail "package name is not lfmd"
dpkg-deb -f "$deb" Depends | grep -q libc6 || fail "Depends lacks libc6 (is dpkg-shlibdeps installed?): $(dpkg-deb -f "$deb" Depends)"
dpkg-deb -I "$deb" conffiles | grep -qx /etc/lfmd/lfmd.toml || fail "/etc/lfmd/lfmd.toml is not a conffile"
dpkg-deb -e "$deb" "$tmp/control"
for s in postinst prerm postrm; do
  [ -x "$tmp/control/$s" ] || fail "maintainer script $s missing or not executable"
  cmp -s "packaging/debian/$s" "$tmp/control/$s" || fail "maintainer script $s differs from packaging/debian/$s"
  sh -n "$tmp/control/$s" || fail "maintainer script $s: syntax error"
done

# --- 2. sysusers.d and tmpfiles.d -----------------------------------------------
echo "== packaging: sysusers.d, tmpfiles.d"
sys=$tmp/sysroot
mkdir -p "$sys/etc" "$sys/var/lib" "$sys/usr/lib/sysusers.d" "$sys/usr/lib/tmpfiles.d"
cp "$root/usr/lib/sysusers.d/lfmd.conf" "$sys/usr/lib/sysusers.d/"
cp "$root/usr/lib/tmpfiles.d/lfmd.conf" "$sys/usr/lib/tmpfiles.d/"
systemd-sysusers --root="$sys" lfmd.conf 2>/dev/null
grep -q '^lfm:' "$sys/etc/group" || fail "sysusers.d made no group lfm"
lfm_gid=$(awk -F: '$1 == "lfm" { print $3 }' "$sys/etc/group")
awk -F: -v g="$lfm_gid" '$1 == "lfmd" && $4 == g && $7 == "/usr/sbin/nologin" { ok = 1 } END { exit !ok }' "$sys/etc/passwd" \
  || fail "sysusers.d: lfmd is not a nologin user with primary group lfm: $(cat "$sys/etc/passwd")"
systemd-tmpfiles --root="$sys" --create lfmd.conf
lfmd_uid=$(awk -F: '$1 == "lfmd" { print $3 }' "$sys/etc/passwd")
want_dir() { # PATH MODE UID GID
  local got
  got=$(stat -c '%a %u %g' "$sys/$1" 2>/dev/null) || got=missing
  [ "$got" = "$2 $3 $4" ] || fail "tmpfiles.d: /$1 is '$got' (mode uid gid), want '$2 $3 $4'"
}
want_dir var/lib/lfmd 750 "$lfmd_uid" "$lfm_gid"
want_dir var/lib/lfmd/models 755 0 0
want_dir etc/lfmd 755 0 0

# --- 3. systemd-analyze verify ----------------------------------------------------
# Verified as packaged: --root is the unpacked .deb, so ExecStart=/usr/bin/lfmd
# is the binary we built and Documentation=man:… must be a page we ship
# (MANPATH points into the root). The root also gets the distribution's own
# units (targets, dbus.socket) and /bin/kill (procps, used by ExecReload=),
# which the real system provides. Warnings (unknown keys, bad values) count
# as failures, not only a non-zero exit.
echo "== packaging: systemd-analyze verify"
mkdir -p "$root/usr/lib/systemd/system" "$root/usr/lib/systemd/user"
cp -an /usr/lib/systemd/system/. "$root/usr/lib/systemd/system/"
cp -an /usr/lib/systemd/user/. "$root/usr/lib/systemd/user/"
ln -sfn usr/bin "$root/bin"
cp /usr/bin/kill "$root/usr/bin/kill"
verify() { # [--user] UNIT...
  local out
  if ! out=$(MANPATH=$root/usr/share/man systemd-analyze "$@" 2>&1) || [ -n "$out" ]; then
    fail "systemd-analyze $*:
$out"
  fi
}
verify verify --root="$root" "$root/usr/lib/systemd/system/lfmd.socket" "$root/usr/lib/systemd/system/lfmd.service"
# systemd 252 cannot verify user units under --root, so they are verified as
# copies whose /usr/bin/lfmd is rewritten to the packaged binary's path (the
# only change); a user manager resolves %t from XDG_RUNTIME_DIR.
mkdir -m 0700 "$tmp/xdg" "$tmp/user-units"
for u in lfmd.socket lfmd.service; do
  sed "s|/usr/bin/lfmd|$root/usr/bin/lfmd|g" "$root/usr/lib/systemd/user/$u" >"$tmp/user-units/$u"
done
XDG_RUNTIME_DIR=$tmp/xdg verify --user verify "$tmp/user-units/lfmd.socket" "$tmp/user-units/lfmd.service"
# The TCP drop-in, installed as the README says.
mkdir -p "$root/etc/systemd/system/lfmd.service.d"
cp "$root/usr/share/doc/lfmd/examples/lfmd-tcp.conf" "$root/etc/systemd/system/lfmd.service.d/tcp.conf"
verify verify --root="$root" "$root/usr/lib/systemd/system/lfmd.service"
# The HTTP socket and its drop-in, installed as lfmd-http.socket says.
cp "$root/usr/share/doc/lfmd/examples/lfmd-http.socket" "$root/etc/systemd/system/lfmd-http.socket"
printf '[Service]\nSockets=lfmd.socket lfmd-http.socket\n' >"$root/etc/systemd/system/lfmd.service.d/http.conf"
verify verify --root="$root" "$root/etc/systemd/system/lfmd-http.socket" "$root/usr/lib/systemd/system/lfmd.service"

# --- 4. exposure ---------------------------------------------------------------------
echo "== packaging: systemd-analyze security"
exposure() { # ROOT → the "Overall exposure level" number of lfmd.service
  systemd-analyze security --offline=true --root="$1" lfmd.service 2>&1 \
    | sed -n 's/.*Overall exposure level for lfmd.service: \([0-9.]*\).*/\1/p'
}
tcp=$(exposure "$root")
rm -r "$root/etc/systemd/system/lfmd.service.d"
level=$(exposure "$root")
[ -n "$level" ] || fail "no exposure level from systemd-analyze security"
echo "lfmd.service exposure $level (with the TCP drop-in: $tcp)"
awk -v l="$level" 'BEGIN { exit !(l <= 2.0) }' || fail "lfmd.service exposure $level > 2.0:
$(systemd-analyze security --offline=true --root="$root" lfmd.service 2>&1 | grep '✗')"

# --- 5. D-Bus policy --------------------------------------------------------------------
echo "== packaging: D-Bus policy on a private system bus"
# Users: lfmd and lfm from our sysusers.d file (as postinst does), lfmtest a
# member of lfm, nobody (65534) an outsider.
systemd-sysusers "$root/usr/lib/sysusers.d/lfmd.conf" 2>/dev/null
getent passwd lfmtest >/dev/null || useradd --system --no-create-home --shell /usr/sbin/nologin lfmtest
id -nG lfmtest | grep -qw lfm || usermod -aG lfm lfmtest
as() { # USER CMD...: run CMD as USER with USER's groups (65534 gets none)
  local u=$1
  shift
  if [ "$u" = root ]; then
    "$@"
  elif [ "$u" = nobody ]; then
    setpriv --reuid=65534 --regid=65534 --clear-groups "$@"
  else
    setpriv --reuid="$u" --regid="$(id -g "$u")" --init-groups "$@"
  fi
}

# A system-type bus: the distribution's default system policy (the
# <policy context="default"> of /usr/share/dbus-1/system.conf, copied so the
# verdicts are a real system bus's) plus our policy file as packaged.
bus=$tmp/bus
mkdir -m 0755 "$bus"
chmod 0755 "$tmp"
[ -f /usr/share/dbus-1/system.conf ] || fail "/usr/share/dbus-1/system.conf missing (package dbus-system-bus-common)"
{
  echo '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">'
  echo '<busconfig>'
  echo '  <type>system</type>'
  echo "  <listen>unix:path=$bus/system_bus_socket</listen>"
  echo '  <auth>EXTERNAL</auth>'
  echo "  <servicedir>$root/usr/share/dbus-1/system-services</servicedir>"
  awk '/<policy context="default">/ { p = 1 } p { print } p && /<\/policy>/ { exit }' /usr/share/dbus-1/system.conf
  echo "  <include>$root/usr/share/dbus-1/system.d/org.lfm.Daemon1.conf</include>"
  echo '</busconfig>'
} >"$bus/system.conf"
dbus-daemon --config-file="$bus/system.conf" --fork --print-address=3 --print-pid=4 3>"$bus/address" 4>"$bus/pid" \
  || fail "dbus-daemon refused the configuration (is the policy well-formed?)"
pids+=("$(cat "$bus/pid")")
addr=$(head -n 1 "$bus/address")

dsend() { # USER DEST PATH IFACE.MEMBER [ARGS]: "reached", else the D-Bus error name (or all output)
  local u=$1 out name
  shift
  if out=$(as "$u" dbus-send --bus="$addr" --print-reply --reply-timeout=5000 --dest="$@" 2>&1); then
    echo reached
  else
    name=$(echo "$out" | grep -o 'org\.freedesktop\.DBus\.Error\.[A-Za-z]*' | head -n 1) || true
    echo "${name:-$out}"
  fi
}
has_owner() {
  as root dbus-send --bus="$addr" --print-reply --dest=org.freedesktop.DBus / \
    org.freedesktop.DBus.NameHasOwner string:org.lfm.Daemon1 | grep -q 'boolean true'
}

# The owner: the real daemon, as the lfmd user (its unit's User=). With it,
# "reached" means the bus let the call through and lfmd answered; a refusal
# by the bus is its own AccessDenied.
run=$tmp/lfmd-run
mkdir -m 0750 "$run"
"$root/usr/bin/lfmd" synth --preset tiny-moe --quant q8_0 "$run/tiny.gguf" >/dev/null 2>&1 \
  || fail "lfmd synth failed"
chown -R lfmd:lfm "$run"
as lfmd "$root/usr/bin/lfmd" serve --model "$run/tiny.gguf" --grpc "unix:$run/lfmd.sock" \
  --dbus "$addr" --threads 1 --config /dev/null 2>"$run/log" &
pids+=("$!")
for _ in $(seq 300); do
  has_owner && break
  sleep 0.1
done
has_owner || fail "lfmd serve --dbus did not own org.lfm.Daemon1 as the lfmd user: $(cat "$run/log")"

obj=(org.lfm.Daemon1 /org/lfm/Daemon1)
props=org.freedesktop.DBus.Properties
checks=0
want() { # WHAT VERDICT USER ARGS...
  local what=$1 verdict=$2 got
  shift 2
  got=$(dsend "$@")
  [ "$got" = "$verdict" ] || fail "D-Bus policy: $what: got '$got', want '$verdict'"
  checks=$((checks + 1))
}
denied=org.freedesktop.DBus.Error.AccessDenied
# Calls lfmd answers (Status), and a property write that reaches lfmd, which
# refuses it itself (its properties have no setter: zbus answers
# UnknownProperty): the bus let both through.
want "root calls a method" reached root "${obj[@]}" org.lfm.Daemon1.Status
want "a member of lfm calls a method" reached lfmtest "${obj[@]}" org.lfm.Daemon1.Status
want "a member of lfm sets a property (lfmd refuses)" org.freedesktop.DBus.Error.UnknownProperty lfmtest "${obj[@]}" $props.Set string:org.lfm.Daemon1 string:Version variant:string:x
want "nobody calls a method" $denied nobody "${obj[@]}" org.lfm.Daemon1.Status
want "nobody sets a property" $denied nobody "${obj[@]}" $props.Set string:org.lfm.Daemon1 string:Version variant:string:x
want "nobody reads a property" reached nobody "${obj[@]}" $props.Get string:org.lfm.Daemon1 string:Version
want "nobody reads all properties" reached nobody "${obj[@]}" $props.GetAll string:org.lfm.Daemon1
want "nobody introspects" reached nobody "${obj[@]}" org.freedesktop.DBus.Introspectable.Introspect
for u in nobody lfmtest; do
  want "$u claims org.lfm.Daemon1" $denied "$u" org.freedesktop.DBus / org.freedesktop.DBus.RequestName string:org.lfm.Daemon1 uint32:0
done

# GLib's gdbus as desktop code calls lfmd (plain integers in the options): a
# member of lfm gets an answer, an outsider the bus's AccessDenied.
command -v gdbus >/dev/null || fail "gdbus missing (package libglib2.0-bin)"
gcall() { # USER: Generate with plain integers, through gdbus
  as "$1" gdbus call --address "$addr" --dest org.lfm.Daemon1 --object-path /org/lfm/Daemon1 \
    --method org.lfm.Daemon1.Generate hello "{'max_tokens': <3>, 'temperature': <0>}" 2>&1
}
out=$(gcall lfmtest) || fail "a member of lfm could not Generate through gdbus: $out"
echo "$out" | grep -q "'generated_tokens': <uint32 3>" || fail "gdbus Generate as lfmtest: $out"
checks=$((checks + 1))
if out=$(gcall nobody); then fail "an outsider's Generate went through: $out"; fi
echo "$out" | grep -q 'org.freedesktop.DBus.Error.AccessDenied' || fail "gdbus Generate as nobody: $out"
checks=$((checks + 1))
out=$(as lfmtest "$root/usr/bin/lfmctl" status --dbus="$addr" 2>&1) || fail "lfmctl status --dbus as lfmtest: $out"
checks=$((checks + 1))
# A Python desktop script (examples/python/lfm_dbus.py on Debian's python3 and
# python3-jeepney): Ask, its signals, a cancel, as a member; refused outside.
cp examples/python/lfm_dbus.py "$run/lfm_dbus.py"
chmod 0644 "$run/lfm_dbus.py"
chmod 0755 "$run"
pyask() { # USER ARGS...
  local u=$1
  shift
  as "$u" /usr/bin/python3 "$run/lfm_dbus.py" --bus "$addr" --temperature 0 "$@" Hello 2>&1
}
out=$(pyask lfmtest --max-tokens 5) || fail "the Python D-Bus example as lfmtest: $out"
echo "$out" | grep -q '# length: 5 tokens' || fail "the Python D-Bus example as lfmtest: $out"
out=$(pyask lfmtest --max-tokens 4000 --cancel-after 2) || fail "the Python D-Bus example's cancel as lfmtest: $out"
echo "$out" | grep -q '# cancelled: ' || fail "the Python D-Bus example's cancel as lfmtest: $out"
if out=$(pyask nobody --max-tokens 5); then fail "the Python D-Bus example ran as nobody: $out"; fi
echo "$out" | grep -q 'AccessDenied' || fail "the Python D-Bus example as nobody: $out"
checks=$((checks + 3))
# Stopped before step 6 (whose purge removes the lfmd user).
pkill -TERM -u lfmd -x lfmd 2>/dev/null || true

# The activation file parses and names the bus name (a system bus accepts
# only files with User=).
as root dbus-send --bus="$addr" --print-reply --dest=org.freedesktop.DBus / org.freedesktop.DBus.ListActivatableNames \
  | grep -q '"org.lfm.Daemon1"' || fail "the system bus does not list org.lfm.Daemon1 as activatable"
# The session activation file, on a private session bus (the distribution's
# session policy).
[ -f /usr/share/dbus-1/session.conf ] || fail "/usr/share/dbus-1/session.conf missing (package dbus-session-bus-common)"
{
  echo '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">'
  echo '<busconfig>'
  echo '  <type>session</type>'
  echo "  <listen>unix:path=$bus/session_bus_socket</listen>"
  echo '  <auth>EXTERNAL</auth>'
  echo "  <servicedir>$root/usr/share/dbus-1/services</servicedir>"
  awk '/<policy context="default">/ { p = 1 } p { print } p && /<\/policy>/ { exit }' /usr/share/dbus-1/session.conf
  echo '</busconfig>'
} >"$bus/session.conf"
dbus-daemon --config-file="$bus/session.conf" --fork --print-pid=4 4>"$bus/session.pid" || fail "dbus-daemon (session) failed"
pids+=("$(cat "$bus/session.pid")")
dbus-send --bus="unix:path=$bus/session_bus_socket" --print-reply --dest=org.freedesktop.DBus / org.freedesktop.DBus.ListActivatableNames \
  | grep -q '"org.lfm.Daemon1"' || fail "the session bus does not list org.lfm.Daemon1 as activatable"
echo "D-Bus policy: $checks verdicts as intended; activation files accepted"

# --- 6. install and purge ------------------------------------------------------------
# The maintainer scripts for real: dpkg -i, then dpkg --purge leaves nothing.
# Only where it cannot disturb anything: no systemd as PID 1 (postinst would
# start the socket) and no lfmd package installed already (purge removes it).
echo "== packaging: dpkg -i, dpkg --purge"
if [ -d /run/systemd/system ] || dpkg -s lfmd >/dev/null 2>&1; then
  echo "skipped: systemd is running here or lfmd is installed"
else
  dpkg -i "$deb" >"$tmp/dpkg.log" 2>&1 || fail "dpkg -i: $(cat "$tmp/dpkg.log")"
  [ "$(stat -c '%a %U %G' /var/lib/lfmd)" = "750 lfmd lfm" ] || fail "after install /var/lib/lfmd is $(stat -c '%a %U %G' /var/lib/lfmd)"
  [ -d /var/lib/lfmd/models ] && [ -f /etc/lfmd/lfmd.toml ] || fail "after install: no /var/lib/lfmd/models or /etc/lfmd/lfmd.toml"
  [ -L /etc/systemd/system/sockets.target.wants/lfmd.socket ] || fail "postinst did not enable lfmd.socket"
  /usr/bin/lfmd --version >/dev/null && /usr/bin/lfmctl --version >/dev/null || fail "the installed binaries do not run"
  dpkg --purge lfmd >"$tmp/dpkg.log" 2>&1 || fail "dpkg --purge: $(cat "$tmp/dpkg.log")"
  for f in /usr/bin/lfmd /etc/lfmd /var/lib/lfmd /etc/systemd/system/sockets.target.wants/lfmd.socket; do
    [ ! -e "$f" ] && [ ! -L "$f" ] || fail "$f is left after dpkg --purge"
  done
  echo "installed and purged cleanly"
fi

echo "packaging: all checks passed (exposure $level)"
