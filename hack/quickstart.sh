#!/usr/bin/env bash
# The main job. On a fresh Debian bookworm machine (as root): install everything, build and
# install the runtime, then run a busybox container in its own VM through containerd,
#   ctr run --rm --runtime io.containerd.kata.v2 docker.io/library/busybox:kata <id> uname -r
# and print the kernel the container saw next to the host's: they differ, because the
# container ran on the guest kernel.
#
# Steps (each skips work already done, so a rerun only repeats the container run):
#   1. hack/install-deps.sh           Debian packages, virtiofsd, vhost-device-vsock
#   2. hack/build-guest.sh --install  guest kernel + initrd (kata-agent as /init)
#   3. hack/install-shim.sh (builds the release binaries):
#                                     /usr/local/bin/containerd-shim-kata-v2, kata-ctl and
#                                     /etc/kata-containers/configuration.toml
#   4. hack/build-test-images.sh      the offline image build/images/busybox.tar
#   5. a private containerd 1.6 (hack/lib/containerd.sh: own root, state and socket in a
#      temp dir, no CRI plugin), the image imported, the container run; containerd is
#      stopped by its pid and its directory removed on exit, whatever happens.
# If the container run fails, `kata-ctl boot-check` tells a VM/agent problem from a
# container one. RUNTIME=io.containerd.runc.v2 runs the same container with runc instead
# (it then shows the host's kernel).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
runtime=${RUNTIME:-io.containerd.kata.v2}
image=docker.io/library/busybox:kata
step() { echo "quickstart: $*" >&2; }

step "[1/5] dependencies"
hack/install-deps.sh
step "[2/5] guest image"
hack/build-guest.sh --install
step "[3/5] containerd-shim-kata-v2 and kata-ctl (release), installed with its configuration"
hack/install-shim.sh
step "[4/5] offline busybox image"
hack/build-test-images.sh

step "[5/5] a busybox container in a VM through containerd"
# shellcheck source=hack/lib/containerd.sh
source hack/lib/containerd.sh
CTD_NS=kata-quickstart
ctd_start /usr/local/bin
ctd_ctr images import build/images/busybox.tar >/dev/null
id=quickstart-$$
echo "+ ctr run --rm --runtime $runtime $image $id uname -r" >&2
t0=$(date +%s%N)
status=0
guest=$(timeout 300 ctr -a "$CTD_SOCK" -n "$CTD_NS" run --rm --runtime "$runtime" \
  "$image" "$id" uname -r 2>"$CTD_DIR/ctr.err") || status=$?
ms=$((($(date +%s%N) - t0) / 1000000))
# The shim's log lines reach containerd's log unchanged (containerd's own start "time=").
shim_log=$(grep -v '^time=' "$CTD_LOG" || true)

if ((status != 0)) || [[ -z $guest ]]; then
  step "the container run failed (exit $status after $ms ms):"
  cat "$CTD_DIR/ctr.err" >&2
  if [[ -n $shim_log ]]; then
    step "the shim's log:"
    tail -n 30 <<<"$shim_log" >&2
  fi
  step "checking the VM and agent alone (kata-ctl boot-check):"
  shared=$(mktemp -d /tmp/kata-quickstart.XXXXXX)
  if /usr/local/bin/kata-ctl boot-check --shared-dir "$shared" >&2; then
    step "the VM boots and the agent answers: the failure is in the container path"
  else
    step "the VM or the agent fails: see above; RUST_LOG=info shows the guest console"
  fi
  rm -rf "$shared"
  exit 1
fi

host=$(uname -r)
accel=$(grep -o 'accel=[a-z]*' <<<"$shim_log" | tail -n 1 | cut -d= -f2 || true)
echo
if [[ $runtime == io.containerd.kata.v2 ]]; then
  echo "busybox ran in its own VM ($runtime, accel ${accel:-?}) in $ms ms"
else
  echo "busybox ran with $runtime in $ms ms"
fi
printf '  %-34s %s\n' "uname -r in the container (guest):" "$guest" "uname -r on this host:" "$host"
if [[ $runtime != io.containerd.kata.v2 ]]; then
  echo "  ($runtime: the container shares the host's kernel)"
elif [[ $guest == "$host" ]]; then
  # Only when the host itself runs the guest image's Debian kernel.
  echo "  (same release: this host runs the guest image's kernel; the container still ran in a VM)"
else
  echo "  different kernels: the container did not share the host's kernel"
fi
