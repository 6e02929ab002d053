#!/usr/bin/env bash
# A local demo: an HTTP origin, one seed and three nodes on this machine; every node downloads the
# same 64 MiB file at once; the origin's log shows it served the file about once.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/df/target}"
cargo build -q -p df-cli
DF="$CARGO_TARGET_DIR/debug/df"

work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${DF_DEMO_KEEP:-}" ] && echo "kept $work" || rm -rf "$work"; }
trap cleanup EXIT

mkdir -p "$work/www"
head -c $((64 << 20)) /dev/urandom > "$work/www/file.bin"
want=$(sha256sum "$work/www/file.bin" | cut -d' ' -f1)
python3 -m http.server 18080 --bind 127.0.0.1 --directory "$work/www" > /dev/null 2> "$work/origin.log" &
pids+=($!)

"$DF" seed --data-dir "$work/seed" --listen /ip4/127.0.0.1/tcp/14001 --api 127.0.0.1:16000 \
  --data-listen 127.0.0.1:15000 2> "$work/seed.log" &
pids+=($!)
for _ in $(seq 100); do "$DF" status --api 127.0.0.1:16000 >/dev/null 2>&1 && break; sleep 0.1; done
# The seed created the swarm key on its first start; members join with it.
for i in 1 2 3; do
  "$DF" node --data-dir "$work/node$i" --listen /ip4/127.0.0.1/tcp/1400$((i + 1)) \
    --api 127.0.0.1:1600$i --data-listen 127.0.0.1:1500$i --swarm-key "$work/seed/swarm.key" \
    --bootstrap /ip4/127.0.0.1/tcp/14001 2> "$work/node$i.log" &
  pids+=($!)
done
for port in 16000 16001 16002 16003; do
  for _ in $(seq 100); do "$DF" status --api 127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.1; done
done
sleep 1 # let identify and the DHT settle

echo "downloading 64 MiB on 3 nodes at once..."
for i in 1 2 3; do
  "$DF" get http://127.0.0.1:18080/file.bin -o "$work/out$i" --api 127.0.0.1:1600$i --no-progress &
  gets+=($!)
done
for p in "${gets[@]}"; do wait "$p"; done
for i in 1 2 3; do
  got=$(sha256sum "$work/out$i" | cut -d' ' -f1)
  [ "$got" = "$want" ] && echo "node$i: content OK" || { echo "node$i: content MISMATCH"; exit 1; }
done
echo "origin GET requests: $(grep -c 'GET /file.bin' "$work/origin.log")"
for port in 16000 16001 16002 16003; do
  "$DF" status --api 127.0.0.1:$port | python3 -c '
import json, sys
s = json.load(sys.stdin); b = s["bytes"]
print("%-5s uploaded %4d MiB, from peers %4d MiB, from origin %4d MiB"
      % (s["role"], b["uploaded"] >> 20, b["from_peers"] >> 20, b["from_origin"] >> 20))'
done
