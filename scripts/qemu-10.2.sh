#!/usr/bin/env bash
# Builds a minimal QEMU 10.2 (x86_64, TCG, vhost-user; nothing else) from Debian unstable's `qemu` source
# package, once, for the tests that need `vhost-user-test-device-pci` (the only QEMU front-end that can drive
# a vhost-user balloon: it forwards queues, GET/SET_CONFIG and config-change notifications to the back-end):
#
#   VHOSTD_QEMU_10_2=$(bash scripts/qemu-10.2.sh) npx ava build/test/e2e/balloon.test.js
#
# Usage: scripts/qemu-10.2.sh
#   Prints the path of a qemu-system-x86_64 wrapper as the last line of stdout; progress goes to stderr.
#
# What it does, once (later runs find the binary and only print the path, in well under a second):
#   - installs the build dependencies that are missing, as root: meson >= 1.5 from bookworm-backports (bookworm
#     has 1.0), ninja-build libglib2.0-dev libpixman-1-dev python3-venv python3-pycotap flex bison
#     device-tree-compiler libfdt-dev bzip2 xz-utils;
#   - downloads the source package with apt-get, from a deb-src line for Debian unstable kept in a private
#     sources list and lists directory under the cache (the system's apt sources are never edited):
#     the newest 1:10.2 version unstable has, else the one this script was tested with (1:10.2.2+ds-1) from
#     snapshot.debian.org;
#   - unpacks the upstream tarball, turns off the unpacking of the edk2 firmware blobs (the +ds tarball
#     has no pc-bios binaries), configures x86_64-softmmu only, without docs or default features, and runs
#     `ninja qemu-system-x86_64` (about 10 minutes on 2 cores);
#   - keeps only the binary, in $VHOSTD_CACHE/qemu-10.2/<version>/bin (VHOSTD_CACHE defaults to
#     $HOME/.cache/vhostd), and writes $VHOSTD_CACHE/qemu-10.2/qemu-system-x86_64, a wrapper that runs it
#     with -L at the installed QEMU's firmware (/usr/share/qemu, /usr/share/seabios, /usr/lib/ipxe/qemu:
#     qemu-system-data, seabios and ipxe-qemu, which scripts/install-deps.sh installs).
set -euo pipefail

log() { printf 'qemu-10.2: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The version this script was tested with; used from snapshot.debian.org when unstable has moved past 10.2.
TESTED_VERSION=1:10.2.2+ds-1
SNAPSHOT=https://snapshot.debian.org/archive/debian/20260301T000000Z
MIN_MESON=1.5
BUILD_PACKAGES=(ninja-build libglib2.0-dev libpixman-1-dev python3-venv python3-pycotap flex bison
  device-tree-compiler libfdt-dev bzip2 xz-utils pkgconf gcc make)
FIRMWARE_DIRS=(/usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu)

for tool in apt-get apt-cache dpkg dpkg-query tar; do
  command -v "$tool" >/dev/null || die "$tool not found (this script needs Debian's apt and dpkg)"
done

# /usr/bin/python3: another python3 earlier in PATH (pyenv) may lack the system's meson. vhost-net
# gives `-netdev vhost-user` (the net daemon's front-end, for a demo guest with every daemon).
CONFIGURE=(--python=/usr/bin/python3 --target-list=x86_64-softmmu --without-default-features
  --enable-vhost-user --enable-vhost-net --enable-tcg --disable-docs --disable-install-blobs --disable-werror --disable-download)
# A tree serves only the configuration it was built with: changing CONFIGURE builds a new one.
build_key=$(printf '%s\n' "${CONFIGURE[@]}" | sha1sum | cut -c1-12)

cache=${VHOSTD_CACHE:-$HOME/.cache/vhostd}
dir=$cache/qemu-10.2
wrapper=$dir/qemu-system-x86_64
mkdir -p "$dir"

write_wrapper() { # write_wrapper BINARY VERSION
  local tmp fw
  fw=""
  for d in "${FIRMWARE_DIRS[@]}"; do fw="$fw -L $d"; done
  tmp=$(mktemp "$dir/.wrapper.XXXXXX")
  cat >"$tmp" <<EOF
#!/bin/sh
# QEMU $2 built by scripts/qemu-10.2.sh (not installed; the system QEMU is untouched). The +ds source has
# no firmware: the installed QEMU's firmware directories serve.
exec '$1'$fw "\$@"
EOF
  chmod 755 "$tmp"
  mv -f "$tmp" "$wrapper"
}

check() {
  local out
  out=$("$wrapper" --version | head -n 1)
  case "$out" in "QEMU emulator version 10.2"*) ;; *) die "$wrapper --version says: $out" ;; esac
  "$wrapper" -device help 2>/dev/null | grep -q '"vhost-user-test-device-pci"' ||
    die "$wrapper has no vhost-user-test-device-pci"
  # -netdev help lists every type; only a start tells whether this one was built in.
  if "$wrapper" -machine none -nodefaults -display none -netdev vhost-user,id=n0,chardev=none 2>&1 | grep -q 'not compiled'; then
    die "$wrapper has no -netdev vhost-user"
  fi
  for d in "${FIRMWARE_DIRS[@]}"; do
    [ -d "$d" ] || log "warning: firmware directory $d is missing (scripts/install-deps.sh installs it)"
  done
  log "$out"
}

# A finished build: the newest complete tree (any version) serves.
finished() {
  local t best=""
  for t in "$dir"/*/.complete; do
    [ -f "$t" ] && [ "$(cat "$t")" = "$build_key" ] || continue
    t=${t%/.complete}
    if [ -z "$best" ] || [ "$t" -nt "$best" ]; then best=$t; fi
  done
  printf '%s\n' "$best"
}

serve() { # serve TREE
  local version
  version=$(cat "$1/version")
  if ! grep -qF "'$1/bin/qemu-system-x86_64'" "$wrapper" 2>/dev/null; then
    write_wrapper "$1/bin/qemu-system-x86_64" "$version"
  fi
  check
  printf '%s\n' "$wrapper"
  exit 0
}

tree=$(finished)
[ -z "$tree" ] || serve "$tree"

# Serialize builders (two test runs starting at once must not build twice).
if command -v flock >/dev/null; then
  exec 9>"$dir/.lock"
  flock 9
  tree=$(finished)
  [ -z "$tree" ] || serve "$tree"
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo -n -E "$@"
  else
    die "installing build dependencies needs root (or password-less sudo): $*"
  fi
}

installed() { [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]; }

# The Debian mirror apt already uses (deb822 or one-line format), for the backports and unstable lines.
debian_mirror() {
  local uri=""
  if [ -n "${VHOSTD_APT_MIRROR:-}" ]; then printf '%s\n' "$VHOSTD_APT_MIRROR"; return; fi
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk 'BEGIN { RS = "" } /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t]|\n|$)/ {
                 if (match($0, /(^|\n)URIs:[ \t]*[^ \t\n]+/)) {
                   s = substr($0, RSTART, RLENGTH); sub(/^\n?URIs:[ \t]*/, "", s); print s; exit } }' \
      /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1 == "deb" && $0 ~ / bookworm / { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' /etc/apt/sources.list)
  fi
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}
mirror=$(debian_mirror)
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

export DEBIAN_FRONTEND=noninteractive
apt_install() { as_root apt-get -q -y --no-install-recommends "$@" >&2; }

# --- build dependencies -------------------------------------------------------------------------------
missing=()
for p in "${BUILD_PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
meson_ok() {
  local v
  v=$(dpkg-query -W -f='${Version}' meson 2>/dev/null || true)
  [ -n "$v" ] && installed meson && dpkg --compare-versions "$v" ge "$MIN_MESON"
}
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing build dependencies: ${missing[*]}"
  apt_install install "${missing[@]}" || { as_root apt-get -q update >&2; apt_install install "${missing[@]}"; }
fi
if ! meson_ok; then
  log "installing meson >= $MIN_MESON from bookworm-backports"
  if ! apt_install install -t bookworm-backports meson; then
    # No backports entry in the system's sources: add one for this command only, through a private
    # sources list next to the system's (Dir::Etc::SourceList replaces only /etc/apt/sources.list).
    extra=$dir/apt/backports.list
    mkdir -p "$dir/apt"
    { [ -f /etc/apt/sources.list ] && cat /etc/apt/sources.list
      printf 'deb [signed-by=%s] %s bookworm-backports main\n' "$keyring" "$mirror"; } >"$extra"
    as_root apt-get -q -o Dir::Etc::SourceList="$extra" update >&2
    apt_install -o Dir::Etc::SourceList="$extra" install -t bookworm-backports meson
  fi
  meson_ok || die "meson >= $MIN_MESON did not install"
fi

# --- source ------------------------------------------------------------------------------------------
work=$(mktemp -d "$dir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
src_list=$dir/apt/unstable-src.list
lists=$dir/apt/lists
mkdir -p "$lists/partial"
printf 'deb-src [signed-by=%s] %s unstable main\n' "$keyring" "$mirror" >"$src_list"
# As root, apt drops to the _apt user, which cannot write into a private home; fetch as ourselves.
private_apt=(-o Dir::Etc::SourceList="$src_list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$lists"
  -o APT::Sandbox::User="$(id -un)")
version=""
log "apt-get update (Debian unstable sources, private list $src_list)"
if apt-get -q "${private_apt[@]}" update >&2; then
  version=$(apt-cache "${private_apt[@]}" showsrc qemu 2>/dev/null |
    awk '/^Package: /{ p = $2 } /^Version: / && p == "qemu" { print $2 }' |
    while read -r v; do case "$v" in 1:10.2*) printf '%s\n' "$v" ;; esac; done | sort -V | tail -n 1)
fi
if [ -n "$version" ]; then
  log "downloading qemu $version source"
  (cd "$work" && apt-get -q "${private_apt[@]}" source --download-only "qemu=$version" >&2)
else
  version=$TESTED_VERSION
  log "Debian unstable has no qemu 1:10.2; downloading $version from $SNAPSHOT"
  upstream=${version#*:}
  upstream=${upstream%-*}
  curl -fsSL --retry 3 -o "$work/qemu_${upstream}.orig.tar.xz" "$SNAPSHOT/pool/main/q/qemu/qemu_${upstream}.orig.tar.xz"
fi
rm -rf "$lists" # 25 MB of unstable's Sources indexes, only needed for this download
tarball=$(ls "$work"/qemu_*.orig.tar.* 2>/dev/null | head -n 1)
[ -n "$tarball" ] || die "no upstream tarball downloaded"
log "unpacking $(basename "$tarball")"
mkdir -p "$work/src"
tar -xf "$tarball" -C "$work/src" --strip-components=1
rm -f "$work"/qemu_*

# --- build -------------------------------------------------------------------------------------------
cd "$work/src"
# The +ds tarball has no pc-bios/edk2-*.fd.bz2: without this, meson fails unpacking them for x86_64.
sed -i 's/^\([[:space:]]*\)unpack_edk2_blobs = bzip2\.found()/\1unpack_edk2_blobs = false/' meson.build
grep -q 'unpack_edk2_blobs = bzip2.found()' meson.build && die "could not turn off the edk2 blob unpacking in meson.build"
log "configure"
./configure "${CONFIGURE[@]}" >&2
log "ninja qemu-system-x86_64 (about 10 minutes on 2 cores)"
start=$SECONDS
nice -n 5 ninja -C build qemu-system-x86_64 >&2
log "built in $((SECONDS - start)) s ($SECONDS s in all)"
tree=$dir/$(printf '%s' "$version" | tr ':+~/' '...-')-$build_key
mkdir -p "$work/tree/bin"
cp build/qemu-system-x86_64 "$work/tree/bin/"
# Without debug symbols the binary is 27 MB instead of 70.
if command -v strip >/dev/null; then strip "$work/tree/bin/qemu-system-x86_64"; fi
printf '%s\n' "$version" >"$work/tree/version"
printf '%s\n' "$build_key" >"$work/tree/.complete"
cd "$dir"
rm -rf "$tree"
mv "$work/tree" "$tree"
serve "$tree"
