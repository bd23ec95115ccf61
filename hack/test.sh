#!/usr/bin/env bash
# The project's test command: formatting, lints, unit tests and end-to-end tests that boot
# real VMs (QEMU; TCG where KVM is unusable). Needs hack/install-deps.sh to have run; builds
# the guest image if it is missing or stale.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

hack/build-guest.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# VM tests use two vCPU threads' worth of host CPU each under TCG; two at a time fits 2 cores.
cargo test --workspace -- --test-threads=2
