#!/usr/bin/env bash
# Installs what df needs on Debian 12, as root or through sudo; fetches the apt lists first when
# a package is missing. Usage: testnet/deps.sh run | test | ci
#   run   building df (RocksDB's bindgen needs libclang) and the demo
#   test  + what `cargo test --workspace` runs: a real registry, skopeo, umoci, containerd,
#         promtool, headless chromium (the status page), kubernetes-validate (PyPI)
#   ci    + the compose testnet's image parts and the BitTorrent baseline
set -euo pipefail
what="${1:-test}"
pkgs=(libclang1-14 libclang-common-14-dev python3 python3-pip curl)
case "$what" in
  run) ;;
  test|ci)
    pkgs+=(docker-registry skopeo umoci containerd apache2-utils prometheus chromium)
    if [ "$what" = ci ]; then
      pkgs+=(docker-compose busybox-static iproute2 nginx-light aria2 opentracker mktorrent)
    fi
    ;;
  *) echo "usage: $0 run|test|ci" >&2; exit 2 ;;
esac

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "deps.sh: run as root or install sudo" >&2; exit 1; }
  as_root=(sudo)
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# Debian's prometheus package starts a server on :9090 where systemd runs; df's tests need only
# promtool (and the testnet starts its own server).

if [ "$what" != run ]; then
  py() { python3 -c "$1" 2>/dev/null; }
  want_pip=()
  command -v kubernetes-validate >/dev/null || want_pip+=(kubernetes-validate)
  py 'import yaml' || want_pip+=(pyyaml)
  py 'import matplotlib' || want_pip+=(matplotlib)
  if [ ${#want_pip[@]} -gt 0 ]; then
    # Debian's python3 refuses system-wide pip installs (PEP 668); a pyenv or venv python does not.
    pip3 install -q "${want_pip[@]}" 2>/dev/null \
      || pip3 install -q --break-system-packages "${want_pip[@]}" \
      || pip3 install -q --user "${want_pip[@]}"
  fi
fi
