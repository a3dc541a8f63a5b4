#!/usr/bin/env bash
# tests/host-tools.sh — Debian packages the unit suite uses on this machine (idempotent): qemu-utils
# (qemu-img, qemu-io) for the qcow2 differential tests. Installed as tests/vm/prepare.sh installs
# the guest's packages; without root or apt the qcow2 tests report themselves skipped instead.
# FVD_VM_NO_APT=1 skips installing.
set -uo pipefail
pkgs=(qemu-utils)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 || ${FVD_VM_NO_APT:-0} == 1 ]] || ! command -v apt-get >/dev/null; then
    echo "host-tools: not installing ${missing[*]} (not root, no apt-get, or FVD_VM_NO_APT=1): the qcow2 tests will be skipped" >&2
    exit 0
fi
echo "host-tools: installing ${missing[*]}" >&2
if ! apt-cache show "${missing[0]}" >/dev/null 2>&1; then apt-get update -q >&2; fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
    || echo "host-tools: installing ${missing[*]} failed: the qcow2 tests will be skipped" >&2
exit 0
