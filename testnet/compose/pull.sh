#!/bin/sh
# pull.sh BASE REPO TAG: pulls an image the way a registry client does — the manifest, then every
# blob it names, all at once — and checks each blob against its digest. BASE is a registry or a
# df mirror (http://127.0.0.1:5001).
set -e
base=$1 repo=$2 tag=$3
dir=/tmp/pull.$$
rm -rf "$dir"; mkdir -p "$dir"
curl -sSf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
  -o "$dir/manifest.json" "$base/v2/$repo/manifests/$tag"
pids=""
for d in $(grep -o 'sha256:[0-9a-f]\{64\}' "$dir/manifest.json" | sort -u); do
  hex=${d#sha256:}
  (curl -sSf -o "$dir/$hex" "$base/v2/$repo/blobs/$d" &&
    [ "$(sha256sum "$dir/$hex" | cut -d' ' -f1)" = "$hex" ]) &
  pids="$pids $!"
done
fail=0
for p in $pids; do wait "$p" || fail=1; done
rm -rf "$dir"
[ $fail = 0 ] && echo "pulled $repo:$tag"
exit $fail
