#!/usr/bin/env bash
# The project's test command: formatting, lints, unit tests and end-to-end tests that boot
# real VMs (QEMU; TCG where KVM is unusable). Needs hack/install-deps.sh to have run; builds
# the guest image if it is missing or stale.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

hack/build-guest.sh
# The peer pods tests boot the pod VM image (the same kernel and agent, repackaged).
hack/build-podvm.sh --no-build
hack/build-test-images.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The end-to-end tests start containerd, which runs the shim binary from target/debug.
cargo build --quiet --workspace --bins
# The shim logs to the journal (global socket): one journald for the whole run, stopped
# at the end if this run started it.
# shellcheck source=lib/journald.sh
source hack/lib/journald.sh
journald_start
# VM tests use two vCPU threads' worth of host CPU each under TCG; two at a time fits 2 cores.
log=$(mktemp)
trap 'rm -f "$log"; journald_stop' EXIT
set +e
cargo test --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over all test binaries (cargo prints one per binary, the last often 0).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
