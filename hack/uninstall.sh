#!/usr/bin/env bash
# Removes what the install scripts put on this node:
#   hack/install-shim.sh       PREFIX/bin/containerd-shim-kata-v2 and kata-ctl;
#                              /etc/kata-containers/configuration.toml and
#                              configuration-remote.toml (each kept, with a
#                              message, when it was edited locally), its .new copy and
#                              install stamp; /etc/containerd/conf.d/50-kata.toml and what
#                              it added to /etc/containerd/config.toml (the marked
#                              `imports` line, or the whole file when it wrote it);
#                              /etc/crio/crio.conf.d/50-kata.conf
#   hack/build-guest.sh --install
#                              /usr/share/kata-containers/vmlinux.container,
#                              kata-containers.img, vmlinuz.container and
#                              kata-containers-initrd.img
#   hack/install-deps.sh       virtiofsd and vhost-device-vsock in KATA_DEPS_PREFIX
#                              (/opt/kata-deps) and cargo's records of them
# Directories of ours are removed when they end up empty. Debian packages are never
# removed (apt-get remove them yourself). No install script puts down systemd units yet.
# Refuses while kata sandboxes run, naming them (live shims of the installed binary, and
# /run/kata/*/state.json records whose shim is alive), unless --force. Idempotent: a second
# run finds nothing to do.
#
# Usage: hack/uninstall.sh [--prefix DIR] [--root DIR] [--force]
#   --prefix DIR  where install-shim.sh put the binaries (default /usr/local)
#   --root DIR    uninstall from DIR as if it were / (what install --root DIR put there)
#   --force       uninstall even while sandboxes run (they keep running until stopped)
# Environment: KATA_DEPS_PREFIX as for hack/install-deps.sh.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=/usr/local root='' force=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --force) force=1; shift ;;
    *) echo "uninstall: unknown argument '$1' (expected --prefix DIR, --root DIR or --force)" >&2; exit 2 ;;
  esac
done
root=${root%/}
[[ $prefix == /* ]] || prefix=$(pwd)/$prefix
deps_prefix=${KATA_DEPS_PREFIX:-/opt/kata-deps}
# The mark hack/install-shim.sh puts on what it adds to containerd's configuration.
MARK="# added by kata hack/install-shim.sh"
log() { echo "uninstall: $*" >&2; }
removed=0 kept=0

# rm_file PATH: removes PATH if it is there.
rm_file() {
  if [[ -e $1 || -L $1 ]]; then
    rm -f "$1"
    log "removed $1"
    removed=$((removed + 1))
  fi
}

# rmdir_empty DIR...: removes each DIR that exists and is empty.
rmdir_empty() {
  local d
  for d in "$@"; do
    if [[ -d $d ]] && rmdir "$d" 2>/dev/null; then
      log "removed $d/"
      removed=$((removed + 1))
    fi
  done
}

# The running sandboxes as "id (shim pid N)" lines: processes whose executable is the
# installed shim, and state records (written by every shim) whose shim is alive.
running_sandboxes() {
  local shim=$root$prefix/bin/containerd-shim-kata-v2 d exe pid id rec
  declare -A seen=()
  for d in /proc/[0-9]*; do
    exe=$(readlink "$d/exe" 2>/dev/null) || continue
    [[ $exe == "$shim" || $exe == "$shim (deleted)" ]] || continue
    pid=${d#/proc/}
    id=$(tr '\0' '\n' <"$d/cmdline" 2>/dev/null | sed -n '/^-id$/{n;p;q}') || true
    seen[$pid]=1
    echo "${id:-unknown} (shim pid $pid)"
  done
  for rec in "$root"/run/kata/*/state.json; do
    [[ -f $rec ]] || continue
    pid=$(sed -n 's/^ *"shim_pid": *\([0-9][0-9]*\).*/\1/p' "$rec")
    id=$(sed -n 's/^ *"sandbox_id": *"\(.*\)",*$/\1/p' "$rec")
    [[ -n $pid && -z ${seen[$pid]:-} && -d /proc/$pid ]] || continue
    seen[$pid]=1
    echo "${id:-unknown} (shim pid $pid, $rec)"
  done
}

sandboxes=$(running_sandboxes)
if [[ -n $sandboxes ]]; then
  if [[ $force == 0 ]]; then
    log "kata sandboxes are running; stop them first (e.g. crictl rmp, ctr task kill + delete) or pass --force:"
    sed 's/^/  /' <<<"$sandboxes" >&2
    exit 1
  fi
  log "--force: uninstalling while these sandboxes run (they keep running until stopped):"
  sed 's/^/  /' <<<"$sandboxes" >&2
fi

# Binaries (install-shim.sh).
for name in containerd-shim-kata-v2 kata-ctl; do
  rm_file "$root$prefix/bin/$name"
done
case $prefix in
  /usr | /usr/local) ;;
  *) rmdir_empty "$root$prefix/bin" "$root$prefix" ;;
esac

# Configuration (install-shim.sh): ours unless edited locally.
conf_dir=$root/etc/kata-containers
for name in configuration.toml configuration-remote.toml; do
  conf=$conf_dir/$name
  stamp=$conf_dir/.$name.installed-sha256
  if [[ -f $conf ]]; then
    if { [[ -f $stamp ]] && (cd "$conf_dir" && sha256sum --status -c "$stamp" 2>/dev/null); } ||
      cmp -s "$repo/shim/$name" "$conf"; then
      rm_file "$conf"
    else
      log "$conf was edited locally: kept it (delete it yourself when it is no longer needed)"
      kept=$((kept + 1))
    fi
  fi
  rm_file "$conf.new"
  rm_file "$stamp"
done
rmdir_empty "$conf_dir"

# containerd (install-shim.sh): the drop-in, then what it added to config.toml.
ctd_dir=$root/etc/containerd
had_dropin=0
[[ -e $ctd_dir/conf.d/50-kata.toml ]] && had_dropin=1
rm_file "$ctd_dir/conf.d/50-kata.toml"
main=$ctd_dir/config.toml
if [[ -f $main ]] && grep -qF "$MARK" "$main"; then
  others=$(find "$ctd_dir/conf.d" -maxdepth 1 -name '*.toml' 2>/dev/null | head -n 1 || true)
  rest=$(grep -vF "$MARK" "$main" || true)
  if grep -qF "$MARK (whole file)" "$main" && [[ $rest == "version = 2" ]]; then
    rm_file "$main"
  elif [[ -n $others ]]; then
    log "$main: kept its imports line: $ctd_dir/conf.d holds other drop-ins ($others)"
    kept=$((kept + 1))
  else
    printf '%s\n' "$rest" >"$main.tmp"
    chmod --reference="$main" "$main.tmp"
    mv -f "$main.tmp" "$main"
    log "removed the conf.d imports line from $main"
    removed=$((removed + 1))
  fi
fi
rmdir_empty "$ctd_dir/conf.d" "$ctd_dir"
((had_dropin)) && log "restart containerd to unload the kata runtime"

# CRI-O (install-shim.sh).
if [[ -e $root/etc/crio/crio.conf.d/50-kata.conf ]]; then
  rm_file "$root/etc/crio/crio.conf.d/50-kata.conf"
  log "restart CRI-O to unload the kata runtime"
fi

# Guest image (build-guest.sh --install).
share=$root/usr/share/kata-containers
rm_file "$share/vmlinux.container"
rm_file "$share/kata-containers.img"
rm_file "$share/vmlinuz.container"
rm_file "$share/kata-containers-initrd.img"
rmdir_empty "$share"

# Daemons (install-deps.sh): our binaries, and cargo's records when they list only ours.
deps=$root$deps_prefix
rm_file "$deps/bin/virtiofsd"
rm_file "$deps/bin/vhost-device-vsock"
if [[ -f $deps/.crates.toml ]]; then
  if grep -v -e '^\[v1\]$' -e '^"virtiofsd ' -e '^"vhost-device-vsock ' -e '^$' "$deps/.crates.toml" >/dev/null; then
    log "$deps holds other cargo-installed crates: kept $deps/.crates.toml and .crates2.json"
    kept=$((kept + 1))
  else
    rm_file "$deps/.crates.toml"
    rm_file "$deps/.crates2.json"
  fi
fi
rmdir_empty "$deps/bin" "$deps"

if ((removed == 0 && kept == 0)); then
  log "nothing of kata is installed${root:+ under $root}"
else
  log "done ($removed removed, $kept kept as said above; Debian packages are left installed)"
fi
