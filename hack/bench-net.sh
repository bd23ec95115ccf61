#!/usr/bin/env bash
# Pod network benchmark, runc pods next to kata pods on the same CNI bridge, in one run:
#   - round-trip latency host -> pod: median (and min/max) of PINGS pings (default 20,
#     busybox ping -i 0.2 from the host's root network namespace to the pod's IP);
#   - TCP throughput pod -> host: the pod serves a file of MIB MiB (default 32, at most ~60:
#     a runc pod's /dev/shm holds 64 MiB) from its /dev/shm with busybox httpd (sendfile);
#     the host fetches it over HTTP; MiB/s from connect to the last byte, median of RUNS
#     fetches (default 5) after a warm-up fetch;
#   - host and guest facts (CPUs, kernel, memory, MTU, QEMU accelerator).
# Pods come from a private containerd 1.6 with CRI and CNI (the tests' harness,
# kata_tests::cri, driven by the `bench-net` binary of the kata-tests crate): network
# hack/cni/10-kata-bridge.conflist (bridge kata-cni0, 10.88.213.0/24, no NAT) with Debian's
# plugins in /usr/lib/cni; the kata handler runs the debug shim from target/debug with the
# tests' configuration (512 MiB, 1 vCPU; the shim is not on the data path). Traffic stays
# between this host and its bridge. Under TCG expect kata to be much slower than runc. The
# numbers are noisy on a busy host (2 CPUs shared with builds or other VMs): compare the
# medians of a quiet run, and raise RUNS for steadier ones.
# Needs hack/install-deps.sh.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

hack/build-guest.sh >/dev/null
hack/build-test-images.sh 2>/dev/null
cargo build --quiet -p kata-shim --bins
cargo build --quiet -p kata-tests --bin bench-net
# In a session of its own, so a Ctrl-C reaches only this script (not the private containerd
# it starts): the script passes SIGINT/SIGTERM on as SIGTERM, and the benchmark removes its
# pods and containerd before it exits.
setsid "${CARGO_TARGET_DIR:-$repo/target}/debug/bench-net" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM
status=0
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid" && status=0 || status=$?
done
exit "$status"
