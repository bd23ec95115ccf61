# shellcheck shell=bash
# The systemd journal for the tests: the shim logs to /run/systemd/journal/socket, a path
# every process on the host shares, so one journald serves a whole test run. On hosts
# without systemd as PID 1 nothing provides it: start Debian's systemd-journald by hand
# (it runs standalone and creates the socket), and stop it again by its pid.
#
# Source this file, then:
#   journald_start   reuse the journal if its socket answers, else start
#                    /lib/systemd/systemd-journald and wait for its socket; sets
#                    JOURNALD_PID when this shell started it
#   journald_stop    stop the journald this shell started (by pid); safe to call twice

JOURNALD_BIN=${JOURNALD_BIN:-/lib/systemd/systemd-journald}
JOURNALD_SOCKET=/run/systemd/journal/socket
JOURNALD_PID=''

journald_log() { echo "journald.sh: $*" >&2; }

# Whether a journal answers on the socket (a datagram to a dead socket fails).
journald_alive() {
  [[ -S $JOURNALD_SOCKET ]] && printf 'MESSAGE=probe\nPRIORITY=7\nSYSLOG_IDENTIFIER=kata-test-probe\n' |
    logger --journald 2>/dev/null
}

journald_start() {
  if journald_alive; then
    journald_log "a journal already listens on $JOURNALD_SOCKET: using it"
    return 0
  fi
  if [[ ! -x $JOURNALD_BIN ]]; then
    journald_log "$JOURNALD_BIN missing: run hack/install-deps.sh (package systemd)"
    return 1
  fi
  "$JOURNALD_BIN" >/dev/null 2>&1 &
  JOURNALD_PID=$!
  local i
  for i in $(seq 100); do
    journald_alive && break
    if ! kill -0 "$JOURNALD_PID" 2>/dev/null; then
      journald_log "systemd-journald exited at start"; JOURNALD_PID=''; return 1
    fi
    sleep 0.05
  done
  journald_alive || { journald_log "no journal socket after 5 s"; journald_stop; return 1; }
  journald_log "systemd-journald pid $JOURNALD_PID on $JOURNALD_SOCKET"
}

journald_stop() {
  [[ -n $JOURNALD_PID ]] || return 0
  kill "$JOURNALD_PID" 2>/dev/null || true
  wait "$JOURNALD_PID" 2>/dev/null || true
  journald_log "stopped systemd-journald pid $JOURNALD_PID"
  JOURNALD_PID=''
}
