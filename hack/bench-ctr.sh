#!/usr/bin/env bash
# Container benchmark through containerd, runc (io.containerd.runc.v2) next to ours
# (io.containerd.kata.v2) with our kernel ("kata") and with Debian's ("kata-debian"), in
# one run:
#   - wall time of `ctr run --rm <image> <id> true`: median of RUNS runs (default 5) after
#     one untimed warm-up run per runtime; the runtimes alternate run by run;
#   - the shim's own memory: VmRSS of the shim process while a detached `sleep 30`
#     container runs (its pid from shim.pid in the task's bundle, else the parent of the
#     task's pid), and the PSS sum of the processes the shim started (runc: the
#     container; ours: QEMU, virtiofsd, vhost-device-vsock; PSS so the guest RAM they all
#     map is counted once);
#   - ours, broken down from the shim's log lines (medians): VM launch, agent ready,
#     sandbox ready, container create, container start, and the rest of the wall time.
# Uses a private containerd 1.6 (hack/lib/containerd.sh) and the working tree: the guest
# images in build/guest (ours) and build/guest-debian, and the release shim in
# target/release, first on containerd's PATH. Each kata column's configuration is
# shim/configuration.toml (the defaults) pointing at its guest (ctr --runtime-config-path);
# KATA_CONF_FILE replaces the "kata" column's. RUNTIMES (default "runc kata kata-debian")
# picks the columns. Needs hack/install-deps.sh.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
runs=${RUNS:-5}
image=docker.io/library/busybox:kata
read -ra runtimes <<<"${RUNTIMES:-runc kata kata-debian}"
log() { echo "bench-ctr: $*" >&2; }

# shellcheck source=hack/lib/bench.sh
source hack/lib/bench.sh
bench_check_runtimes "${runtimes[@]}"
bench_prepare configuration.toml $debian
declare -A conf_of=([kata]=$conf)
if [[ -n $debian ]]; then
  conf_of[kata-debian]=$bench/configuration-debian.toml
  bench_config debian "${conf_of[kata-debian]}"
fi
conf_value() { awk -F' *= *' -v k="$1" '$1 == k {gsub(/"/, "", $2); print $2; exit}' "$conf"; }

accel_host=tcg
if grep -qwE 'vmx|svm' /proc/cpuinfo && [[ -c /dev/kvm ]]; then accel_host=kvm; fi

# shellcheck source=hack/lib/containerd.sh
source hack/lib/containerd.sh
CTD_NS=kata-bench
ctd_start "$bench/bin"
ctd_ctr images import build/images/busybox.tar >/dev/null

now_ms() { echo $(($(date +%s%N) / 1000000)); }
declare -A failed=() wall=() shim_rss=() kids_pss=()

# fail RUNTIME WHAT FILE: the runtime is out of the benchmark; FILE holds ctr's error.
fail() {
  failed[$1]="$2: $(tr -s '\n' ' ' <"$3")"
  log "$1 failed: ${failed[$1]}"
}

# run_once RUNTIME ID: times `ctr run --rm ... true` into last_ms.
run_once() {
  local t0
  t0=$(now_ms)
  # shellcheck disable=SC2046 # bench_runtime_args is a list of words
  if ! timeout 300 ctr -a "$CTD_SOCK" -n "$CTD_NS" run --rm $(bench_runtime_args "$1") "$image" "$2" true \
    >/dev/null 2>"$CTD_DIR/ctr.err"; then
    fail "$1" "ctr run --rm $2 true" "$CTD_DIR/ctr.err"
    return 1
  fi
  last_ms=$(($(now_ms) - t0))
}

# shim_field ID FIELD: FIELD=<ms> from the shim's log line about sandbox, container or
# process ID (the shim's lines reach containerd's log as they are).
shim_field() {
  { grep -E "(sandbox|container|process)=\"?$1\"?( |$)" "$CTD_LOG" || true; } |
    grep -oE "(^| )$2=[0-9]+" | tail -n 1 | cut -d= -f2
}

# memory RUNTIME ID: run `sleep 30` detached, sample the shim's VmRSS and the PSS of what
# it started (kB), delete it.
memory() {
  local rt=$1 id=$2 i status='' pid kid kb pss=0
  # shellcheck disable=SC2046 # bench_runtime_args is a list of words
  if ! ctd_ctr run -d $(bench_runtime_args "$rt") "$image" "$id" sleep 30 >/dev/null 2>"$CTD_DIR/ctr.err"; then
    fail "$rt" "ctr run -d $id sleep 30" "$CTD_DIR/ctr.err"
    ctd_ctr containers delete "$id" >/dev/null 2>&1 || true
    return 1
  fi
  for ((i = 0; i < 600; i++)); do
    status=$(ctd_ctr task ls 2>/dev/null | awk -v id="$id" '$1 == id {print $3}')
    [[ $status == RUNNING ]] && break
    sleep 0.2
  done
  sleep 1 # let it settle
  if [[ $status == RUNNING ]] && pid=$(ctd_shim_pid "$id"); then
    shim_rss[$rt]=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
    for kid in $(ctd_descendants "$pid"); do
      kb=$(awk '/^Pss:/ {print $2}' "/proc/$kid/smaps_rollup" 2>/dev/null || true)
      pss=$((pss + ${kb:-0}))
    done
    kids_pss[$rt]=$pss
    log "$rt: shim pid $pid VmRSS ${shim_rss[$rt]} kB, its processes PSS $pss kB"
  else
    log "$rt: no running task $id to sample (status '$status')"
  fi
  timeout 120 ctr -a "$CTD_SOCK" -n "$CTD_NS" task delete -f "$id" >/dev/null 2>&1 || true
  timeout 120 ctr -a "$CTD_SOCK" -n "$CTD_NS" containers delete "$id" >/dev/null 2>&1 || true
}

# Per kata runtime, the phases from the shim's log: "RUNTIME,phase" -> " ms ms ...".
declare -A phase=()
for rt in "${runtimes[@]}"; do
  log "$rt: warm-up run"
  run_once "$rt" "bench-$rt-warm" || true
done
for i in $(seq "$runs"); do
  for rt in "${runtimes[@]}"; do
    [[ -z ${failed[$rt]:-} ]] || continue
    id=bench-$rt-$i
    run_once "$rt" "$id" || continue
    wall[$rt]+=" $last_ms"
    if [[ $rt != runc ]]; then
      for _ in $(seq 20); do [[ -n $(shim_field "$id" start_ms) ]] && break; sleep 0.1; done
      v=$(shim_field "$id" vm_launch_ms) a=$(shim_field "$id" agent_ready_ms)
      s=$(shim_field "$id" sandbox_ready_ms) c=$(shim_field "$id" container_create_ms)
      st=$(shim_field "$id" start_ms)
      if [[ -n $v && -n $a && -n $s && -n $c && -n $st ]]; then
        phase[$rt,vm]+=" $v" phase[$rt,agent]+=" $a" phase[$rt,sbx]+=" $s"
        phase[$rt,create]+=" $c" phase[$rt,start]+=" $st" phase[$rt,rest]+=" $((last_ms - s - c - st))"
        log "run $i: $rt $last_ms ms (VM launch $v, agent ready $a, sandbox ready $s, create $c, start $st)"
      else
        log "run $i: $rt $last_ms ms (no timing lines in the shim's log for $id)"
      fi
    else
      log "run $i: runc $last_ms ms"
    fi
  done
done
for rt in "${runtimes[@]}"; do
  if [[ -z ${failed[$rt]:-} ]]; then memory "$rt" "bench-$rt-sleep" || true; fi
done

# Table cells: "failed" for a runtime out of the benchmark.
cell() { if [[ -n ${failed[$1]:-} ]]; then echo failed; else echo "${2:-n/a}"; fi; }
mib() { [[ -n ${1:-} ]] && awk -v k="$1" 'BEGIN {printf "%.1f", k/1024}'; }
med() { tr ' ' '\n' <<<"${1:-}" | grep . | median; }
accel=$(grep -oE '(^| )accel=[a-z]+' "$CTD_LOG" | tail -n 1 | cut -d= -f2 || true)

echo
echo "ctr benchmark: $runs runs each (after one warm-up; the runtimes alternate), image $image"
echo "host: $(nproc) CPUs, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)," \
  "containerd $(containerd --version | awk '{print $3}'), $(runc --version | head -n 1)"
echo "kata: accel ${accel:-?} (host: $( [[ $accel_host == kvm ]] && echo 'KVM usable' || echo 'no vmx/svm: TCG'))," \
  "$(conf_value default_memory) MiB, $(conf_value default_vcpus) vCPU"
for rt in "${runtimes[@]}"; do
  case $rt in
    kata) echo "  kata: our kernel $(bench_kernel_release kata), config ${conf_of[kata]}" ;;
    kata-debian) echo "  kata-debian: Debian's kernel $(bench_kernel_release debian), config ${conf_of[kata-debian]}" ;;
  esac
done
row() {
  printf '%-54s' "$1"
  shift
  printf ' %12s' "$@"
  echo
}
# cells KIND [ARG]: one cell per runtime.
cells() {
  local rt out=()
  for rt in "${runtimes[@]}"; do
    case $1 in
      wall) out+=("$(cell "$rt" "$(med "${wall[$rt]:-}")")") ;;
      rss) out+=("$(cell "$rt" "$(mib "${shim_rss[$rt]:-}")")") ;;
      pss) out+=("$(cell "$rt" "$(mib "${kids_pss[$rt]:-}")")") ;;
      phase) if [[ $rt == runc ]]; then out+=(""); else out+=("$(cell "$rt" "$(med "${phase[$rt,$2]:-}")")"); fi ;;
    esac
  done
  printf '%s\n' "${out[@]}"
}
mapfile -t c < <(cells wall)
row "measure" "${runtimes[@]}"
row "ctr run --rm busybox true: wall time, median ms" "${c[@]}"
if [[ -n ${wall[kata-debian]:-} && -n ${wall[kata]:-} ]]; then
  row "  kata over kata-debian" "" "$(awk -v a="$(med "${wall[kata]}")" -v b="$(med "${wall[kata-debian]}")" 'BEGIN {printf "%.2f", a/b}')"
fi
mapfile -t c < <(cells rss)
row "shim VmRSS, MiB (sleep 30 running)" "${c[@]}"
mapfile -t c < <(cells pss)
row "processes the shim started, PSS sum MiB" "${c[@]}"
echo "  (runc: the container; kata: QEMU, virtiofsd, vsock daemon)"
echo "kata, from the shim's log (median ms):"
for p in "vm:  VM launch (Vm::start: daemons + QEMU + QMP)" "agent:  agent ready (from VM launch: agent answered)" \
  "sbx:  sandbox ready (+ virtio-fs mounted in the guest)" "create:  container create (rootfs shared + CreateContainer)" \
  "start:  container start (stdio + StartContainer)" "rest:  rest (ctr, containerd, exit, VM stop, cleanup)"; do
  mapfile -t c < <(cells phase "${p%%:*}")
  row "${p#*:}" "${c[@]}"
done

if ((${#failed[@]})); then
  echo
  for rt in "${!failed[@]}"; do echo "$rt failed: ${failed[$rt]}"; done
  shim_log=$(grep -v '^time=' "$CTD_LOG" || true)
  if [[ -n $shim_log ]]; then
    echo "the shim's log (last lines):"
    tail -n 15 <<<"$shim_log"
  fi
  exit 1
fi
