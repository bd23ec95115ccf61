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
  erofs-utils       # mkfs.erofs: the guest's root filesystem image
  # The guest kernel, built by hack/build-guest.sh from Debian's source package
  linux-source-6.1 make gcc bc flex bison libelf-dev libssl-dev xz-utils
  busybox-static    # offline test images and the boot benchmark's trivial init
  libseccomp-dev libcap-ng-dev pkg-config  # build deps of virtiofsd
  protobuf-compiler # protoc for k8s-cri's build script (the tests' CRI client); ttrpc-codegen is pure Rust
  kmod              # depmod, to order Debian's guest kernel modules (build-guest.sh --kernel debian)
  iproute2 util-linux procps
  containernetworking-plugins  # CNI bridge, host-local, loopback in /usr/lib/cni (pod network tests, bench-net)
  openssl           # hack/k8s/peerpods-webhook-cert.sh (the peer pods webhook's certificate, and its test)
  systemd           # /lib/systemd/systemd-journald and journalctl (log tests: a journald of their own)
  curl              # the metrics benchmark and troubleshooting commands
  skopeo            # copies the offline test images into the peer pods tests' registry
)
# Packages that ship a service: installed without starting it and left disabled (the tests
# start private instances on their own ports).
SERVICE_PACKAGES=(
  prometheus        # prometheus and promtool 2.42 (metrics tests: a private Prometheus)
  docker-registry   # a real registry for the peer pods tests' in-guest image pulls
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

# Service packages: a policy-rc.d refusing every start keeps the package's service from
# starting during the install; afterwards it is disabled, and stopped if it runs anyway.
missing=()
for p in "${SERVICE_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  log "service packages to install (not started): ${missing[*]}"
  policy=/usr/sbin/policy-rc.d
  if [[ -e $policy ]]; then
    log "$policy exists: leaving it as it is"
    policy=''
  else
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    trap '[[ -n $policy ]] && rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [[ -n $policy ]] && rm -f "$policy"
  policy=''
fi
for svc in "${SERVICE_PACKAGES[@]}"; do
  if command -v deb-systemd-helper >/dev/null; then
    deb-systemd-helper disable "$svc.service" >/dev/null 2>&1 || true
  fi
  if [[ -x /etc/init.d/$svc ]]; then
    update-rc.d "$svc" disable >/dev/null 2>&1 || true
    if /etc/init.d/"$svc" status >/dev/null 2>&1; then
      log "stopping the $svc service the package started"
      /etc/init.d/"$svc" stop >/dev/null 2>&1 || true
    fi
  fi
done

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
