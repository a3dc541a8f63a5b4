#!/usr/bin/env bash
# tests/install-test-deps.sh — Debian packages the unit suite's real-server tests use (remote
# bases: nginx-light serving templates over HTTP, qemu-nbd from qemu-utils and nbdkit for NBD,
# qemu-block-extra for qemu-img's curl/nbd drivers in the benchmark), installed the way
# tests/vm/prepare.sh installs its packages: only the missing ones, apt-get update only when the
# lists do not know them. Not root or FVD_NO_APT=1: nothing is installed, and the tests that need
# a missing program report a skip.
set -uo pipefail
pkgs=(nginx-light qemu-utils nbdkit qemu-block-extra)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 || ${FVD_NO_APT:-0} == 1 ]]; then
    echo "[test-deps] not installing ${missing[*]} (not root or FVD_NO_APT=1): their tests will be skipped" >&2
    exit 0
fi
echo "[test-deps] installing: ${missing[*]}" >&2
apt-cache show "${missing[0]}" >/dev/null 2>&1 || apt-get update -q >&2
# The package must not start a system nginx on port 80: policy-rc.d says no to every service start.
rcd=/usr/sbin/policy-rc.d
made_rcd=0
if [[ ! -e $rcd ]]; then printf '#!/bin/sh\nexit 101\n' > "$rcd" && chmod +x "$rcd" && made_rcd=1; fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
    || echo "[test-deps] apt-get install failed: the tests that need ${missing[*]} will be skipped" >&2
[[ $made_rcd == 1 ]] && rm -f "$rcd"
exit 0
