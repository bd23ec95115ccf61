#!/usr/bin/env bash
# Builds offline OCI image archives (no registry is reachable) from Debian's busybox-static:
#   build/images/busybox.tar  -> docker.io/library/busybox:kata   (sh, coreutils applets, users)
#   build/images/pause.tar    -> registry.k8s.io/pause:kata      (sleeps forever; CRI sandbox image)
# Import with: ctr -n <ns> images import build/images/busybox.tar
# Layers are uncompressed tars, so each diff_id equals its layer digest. Idempotent.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${IMAGE_BUILD_DIR:-$repo/build/images}
mkdir -p "$out"
busybox=/bin/busybox
[[ -x $busybox ]] || { echo "build-test-images: $busybox missing: run hack/install-deps.sh" >&2; exit 1; }

sha() { sha256sum "$1" | cut -d' ' -f1; }

# build_image <archive name> <image ref> <rootfs dir> <config json fragment>
build_image() {
  local name=$1 ref=$2 rootfs=$3 cfg=$4 work
  work=$(mktemp -d)
  mkdir -p "$work/blobs/sha256"
  # Reproducible layer: sorted, fixed owner and mtime.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$rootfs" -cf "$work/layer.tar" .
  local layer_sha layer_size
  layer_sha=$(sha "$work/layer.tar"); layer_size=$(stat -c %s "$work/layer.tar")
  mv "$work/layer.tar" "$work/blobs/sha256/$layer_sha"
  printf '{"architecture":"amd64","os":"linux","config":%s,"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"hack/build-test-images.sh"}]}' \
    "$cfg" "$layer_sha" >"$work/config.json"
  local cfg_sha cfg_size
  cfg_sha=$(sha "$work/config.json"); cfg_size=$(stat -c %s "$work/config.json")
  mv "$work/config.json" "$work/blobs/sha256/$cfg_sha"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$cfg_sha" "$cfg_size" "$layer_sha" "$layer_size" >"$work/manifest.json"
  local man_sha man_size
  man_sha=$(sha "$work/manifest.json"); man_size=$(stat -c %s "$work/manifest.json")
  mv "$work/manifest.json" "$work/blobs/sha256/$man_sha"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci-layout"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$man_sha" "$man_size" "$ref" "${ref##*:}" >"$work/index.json"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work" -cf "$out/$name.tmp" oci-layout index.json blobs
  mv "$out/$name.tmp" "$out/$name"
  rm -rf "$work"
  echo "build-test-images: $out/$name = $ref" >&2
}

stamp_in=$(sha256sum "$busybox" "$0" | sha256sum | cut -d' ' -f1)
if [[ -f $out/stamp && "$(cat "$out/stamp")" == "$stamp_in" && -f $out/busybox.tar && -f $out/pause.tar ]]; then
  echo "build-test-images: up to date in $out" >&2
  exit 0
fi

# busybox: every applet as a symlink, users for --user tests, writable /tmp.
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,home/user,proc,sys,dev,var/www}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list-full); do
  [[ -e "$root/$applet" ]] || ln -s /bin/busybox "$root/$applet"
done
cat >"$root/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
user:x:1000:1000:Test User:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat >"$root/etc/group" <<'G'
root:x:0:
daemon:x:1:
wheel:x:10:user
users:x:100:user
user:x:1000:
nogroup:x:65534:
G
chown 1000:1000 "$root/home/user"
build_image busybox.tar docker.io/library/busybox:kata "$root" \
  '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"}'

# pause: a static busybox that sleeps forever (the CRI sandbox container).
rm -rf "$root"; root=$(mktemp -d)
mkdir -p "$root"/{bin,proc,sys,dev,etc}
cp "$busybox" "$root/bin/busybox"
build_image pause.tar registry.k8s.io/pause:kata "$root" \
  '{"Entrypoint":["/bin/busybox","sleep","infinity"],"WorkingDir":"/"}'

echo "$stamp_in" >"$out/stamp"
