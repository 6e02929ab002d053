#!/usr/bin/env bash
# A/B of two df binaries in the compose testnet: the `bench` scenario run with each binary in
# turn, interleaved for ROUNDS rounds (the same build's times move by ~1 s from hour to hour on
# a shared VM; only interleaved runs compare). Each run's report.json and timeline.json are
# kept in OUT as a-N.* / b-N.*, and a line per run printed.
#
# usage: ab.sh BIN_A BIN_B [ROUNDS] [bench options...]
#   e.g. ab.sh /tmp/df-before /tmp/df-after 3 --peers 8 --size 256MiB --rate 100mbit --methods df
# OUT: $DF_AB_OUT, default testnet/out/ab
set -euo pipefail
a=${1:?usage: ab.sh BIN_A BIN_B [ROUNDS] [bench options...]}
b=${2:?usage: ab.sh BIN_A BIN_B [ROUNDS] [bench options...]}
rounds=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
here=$(cd "$(dirname "$0")" && pwd)
out=${DF_AB_OUT:-$here/../out/ab}
mkdir -p "$out"
for i in $(seq 1 "$rounds"); do
  for side in a b; do
    bin=$a; [ "$side" = b ] && bin=$b
    "$here/build-image.sh" "$bin" > "$out/build.log" 2>&1 || { echo "building the image with $bin failed: $out/build.log" >&2; exit 1; }
    python3 "$here/testnet.py" bench "$@" > "$out/$side-$i.log" 2>&1 || { echo "bench failed: $out/$side-$i.log" >&2; exit 1; }
    cp "$here/../out/report.json" "$out/$side-$i.report.json"
    cp "$here/../out/timeline.json" "$out/$side-$i.timeline.json" 2>/dev/null || true
    echo "$side round $i: $(grep 'ok=' "$out/$side-$i.log" | sed 's/^\[testnet\] *//' | tr '\n' ' ')"
  done
done
