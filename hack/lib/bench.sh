# shellcheck shell=bash
# Shared by the benchmark scripts (source it from the repository root; needs `log`).
#   bench_prepare NAME [debian]
#                        builds the guest image (ours in build/guest; with `debian` also
#                        Debian's kernel in build/guest-debian), the release shim and the
#                        test images, puts the shim in $bench/bin (first on the private
#                        containerd's PATH) and sets `conf`: KATA_CONF_FILE if given, else
#                        build/bench/NAME, shim/configuration.toml pointing at build/guest.
#   bench_config KERNEL FILE [VARIANT...]
#                        writes FILE, shim/configuration.toml booting KERNEL (kata: ours
#                        with its pmem image; debian: Debian's with its initrd), changed by
#                        the VARIANT words (for A/B runs of the lean-VM changes):
#                          initrd        ours booted from its initrd instead of the image
#                          tb=N          TCG translation cache of N MiB instead of ours
#                          no-balloon    without the virtio-balloon (free page reporting)
#                          seabios       QEMU's default firmware instead of qboot
#                          full-machine  q35 with its default devices (SATA, SMBus, PS/2,
#                                        VMware port) and SMM
#                          noapictimer   the guest kernel parameter `noapictimer` (no local
#                                        APIC timer calibration at boot; ticks from the HPET)
#                        all but initrd edit QEMU's arguments through a wrapper script
#                        written next to FILE and named as the configuration's QEMU.
#   bench_check_runtimes RUNTIME...
#                        exits 2 naming an unknown runtime (runc, kata, kata-debian);
#                        sets `debian` to "debian" when kata-debian is among them (the
#                        argument bench_prepare takes), else to "".
#   bench_runtime_args RUNTIME
#                        ctr's options for it; a kata column's configuration file comes
#                        from the caller's associative array conf_of.
#   bench_kernel_release KERNEL
#                        the guest kernel release (kata | debian)
#   median               the median of the numbers on stdin ("n/a" for none).
bench=''
conf=''

bench_prepare() {
  local repo name=$1
  repo=$(pwd)
  hack/build-guest.sh >/dev/null
  if [[ ${2:-} == debian ]]; then
    GUEST_BUILD_DIR=$repo/build/guest-debian hack/build-guest.sh --kernel debian >/dev/null
  fi
  cargo build --quiet --release -p kata-shim --bin containerd-shim-kata-v2
  hack/build-test-images.sh 2>/dev/null
  bench=$repo/build/bench
  mkdir -p "$bench/bin"
  ln -sfn "${CARGO_TARGET_DIR:-$repo/target}/release/containerd-shim-kata-v2" \
    "$bench/bin/containerd-shim-kata-v2"
  conf=${KATA_CONF_FILE:-}
  [[ -n $conf ]] && return 0
  conf=$bench/$name
  bench_config kata "$conf"
}

# The guest directory of KERNEL.
bench_guest_dir() {
  case $1 in
    kata) echo "$(pwd)/build/guest" ;;
    debian) echo "$(pwd)/build/guest-debian" ;;
    *) log "unknown kernel '$1' (expected kata or debian)"; return 1 ;;
  esac
}

bench_kernel_release() {
  local dir
  dir=$(bench_guest_dir "$1") && cat "$dir/kernel-release" 2>/dev/null || echo '?'
}

bench_config() {
  local kernel=$1 file=$2 dir kernel_line root_line qemu=/usr/bin/qemu-system-x86_64 v
  shift 2
  dir=$(bench_guest_dir "$kernel") || return 1
  local edits=() initrd=0
  for v in "$@"; do
    case $v in
      initrd) initrd=1 ;;
      tb=[0-9]*) edits+=("tb=${v#tb=}") ;;
      no-balloon | seabios | full-machine | noapictimer) edits+=("$v") ;;
      '') ;;
      *) log "unknown variant '$v' (expected initrd, tb=N, no-balloon, seabios, full-machine or noapictimer)"; return 1 ;;
    esac
  done
  if [[ $kernel == kata ]]; then
    kernel_line="kernel = \"$dir/vmlinux\""
    if ((initrd)); then root_line="initrd = \"$dir/initrd.img\""; else root_line="image = \"$dir/rootfs.img\""; fi
  else
    kernel_line="kernel = \"$dir/vmlinuz\""
    root_line="initrd = \"$dir/initrd.img\""
  fi
  if ((${#edits[@]})); then
    qemu=$file.qemu
    bench_qemu_wrapper "$qemu" "${edits[@]}"
  fi
  sed -e "s|^path = .*|path = \"$qemu\"|" -e "s|^kernel = .*|$kernel_line|" \
    -e "s|^image = .*|$root_line|" -e '/^# initrd = /d' shim/configuration.toml >"$file"
  if ! grep -qxF "$kernel_line" "$file" || ! grep -qxF "$root_line" "$file"; then
    log "cannot point $file at $dir (shim/configuration.toml changed?)"
    return 1
  fi
}

# bench_qemu_wrapper FILE EDIT...: a script that runs QEMU with its arguments edited.
bench_qemu_wrapper() {
  local file=$1 e
  shift
  {
    echo '#!/usr/bin/env bash'
    echo '# Written by hack/lib/bench.sh: QEMU with edited arguments, for A/B benchmarks.'
    echo 'args=()'
    echo 'while (($#)); do'
    echo '  a=$1; shift'
    for e in "$@"; do
      case $e in
        tb=*) echo "  a=\${a/tb-size=[0-9]*/tb-size=${e#tb=}}" ;;
        no-balloon) echo '  if [[ $a == -device && $1 == virtio-balloon-pci* ]]; then shift; continue; fi' ;;
        seabios) echo '  if [[ $a == -bios ]]; then shift; continue; fi' ;;
        full-machine) echo '  if [[ $a == q35,* ]]; then a=q35,memory-backend=dimm0; fi' ;;
        noapictimer) echo '  if [[ $prev == -append ]]; then a="$a noapictimer"; fi' ;;
      esac
    done
    echo '  args+=("$a")'
    echo '  prev=$a'
    echo 'done'
    echo 'exec /usr/bin/qemu-system-x86_64 "${args[@]}"'
  } >"$file"
  chmod +x "$file"
}

bench_check_runtimes() {
  local rt
  debian=''
  for rt in "$@"; do
    case $rt in
      runc | kata) ;;
      kata-debian) debian=debian ;;
      *) log "unknown runtime '$rt' (expected runc, kata or kata-debian)"; exit 2 ;;
    esac
  done
}

bench_runtime_args() {
  case $1 in
    runc) echo "--runtime io.containerd.runc.v2" ;;
    *) echo "--runtime io.containerd.kata.v2 --runtime-config-path ${conf_of[$1]}" ;;
  esac
}

median() {
  sort -n | awk '{a[NR]=$1} END {if (NR == 0) print "n/a"; else if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'
}
