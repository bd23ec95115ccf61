#!/usr/bin/env bash
# Peer pods benchmark: time to a running container in a `kata-remote` pod (the adaptor's
# local provider boots the pod VM image; busybox is pulled inside the VM from a private
# registry on the provider bridge), split into CreateVM / StartVM / agent ready / image pull
# / container create, next to a local `kata` pod in the same run (the `bench-peerpod`
# binary of the kata-tests crate drives a private containerd 1.6 with CRI). RUNS (default
# 3) pods of each; medians in ms. Under TCG every VM boot costs seconds of CPU: run it on
# an otherwise idle host. Needs hack/install-deps.sh.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
hack/build-guest.sh >/dev/null
hack/build-podvm.sh --no-build >/dev/null
hack/build-test-images.sh 2>/dev/null
cargo build --quiet -p kata-shim -p kata-peerpod --bins
cargo build --quiet -p kata-tests --bin bench-peerpod
target=${CARGO_TARGET_DIR:-$repo/target}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$target/debug/bench-peerpod" >"$out"
printf '%-42s %10s %10s\n' "phase (ms, median)" "kata-remote" "kata"
while IFS=$'\t' read -r phase peer local; do
  printf '%-42s %10s %10s\n' "$phase" "$peer" "$local"
done <"$out"
