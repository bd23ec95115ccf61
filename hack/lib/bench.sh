# shellcheck shell=bash
# Shared by the benchmark scripts (source it from the repository root; needs `log`).
#   bench_prepare NAME   builds the guest image, the release shim and the test images, puts
#                        the shim in $bench/bin (first on the private containerd's PATH) and
#                        sets `conf`: KATA_CONF_FILE if given, else build/bench/NAME, a copy of
#                        shim/configuration.toml pointing at build/guest's kernel and initrd.
#   median               the median of the numbers on stdin ("n/a" for none).
bench=''
conf=''

bench_prepare() {
  local repo name=$1
  repo=$(pwd)
  hack/build-guest.sh >/dev/null
  cargo build --quiet --release -p kata-shim --bin containerd-shim-kata-v2
  hack/build-test-images.sh 2>/dev/null
  bench=$repo/build/bench
  mkdir -p "$bench/bin"
  ln -sfn "${CARGO_TARGET_DIR:-$repo/target}/release/containerd-shim-kata-v2" \
    "$bench/bin/containerd-shim-kata-v2"
  conf=${KATA_CONF_FILE:-}
  [[ -n $conf ]] && return 0
  conf=$bench/$name
  sed -e "s|^kernel = .*|kernel = \"$repo/build/guest/vmlinuz\"|" \
    -e "s|^initrd = .*|initrd = \"$repo/build/guest/initrd.img\"|" \
    shim/configuration.toml >"$conf"
  if ! grep -q "^kernel = \"$repo/build/guest/vmlinuz\"" "$conf" ||
    ! grep -q "^initrd = \"$repo/build/guest/initrd.img\"" "$conf"; then
    log "cannot point $conf at build/guest (shim/configuration.toml changed?)"
    exit 1
  fi
}

median() {
  sort -n | awk '{a[NR]=$1} END {if (NR == 0) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'
}
