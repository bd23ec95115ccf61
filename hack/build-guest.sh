#!/usr/bin/env bash
# Builds the guest image: Debian's cloud kernel (vmlinuz) and an initrd whose /init is
# kata-agent, carrying the kernel modules the agent loads at boot in dependency order, and
# Debian's static busybox as /bin/sh with its applets (the shell of the debug console,
# `[agent.kata] debug_console_enabled`; about 1 MiB of the initrd's size).
#
# Usage: hack/build-guest.sh [--install] [--force] [--root DIR] [--no-build]
#   --install   also copy to /usr/share/kata-containers/{vmlinuz.container,kata-containers-initrd.img}
#               (hack/uninstall.sh removes them)
#   --force     rebuild even if the inputs did not change
#   --root DIR  install under DIR as if it were / (a staging or test root)
#   --no-build  install the image already built in the output directory, without building
# Environment:
#   GUEST_BUILD_DIR   output directory (default <repo>/build/guest)
#   KERNEL_PACKAGE    Debian kernel metapackage (default linux-image-cloud-amd64)
#   BUSYBOX_PACKAGE   Debian static busybox package (default busybox-static)
# Network: only `apt-get download` (Debian's archive).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${GUEST_BUILD_DIR:-$repo/build/guest}
meta_pkg=${KERNEL_PACKAGE:-linux-image-cloud-amd64}
busybox_pkg=${BUSYBOX_PACKAGE:-busybox-static}
install=0 force=0 build=1 root=''
while [[ $# -gt 0 ]]; do
  case $1 in
    --install) install=1; shift ;;
    --force) force=1; shift ;;
    --no-build) build=0; shift ;;
    --root) root=${2:?--root needs a directory}; root=${root%/}; shift 2 ;;
    *) echo "build-guest: unknown argument '$1' (expected --install, --force, --root DIR or --no-build)" >&2; exit 2 ;;
  esac
done

# The modules the agent loads, by name; their dependencies are added from modules.dep.
# vxlan: the pod network of a peer pod VM (hack/build-podvm.sh uses this same image).
MODULES=(virtio_pci vmw_vsock_virtio_transport virtiofs virtio_net virtio_mem overlay virtio_rng virtio_console virtio_blk pvpanic_mmio vxlan)

export PATH=$PATH:/usr/sbin:/sbin
log() { echo "build-guest: $*" >&2; }

install_image() {
  local dest=$root/usr/share/kata-containers
  mkdir -p "$dest"
  install -m 0644 "$out/vmlinuz" "$dest/vmlinuz.container"
  install -m 0644 "$out/initrd.img" "$dest/kata-containers-initrd.img"
  log "installed to $dest"
}
if [[ $build == 0 ]]; then
  [[ -f $out/vmlinuz && -f $out/initrd.img ]] || { log "no guest image in $out: run hack/build-guest.sh"; exit 1; }
  [[ $install == 1 ]] && install_image
  exit 0
fi
for tool in apt-get dpkg-deb depmod cpio zstd cargo; do
  command -v "$tool" >/dev/null || { log "missing tool '$tool': run hack/install-deps.sh"; exit 1; }
done

mkdir -p "$out/cache"

# 1. The kernel package (the metapackage names the versioned image package). With stale or
#    missing package lists, refresh them once and try again.
fetch_kernel() {
  kpkg=$(apt-cache depends "$meta_pkg" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  [[ -n "$kpkg" ]] || return 1
  deb=$(ls "$out"/cache/"${kpkg}"_*.deb 2>/dev/null | head -1 || true)
  if [[ -z "$deb" ]]; then
    log "downloading $kpkg"
    (cd "$out/cache" && apt-get download -q "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    deb=$(ls "$out"/cache/"${kpkg}"_*.deb 2>/dev/null | head -1 || true)
  fi
  [[ -n "$deb" ]]
}
if ! fetch_kernel; then
  apt-get update -qq
  fetch_kernel || { log "cannot download the kernel package behind '$meta_pkg'"; exit 1; }
fi

# 1b. Static busybox: the debug console's /bin/sh.
fetch_busybox() {
  bbdeb=$(ls "$out"/cache/"${busybox_pkg}"_*.deb 2>/dev/null | head -1 || true)
  if [[ -z "$bbdeb" ]]; then
    log "downloading $busybox_pkg"
    (cd "$out/cache" && apt-get download -q "$busybox_pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    bbdeb=$(ls "$out"/cache/"${busybox_pkg}"_*.deb 2>/dev/null | head -1 || true)
  fi
  [[ -n "$bbdeb" ]]
}
if ! fetch_busybox; then
  apt-get update -qq
  fetch_busybox || { log "cannot download '$busybox_pkg'"; exit 1; }
fi

# 2. The agent, static (glibc +crt-static; no musl target here).
log "building kata-agent (static)"
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --quiet --release -p kata-agent --target x86_64-unknown-linux-gnu)
agent=$repo/target/x86_64-unknown-linux-gnu/release/kata-agent
if ! file_out=$(LC_ALL=C readelf -d "$agent" 2>/dev/null) || grep -q NEEDED <<<"$file_out"; then
  log "kata-agent is not statically linked: $agent"; exit 1
fi

# Skip the rest when neither the kernel package, the agent nor this script changed.
stamp=$(sha256sum "$deb" "$bbdeb" "$agent" "$0" | sha256sum | cut -d' ' -f1)
if [[ $force == 0 && -f "$out/stamp" && "$(cat "$out/stamp")" == "$stamp" && -f "$out/vmlinuz" && -f "$out/initrd.img" ]]; then
  log "guest image up to date in $out"
else
  work=$(mktemp -d "$out/work.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  dpkg-deb -x "$deb" "$work/kernel"
  kver=$(ls "$work/kernel/lib/modules")
  depmod -b "$work/kernel" "$kver"
  moddir=$work/kernel/lib/modules/$kver
  cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"

  # Resolve each module's path and its dependencies (modules.dep is transitive), depth first.
  declare -A seen=()
  order=()
  add_module() { # $1: path relative to $moddir
    local rel=$1 line dep
    [[ -n ${seen[$rel]:-} ]] && return
    seen[$rel]=1
    line=$(grep -m1 "^$rel:" "$moddir/modules.dep") || { log "module $rel not in modules.dep"; exit 1; }
    for dep in ${line#*:}; do add_module "$dep"; done
    order+=("$rel")
  }
  for m in "${MODULES[@]}"; do
    pat=${m//_/[-_]}   # file names may use '-' where module names use '_'
    rel=$(grep -m1 -E "(^|/)$pat\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | cut -d: -f1) || true
    if [[ -z "$rel" ]]; then
      grep -qE "(^|/)$pat\.ko" "$moddir/modules.builtin" && continue
      log "module $m is neither in modules.dep nor built in"; exit 1
    fi
    add_module "$rel"
  done

  root=$work/initrd
  mkdir -p "$root"/{proc,sys,dev,run,tmp,etc/kata-agent,lib/modules/"$kver"}
  install -m 0755 "$agent" "$root/init"
  mknod -m 600 "$root/dev/console" c 5 1
  mknod -m 666 "$root/dev/null" c 1 3
  : >"$root/etc/kata-agent/modules"
  for rel in "${order[@]}"; do
    dest=/lib/modules/$kver/$(basename "${rel%%.ko*}").ko
    case $rel in
      *.ko) cp "$moddir/$rel" "$root$dest" ;;
      *.ko.xz) xz -dc "$moddir/$rel" >"$root$dest" ;;
      *.ko.zst) zstd -qdc "$moddir/$rel" >"$root$dest" ;;
      *) log "unsupported module file $rel"; exit 1 ;;
    esac
    echo "$dest" >>"$root/etc/kata-agent/modules"
  done
  echo "$kver" >"$root/etc/kata-agent/kernel-release"

  # busybox as /bin/sh and its applets (symlinks; existing files win).
  dpkg-deb -x "$bbdeb" "$work/busybox"
  bb=$work/busybox/bin/busybox
  if ! bb_dyn=$(LC_ALL=C readelf -d "$bb" 2>/dev/null) || grep -q NEEDED <<<"$bb_dyn"; then
    log "busybox from $bbdeb is not statically linked"; exit 1
  fi
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin}
  install -m 0755 "$bb" "$root/bin/busybox"
  while read -r applet; do
    [[ -e "$root$applet" || -L "$root$applet" ]] || ln -s /bin/busybox "$root$applet"
  done < <("$bb" --list-full | grep -vxE 'linuxrc|sbin/init' | sed 's|^|/|')
  [[ -L "$root/bin/sh" ]] || { log "busybox has no sh applet"; exit 1; }
  (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner 0:0) \
    | zstd -q -19 -T0 >"$work/initrd.img"
  mv "$work/vmlinuz" "$out/vmlinuz"
  mv "$work/initrd.img" "$out/initrd.img"
  echo "$kver" >"$out/kernel-release"
  echo "$stamp" >"$out/stamp"
  log "built $out/vmlinuz and $out/initrd.img (kernel $kver, ${#order[@]} modules, initrd $(du -h "$out/initrd.img" | cut -f1))"
fi

if [[ $install == 1 ]]; then
  install_image
fi
