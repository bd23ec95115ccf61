#!/usr/bin/env bash
# Hotplug benchmark: how long a container's limits take to reach its VM, through
# containerd and our shim (`ctr run --rm --memory-limit ... / --cpus 1`).
#   - memory: 256 MiB, 1 GiB and 4 GiB limits, each hot-added as one pc-DIMM on a shared
#     memfd; latency = the shim's `hotplug_ms` (QMP object-add + device_add until the
#     agent reports the blocks online in the guest), RUNS runs each (default 3);
#   - CPU: a 1-CPU limit hot-adds one vCPU; same measure.
# Also prints the guest's MemTotal and nproc without limits and with each limit.
# Private containerd (hack/lib/containerd.sh), the working tree's release shim and guest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
runs=${RUNS:-3}
image=docker.io/library/busybox:kata
KATA=io.containerd.kata.v2
log() { echo "bench-hotplug: $*" >&2; }

# shellcheck source=hack/lib/bench.sh
source hack/lib/bench.sh
# Always the defaults: the numbers are for the documented configuration.
KATA_CONF_FILE='' bench_prepare configuration-hotplug.toml

# shellcheck source=hack/lib/containerd.sh
source hack/lib/containerd.sh
CTD_NS=kata-bench-hotplug
CTD_ENV="KATA_CONF_FILE=$conf"
ctd_start "$bench/bin"
ctd_ctr images import build/images/busybox.tar >/dev/null

# field ID KEY: the last KEY=<number> on the shim's "hotplugged" line for container ID.
field() {
  { grep -E "container=\"?$1\"?( |$)" "$CTD_LOG" || true; } | { grep -F hotplugged || true; } |
    { grep -oE "(^| )$2=[0-9]+" || true; } | tail -n 1 | cut -d= -f2
}
# probe ID ARGS...: runs a container printing MemTotal (kB) and nproc; sets mem, cpus.
probe() {
  local id=$1 out
  shift
  out=$(timeout 300 ctr -a "$CTD_SOCK" -n "$CTD_NS" run --rm --runtime "$KATA" "$@" "$image" "$id" \
    sh -c 'grep MemTotal /proc/meminfo; nproc' 2>"$CTD_DIR/ctr.err") || {
    log "ctr run $id failed: $(tr -s '\n' ' ' <"$CTD_DIR/ctr.err")"
    exit 1
  }
  mem=$(awk '/MemTotal/ {print $2}' <<<"$out")
  cpus=$(tail -n 1 <<<"$out")
}

n=0
probe "hp-base-$$"
base_mem=$mem base_cpus=$cpus
declare -A lat=() after=()
cases=("256 MiB:268435456" "1 GiB:1073741824" "4 GiB:4294967296" "1 vCPU:cpu")
for c in "${cases[@]}"; do
  name=${c%%:*} arg=${c#*:}
  samples=()
  for _ in $(seq "$runs"); do
    n=$((n + 1))
    id=hp-$$-$n
    if [[ $arg == cpu ]]; then
      probe "$id" --cpus 1
      after[$name]="nproc $cpus"
    else
      probe "$id" --memory-limit "$arg"
      after[$name]="MemTotal $((mem / 1024)) MiB"
    fi
    ms=$(field "$id" hotplug_ms)
    [[ -n $ms ]] && samples+=("$ms")
  done
  lat[$name]=$(printf '%s\n' "${samples[@]}" | median)
  log "$name: ${samples[*]} ms"
done

accel=$(grep -oE '(^| )accel=[a-z]+' "$CTD_LOG" | tail -n 1 | cut -d= -f2 || true)
echo "hotplug benchmark: $runs runs each, accel ${accel:-?}, $(nproc) host CPUs, guest $(grep -E '^default_memory' "$conf" | tr -d ' ') MiB"
echo "guest without limits: MemTotal $((base_mem / 1024)) MiB, nproc $base_cpus"
printf '%-10s %26s %24s\n' "limit" "request->online, median ms" "guest after"
for c in "${cases[@]}"; do
  name=${c%%:*}
  printf '%-10s %26s %24s\n' "$name" "${lat[$name]}" "${after[$name]}"
done
