#!/usr/bin/env bash
# Installs the peer pods adaptor and what the `kata-remote` handler needs on a node:
#   /usr/local/bin/peerpod-adaptor
#   /etc/kata-containers/peerpod-adaptor.toml          (kept when edited locally)
#   /etc/systemd/system/peerpod-adaptor.service        (enabled and started when systemd runs)
#   /usr/share/kata-containers/podvm/                  (hack/build-podvm.sh --install)
#   /etc/containerd/conf.d/51-kata-remote.toml         (restart containerd)
#   /etc/crio/crio.conf.d/51-kata-remote.conf          (only where /etc/crio exists)
# The shim itself and containerd's conf.d import come from hack/install-shim.sh; the shim's
# /etc/kata-containers/configuration-remote.toml is installed with the shim.
#
# Usage: hack/install-peerpod.sh [--prefix DIR] [--root DIR] [--bin-dir DIR] [--uninstall]
#   --prefix DIR   binaries to DIR/bin (default /usr/local)
#   --root DIR     install under DIR as if it were / (paths written into files stay without DIR)
#   --bin-dir DIR  take peerpod-adaptor from DIR (e.g. target/debug) instead of building it
#   --uninstall    remove everything listed above (the pod VM image, the units, the
#                  drop-ins; the adaptor's state in /var/lib/peerpod is kept)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=/usr/local root='' bin_dir='' uninstall=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --root) root=${2:?--root needs a directory}; root=${root%/}; shift 2 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    *) echo "install-peerpod: unknown argument '$1' (expected --prefix, --root, --bin-dir or --uninstall)" >&2; exit 2 ;;
  esac
done
log() { echo "install-peerpod: $*" >&2; }
systemd=0
if [[ -z $root ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then systemd=1; fi

bin=$root$prefix/bin/peerpod-adaptor
conf=$root/etc/kata-containers/peerpod-adaptor.toml
unit=$root/etc/systemd/system/peerpod-adaptor.service
podvm=$root/usr/share/kata-containers/podvm
ctd=$root/etc/containerd/conf.d/51-kata-remote.toml
crio=$root/etc/crio/crio.conf.d/51-kata-remote.conf

if [[ $uninstall == 1 ]]; then
  if ((systemd)); then systemctl disable --now peerpod-adaptor.service 2>/dev/null || true; fi
  for f in "$unit" "$bin" "$ctd" "$crio"; do
    if [[ -e $f ]]; then rm -f "$f"; log "removed $f"; fi
  done
  if [[ -e $conf ]]; then
    if cmp -s "$conf" "$repo/hack/peerpod/peerpod-adaptor.toml"; then rm -f "$conf"; log "removed $conf"
    else log "kept $conf (edited locally)"; fi
  fi
  if [[ -d $podvm ]]; then rm -rf "$podvm"; log "removed $podvm"; fi
  if ((systemd)); then systemctl daemon-reload; fi
  exit 0
fi

if [[ -z $bin_dir ]]; then
  log "building peerpod-adaptor (release)"
  cargo build --manifest-path "$repo/Cargo.toml" --release -p kata-peerpod --bin peerpod-adaptor
  bin_dir=$repo/target/release
fi
[[ -x $bin_dir/peerpod-adaptor ]] || { log "$bin_dir/peerpod-adaptor is missing"; exit 1; }
install -d "$(dirname "$bin")"
install -m 0755 "$bin_dir/peerpod-adaptor" "$bin.tmp"
mv -f "$bin.tmp" "$bin"
log "installed $bin"

install -d "$(dirname "$conf")"
if [[ ! -e $conf ]]; then
  install -m 0644 "$repo/hack/peerpod/peerpod-adaptor.toml" "$conf"
  log "installed $conf"
elif ! cmp -s "$repo/hack/peerpod/peerpod-adaptor.toml" "$conf"; then
  install -m 0644 "$repo/hack/peerpod/peerpod-adaptor.toml" "$conf.new"
  log "kept $conf (edited locally); the new default is $conf.new"
fi

install -d "$(dirname "$unit")"
sed "s|/usr/local/bin/peerpod-adaptor|$prefix/bin/peerpod-adaptor|" "$repo/hack/peerpod/peerpod-adaptor.service" >"$unit"
chmod 0644 "$unit"
log "installed $unit"

args=(--install --no-build)
[[ -n $root ]] && args+=(--root "$root")
if [[ ! -f $repo/build/podvm/initrd.img ]]; then args=(--install); [[ -n $root ]] && args+=(--root "$root"); fi
"$repo/hack/build-podvm.sh" "${args[@]}"

install -d "$(dirname "$ctd")"
install -m 0644 "$repo/hack/containerd/kata-remote.toml" "$ctd"
log "installed $ctd (restart containerd to load the kata-remote runtime)"
if [[ -d $root/etc/crio ]]; then
  install -d "$(dirname "$crio")"
  sed "s|^runtime_path = .*|runtime_path = \"$prefix/bin/containerd-shim-kata-v2\"|" "$repo/hack/crio/51-kata-remote.conf" >"$crio"
  chmod 0644 "$crio"
  log "installed $crio (restart CRI-O to load the kata-remote runtime)"
fi

if ((systemd)); then
  systemctl daemon-reload
  systemctl enable --now peerpod-adaptor.service
  log "peerpod-adaptor.service enabled and started"
else
  log "no systemd here: start the adaptor with: $prefix/bin/peerpod-adaptor --config /etc/kata-containers/peerpod-adaptor.toml"
fi
