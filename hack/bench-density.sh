#!/usr/bin/env bash
# Density benchmark: N idle pods (busybox `sleep`) per runtime through containerd, started
# one at a time, then measured together while idle:
#   - start latency of the 1st and of the Nth pod (`ctr run -d` until the task runs);
#   - PSS per pod of each of a pod's host processes (QEMU, virtiofsd, vsock daemon, shim;
#     runc: the container) and their sum: the PSS of all pods' processes divided by N, so
#     pages the pods share (the guest image, binaries) count once;
#   - the guest's MemTotal and MemAvailable (/proc/meminfo read in the first pod);
#   - host CPU per idle pod over CPU_SECONDS, in % of one core;
#   - kata: the PSS sum per pod again after a process in each pod allocated and freed
#     CHURN_MIB of memory (what free page reporting gives back to the host);
#   - then every pod is removed and nothing may be left: no process, mount or directory
#     naming a pod, no shim of ours.
# Runtimes (RUNTIMES, default "runc kata kata-debian"): runc (io.containerd.runc.v2, the
# baseline), kata (ours: our kernel, the pmem image) and kata-debian (Debian's kernel with
# its initrd), all in one run and one private containerd; kata's configuration is
# shim/configuration.toml pointing at build/guest (VARIANT words from hack/lib/bench.sh
# change it for A/B runs, e.g. VARIANT="tb=1024 no-balloon").
# Environment: N (default 10), RUNTIMES, VARIANT, CPU_SECONDS (default 30), SETTLE (seconds
# between the last start and the measurements, default 10), CHURN_MIB (default 256; 0 skips). Exit status 1 when a pod failed
# to start or stop or something was left behind.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
n=${N:-10}
read -ra runtimes <<<"${RUNTIMES:-runc kata kata-debian}"
read -ra variant <<<"${VARIANT:-}"
cpu_seconds=${CPU_SECONDS:-30}
settle=${SETTLE:-10}
churn=${CHURN_MIB:-256}
image=docker.io/library/busybox:kata
log() { echo "bench-density: $*" >&2; }
[[ $n =~ ^[1-9][0-9]*$ ]] || { log "N=$n: expected a positive number of pods"; exit 2; }

# shellcheck source=hack/lib/bench.sh
source hack/lib/bench.sh
bench_check_runtimes "${runtimes[@]}"
bench_prepare density.toml $debian
declare -A conf_of=()
conf_of[kata]=$bench/density-kata.toml
bench_config kata "${conf_of[kata]}" "${variant[@]}"
if [[ -n $debian ]]; then
  conf_of[kata-debian]=$bench/density-debian.toml
  bench_config debian "${conf_of[kata-debian]}" "${variant[@]}"
fi

# shellcheck source=hack/lib/containerd.sh
source hack/lib/containerd.sh
CTD_NS=kata-density
ctd_start "$bench/bin"
ctd_ctr images import build/images/busybox.tar >/dev/null

now_ms() { echo $(($(date +%s%N) / 1000000)); }
pod_id() { echo "dens-$1-$2"; }

# pod_pids ID: "role pid" lines for the pod's host processes.
pod_pids() {
  local shim kid comm
  shim=$(ctd_shim_pid "$1") || return 1
  echo "shim $shim"
  for kid in $(ctd_descendants "$shim"); do
    comm=$(cat "/proc/$kid/comm" 2>/dev/null) || continue
    case $comm in
      qemu-system-*) echo "qemu $kid" ;;
      virtiofsd) echo "virtiofsd $kid" ;;
      vhost-device-vs*) echo "vsock $kid" ;;
      *) echo "container $kid" ;;
    esac
  done
}

pss_kb() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
# Ticks of CPU (user + system, all threads) a process used so far.
cpu_ticks() { awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$1/stat" 2>/dev/null || echo 0; }

declare -A started=() first_ms=() last_ms=() pss=() pss_churn=() mem_total=() mem_avail=() cpu_pct=() stop_s=() leftover=() failure=()
status=0
for rt in "${runtimes[@]}"; do
  log "$rt: starting $n pods"
  started[$rt]=0
  for ((i = 1; i <= n; i++)); do
    id=$(pod_id "$rt" "$i")
    t0=$(now_ms)
    # shellcheck disable=SC2046 # bench_runtime_args is a list of words
    if ! timeout 300 ctr -a "$CTD_SOCK" -n "$CTD_NS" run -d $(bench_runtime_args "$rt") "$image" "$id" \
      sleep 1000000 >/dev/null 2>"$CTD_DIR/ctr.err"; then
      failure[$rt]="pod $i: $(tr -s '\n' ' ' <"$CTD_DIR/ctr.err")"
      log "$rt: ${failure[$rt]}"
      status=1
      break
    fi
    ms=$(($(now_ms) - t0))
    ((i == 1)) && first_ms[$rt]=$ms
    last_ms[$rt]=$ms
    started[$rt]=$i
    log "$rt: pod $i running after $ms ms"
  done
  count=${started[$rt]}
  if ((count > 0)); then
    sleep "$settle"
    # PSS by role, summed over all pods.
    declare -A kb=([qemu]=0 [virtiofsd]=0 [vsock]=0 [shim]=0 [container]=0)
    pids=()
    for ((i = 1; i <= count; i++)); do
      while read -r role pid; do
        kb[$role]=$((kb[$role] + $(pss_kb "$pid")))
        pids+=("$pid")
      done < <(pod_pids "$(pod_id "$rt" "$i")")
    done
    for role in qemu virtiofsd vsock shim container; do pss[$rt,$role]=$((kb[$role] / count)); done
    pss[$rt,sum]=$(((kb[qemu] + kb[virtiofsd] + kb[vsock] + kb[shim] + kb[container]) / count))
    unset kb
    if [[ $rt != runc ]]; then
      meminfo=$(ctd_ctr task exec --exec-id meminfo "$(pod_id "$rt" 1)" cat /proc/meminfo 2>/dev/null || true)
      mem_total[$rt]=$(awk '/^MemTotal:/ {printf "%.0f", $2/1024}' <<<"$meminfo")
      mem_avail[$rt]=$(awk '/^MemAvailable:/ {printf "%.0f", $2/1024}' <<<"$meminfo")
    fi
    # Idle CPU: all the pods' processes over CPU_SECONDS.
    t_before=0 t_after=0
    for pid in "${pids[@]}"; do t_before=$((t_before + $(cpu_ticks "$pid"))); done
    sleep "$cpu_seconds"
    for pid in "${pids[@]}"; do t_after=$((t_after + $(cpu_ticks "$pid"))); done
    cpu_pct[$rt]=$(awk -v d=$((t_after - t_before)) -v hz="$(getconf CLK_TCK)" -v s="$cpu_seconds" -v n="$count" \
      'BEGIN {printf "%.2f", d / hz / s / n * 100}')
    log "$rt: $count pods: PSS ${pss[$rt,sum]} kB per pod, CPU ${cpu_pct[$rt]}% of a core per pod"
    if [[ $rt != runc ]] && ((churn > 0)); then
      for ((i = 1; i <= count; i++)); do
        ctd_ctr task exec --exec-id churn "$(pod_id "$rt" "$i")" \
          dd if=/dev/zero of=/dev/null bs="${churn}M" count=1 >/dev/null 2>&1 || log "$rt: pod $i: dd failed"
      done
      sleep "$settle"
      total=0
      for ((i = 1; i <= count; i++)); do
        while read -r _ pid; do total=$((total + $(pss_kb "$pid"))); done < <(pod_pids "$(pod_id "$rt" "$i")")
      done
      pss_churn[$rt]=$((total / count))
      log "$rt: after freeing $churn MiB in each pod: PSS ${pss_churn[$rt]} kB per pod"
    fi
  fi
  # Remove every pod, then look for leftovers.
  t0=$(now_ms)
  for ((i = 1; i <= n; i++)); do
    id=$(pod_id "$rt" "$i")
    timeout 120 ctr -a "$CTD_SOCK" -n "$CTD_NS" task delete -f "$id" >/dev/null 2>&1 || true
    timeout 120 ctr -a "$CTD_SOCK" -n "$CTD_NS" containers delete "$id" >/dev/null 2>&1 || true
  done
  for ((w = 0; w < 150; w++)); do [[ -z $(ctd_our_shims) ]] && break; sleep 0.1; done
  stop_s[$rt]=$(awk -v ms=$(($(now_ms) - t0)) 'BEGIN {printf "%.1f", ms / 1000}')
  left=()
  [[ -n $(ctd_our_shims) ]] && left+=("shims: $(ctd_our_shims | tr '\n' ' ')")
  for ((i = 1; i <= n; i++)); do
    id=$(pod_id "$rt" "$i")
    for p in /proc/[0-9]*; do
      grep -qF -- "$id" "$p/cmdline" 2>/dev/null && ! grep -q '^ctr' "$p/cmdline" 2>/dev/null &&
        left+=("process ${p#/proc/} ($(tr '\0' ' ' <"$p/cmdline" | cut -c1-80))")
    done
    grep -qF -- "$id" /proc/self/mountinfo && left+=("mounts of $id")
    for d in "/run/kata/$id" "/run/kata-containers/shared/sandboxes/$id"; do
      [[ -e $d ]] && left+=("$d")
    done
  done
  if ((${#left[@]})); then
    leftover[$rt]=$(printf '%s; ' "${left[@]}")
    log "$rt: left behind: ${leftover[$rt]}"
    status=1
  fi
done

mib() { awk -v k="${1:-}" 'BEGIN {if (k == "") print "n/a"; else printf "%.1f", k / 1024}'; }
row() {
  printf '%-48s' "$1"
  shift
  printf ' %12s' "$@"
  echo
}
cells() { # cells KIND [ROLE]
  local rt out=()
  for rt in "${runtimes[@]}"; do
    case $1 in
      started) out+=("${started[$rt]}/$n") ;;
      first) out+=("${first_ms[$rt]:-n/a}") ;;
      last) out+=("${last_ms[$rt]:-n/a}") ;;
      pss) out+=("$(mib "${pss[$rt,$2]:-}")") ;;
      total) out+=("${mem_total[$rt]:-n/a}") ;;
      avail) out+=("${mem_avail[$rt]:-n/a}") ;;
      cpu) out+=("${cpu_pct[$rt]:-n/a}") ;;
      churn) out+=("$(mib "${pss_churn[$rt]:-}")") ;;
      stop) out+=("${stop_s[$rt]:-n/a}") ;;
      left) if [[ -n ${leftover[$rt]:-} ]]; then out+=(yes); else out+=(nothing); fi ;;
    esac
  done
  printf '%s\n' "${out[@]}"
}
echo
echo "density benchmark: N=$n idle pods per runtime ($image, sleep), one at a time;" \
  "load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs, $(awk '/^MemTotal:/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
for rt in "${runtimes[@]}"; do
  case $rt in
    runc) echo "  runc: $(runc --version | head -n 1)" ;;
    kata) echo "  kata: our kernel $(bench_kernel_release kata), pmem image; ${conf_of[kata]}${variant[*]:+ (variant: ${variant[*]})}" ;;
    kata-debian) echo "  kata-debian: Debian's kernel $(bench_kernel_release debian), initrd; ${conf_of[kata-debian]}" ;;
  esac
done
mapfile -t c < <(cells started)
row "measure" "${runtimes[@]}"
row "pods started" "${c[@]}"
mapfile -t c < <(cells first)
row "start latency, 1st pod (ms)" "${c[@]}"
mapfile -t c < <(cells last)
row "start latency, pod N (ms)" "${c[@]}"
for role in qemu virtiofsd vsock shim container sum; do
  case $role in
    qemu) label="PSS per pod, MiB: QEMU" ;;
    virtiofsd) label="                  virtiofsd" ;;
    vsock) label="                  vsock daemon" ;;
    shim) label="                  shim" ;;
    container) label="                  container processes" ;;
    sum) label="                  sum" ;;
  esac
  mapfile -t c < <(cells pss "$role")
  row "$label" "${c[@]}"
done
mapfile -t c < <(cells total)
row "guest MemTotal, MiB" "${c[@]}"
mapfile -t c < <(cells avail)
row "guest MemAvailable, MiB" "${c[@]}"
mapfile -t c < <(cells cpu)
row "host CPU per idle pod, % of one core (${cpu_seconds} s)" "${c[@]}"
if ((churn > 0)); then
  mapfile -t c < <(cells churn)
  row "PSS sum per pod after the guest freed $churn MiB, MiB" "${c[@]}"
fi
mapfile -t c < <(cells stop)
row "remove all pods, s" "${c[@]}"
mapfile -t c < <(cells left)
row "left behind" "${c[@]}"
for rt in "${runtimes[@]}"; do
  [[ -n ${failure[$rt]:-} ]] && echo "$rt failed: ${failure[$rt]}"
  [[ -n ${leftover[$rt]:-} ]] && echo "$rt left: ${leftover[$rt]}"
done
exit "$status"
