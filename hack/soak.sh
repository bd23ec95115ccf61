#!/usr/bin/env bash
# Soak test (not part of hack/test.sh): N container cycles through ctr (run -d, exec, kill,
# delete), N pod cycles through CRI (RunPodSandbox, a container created, started,
# ExecSync'd, stopped, removed; StopPodSandbox, RemovePodSandbox), and N container cycles
# inside one long-lived pod, against a private containerd 1.6 with CRI and the debug shim
# (the tests' harness). Prints containerd's and the long-lived pod shim's fds, threads and
# RSS before (after one warm-up round of each kind) and after, and fails when fds or
# threads do not return to their baseline within SETTLE seconds or RSS ends more than
# 10 MiB above it.
#
# Environment: N (default 100; each cycle boots a VM: ~15 minutes for 100 under TCG),
# SETTLE (default 30). Needs hack/install-deps.sh.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

hack/build-guest.sh >/dev/null
hack/build-test-images.sh 2>/dev/null
cargo build --quiet -p kata-shim --bins
cargo build --quiet -p kata-tests --bin soak
# In a session of its own so a Ctrl-C reaches only this script; the soak's containerd and
# pods are removed by its harness when it exits.
setsid "${CARGO_TARGET_DIR:-$repo/target}/debug/soak" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM
status=0
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid" && status=0 || status=$?
done
exit "$status"
