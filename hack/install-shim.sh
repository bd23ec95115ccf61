#!/usr/bin/env bash
# Builds and installs containerd-shim-kata-v2 and kata-ctl, the shim's default
# configurations (configuration.toml; configuration-remote.toml for peer pods), the containerd CRI runtime entry (hack/containerd/kata.toml as a conf.d
# drop-in) and, where /etc/crio exists, the CRI-O runtime handler (hack/crio/50-kata.conf).
# hack/uninstall.sh removes all of it.
#
# Usage: hack/install-shim.sh [--prefix DIR] [--root DIR] [--bin-dir DIR]
#   --prefix DIR   install the binaries to DIR/bin (default /usr/local; containerd finds
#                  io.containerd.kata.v2 as containerd-shim-kata-v2 on its PATH)
#   --root DIR     install under DIR as if it were / (a staging or test root; the paths
#                  written into the configuration files stay the ones without DIR)
#   --bin-dir DIR  install the binaries already built in DIR instead of building release
#                  ones (e.g. target/debug)
# The configuration goes to /etc/kata-containers/configuration.toml only when that file
# is absent or still identical to the copy a previous run installed (a local edit is
# kept, and the new default is written next to it as configuration.toml.new).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=/usr/local root='' bin_dir=''
while [[ $# -gt 0 ]]; do
  case $1 in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    *) echo "install-shim: unknown argument '$1' (expected --prefix DIR, --root DIR or --bin-dir DIR)" >&2; exit 2 ;;
  esac
done
root=${root%/}
[[ $prefix == /* ]] || prefix=$(pwd)/$prefix
log() { echo "install-shim: $*" >&2; }
# Marks the lines and files this script writes into containerd's own configuration, so
# hack/uninstall.sh removes exactly those.
MARK="# added by kata hack/install-shim.sh"

if [[ -z $bin_dir ]]; then
  log "building containerd-shim-kata-v2 and kata-ctl (release)"
  cargo build --manifest-path "$repo/Cargo.toml" --release -p kata-shim -p kata-ctl \
    --bin containerd-shim-kata-v2 --bin kata-ctl
  bin_dir="$repo/target/release"
fi

install -d "$root$prefix/bin"
for name in containerd-shim-kata-v2 kata-ctl; do
  [[ -x $bin_dir/$name ]] || { log "$bin_dir/$name is missing"; exit 1; }
  install -m 0755 "$bin_dir/$name" "$root$prefix/bin/$name.tmp"
  mv -f "$root$prefix/bin/$name.tmp" "$root$prefix/bin/$name"
  log "installed $root$prefix/bin/$name"
done

conf_dir=$root/etc/kata-containers
install -d "$conf_dir"
# configuration.toml (handler `kata`) and configuration-remote.toml (handler `kata-remote`,
# peer pods).
for name in configuration.toml configuration-remote.toml; do
  conf="$conf_dir/$name"
  # The checksum of what we installed last, to tell our copy from a local edit.
  stamp="$conf_dir/.$name.installed-sha256"
  src="$repo/shim/$name"
  if [[ ! -e $conf ]] || { [[ -f $stamp ]] && (cd "$conf_dir" && sha256sum --status -c "$stamp" 2>/dev/null); }; then
    install -m 0644 "$src" "$conf"
    (cd "$conf_dir" && sha256sum "$name" > "$stamp")
    log "installed $conf"
  elif cmp -s "$src" "$conf"; then
    log "$conf is up to date"
  else
    install -m 0644 "$src" "$conf.new"
    log "$conf was edited locally: kept it; the new default is $conf.new"
  fi
done

# containerd: the CRI runtime entry as a drop-in, imported by the main configuration.
ctd_dir=/etc/containerd
dropin="$root$ctd_dir/conf.d/50-kata.toml"
install -d "$root$ctd_dir/conf.d"
install -m 0644 "$repo/hack/containerd/kata.toml" "$dropin"
log "installed $dropin"
main="$root$ctd_dir/config.toml"
imports="imports = [\"$ctd_dir/conf.d/*.toml\"]  $MARK"
if [[ ! -e $main ]]; then
  printf '%s\nversion = 2\n%s\n' "$MARK (whole file)" "$imports" > "$main"
  log "wrote $main importing $ctd_dir/conf.d/*.toml"
elif grep -q '^imports' "$main"; then
  grep -q 'conf.d' "$main" ||
    log "$main has its own imports: add \"$ctd_dir/conf.d/*.toml\" to them for the kata runtime"
else
  # `imports` is a top-level key: it must come before the first table.
  { printf '%s\n' "$imports"; cat "$main"; } > "$main.tmp"
  chmod --reference="$main" "$main.tmp"
  mv -f "$main.tmp" "$main"
  log "$main now imports $ctd_dir/conf.d/*.toml (restart containerd to load the kata runtime)"
fi

# CRI-O: the `kata` runtime handler as a drop-in, only where CRI-O is set up. CRI-O runs
# the shim by its absolute runtime_path: the one just installed.
crio_dir=$root/etc/crio
if [[ -d $crio_dir ]]; then
  crio_dropin="$crio_dir/crio.conf.d/50-kata.conf"
  shim_path="$prefix/bin/containerd-shim-kata-v2"
  install -d "$crio_dir/crio.conf.d"
  sed "s|^runtime_path = .*|runtime_path = \"$shim_path\"|" "$repo/hack/crio/50-kata.conf" > "$crio_dropin.tmp"
  chmod 0644 "$crio_dropin.tmp"
  mv -f "$crio_dropin.tmp" "$crio_dropin"
  log "installed $crio_dropin (restart CRI-O to load the kata runtime)"
fi
