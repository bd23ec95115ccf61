#!/usr/bin/env bash
# Builds the pod VM image of peer pods (RuntimeClass kata-remote) for the adaptor's local
# provider: the same guest kernel and kata-agent as the local guest (hack/build-guest.sh),
# booted in network mode. The local counterpart of the "podvm" image the OpenShift guide
# builds for a cloud.
#
# What network mode needs is in the guest image already: virtio-net (the VM's NIC),
# virtio-blk (the user-data config disk), virtio-rng (entropy for TLS at boot), VXLAN (the
# pod network), overlay (image layers). The image directory holds:
#   vmlinux or vmlinuz   the guest kernel
#   initrd.img           the root filesystem, /init = kata-agent
#   cmdline              kernel parameters the provider appends (the provider always adds
#                        agent.mode=peerpod, which selects network mode)
#   kernel-release
#
# Usage: hack/build-podvm.sh [--install] [--no-build] [--root DIR]
#   --install   also copy to /usr/share/kata-containers/podvm (the adaptor's default image
#               directory, local.images.default)
#   --no-build  use the guest image already in GUEST_BUILD_DIR
#   --root DIR  install under DIR as if it were /
# Environment:
#   GUEST_BUILD_DIR      the guest image (default <repo>/build/guest)
#   PODVM_BUILD_DIR      output directory (default <repo>/build/podvm)
#   PODVM_KERNEL_PARAMS  extra kernel parameters written to cmdline (e.g. agent.log=debug)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
guest=${GUEST_BUILD_DIR:-$repo/build/guest}
out=${PODVM_BUILD_DIR:-$repo/build/podvm}
install=0 build=1 root=''
while [[ $# -gt 0 ]]; do
  case $1 in
    --install) install=1; shift ;;
    --no-build) build=0; shift ;;
    --root) root=${2:?--root needs a directory}; root=${root%/}; shift 2 ;;
    *) echo "build-podvm: unknown argument '$1' (expected --install, --no-build or --root DIR)" >&2; exit 2 ;;
  esac
done
log() { echo "build-podvm: $*" >&2; }

if [[ $build == 1 ]]; then
  GUEST_BUILD_DIR=$guest "$repo/hack/build-guest.sh"
fi
kernel=''
for k in vmlinux vmlinuz; do
  if [[ -f $guest/$k ]]; then kernel=$k; break; fi
done
[[ -n $kernel && -f $guest/initrd.img ]] || { log "no guest image in $guest: run hack/build-guest.sh"; exit 1; }

mkdir -p "$out"
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$guest/$kernel" "$work/$kernel"
cp "$guest/initrd.img" "$work/initrd.img"
cp "$guest/kernel-release" "$work/kernel-release" 2>/dev/null || true
printf '%s\n' "${PODVM_KERNEL_PARAMS:-}" >"$work/cmdline"
# Renamed into place: a running pod VM keeps the files it was started with.
rm -f "$out/vmlinux" "$out/vmlinuz"
for f in "$kernel" initrd.img kernel-release cmdline; do
  [[ -f $work/$f ]] && mv "$work/$f" "$out/$f"
done
log "pod VM image in $out ($kernel + initrd.img, $(du -sh "$out" | cut -f1))"

if [[ $install == 1 ]]; then
  dest=$root/usr/share/kata-containers/podvm
  mkdir -p "$dest"
  for f in "$kernel" initrd.img kernel-release cmdline; do
    [[ -f $out/$f ]] || continue
    install -m 0644 "$out/$f" "$dest/.$f.tmp"
    mv -f "$dest/.$f.tmp" "$dest/$f"
  done
  log "installed to $dest"
fi
