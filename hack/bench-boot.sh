#!/usr/bin/env bash
# Boot benchmark, Debian's kernel next to ours in one run:
#   (a) the floor: bare QEMU booting the kernel with a trivial busybox init that powers
#       off at once (spawn -> QEMU exit), with the machine and firmware our VMs use, the
#       same for both kernels;
#   (b) our launch: Vm::start -> kata-agent answered a health Check over vsock
#       (kata-ctl boot-check --timing), plus its parts and the stop time.
# Prints medians over RUNS runs (default 5; the configurations alternate run by run) of
# the wall times and of the CPU time spent (which other load on the host disturbs less),
# and the ratios ours/Debian's.
# Environment:
#   RUNS        runs per configuration (default 5)
#   MEMORY_MIB  guest memory (default 2048, the configuration's default_memory)
#   CONFIGS     the columns (default "debian kata"): a kernel (debian | kata), optionally
#               with variant words after a colon, comma separated (see hack/lib/bench.sh:
#               initrd, tb=N, no-balloon, seabios, full-machine, noapictimer), e.g.
#               CONFIGS="debian kata kata:initrd kata:tb=1024"
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
runs=${RUNS:-5}
mem=${MEMORY_MIB:-2048}
read -ra configs <<<"${CONFIGS:-debian kata}"
log() { echo "bench-boot: $*" >&2; }

# shellcheck source=hack/lib/bench.sh
source hack/lib/bench.sh
need_debian=''
for c in "${configs[@]}"; do [[ ${c%%:*} == debian ]] && need_debian=debian; done
hack/build-guest.sh >/dev/null
if [[ -n $need_debian ]]; then
  GUEST_BUILD_DIR=$repo/build/guest-debian hack/build-guest.sh --kernel debian >/dev/null
fi
cargo build --quiet --release -p kata-ctl
bench=build/bench
mkdir -p "$bench"

# The trivial init: busybox powers the VM off as soon as the kernel runs it.
if [[ ! -f $bench/trivial-initrd.img ]]; then
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,dev,proc}
  cp /bin/busybox "$root/bin/busybox"
  printf '#!/bin/busybox sh\n/bin/busybox poweroff -f\n' >"$root/init"
  chmod +x "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet --owner 0:0) | zstd -q -19 >"$bench/trivial-initrd.img"
  rm -rf "$root"
fi

accel=tcg
if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -c /dev/kvm ]]; then accel=kvm; fi
cmdline="console=ttyS0 quiet panic=-1 tsc=reliable no_timer_check rcupdate.rcu_expedited=1 i8042.noaux=1 i8042.nomux=1 i8042.nopnp=1 i8042.dumbkbd=1 cryptomgr.notests"

now_ms() { echo $(($(date +%s%N) / 1000000)); }
lean_machine=sata=off,smbus=off,i8042=off,vmport=off,smm=off

# Per configuration: the kernel, kata-ctl's root arguments and QEMU (a wrapper for variants).
declare -A kernel_of=() root_args=() qemu_of=() bare=() ready=() launch=() stop=() bare_cpu=() ours_cpu=()
for c in "${configs[@]}"; do
  k=${c%%:*}
  variants=''
  [[ $c == *:* ]] && variants=${c#*:}
  dir=$(bench_guest_dir "$k")
  IFS=, read -ra words <<<"$variants"
  # The configuration file is not used here, only its QEMU wrapper and the root choice.
  bench_config "$k" "$bench/boot-${c//[:,=]/-}.toml" "${words[@]}"
  qemu_of[$c]=$(awk -F'"' '/^path = /{print $2}' "$bench/boot-${c//[:,=]/-}.toml")
  if [[ $k == kata ]]; then
    kernel_of[$c]=$dir/vmlinux
    if [[ ,$variants, == *,initrd,* ]]; then
      root_args[$c]="--initrd $dir/initrd.img"
    else
      root_args[$c]="--image $dir/rootfs.img"
    fi
  else
    kernel_of[$c]=$dir/vmlinuz
    root_args[$c]="--initrd $dir/initrd.img"
  fi
done

# cpu_ms FILE: user + system CPU from /usr/bin/time's "%U %S", in ms.
cpu_ms() { awk '{printf "%d", ($1 + $2) * 1000}' "$1"; }
tf=$(mktemp)
trap 'rm -f "$tf"' EXIT
for i in $(seq "$runs"); do
  for c in "${configs[@]}"; do
    t0=$(now_ms)
    # The machine and firmware our VMs use (a variant's wrapper edits them alike).
    /usr/bin/time -o "$tf" -f '%U %S' \
      "${qemu_of[$c]}" -machine "q35,memory-backend=dimm0,$lean_machine" -accel $accel -cpu max \
      -object "memory-backend-memfd,id=dimm0,size=${mem}M,share=on" -m "$mem" -smp 1 \
      -bios /usr/share/qemu/qboot.rom -nodefaults -no-reboot \
      -nographic -no-user-config -serial null -kernel "${kernel_of[$c]}" \
      -initrd "$bench/trivial-initrd.img" -append "$cmdline" >/dev/null 2>&1
    bare[$c]+=" $(($(now_ms) - t0))"
    bare_cpu[$c]+=" $(cpu_ms "$tf")"

    # shellcheck disable=SC2086 # root_args holds two words
    # kata-ctl reaps QEMU and the daemons: its children's CPU time is the VM's.
    line=$(RUST_LOG=error /usr/bin/time -o "$tf" -f '%U %S' target/release/kata-ctl boot-check \
      --qemu "${qemu_of[$c]}" --kernel "${kernel_of[$c]}" ${root_args[$c]} --memory "$mem" --timing)
    eval "$line" # launch_ms=.. agent_ready_ms=.. stop_ms=..
    ready[$c]+=" $agent_ready_ms" launch[$c]+=" $launch_ms" stop[$c]+=" $stop_ms"
    ours_cpu[$c]+=" $(cpu_ms "$tf")"
    log "run $i $c: bare ${bare[$c]##* } ms (CPU ${bare_cpu[$c]##* }), launch $launch_ms / agent ready $agent_ready_ms / stop $stop_ms ms (CPU ${ours_cpu[$c]##* })"
  done
done

med() { tr ' ' '\n' <<<"$1" | grep . | median; }
echo
echo "boot benchmark: $runs runs each, accel=$accel, ${mem} MiB, $(nproc) host CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
for c in "${configs[@]}"; do
  echo "  $c: kernel $(bench_kernel_release "${c%%:*}") ($(basename "${kernel_of[$c]}"), ${root_args[$c]%% *} $(basename "${root_args[$c]##* }"))"
done
row() {
  printf "%-52s" "$1"
  shift
  printf ' %14s' "$@"
  echo
}
row "median ms" "${configs[@]}"
declare -A m_bare=() m_ready=()
cells_bare=() cells_ready=() cells_launch=() cells_stop=() cells_bare_cpu=() cells_ours_cpu=()
for c in "${configs[@]}"; do
  m_bare[$c]=$(med "${bare[$c]}") m_ready[$c]=$(med "${ready[$c]}")
  cells_bare+=("${m_bare[$c]}") cells_ready+=("${m_ready[$c]}")
  cells_launch+=("$(med "${launch[$c]}")") cells_stop+=("$(med "${stop[$c]}")")
  cells_bare_cpu+=("$(med "${bare_cpu[$c]}")") cells_ours_cpu+=("$(med "${ours_cpu[$c]}")")
done
row "(a) bare QEMU, trivial init, spawn -> exit" "${cells_bare[@]}"
row "    CPU time (QEMU)" "${cells_bare_cpu[@]}"
row "(b) spawn -> agent answered Check" "${cells_ready[@]}"
row "    of which Vm::start (daemons + QEMU + QMP)" "${cells_launch[@]}"
row "    stop (QMP quit -> all reaped)" "${cells_stop[@]}"
row "    CPU time, boot to stop (QEMU, daemons, kata-ctl)" "${cells_ours_cpu[@]}"
ratio() { awk -v b="$1" -v a="$2" 'BEGIN {if (a > 0) printf "%.2f", b/a; else print "n/a"}'; }
cells=()
for c in "${configs[@]}"; do cells+=("$(ratio "${m_ready[$c]}" "${m_bare[$c]}")"); done
row "ratio b/a (our launch over the floor)" "${cells[@]}"
if [[ -n ${m_ready[debian]:-} ]]; then
  cells=()
  for c in "${configs[@]}"; do cells+=("$(ratio "${m_ready[$c]}" "${m_ready[debian]}")"); done
  row "(b) over Debian's kernel (b)" "${cells[@]}"
fi
