#!/usr/bin/env bash
# Builds, once, the guest image the real-guest (e2e) tests boot under QEMU: a Debian kernel plus a small
# gzip'ed newc initramfs holding a static busybox, an /init, the virtio modules with their dependencies, and
# a few dynamically linked Debian tools busybox lacks (ethtool, sg3-utils, lsscsi) with the libraries they load.
#
# Usage: scripts/build-guest-image.sh
#   Prints the image directory as the last line of stdout; progress goes to stderr. The directory holds
#   vmlinuz (the bzImage), vmlinux (the same kernel uncompressed, booted through PVH when the kernel has it),
#   initramfs.cpio.gz and manifest.json, whose "kernel" names the file to boot and "modules" lists what
#   /init inserts, in order, as paths inside the guest.
#
# Environment:
#   VHOSTD_CACHE   cache root (default $HOME/.cache/vhostd). Images live in $VHOSTD_CACHE/guest/<key>/,
#                  downloaded .debs in $VHOSTD_CACHE/debs/.
#
# The cache key holds the kernel ABI name, the kernel and busybox package versions, a hash of the tool
# packages' versions and a hash of this file, so a kernel or tool update or a change to /init below builds a
# new image. The libraries come from apt's candidates at build time (manifest.json names them); a library
# update alone keeps the cached image, whose tools and libraries still match each other. An image directory is complete or absent:
# the build happens in a temporary directory that is renamed into place, under a lock when flock(1) exists,
# so test processes that start at once build it once and never see half an image.
#
# The per-test script is not part of this image: test/helpers/guest-image.ts appends a second cpio archive
# with the script to a copy of initramfs.cpio.gz (the kernel unpacks concatenated archives in order).
set -euo pipefail

# Modules the guest loads at boot, by name; their dependencies come from modprobe --show-depends.
MODULES=(virtio_pci virtio_blk virtio_net virtio_scsi sd_mod sg virtio-rng virtio_balloon)
# Debian packages with tools the tests run in the guest, and the programs taken from each (paths inside the
# package, kept as they are in the guest). The shared libraries they need come from the packages' Depends,
# chosen per program by the packaged dynamic loader's --list.
declare -A TOOLS=(
  [ethtool]="sbin/ethtool"
  [sg3-utils]="usr/bin/sg_inq usr/bin/sg_vpd usr/bin/sg_readcap usr/bin/sg_turs usr/bin/sg_reset usr/bin/sg_luns
    usr/bin/sg_modes usr/bin/sg_opcodes usr/bin/sg_requests usr/bin/sg_sync usr/bin/sg_unmap usr/bin/sg_verify
    usr/bin/sg_write_same usr/bin/sg_raw"
  [lsscsi]="usr/bin/lsscsi"
)
TOOL_PACKAGES=(ethtool lsscsi sg3-utils)

log() { printf 'build-guest-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-cache apt-get dpkg-deb depmod modprobe cpio gzip xz sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
done

cache=${VHOSTD_CACHE:-$HOME/.cache/vhostd}
debs=$cache/debs
images=$cache/guest
mkdir -p "$debs" "$images"

# One apt-cache call on the cached path (it reparses the package lists each time, about a second here): the
# candidate linux-image-amd64, whose Depends names the kernel package (and pins its version), busybox-static
# and the tool packages.
if ! meta=$(apt-cache show --no-all-versions linux-image-amd64 busybox-static "${TOOL_PACKAGES[@]}" 2>/dev/null); then
  # Without apt's lists (cleaned, or another distribution), the newest image already built still serves.
  newest=$(find "$images" -mindepth 2 -maxdepth 2 -name manifest.json -printf '%T@ %h\n' 2>/dev/null | sort -rn | head -n 1 | cut -d' ' -f2-)
  [ -n "$newest" ] || die "apt-cache knows no linux-image-amd64 or busybox-static (run apt-get update or scripts/install-deps.sh)"
  log "apt-cache knows no linux-image-amd64; using the newest cached image"
  printf '%s\n' "$newest"
  exit 0
fi
field() { # field PACKAGE FIELD [STANZAS]: a field of PACKAGE's stanza in STANZAS (default $meta)
  awk -v pkg="$1" -v field="$2" '
    /^Package: / { inpkg = ($2 == pkg) }
    inpkg && index($0, field ": ") == 1 { print substr($0, length(field) + 3); exit }' <<<"${3-$meta}"
}
kernel_dep=$(field linux-image-amd64 Depends)
kernel_pkg=$(sed -n 's/^\(linux-image-[^ ,]*\).*/\1/p' <<<"$kernel_dep")
kernel_pkg_version=$(sed -n 's/^linux-image-[^ ,]* (= \([^)]*\)).*/\1/p' <<<"$kernel_dep")
if [ -n "$kernel_pkg" ] && [ -z "$kernel_pkg_version" ]; then
  kernel_pkg_version=$(apt-cache show --no-all-versions "$kernel_pkg" | sed -n 's/^Version: //p' | head -n 1)
fi
busybox_version=$(field busybox-static Version)
[ -n "$kernel_pkg" ] || die "cannot resolve the kernel package of linux-image-amd64 (Depends: $kernel_dep)"
[ -n "$kernel_pkg_version" ] && [ -n "$busybox_version" ] || die "no candidate version for $kernel_pkg or busybox-static"
kernel_version=${kernel_pkg#linux-image-}
declare -A tool_versions=()
for pkg in "${TOOL_PACKAGES[@]}"; do
  tool_versions[$pkg]=$(field "$pkg" Version)
  [ -n "${tool_versions[$pkg]}" ] || die "apt-cache knows no $pkg (run apt-get update)"
done
tools_hash=$(for pkg in "${TOOL_PACKAGES[@]}"; do printf '%s=%s\n' "$pkg" "${tool_versions[$pkg]}"; done | sha256sum | cut -c1-8)

script_hash=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)
key=$(printf '%s_%s_bb%s_t%s_%s' "$kernel_version" "$kernel_pkg_version" "$busybox_version" "$tools_hash" "$script_hash" | tr ':+~/' '...-')
image=$images/$key

if [ -f "$image/manifest.json" ]; then
  printf '%s\n' "$image"
  exit 0
fi

# Serialize builders; the rename below keeps the result atomic even without flock.
if command -v flock >/dev/null; then
  exec 9>"$images/.lock"
  flock 9
  if [ -f "$image/manifest.json" ]; then
    printf '%s\n' "$image"
    exit 0
  fi
fi

# fetch_deb PKG VERSION: prints the path of PKG_VERSION's .deb in $debs, downloading it if needed.
fetch_deb() {
  local pkg=$1 version=$2 f dl
  for f in "$debs/${pkg}"_*.deb; do
    [ -e "$f" ] || continue
    if [ "$(dpkg-deb -f "$f" Package)" = "$pkg" ] && [ "$(dpkg-deb -f "$f" Version)" = "$version" ]; then
      printf '%s\n' "$f"
      return
    fi
  done
  log "downloading $pkg=$version"
  dl=$(mktemp -d "$debs/.download.XXXXXX")
  # As root, apt drops to the _apt user, which cannot write into a private home; download as ourselves.
  (cd "$dl" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "$pkg=$version" >&2)
  f=$(find "$dl" -maxdepth 1 -name '*.deb' | head -n 1)
  [ -n "$f" ] || die "apt-get download $pkg=$version produced no .deb"
  # Older versions of the same package are of no further use.
  find "$debs" -maxdepth 1 -name "${pkg}_*.deb" -delete
  mv "$f" "$debs/"
  rmdir "$dl"
  printf '%s\n' "$debs/$(basename "$f")"
}

kernel_deb=$(fetch_deb "$kernel_pkg" "$kernel_pkg_version")
busybox_deb=$(fetch_deb busybox-static "$busybox_version")
# The tools' Depends, first alternative each, without version constraints: their libraries (libc6, libmnl0,
# libsgutils2-*). One level is enough: a library a program loads that these packages lack fails the build below.
lib_packages=$(for pkg in "${TOOL_PACKAGES[@]}"; do field "$pkg" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*//; s/:any//; s/ //g'; done | sort -u)
lib_meta=$(apt-cache show --no-all-versions $lib_packages) || die "apt-cache cannot show the tools' dependencies: $lib_packages"
tool_debs=()
package_list=()
for pkg in "${TOOL_PACKAGES[@]}" $lib_packages; do
  version=${tool_versions[$pkg]:-$(field "$pkg" Version "$lib_meta")}
  [ -n "$version" ] || die "no candidate version for $pkg"
  tool_debs+=("$(fetch_deb "$pkg" "$version")")
  package_list+=("$pkg=$version")
done

work=$(mktemp -d "$images/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building $key in $work"

dpkg-deb -x "$kernel_deb" "$work/kernel"
dpkg-deb -x "$busybox_deb" "$work/busybox"
# All tool and library packages unpack into one tree, as they would install.
for deb in "${tool_debs[@]}"; do dpkg-deb -x "$deb" "$work/tools"; done
kroot=$work/kernel
[ -d "$kroot/lib/modules/$kernel_version" ] || die "$kernel_deb has no lib/modules/$kernel_version"
# The package ships no modules.dep (its postinst runs depmod); make one for modprobe --show-depends.
depmod -b "$kroot" "$kernel_version"

# Dependency order: each module after everything it needs, each loaded once.
declare -A seen=()
order=()
for m in "${MODULES[@]}"; do
  deps=$(modprobe --show-depends -d "$kroot" -S "$kernel_version" "$m") || die "modprobe cannot resolve $m"
  while read -r verb path _; do
    # "builtin NAME" lines are for modules compiled into the kernel: nothing to load.
    [ "$verb" = insmod ] || continue
    rel=${path#"$kroot"}
    [ -n "${seen[$rel]:-}" ] && continue
    seen[$rel]=1
    order+=("$rel")
  done <<<"$deps"
done

stage=$work/initramfs
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,mnt,vhostd}
cp "$work/busybox/bin/busybox" "$stage/bin/busybox"
for rel in "${order[@]}"; do
  mkdir -p "$stage$(dirname "$rel")"
  cp "$kroot$rel" "$stage$rel"
done
# A modules.dep inside the guest too, so a test can `modprobe` what it loaded by name.
for f in modules.order modules.builtin modules.builtin.modinfo; do
  cp "$kroot/lib/modules/$kernel_version/$f" "$stage/lib/modules/$kernel_version/"
done
depmod -b "$stage" "$kernel_version"
printf '%s\n' "${order[@]}" >"$stage/etc/vhostd-modules"

# The tools, at their packaged paths (`busybox --install -s` in /init does not replace an existing file; but
# Debian's busybox sh prefers its own applets to PATH, so a script runs the real lsscsi as /usr/bin/lsscsi,
# as busybox has an applet of that name), and every
# library each one loads, found by the unpacked loader's --list against the unpacked tree only. The host
# runs that loader, so this needs an x86_64 host, as the kernel does. Debian's loader searches
# /lib/x86_64-linux-gnu and /usr/lib/x86_64-linux-gnu without an ld.so.cache.
troot=$work/tools
in_tree() { # in_tree PATH: PATH inside $troot with its symlinks followed inside $troot (libc6's
  # lib64/ld-linux-x86-64.so.2 links to an absolute path, which outside the tree is the host's loader)
  local path=$1 target n=0
  while [ -L "$troot/$path" ]; do
    [ $((n += 1)) -le 16 ] || die "symlink loop at $path in the tools' packages"
    target=$(readlink "$troot/$path")
    case $target in
      /*) path=${target#/} ;;
      *) path=$(dirname "$path")/$target ;;
    esac
  done
  [ -f "$troot/$path" ] || die "$1 is not in the tools' packages ($lib_packages)"
  printf '%s\n' "$path"
}
declare -A staged=()
stage_file() { # stage_file PATH: copies the file $troot/PATH names to $stage/PATH, once
  local source
  [ -n "${staged[$1]:-}" ] && return
  staged[$1]=1
  source=$(in_tree "$1") || exit 1
  mkdir -p "$stage/$(dirname "$1")"
  cp "$troot/$source" "$stage/$1"
}
# The programs' PT_INTERP.
stage_file lib64/ld-linux-x86-64.so.2
loader=$(in_tree lib64/ld-linux-x86-64.so.2) || exit 1
loader=$troot/$loader
for pkg in "${TOOL_PACKAGES[@]}"; do
  for program in ${TOOLS[$pkg]}; do
    [ -f "$troot/$program" ] || die "$pkg has no $program"
    stage_file "$program"
    libs=$("$loader" --library-path "$troot/lib/x86_64-linux-gnu:$troot/usr/lib/x86_64-linux-gnu" --list "$troot/$program") ||
      die "the loader cannot list the libraries of $program: $libs"
    while read -r name arrow path _; do
      # Not linux-vdso.so.1 (the kernel's), nor the loader's own line (named by its absolute path, staged above).
      [ "$arrow" = '=>' ] && [ "${name#/}" = "$name" ] || continue
      case $path in
        "$troot"/*) stage_file "${path#"$troot"/}" ;;
        *) die "$program needs $name, which none of $lib_packages holds ($path)" ;;
      esac
    done <<<"$libs"
  done
done

# /init, PID 1 of the guest. Output goes to the serial console, which the host reads.
# Markers (parsed by test/helpers/qemu-guest.ts): "VHOSTD-GUEST-READY uptime=S" before the test script runs
# and "VHOSTD-GUEST-EXIT status=N" after it. The init never exits: it powers off, and a panic reboots,
# which QEMU's -no-reboot turns into an exit.
cat >"$stage/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ln -sf /proc/self/fd /dev/fd

while read -r module; do
  # A module may refuse an absent CPU feature (crct10dif-pclmul on TCG's default CPU); that is not fatal.
  insmod "$module" 2>/dev/null || echo "vhostd-guest: insmod ${module##*/} failed (ignored)"
done </etc/vhostd-modules
ip link set lo up 2>/dev/null

echo "VHOSTD-GUEST-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
status=0
if [ -f /vhostd/test.sh ]; then
  (cd /root && sh /vhostd/test.sh)
  status=$?
fi
# For a person at the console: a shell when there is no test script, or after it with vhostd.shell on the
# kernel command line. Leaving the shell powers the guest off.
if [ ! -f /vhostd/test.sh ] || grep -qw vhostd.shell /proc/cmdline; then
  echo "vhostd-guest: script status $status; interactive shell, exit to power off"
  (cd /root && setsid cttyhack sh -l)
fi
echo "VHOSTD-GUEST-EXIT status=$status"
sync
# tcsetattr(TCSADRAIN): wait until the serial port has sent everything before the power goes.
stty -F /dev/console onlcr 2>/dev/null
poweroff -f
INIT
chmod 0755 "$stage/init"

mkdir "$work/out"
mv "$kroot/boot/vmlinuz-$kernel_version" "$work/out/vmlinuz"
# QEMU boots an uncompressed ELF vmlinux through its PVH entry point, skipping the real-mode setup and the
# in-guest decompression, which under TCG cost seconds per boot (measured here: about 4 s wall instead of 10).
# Debian compresses the kernel with xz; the payload starts at the first xz magic in the bzImage.
boot_kernel=vmlinuz
if grep -q '^CONFIG_PVH=y' "$kroot/boot/config-$kernel_version"; then
  xz_offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$work/out/vmlinuz" | head -n 1 | cut -d: -f1 || true)
  if [ -n "$xz_offset" ] &&
    xz -dc --single-stream < <(tail -c "+$((xz_offset + 1))" "$work/out/vmlinuz") >"$work/out/vmlinux" 2>/dev/null &&
    [ "$(head -c 4 "$work/out/vmlinux")" = $'\x7fELF' ]; then
    boot_kernel=vmlinux
  else
    log "cannot extract an ELF vmlinux from the bzImage; the guest boots the slower bzImage"
    rm -f "$work/out/vmlinux"
  fi
fi
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) \
  | gzip -9n >"$work/out/initramfs.cpio.gz"
modules_json=$(printf '"%s",' "${order[@]}")
cat >"$work/out/manifest.json" <<JSON
{
  "key": "$key",
  "kernelVersion": "$kernel_version",
  "kernelPackage": "$kernel_pkg=$kernel_pkg_version",
  "busyboxPackage": "busybox-static=$busybox_version",
  "toolPackages": [$(printf '"%s",' "${package_list[@]}" | sed 's/,$//')],
  "kernel": "$boot_kernel",
  "initrd": "initramfs.cpio.gz",
  "modules": [${modules_json%,}]
}
JSON

if mv -T "$work/out" "$image" 2>/dev/null; then
  log "built $image ($(du -sh "$image" | cut -f1))"
elif [ -f "$image/manifest.json" ]; then
  log "another process built $image first"
else
  die "cannot move the image into $image"
fi
printf '%s\n' "$image"
