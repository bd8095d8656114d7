#!/usr/bin/env bash
# Installs what vhostd's build and tests need on Debian 12 (bookworm), as root, without questions:
#   - from bookworm-backports: qemu-system-x86 qemu-system-common qemu-utils (QEMU 10.0, which has the
#     vhost-user front-ends we test against and qemu-storage-daemon);
#   - from bookworm: the native addon's toolchain (make g++ python3 liburing-dev), the guest image's tools
#     (busybox-static cpio kmod xz-utils), systemd (systemd-analyze verify for the unit files), iproute2
#     and mount (losetup, for the test of a block device's size and sector size), DPDK's testpmd with its
#     vhost and tap drivers (dpdk-dev librte-net-vhost23 librte-net-tap23 librte-mempool-ring23: bench:net's
#     reference) and its virtio-user driver with the vdev bus it sits on (librte-net-virtio23
#     librte-bus-vdev23: the second front-end of test/daemons/net/dpdk-interop.test.ts). testpmd loads
#     the net and mempool drivers as plugins from /usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0 (ldd lists none).
# Idempotent: when everything is there it touches nothing and returns in well under a second. It also runs
# `apt-get update` when apt does not yet know linux-image-amd64, which the guest image build downloads.
#
# Environment: VHOSTD_APT_MIRROR overrides the Debian mirror used for bookworm-backports (default: the
# mirror of /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list).
set -euo pipefail

BACKPORTS_PACKAGES=(qemu-system-x86 qemu-system-common qemu-utils)
# The lowest QEMU the backports install must reach; bookworm itself has 7.2.
MIN_QEMU_VERSION=1:10.0
PACKAGES=(liburing-dev busybox-static cpio kmod xz-utils systemd iproute2 mount python3 make g++
  dpdk-dev librte-net-vhost23 librte-net-tap23 librte-mempool-ring23 librte-net-virtio23 librte-bus-vdev23)
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { printf 'install-deps: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    exec sudo -n -E bash "$0" "$@"
  fi
  die "must run as root (or with password-less sudo)"
fi

# shellcheck disable=SC1091
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || die "this script knows Debian 12 (bookworm); this is ${PRETTY_NAME:-unknown}"

installed() { # installed PKG: is PKG fully installed?
  [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
}

installed_version() {
  dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true
}

# Is there an active bookworm-backports entry in apt's sources (one-line or deb822 format)?
has_backports_source() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    case "$f" in
      *.sources)
        # Only stanzas that are not disabled with "Enabled: no".
        awk 'BEGIN { RS = "" }
             /(^|\n)Suites:[^\n]*bookworm-backports/ && !/(^|\n)Enabled:[ \t]*no/ { found = 1 }
             END { exit !found }' "$f" && return 0 ;;
      *)
        grep -Eq '^[[:space:]]*deb[[:space:]].*[[:space:]]bookworm-backports([[:space:]]|$)' "$f" && return 0 ;;
    esac
  done
  return 1
}

# The Debian mirror of the bookworm entry, so backports come from the same place as everything else.
debian_mirror() {
  if [ -n "${VHOSTD_APT_MIRROR:-}" ]; then
    printf '%s\n' "$VHOSTD_APT_MIRROR"
    return
  fi
  local uri=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk 'BEGIN { RS = "" }
               /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t]|\n|$)/ {
                 if (match($0, /(^|\n)URIs:[ \t]*[^ \t\n]+/)) {
                   s = substr($0, RSTART, RLENGTH); sub(/^\n?URIs:[ \t]*/, "", s); print s; exit
                 }
               }' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/ && $i ~ /:\/\//) { if ($(i + 1) == "bookworm") { print $i; exit } } }' /etc/apt/sources.list)
  fi
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

need_update=0
missing_backports=()
missing=()

for p in "${BACKPORTS_PACKAGES[@]}"; do
  v=$(installed_version "$p")
  if ! installed "$p" || ! dpkg --compare-versions "$v" ge "$MIN_QEMU_VERSION"; then
    missing_backports+=("$p")
  fi
done
command -v qemu-storage-daemon >/dev/null || missing_backports+=(qemu-utils)
for p in "${PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done

if [ "${#missing_backports[@]}" -gt 0 ] && ! has_backports_source; then
  mirror=$(debian_mirror)
  log "adding bookworm-backports from $mirror"
  printf 'deb [signed-by=%s] %s bookworm-backports main\n' "$KEYRING" "$mirror" >/etc/apt/sources.list.d/vhostd-bookworm-backports.list
  need_update=1
fi
if [ "$(( ${#missing_backports[@]} + ${#missing[@]} ))" -gt 0 ]; then
  need_update=1
fi
# The guest image build asks apt for linux-image-amd64 and downloads it: apt's lists must know it.
if [ "$need_update" -eq 0 ] && ! apt-cache show --no-all-versions linux-image-amd64 >/dev/null 2>&1; then
  need_update=1
fi

if [ "$need_update" -eq 0 ]; then
  log "everything is installed (QEMU $(installed_version qemu-system-x86))"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -q -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"; }

log "apt-get update"
apt_get update
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing from bookworm: ${missing[*]}"
  apt_get install --no-install-recommends "${missing[@]}"
fi
if [ "${#missing_backports[@]}" -gt 0 ]; then
  # All three at once: they pin each other's exact version. No recommends: they pull in GUI and GL stacks.
  log "installing from bookworm-backports: ${BACKPORTS_PACKAGES[*]}"
  apt_get install --no-install-recommends -t bookworm-backports "${BACKPORTS_PACKAGES[@]}"
fi

qemu_version=$(installed_version qemu-system-x86)
dpkg --compare-versions "$qemu_version" ge "$MIN_QEMU_VERSION" || die "qemu-system-x86 is $qemu_version, below $MIN_QEMU_VERSION"
command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon is missing after the install"
log "done (QEMU $qemu_version)"
