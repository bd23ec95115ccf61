#!/usr/bin/env bash
# Imports the offline images (hack/build-test-images.sh) into a running containerd's
# `k8s.io` namespace, where the CRI plugin looks for them: the pause image under the name
# hack/containerd/kata.toml sets as sandbox_image, and busybox.
#
# Usage: hack/import-images.sh [--address /run/containerd/containerd.sock]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
address=/run/containerd/containerd.sock
while [[ $# -gt 0 ]]; do
  case $1 in
    --address) address=${2:?--address needs a socket path}; shift 2 ;;
    *) echo "import-images: unknown argument '$1' (expected --address SOCKET)" >&2; exit 2 ;;
  esac
done
log() { echo "import-images: $*" >&2; }
if [[ ! -S $address ]]; then
  log "no containerd socket at $address: start containerd first"
  exit 1
fi
"$repo/hack/build-test-images.sh"
for image in pause busybox; do
  ctr -a "$address" -n k8s.io images import "$repo/build/images/$image.tar" >/dev/null
  log "imported build/images/$image.tar into namespace k8s.io"
done
ctr -a "$address" -n k8s.io images ls -q | grep -E 'pause:kata|busybox:kata' >&2
