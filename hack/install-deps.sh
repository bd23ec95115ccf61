#!/usr/bin/env bash
# Installs everything the runtime and its tests need on a Debian bookworm host.
# Idempotent: packages already installed and daemons already at the pinned version are skipped.
#
# hack/uninstall.sh removes what goes to KATA_DEPS_PREFIX; Debian packages stay.
#
# Usage: hack/install-deps.sh [--root DIR]
#   --root DIR  put the cargo-installed daemons under DIR as if it were / (a staging or
#               test root); Debian packages are always the host's
# Environment:
#   KATA_DEPS_PREFIX  where cargo-installed daemons go (default /opt/kata-deps; binaries in $KATA_DEPS_PREFIX/bin)
set -euo pipefail

root=''
while [[ $# -gt 0 ]]; do
  case $1 in
    --root) root=${2:?--root needs a directory}; root=${root%/}; shift 2 ;;
    *) echo "install-deps: unknown argument '$1' (expected --root DIR)" >&2; exit 2 ;;
  esac
done
PREFIX=$root${KATA_DEPS_PREFIX:-/opt/kata-deps}
VIRTIOFSD_VERSION=1.14.0
VHOST_DEVICE_VSOCK_VERSION=0.3.0

APT_PACKAGES=(
  qemu-system-x86   # the hypervisor
  containerd runc   # the container manager our shim plugs into, and the reference runtime
  cpio zstd         # initrd packing
  busybox-static    # offline test images and the boot benchmark's trivial init
  libseccomp-dev libcap-ng-dev pkg-config  # build deps of virtiofsd
  protobuf-compiler # protoc for k8s-cri's build script (the tests' CRI client); ttrpc-codegen is pure Rust
  kmod              # depmod, to order the guest kernel modules
  iproute2 util-linux procps
  containernetworking-plugins  # CNI bridge, host-local, loopback in /usr/lib/cni (pod network tests, bench-net)
  skopeo            # copies the offline test images into the peer pods tests' registry
)
# Packages that ship a service: installed with their service kept from starting (the peer
# pods tests start a private instance of the registry themselves).
APT_SERVICE_PACKAGES=(
  docker-registry   # a real registry for the in-guest image pull tests
)

log() { echo "install-deps: $*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  log "apt packages to install: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "apt packages: all present"
fi

missing=()
for p in "${APT_SERVICE_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  log "apt packages to install without starting their services: ${missing[*]}"
  # policy-rc.d answering 101 keeps invoke-rc.d/deb-systemd-invoke from starting services.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  status=0
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
  ((own_policy)) && rm -f "$policy"
  ((status == 0)) || exit "$status"
  if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
  fi
else
  log "apt packages with services: all present"
fi

# cargo install <crate> <version> <binary>
cargo_install() {
  local crate=$1 version=$2 bin=$3
  if [[ -x "$PREFIX/bin/$bin" ]] && cargo install --list --root "$PREFIX" 2>/dev/null | grep -q "^$crate v$version:"; then
    log "$crate $version: present"
    return
  fi
  log "cargo install $crate $version into $PREFIX"
  cargo install --locked --quiet --root "$PREFIX" --version "$version" "$crate"
}

cargo_install virtiofsd "$VIRTIOFSD_VERSION" virtiofsd
cargo_install vhost-device-vsock "$VHOST_DEVICE_VSOCK_VERSION" vhost-device-vsock
log "done"
