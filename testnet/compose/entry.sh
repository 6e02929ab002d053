#!/bin/sh
# The testnet image's entry point: shape this container's links, then run its role.
#   UP / DOWN: egress / ingress rate for tc tbf (e.g. 100mbit); empty = unshaped.
#   BOOTSTRAP: multiaddr of a seed or peer to join (df roles).
set -e
shape() {
  dev=eth0
  if [ -n "$UP" ]; then
    /usr/sbin/tc qdisc replace dev $dev root tbf rate "$UP" burst 256kb latency 100ms
  fi
  if [ -n "$DOWN" ]; then
    /usr/bin/ip link add ifb0 type ifb 2>/dev/null || true
    /usr/bin/ip link set ifb0 up
    /usr/sbin/tc qdisc replace dev $dev handle ffff: ingress
    /usr/sbin/tc filter replace dev $dev parent ffff: protocol all u32 match u32 0 0 \
      action mirred egress redirect dev ifb0
    /usr/sbin/tc qdisc replace dev ifb0 root tbf rate "$DOWN" burst 256kb latency 100ms
  fi
}
shape
export RUST_LOG="${RUST_LOG:-info,df_piece=debug}"
role=$1
shift || true
case "$role" in
  origin) exec nginx -c /testnet/nginx.conf -g 'daemon off;' ;;
  registry) exec docker-registry serve /testnet/registry.yml ;;
  # Debian's opentracker serves whitelisted torrents only; the bench adds each torrent's info
  # hash to /out/tracker-whitelist and sends SIGHUP.
  tracker) touch /out/tracker-whitelist; exec opentracker -p 6969 -P 6969 -w /out/tracker-whitelist ;;
  seed|peer)
    kind=node
    [ "$role" = seed ] && kind=seed
    set -- --data-dir /data/df --listen /ip4/0.0.0.0/tcp/4001 --api 127.0.0.1:7000 \
      --data-listen 0.0.0.0:4002 --metrics-listen 0.0.0.0:9464 --mirror-listen 0.0.0.0:5001 \
      --mirror-upstream http://registry:5000 "$@"
    [ -n "$BOOTSTRAP" ] && set -- "$@" --bootstrap "$BOOTSTRAP"
    # testnet/run --node-config FILE: one config file for every seed and peer.
    [ -n "$DF_NODE_CONFIG" ] && set -- "$@" --config "$DF_NODE_CONFIG"
    exec /usr/bin/df "$kind" "$@" ;;
  *) exec "$role" "$@" ;;
esac
