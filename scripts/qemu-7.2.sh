#!/usr/bin/env bash
# Unpacks Debian bookworm's QEMU 7.2 next to the system QEMU (10.0 from bookworm-backports), without
# installing it, so the real-guest tests can run against the older front-end:
#
#   VHOSTD_QEMU=$(bash scripts/qemu-7.2.sh) npm test -- build/test/e2e
#
# Usage: scripts/qemu-7.2.sh
#   Prints the path of a qemu-system-x86_64 wrapper as the last line of stdout; progress goes to stderr.
#
# What it does, once (later runs find the tree and only print the path):
#   - picks the newest 7.2 version of qemu-system-x86 that apt knows (apt-cache madison; runs apt-get update
#     once, as root, if apt knows none);
#   - apt-get downloads qemu-system-x86, qemu-system-common (same version), qemu-system-data, and bookworm's
#     seabios and ipxe-qemu (the firmware 7.2 shipped with), plus any library qemu-system-x86 depends on that
#     is not installed, and unpacks them all with dpkg-deb -x into
#     $VHOSTD_CACHE/qemu-7.2/<version>/root (VHOSTD_CACHE defaults to $HOME/.cache/vhostd);
#   - writes $VHOSTD_CACHE/qemu-7.2/qemu-system-x86_64, a wrapper that runs the unpacked binary with
#     -L at the unpacked firmware directories and LD_LIBRARY_PATH at the unpacked libraries, and checks that
#     `--version` says 7.2 and that ldd finds every library.
# Debian's QEMU is relocatable: the unpacked binary loads its modules (accel-tcg-x86_64.so, ...) from
# ../lib/x86_64-linux-gnu/qemu next to itself, not the system's 10.0 modules.
set -euo pipefail

log() { printf 'qemu-7.2: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-cache apt-get dpkg-deb dpkg-query ldd; do
  command -v "$tool" >/dev/null || die "$tool not found (this script needs Debian's apt and dpkg)"
done

cache=${VHOSTD_CACHE:-$HOME/.cache/vhostd}
dir=$cache/qemu-7.2
wrapper=$dir/qemu-system-x86_64
mkdir -p "$dir"

# newest_version PKG PREFIX: the highest version of PKG that apt knows starting with PREFIX (or nothing).
newest_version() {
  local best="" v
  while read -r v; do
    case "$v" in "$2"*) ;; *) continue ;; esac
    if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
  done < <(apt-cache madison "$1" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }')
  printf '%s\n' "$best"
}

version=$(newest_version qemu-system-x86 '1:7.2+')
if [ -z "$version" ] && [ "$(id -u)" -eq 0 ]; then
  log "apt knows no qemu-system-x86 7.2; apt-get update"
  apt-get -q update >&2
  version=$(newest_version qemu-system-x86 '1:7.2+')
fi
if [ -z "$version" ]; then
  # Without apt's lists, a tree unpacked before still serves.
  [ -x "$wrapper" ] || die "apt knows no qemu-system-x86 7.2 (run apt-get update)"
  log "apt knows no qemu-system-x86 7.2; using the unpacked $("$wrapper" --version | head -n 1)"
  printf '%s\n' "$wrapper"
  exit 0
fi

tree=$dir/$(printf '%s' "$version" | tr ':+~/' '...-')
root=$tree/root

write_wrapper() {
  local tmp
  tmp=$(mktemp "$dir/.wrapper.XXXXXX")
  cat >"$tmp" <<EOF
#!/bin/sh
# QEMU $version unpacked by scripts/qemu-7.2.sh (not installed; the system QEMU is untouched).
root='$root'
export LD_LIBRARY_PATH="\$root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "\$root/usr/bin/qemu-system-x86_64" -L "\$root/usr/share/qemu" -L "\$root/usr/share/seabios" -L "\$root/usr/lib/ipxe/qemu" "\$@"
EOF
  chmod 755 "$tmp"
  mv -f "$tmp" "$wrapper"
}

check() {
  local out missing
  out=$("$wrapper" --version | head -n 1)
  case "$out" in "QEMU emulator version 7.2"*) ;; *) die "$wrapper --version says: $out" ;; esac
  missing=$(LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu" ldd "$root/usr/bin/qemu-system-x86_64" \
    "$root"/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so | awk '/not found/ { print $1 }' | sort -u)
  [ -z "$missing" ] || die "libraries not found for QEMU 7.2: $(echo $missing)"
  log "$out"
}

if [ -x "$root/usr/bin/qemu-system-x86_64" ] && [ -f "$tree/.complete" ]; then
  if ! grep -qF "root='$root'" "$wrapper" 2>/dev/null; then write_wrapper; fi
  check
  printf '%s\n' "$wrapper"
  exit 0
fi

# Serialize unpackers; the rename below keeps a tree complete or absent even without flock.
if command -v flock >/dev/null; then
  exec 9>"$dir/.lock"
  flock 9
fi
if ! [ -f "$tree/.complete" ]; then
  apt_field() { # apt_field PKG=VERSION FIELD
    apt-cache show "$1" 2>/dev/null | awk -v f="$2" 'index($0, f ": ") == 1 { print substr($0, length(f) + 3); exit }'
  }
  data_version=$(newest_version qemu-system-data '1:7.2+')
  seabios_version=$(apt-cache madison seabios | awk -F'|' '$3 ~ /bookworm\/main/ && $3 !~ /backports/ { gsub(/ /, "", $2); print $2; exit }')
  ipxe_version=$(apt-cache madison ipxe-qemu | awk -F'|' '$3 ~ /bookworm\/main/ && $3 !~ /backports/ { gsub(/ /, "", $2); print $2; exit }')
  [ -n "$data_version" ] && [ -n "$seabios_version" ] && [ -n "$ipxe_version" ] ||
    die "apt lacks a bookworm version of qemu-system-data, seabios or ipxe-qemu"
  wanted=("qemu-system-x86=$version" "qemu-system-common=$version" "qemu-system-data=$data_version"
    "seabios=$seabios_version" "ipxe-qemu=$ipxe_version")
  # Libraries qemu-system-x86 depends on that the system lacks (none with QEMU 10.0 from backports
  # installed, but a machine without it may lack some): their candidate versions, unpacked alongside.
  deps=$(apt_field "qemu-system-x86=$version" Depends | tr ',' '\n' | sed -n 's/^ *\(lib[^ |]*\).*/\1/p')
  for p in $deps; do
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" = "ii " ] && continue
    log "library package $p is not installed; unpacking it too"
    wanted+=("$p")
  done

  work=$(mktemp -d "$dir/.unpack.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/debs" "$work/root"
  log "downloading ${wanted[*]}"
  # As root, apt drops to the _apt user, which cannot write into a private home; download as ourselves.
  (cd "$work/debs" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "${wanted[@]}" >&2)
  for f in "$work"/debs/*.deb; do
    dpkg-deb -x "$f" "$work/root"
  done
  [ -x "$work/root/usr/bin/qemu-system-x86_64" ] || die "the packages hold no usr/bin/qemu-system-x86_64"
  touch "$work/.complete"
  rm -rf "$work/debs" "$tree"
  mv "$work" "$tree"
  trap - EXIT
fi
write_wrapper
check
printf '%s\n' "$wrapper"
