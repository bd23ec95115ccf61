#!/usr/bin/env bash
# Boot benchmark, in one run:
#   (a) the floor: bare QEMU booting the same guest kernel with a trivial busybox init that
#       powers off at once (spawn -> QEMU exit);
#   (b) our launch: Vm::start -> kata-agent answered a health Check over vsock
#       (kata-ctl boot-check --timing), plus its parts and the stop time.
# Prints medians over RUNS runs (default 5) and the ratio b/a.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
runs=${RUNS:-5}
mem=${MEMORY_MIB:-2048}

hack/build-guest.sh >/dev/null
cargo build --quiet --release -p kata-ctl
kernel=build/guest/vmlinuz
initrd=build/guest/initrd.img
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

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'; }

bare=() launch=() ready=() stop=()
for i in $(seq "$runs"); do
  t0=$(now_ms)
  qemu-system-x86_64 -machine q35,accel=$accel -cpu max -m "$mem" -smp 1 -nodefaults -no-reboot \
    -nographic -no-user-config -serial null -kernel "$kernel" -initrd "$bench/trivial-initrd.img" \
    -append "$cmdline" >/dev/null 2>&1
  bare+=($(( $(now_ms) - t0 )))

  line=$(target/release/kata-ctl boot-check --kernel "$kernel" --initrd "$initrd" --memory "$mem" --timing)
  eval "$line"   # launch_ms=.. agent_ready_ms=.. stop_ms=..
  launch+=("$launch_ms") ready+=("$agent_ready_ms") stop+=("$stop_ms")
  echo "run $i: bare ${bare[-1]} ms, ours launch ${launch_ms} / agent ready ${agent_ready_ms} / stop ${stop_ms} ms" >&2
done

m_bare=$(printf '%s\n' "${bare[@]}" | median)
m_launch=$(printf '%s\n' "${launch[@]}" | median)
m_ready=$(printf '%s\n' "${ready[@]}" | median)
m_stop=$(printf '%s\n' "${stop[@]}" | median)
echo
echo "boot benchmark: $runs runs, accel=$accel, ${mem} MiB, $(nproc) host CPUs, kernel $(cat build/guest/kernel-release)"
printf '%-52s %10s\n' "measure" "median ms"
printf '%-52s %10s\n' "(a) bare QEMU, trivial init, spawn -> exit" "$m_bare"
printf '%-52s %10s\n' "(b) ours: spawn -> agent answered Check" "$m_ready"
printf '%-52s %10s\n' "    of which Vm::start (daemons + QEMU + QMP)" "$m_launch"
printf '%-52s %10s\n' "    ours: stop (QMP quit -> all reaped)" "$m_stop"
printf '%-52s %10s\n' "ratio b/a" "$(awk -v b="$m_ready" -v a="$m_bare" 'BEGIN {printf "%.2f", b/a}')"
