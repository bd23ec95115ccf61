#!/usr/bin/env bash
# Sets up a fresh Debian bookworm machine and runs the main job: boot a sandbox VM,
# reach kata-agent over vsock, share a host directory into the guest through virtio-fs
# and read a file back through the agent.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

hack/install-deps.sh
hack/build-guest.sh --install
cargo build --quiet --release -p kata-shim --bin kata-ctl
shared=$(mktemp -d /tmp/kata-quickstart.XXXXXX)
trap 'rm -rf "$shared"' EXIT
target/release/kata-ctl boot-check --shared-dir "$shared"
