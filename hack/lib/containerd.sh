# shellcheck shell=bash
# A private containerd 1.6 for the hack/ scripts, like the one tests/src/containerd.rs
# starts: its own root, state, gRPC and ttrpc sockets and log under one temp dir, the CRI
# plugin disabled, so a system containerd (if any) is neither used nor disturbed.
#
# Source this file, then:
#   ctd_start [DIR...]   start containerd with DIRs first on its PATH (where it finds
#                        containerd-shim-<name>-v2); sets CTD_DIR CTD_SOCK CTD_PID CTD_LOG,
#                        and installs EXIT/INT/TERM traps that call ctd_stop
#   ctd_ctr ARGS...      ctr -a "$CTD_SOCK" -n "$CTD_NS" ARGS...
#   ctd_task_dir ID      the task's bundle in containerd's state dir
#   ctd_shim_pid ID      pid of the shim serving task ID (shim.pid in the bundle, else the
#                        parent of the task's pid), checked to name our socket
#   ctd_stop             delete leftover tasks and containers, stop containerd by its pid,
#                        stop shims still naming our socket, unmount and remove CTD_DIR;
#                        safe to call twice
# Environment: CTD_NS (namespace, default kata-hack), CTD_LOG_LEVEL (default info),
# CTD_ENV (extra NAME=VALUE words for containerd and its shims, e.g. KATA_CONF_FILE=...).

CTD_NS=${CTD_NS:-kata-hack}
CTD_DIR='' CTD_SOCK='' CTD_PID='' CTD_LOG=''

ctd_log() { echo "containerd.sh: $*" >&2; }

ctd_ctr() { ctr -a "$CTD_SOCK" -n "$CTD_NS" "$@"; }

ctd_start() {
  if ! command -v containerd >/dev/null || ! command -v ctr >/dev/null; then
    ctd_log "containerd/ctr missing: run hack/install-deps.sh"; return 1
  fi
  CTD_DIR=$(mktemp -d /tmp/kata-hack-ctd.XXXXXX)
  CTD_SOCK=$CTD_DIR/containerd.sock
  CTD_LOG=$CTD_DIR/containerd.log
  trap 'ctd_stop' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  cat >"$CTD_DIR/config.toml" <<EOF
version = 2
root = "$CTD_DIR/root"
state = "$CTD_DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CTD_SOCK"
[ttrpc]
  address = "$CTD_SOCK.ttrpc"
[debug]
  level = "${CTD_LOG_LEVEL:-info}"
EOF
  local path=$PATH d
  for ((d = $#; d >= 1; d--)); do path=${!d}:$path; done
  # shellcheck disable=SC2086 # CTD_ENV is a list of NAME=VALUE words
  env PATH="$path" ${CTD_ENV:-} containerd --config "$CTD_DIR/config.toml" \
    --root "$CTD_DIR/root" --state "$CTD_DIR/state" --address "$CTD_SOCK" \
    </dev/null >"$CTD_LOG" 2>&1 &
  CTD_PID=$!
  local i
  for ((i = 0; i < 200; i++)); do
    if ! kill -0 "$CTD_PID" 2>/dev/null; then
      ctd_log "containerd exited at start; its log:"; tail -n 20 "$CTD_LOG" >&2; return 1
    fi
    if [[ -S $CTD_SOCK ]] && ctr -a "$CTD_SOCK" version >/dev/null 2>&1; then
      ctd_log "private containerd pid $CTD_PID on $CTD_SOCK"
      return 0
    fi
    sleep 0.1
  done
  ctd_log "containerd did not answer within 20 s; its log:"; tail -n 20 "$CTD_LOG" >&2
  return 1
}

ctd_task_dir() { echo "$CTD_DIR/state/io.containerd.runtime.v2.task/$CTD_NS/$1"; }

# True when process $1's command line has `-address <our socket>`: a shim of ours
# (containerd itself has `--address`).
ctd_names_socket() {
  local args=() i
  { mapfile -d '' args <"/proc/$1/cmdline"; } 2>/dev/null || return 1
  for ((i = 1; i < ${#args[@]}; i++)); do
    [[ ${args[i - 1]} == -address && ${args[i]} == "$CTD_SOCK" ]] && return 0
  done
  return 1
}

ctd_shim_pid() {
  local id=$1 pid='' task_pid
  local pidfile
  pidfile="$(ctd_task_dir "$id")/shim.pid"
  # Both shims write shim.pid in the bundle (ours for the shim that started the sandbox);
  # otherwise the shim is the parent (subreaper) of the process the task reports (runc:
  # the container's init, kata: QEMU).
  if [[ -s $pidfile ]]; then
    pid=$(<"$pidfile")
  else
    task_pid=$(ctd_ctr task ls 2>/dev/null | awk -v id="$id" '$1 == id {print $2}')
    [[ -n $task_pid && $task_pid != 0 ]] &&
      pid=$(awk '/^PPid:/ {print $2}' "/proc/$task_pid/status" 2>/dev/null)
  fi
  if [[ -n $pid ]] && ctd_names_socket "$pid"; then
    echo "$pid"
  else
    ctd_log "cannot find the shim of task $id (pid '${pid}')"
    return 1
  fi
}

# Pids of $1's descendants, children first.
ctd_descendants() {
  local c kids=()
  read -ra kids <<<"$(cat /proc/"$1"/task/*/children 2>/dev/null | tr '\n' ' ')"
  for c in "${kids[@]}"; do
    echo "$c"
    ctd_descendants "$c"
  done
}

# Pids of live processes whose command line names our socket (shims outlive containerd).
ctd_our_shims() {
  local p
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [[ $p != "$$" ]] && ctd_names_socket "$p" && echo "$p"
  done
  return 0
}

ctd_stop() {
  [[ -n $CTD_DIR ]] || return 0
  local ns id pid i shims=() all=()
  set +e
  if [[ -n $CTD_PID ]] && kill -0 "$CTD_PID" 2>/dev/null; then
    # Tasks an interrupted run left: a kata shim stops its VM when its task is deleted.
    for ns in $(ctr -a "$CTD_SOCK" namespaces ls -q 2>/dev/null); do
      for id in $(ctr -a "$CTD_SOCK" -n "$ns" task ls -q 2>/dev/null); do
        timeout 60 ctr -a "$CTD_SOCK" -n "$ns" task delete -f "$id" >/dev/null 2>&1
      done
      for id in $(ctr -a "$CTD_SOCK" -n "$ns" containers ls -q 2>/dev/null); do
        timeout 60 ctr -a "$CTD_SOCK" -n "$ns" containers delete "$id" >/dev/null 2>&1
      done
    done
    # Shims of deleted tasks exit by themselves (ours after stopping its VM and sending
    # its last events): give them 10 s while containerd still takes those events.
    for ((i = 0; i < 100; i++)); do [[ -n $(ctd_our_shims) ]] || break; sleep 0.1; done
    kill -TERM "$CTD_PID" 2>/dev/null
    for ((i = 0; i < 100; i++)); do kill -0 "$CTD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$CTD_PID" 2>/dev/null
    wait "$CTD_PID" 2>/dev/null
  fi
  # Shims still naming our socket: SIGTERM (ours tears its VM down), then SIGKILL them and
  # what they started.
  mapfile -t shims < <(ctd_our_shims)
  if ((${#shims[@]})); then
    ctd_log "stopping leftover shims: ${shims[*]}"
    for pid in "${shims[@]}"; do all+=("$pid"); mapfile -t -O "${#all[@]}" all < <(ctd_descendants "$pid"); done
    kill -TERM "${shims[@]}" 2>/dev/null
    for ((i = 0; i < 150; i++)); do
      for pid in "${shims[@]}"; do kill -0 "$pid" 2>/dev/null && break; done
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "${all[@]}" 2>/dev/null
  fi
  # Bundle rootfs mounts of tasks that were not deleted; deepest first.
  awk -v d="$CTD_DIR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null; done
  rm -rf --one-file-system "$CTD_DIR"
  CTD_DIR='' CTD_PID=''
  set -e
}
