#!/usr/bin/env bash
# Builds the testnet's one image, `df-testnet:local`, with no registry to pull from: a root folder
# holding the host-built `df` binary, the programs the testnet runs (busybox, tc, ip, curl, nginx,
# docker-registry, aria2c, opentracker) and every shared library `ldd` lists for them, imported
# with `docker import`. The host is Debian 12, so the host's libraries are the right ones.
#
# usage: build-image.sh DF_BINARY
# With a registry to pull from, `Dockerfile.debian` beside this script builds the same image from
# a Debian base instead (see the README's Experiments section).
set -euo pipefail
df_bin=${1:?usage: build-image.sh DF_BINARY}
here=$(cd "$(dirname "$0")" && pwd)
programs=(/bin/busybox /usr/sbin/tc /usr/bin/ip /usr/bin/curl /usr/sbin/nginx /usr/bin/docker-registry
  /usr/bin/aria2c /usr/bin/opentracker)
for p in "${programs[@]}"; do
  [ -x "$p" ] || { echo "missing $p: apt-get install busybox-static iproute2 curl nginx-light docker-registry aria2 opentracker" >&2; exit 1; }
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,etc,tmp,data,www,out,testnet,var/lib/nginx,var/log/nginx,run,proc,sys,dev}
chmod 1777 "$root/tmp"
ln -s usr/bin "$root/bin"; ln -s usr/sbin "$root/sbin"; ln -s usr/lib "$root/lib"; ln -s usr/lib64 "$root/lib64"

copy_with_libs() {
  local bin=$1 dest=$2
  install -m 0755 "$bin" "$root$dest"
  # Every library the dynamic linker resolves, at the path it resolved it to (plus the loader).
  { ldd "$bin" 2>/dev/null || true; } | awk '/=> \//{print $3} /^[ \t]*\/lib/{print $1}' | while read -r lib; do
    real=$(readlink -f "$lib")
    target="$root/usr${lib#/usr}"
    mkdir -p "$(dirname "$target")"
    [ -e "$target" ] || cp "$real" "$target"
  done
}
for p in "${programs[@]}"; do copy_with_libs "$p" "${p/#\/bin/\/usr\/bin}"; done
copy_with_libs "$df_bin" /usr/bin/df
# Line tables make the release binary ~0.5 GB; the image does not need them.
strip --strip-debug "$root/usr/bin/df" 2>/dev/null || true
# busybox applets (its sh runs its own applets first, so tc, ip and df are called by full path).
for a in sh ash cat cp echo env grep head kill pkill pgrep killall ls mkdir mv ps rm sed sha256sum sleep sort tail tee test touch wc date awk cut seq sync true false printf dd stat; do
  ln -sf busybox "$root/usr/bin/$a"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
cp /etc/nginx/mime.types "$root/etc/mime.types" 2>/dev/null || true
# df's HTTPS client (rustls) will not start without the system's CA certificates.
mkdir -p "$root/etc/ssl/certs"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
install -m 0755 "$here/entry.sh" "$here/pull.sh" "$root/testnet/"
cp "$here/nginx.conf" "$here/registry.yml" "$root/testnet/"

tar -C "$root" -c . | docker import -c 'ENTRYPOINT ["/testnet/entry.sh"]' - df-testnet:local >/dev/null
echo "built df-testnet:local ($(du -sh "$root" | cut -f1))"
