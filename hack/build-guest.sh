#!/usr/bin/env bash
# Builds the guest: a kernel and the root filesystem whose /init is kata-agent, with
# Debian's static busybox as /bin/sh and its applets (the shell of the debug console,
# `[agent.kata] debug_console_enabled`; about 1 MiB).
#
# Usage: hack/build-guest.sh [--kernel kata|debian] [--install] [--force] [--root DIR] [--no-build]
#   --kernel kata    (the default) our kernel, built from Debian's linux-source-6.1:
#                    tinyconfig plus hack/guest/kernel.fragment, no modules, no debug info,
#                    booted directly as an uncompressed vmlinux (PVH). Root filesystem:
#                    rootfs.img, a read-only EROFS image the VM maps as a virtio-pmem device
#                    and mounts in place (DAX); initrd.img holds the same files for the
#                    initrd boot path.
#   --kernel debian  Debian's cloud kernel (vmlinuz) with initrd.img carrying the modules
#                    the agent loads at boot; kept for comparison.
#   --install        also copy to /usr/share/kata-containers (kata: vmlinux.container,
#                    kata-containers.img, kata-containers-initrd.img; debian:
#                    vmlinuz.container, kata-containers-initrd.img; hack/uninstall.sh
#                    removes them)
#   --force          rebuild the image even if its inputs did not change (a cached kernel
#                    is reused: remove its directory under KERNEL_CACHE_DIR to rebuild it)
#   --root DIR       install under DIR as if it were / (a staging or test root)
#   --no-build       install the guest already built in the output directory, without
#                    building (the flavour recorded there unless --kernel says otherwise)
# Environment:
#   GUEST_BUILD_DIR   output directory (default <repo>/build/guest)
#   GUEST_KERNEL      kata | debian: the default of --kernel
#   KERNEL_CACHE_DIR  built kernels by key, source trees and the build tree
#                     (default ${XDG_CACHE_HOME:-$HOME/.cache}/kata-rs/guest-kernel)
#   KERNEL_JOBS       make -j for the kernel (default: the CPU count)
#   KERNEL_PACKAGE    Debian kernel metapackage for --kernel debian (default linux-image-cloud-amd64)
#   BUSYBOX_PACKAGE   Debian static busybox package (default busybox-static)
# Output in GUEST_BUILD_DIR: the kernel (vmlinux or vmlinuz), rootfs.img (kata only),
# initrd.img, kernel-release, kernel-flavour (kata | debian), kernel.config.
# The kernel is cached under a key of its inputs (fragment, source package version,
# compiler, recipe): warm reruns and other worktrees on this machine skip the build.
# Network: only Debian's archive (apt-get download: busybox, and the kernel for --kernel debian).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${GUEST_BUILD_DIR:-$repo/build/guest}
flavour=${GUEST_KERNEL:-}
meta_pkg=${KERNEL_PACKAGE:-linux-image-cloud-amd64}
busybox_pkg=${BUSYBOX_PACKAGE:-busybox-static}
cache=${KERNEL_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:?set HOME, XDG_CACHE_HOME or KERNEL_CACHE_DIR}/.cache}/kata-rs/guest-kernel}
fragment=$repo/hack/guest/kernel.fragment
src_pkg=linux-source-6.1
# Bump when the kernel recipe below changes in a way the key does not see.
KERNEL_RECIPE=1
install=0 force=0 build=1 dest_root=''
while [[ $# -gt 0 ]]; do
  case $1 in
    --kernel) flavour=${2:-}; shift 2 || { echo "build-guest: --kernel needs kata or debian" >&2; exit 2; } ;;
    --kernel=*) flavour=${1#--kernel=}; shift ;;
    --install) install=1; shift ;;
    --force) force=1; shift ;;
    --no-build) build=0; shift ;;
    --root) dest_root=${2:?--root needs a directory}; dest_root=${dest_root%/}; shift 2 ;;
    *) echo "build-guest: unknown argument '$1' (expected --kernel kata|debian, --install, --force, --root DIR or --no-build)" >&2; exit 2 ;;
  esac
done
if [[ -z $flavour ]]; then
  flavour=kata
  # --no-build installs what the output directory holds.
  if [[ $build == 0 && -f $out/kernel-flavour ]]; then flavour=$(cat "$out/kernel-flavour"); fi
fi
case $flavour in
  kata | debian) ;;
  *) echo "build-guest: unknown kernel '$flavour' (expected kata or debian)" >&2; exit 2 ;;
esac

export PATH=$PATH:/usr/sbin:/sbin
log() { echo "build-guest: $*" >&2; }
need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { log "missing tool '$tool': run hack/install-deps.sh"; exit 1; }
  done
}

# The modules the agent loads from Debian's kernel, by name; their dependencies are added
# from modules.dep. Our kernel has all of this built in.
# vxlan: the pod network of a peer pod VM (hack/build-podvm.sh uses this same image).
DEBIAN_MODULES=(virtio_pci vmw_vsock_virtio_transport virtiofs virtio_net virtio_mem overlay virtio_rng virtio_console virtio_blk pvpanic_mmio vxlan)

# The files of each flavour in the output directory.
outputs=(initrd.img)
if [[ $flavour == kata ]]; then outputs+=(vmlinux rootfs.img); else outputs+=(vmlinuz); fi

install_image() {
  local dest=$dest_root/usr/share/kata-containers
  mkdir -p "$dest"
  # put FILE MODE NAME: a new file renamed over the old one, never rewritten in place
  # (running VMs map the image and would see it change under them).
  put() {
    install -m "$2" "$1" "$dest/.$3.tmp"
    mv -f "$dest/.$3.tmp" "$dest/$3"
  }
  # The other flavour's files go: kata-containers-initrd.img is replaced by this flavour's,
  # so a configuration still naming the other kernel fails at once ("guest kernel ... not
  # found") instead of booting a kernel whose drivers the new initrd does not carry.
  local stale=()
  if [[ $flavour == kata ]]; then
    put "$out/vmlinux" 0644 vmlinux.container
    put "$out/rootfs.img" 0444 kata-containers.img
    stale=(vmlinuz.container)
  else
    put "$out/vmlinuz" 0644 vmlinuz.container
    stale=(vmlinux.container kata-containers.img)
  fi
  put "$out/initrd.img" 0644 kata-containers-initrd.img
  for f in "${stale[@]}"; do
    if [[ -e $dest/$f ]]; then
      rm -f "$dest/$f"
      log "removed $dest/$f (the other kernel flavour's)"
    fi
  done
  log "installed the $flavour guest to $dest"
}
if [[ $build == 0 ]]; then
  for f in "${outputs[@]}"; do
    [[ -f $out/$f ]] || { log "no $flavour guest in $out ($f missing): run hack/build-guest.sh --kernel $flavour"; exit 1; }
  done
  [[ $install == 1 ]] && install_image
  exit 0
fi
need cpio zstd cargo readelf
mkdir -p "$out"

# --- Debian's kernel package ------------------------------------------------------------
# The metapackage names the versioned image package; with stale or missing package lists,
# refresh them once and try again. Sets `deb`.
fetch_debian_kernel() {
  local kpkg
  kpkg=$(apt-cache depends "$meta_pkg" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  [[ -n "$kpkg" ]] || return 1
  mkdir -p "$out/cache"
  deb=$(ls "$out"/cache/"${kpkg}"_*.deb 2>/dev/null | head -1 || true)
  if [[ -z "$deb" ]]; then
    log "downloading $kpkg"
    (cd "$out/cache" && apt-get download -q "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    deb=$(ls "$out"/cache/"${kpkg}"_*.deb 2>/dev/null | head -1 || true)
  fi
  [[ -n "$deb" ]]
}

# --- Static busybox: the debug console's /bin/sh. Sets `bbdeb`. ------------------------
fetch_busybox() {
  mkdir -p "$out/cache"
  bbdeb=$(ls "$out"/cache/"${busybox_pkg}"_*.deb 2>/dev/null | head -1 || true)
  if [[ -z "$bbdeb" ]]; then
    log "downloading $busybox_pkg"
    (cd "$out/cache" && apt-get download -q "$busybox_pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
    bbdeb=$(ls "$out"/cache/"${busybox_pkg}"_*.deb 2>/dev/null | head -1 || true)
  fi
  [[ -n "$bbdeb" ]]
}
need apt-get dpkg-deb
if ! fetch_busybox; then
  apt-get update -qq
  fetch_busybox || { log "cannot download '$busybox_pkg'"; exit 1; }
fi

# --- Our kernel -------------------------------------------------------------------------
# check_fragment CONFIG: every line of the fragment survived olddefconfig in CONFIG.
check_fragment() {
  local config=$1 line name lost=()
  while IFS= read -r line; do
    case $line in
      CONFIG_*=*) grep -qxF -- "$line" "$config" || lost+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$config" || echo unset))") ;;
      "# CONFIG_"*" is not set")
        name=${line#\# }
        name=${name%% *}
        if grep -q "^$name=" "$config"; then lost+=("$line (got: $(grep "^$name=" "$config"))"); fi
        ;;
    esac
  done <"$fragment"
  if ((${#lost[@]})); then
    log "options of $fragment that did not survive olddefconfig (a missing dependency, a select, or a renamed option):"
    printf '  %s\n' "${lost[@]}" >&2
    return 1
  fi
}

# Builds the kernel unless the cache has it; sets `kdir` to the directory holding vmlinux,
# config and release.
build_kernel() {
  local src_ver tarball key srcdir objdir t0 jobs
  src_ver=$(dpkg-query -W -f='${Version}' "$src_pkg" 2>/dev/null) || {
    log "package $src_pkg is not installed: run hack/install-deps.sh"; exit 1; }
  tarball=/usr/src/$src_pkg.tar.xz
  [[ -f $tarball ]] || { log "$tarball missing (package $src_pkg $src_ver)"; exit 1; }
  need make gcc ld flex bison bc
  key=$({ echo "recipe $KERNEL_RECIPE"; echo "source $src_pkg $src_ver"; gcc --version | head -1
    ld --version | head -1; cat "$fragment"; } | sha256sum | cut -c1-16)
  kdir=$cache/$key
  [[ -f $kdir/vmlinux ]] && { log "kernel $key cached in $kdir"; return; }

  mkdir -p "$cache"
  # One kernel build at a time on this machine (worktrees share the cache).
  exec 9>"$cache/lock"
  flock 9
  [[ -f $kdir/vmlinux ]] && { exec 9>&-; log "kernel $key cached in $kdir"; return; }
  t0=$(date +%s)
  srcdir=$cache/src-$src_ver
  if [[ ! -f $srcdir/Makefile ]]; then
    log "extracting $tarball"
    rm -rf "$cache"/src-* "$cache"/obj-* "$cache/src.tmp"
    mkdir -p "$cache/src.tmp"
    tar -xf "$tarball" -C "$cache/src.tmp" --strip-components=1
    mv "$cache/src.tmp" "$srcdir"
  fi
  # One build tree per source version, reused across configurations (incremental).
  objdir=$cache/obj-$src_ver
  mkdir -p "$objdir"
  jobs=${KERNEL_JOBS:-$(nproc)}
  local mk=(make -s -C "$srcdir" O="$objdir" ARCH=x86_64 KBUILD_BUILD_USER=kata-rs KBUILD_BUILD_HOST=build)
  log "configuring the kernel ($src_pkg $src_ver, key $key): tinyconfig + ${fragment#"$repo"/}"
  if ! { "${mk[@]}" tinyconfig && "$srcdir/scripts/kconfig/merge_config.sh" -m -O "$objdir" \
    "$objdir/.config" "$fragment" && "${mk[@]}" olddefconfig; } >"$cache/config.log" 2>&1; then
    cat "$cache/config.log" >&2
    log "configuring the kernel failed"
    exit 1
  fi
  check_fragment "$objdir/.config" || exit 1
  log "building vmlinux with $jobs jobs (several minutes on a cold cache)"
  if ! "${mk[@]}" -j"$jobs" vmlinux >"$cache/build.log" 2>&1; then
    tail -n 30 "$cache/build.log" >&2
    log "kernel build failed; full log: $cache/build.log"
    exit 1
  fi
  # QEMU boots the uncompressed image through its PVH entry point (the Xen ELF note).
  if ! readelf -n "$objdir/vmlinux" | grep -q '^  Xen '; then
    log "$objdir/vmlinux has no PVH entry note (CONFIG_PVH missing?)"; exit 1
  fi
  rm -rf "$kdir.tmp"
  mkdir -p "$kdir.tmp"
  cp "$objdir/vmlinux" "$kdir.tmp/vmlinux"
  cp "$objdir/.config" "$kdir.tmp/config"
  "${mk[@]}" -s kernelrelease >"$kdir.tmp/release"
  echo "$(($(date +%s) - t0))" >"$kdir.tmp/build-seconds"
  mv "$kdir.tmp" "$kdir"
  exec 9>&-
  log "built kernel $(cat "$kdir/release") in $(cat "$kdir/build-seconds") s (key $key)"
}

# --- The agent, static (glibc +crt-static; no musl target here) --------------------------
log "building kata-agent (static)"
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --quiet --release -p kata-agent --target x86_64-unknown-linux-gnu)
agent=$repo/target/x86_64-unknown-linux-gnu/release/kata-agent
if ! file_out=$(LC_ALL=C readelf -d "$agent" 2>/dev/null) || grep -q NEEDED <<<"$file_out"; then
  log "kata-agent is not statically linked: $agent"; exit 1
fi

if [[ $flavour == kata ]]; then
  need mkfs.erofs
  build_kernel
  kernel_input=$kdir/vmlinux
else
  need depmod
  if ! fetch_debian_kernel; then
    apt-get update -qq
    fetch_debian_kernel || { log "cannot download the kernel package behind '$meta_pkg'"; exit 1; }
  fi
  kernel_input=$deb
fi

# Skip the rest when neither the kernel, the agent nor this script changed.
stamp=$({ echo "$flavour"; sha256sum "$kernel_input" "$bbdeb" "$agent" "$0"; } | sha256sum | cut -d' ' -f1)
up_to_date=0
if [[ $force == 0 && -f "$out/stamp" && "$(cat "$out/stamp")" == "$stamp" ]]; then
  up_to_date=1
  for f in "${outputs[@]}" kernel.config; do [[ -f $out/$f ]] || up_to_date=0; done
fi

# stage_root DIR RELEASE: the files of the guest's root filesystem (agent as /init,
# busybox as /bin/sh and its applets).
stage_root() {
  local root=$1 release=$2 bb applet
  mkdir -p "$root"/{proc,sys,dev,run,tmp,etc/kata-agent,bin,sbin,usr/bin,usr/sbin}
  install -m 0755 "$agent" "$root/init"
  mknod -m 600 "$root/dev/console" c 5 1
  mknod -m 666 "$root/dev/null" c 1 3
  echo "$release" >"$root/etc/kata-agent/kernel-release"
  : >"$root/etc/kata-agent/modules"
  dpkg-deb -x "$bbdeb" "$work/busybox"
  bb=$work/busybox/bin/busybox
  if ! bb_dyn=$(LC_ALL=C readelf -d "$bb" 2>/dev/null) || grep -q NEEDED <<<"$bb_dyn"; then
    log "busybox from $bbdeb is not statically linked"; exit 1
  fi
  install -m 0755 "$bb" "$root/bin/busybox"
  while read -r applet; do
    [[ -e "$root$applet" || -L "$root$applet" ]] || ln -s /bin/busybox "$root$applet"
  done < <("$bb" --list-full | grep -vxE 'linuxrc|sbin/init' | sed 's|^|/|')
  [[ -L "$root/bin/sh" ]] || { log "busybox has no sh applet"; exit 1; }
}

# pack_initrd DIR FILE
pack_initrd() {
  (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner 0:0) |
    zstd -q -19 -T0 >"$2"
}

if ((up_to_date)); then
  log "guest image up to date in $out"
else
  work=$(mktemp -d "$out/work.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  if [[ $flavour == kata ]]; then
    release=$(cat "$kdir/release")
    cp "$kdir/vmlinux" "$work/vmlinux"
    cp "$kdir/config" "$work/kernel.config"
    stage_root "$work/root" "$release"
    echo "# $release: every driver is built in" >"$work/root/etc/kata-agent/modules"
    # Regular files uncompressed and never inlined in metadata blocks, so that DAX maps
    # every page of the agent straight from the host's page cache. The file is padded
    # (sparse) to a multiple of 128 MiB: the device sits in the VM's memory hotplug area,
    # and DIMMs hot-added after it must stay aligned to the guest's memory sections.
    mkfs.erofs --quiet -E noinline_data -T 0 --all-root "$work/rootfs.img" "$work/root"
    truncate -s %128M "$work/rootfs.img"
    pack_initrd "$work/root" "$work/initrd.img"
    rm -f "$out/vmlinuz"
  else
    dpkg-deb -x "$deb" "$work/kernel"
    release=$(ls "$work/kernel/lib/modules")
    depmod -b "$work/kernel" "$release"
    moddir=$work/kernel/lib/modules/$release
    cp "$work/kernel/boot/vmlinuz-$release" "$work/vmlinuz"
    cp "$work/kernel/boot/config-$release" "$work/kernel.config"

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
    for m in "${DEBIAN_MODULES[@]}"; do
      pat=${m//_/[-_]} # file names may use '-' where module names use '_'
      rel=$(grep -m1 -E "(^|/)$pat\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | cut -d: -f1) || true
      if [[ -z "$rel" ]]; then
        grep -qE "(^|/)$pat\.ko" "$moddir/modules.builtin" && continue
        log "module $m is neither in modules.dep nor built in"; exit 1
      fi
      add_module "$rel"
    done

    root=$work/root
    stage_root "$root" "$release"
    mkdir -p "$root/lib/modules/$release"
    for rel in "${order[@]}"; do
      dest=/lib/modules/$release/$(basename "${rel%%.ko*}").ko
      case $rel in
        *.ko) cp "$moddir/$rel" "$root$dest" ;;
        *.ko.xz) xz -dc "$moddir/$rel" >"$root$dest" ;;
        *.ko.zst) zstd -qdc "$moddir/$rel" >"$root$dest" ;;
        *) log "unsupported module file $rel"; exit 1 ;;
      esac
      echo "$dest" >>"$root/etc/kata-agent/modules"
    done
    pack_initrd "$root" "$work/initrd.img"
    rm -f "$out/vmlinux" "$out/rootfs.img"
  fi
  # Renamed into place: running VMs keep the files they mapped.
  for f in "${outputs[@]}" kernel.config; do
    if [[ -f $work/$f ]]; then mv "$work/$f" "$out/$f"; fi
  done
  echo "$release" >"$out/kernel-release"
  echo "$flavour" >"$out/kernel-flavour"
  echo "$stamp" >"$out/stamp"
  sizes=$(cd "$out" && du -h "${outputs[@]}" | awk '{printf "%s%s %s", sep, $2, $1; sep=", "}')
  log "built the $flavour guest in $out (kernel $release; $sizes)"
fi

if [[ $install == 1 ]]; then
  install_image
fi
