#!/usr/bin/env bash
# The product's main job, end to end: a small FVD image over a raw base served as /dev/ublkbN,
# a filesystem made and mounted on it, files written and read back, the device's figures, a
# clean stop. Runs where ublk is available (`make demo` boots a guest when this kernel lacks it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# Shown as "fvd ..." (what an installed fvd is called); runs the built CLI.
fvd() { node "$root/build/daemon/cli.js" "$@"; }
work=$(mktemp -d /tmp/fvd-demo.XXXXXX)
mnt=$work/mnt
pid=
cleanup() {
  mountpoint -q "$mnt" 2>/dev/null && umount "$mnt"
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
show() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
step() { show "$@"; "$@"; }
modprobe ublk_drv 2>/dev/null || true

cd "$work"
truncate -s 64M base.raw
show "truncate -s 64M base.raw && mkfs.ext4 -q -L demo-base -d docs base.raw   # a base image holding a filesystem"
mkfs.ext4 -q -L demo-base -d "$root/docs" base.raw
step fvd create -b base.raw -F raw demo.fvd 256M
show "fvd serve demo.fvd --name demo --queues 2 > serve.out 2> serve.log &"
fvd serve demo.fvd --name demo --queues 2 > serve.out 2> serve.log &
pid=$!
for _ in $(seq 200); do grep -q /dev/ublkb serve.out 2>/dev/null && break; sleep 0.1; done
dev=$(head -1 serve.out)
[ -b "$dev" ] || { echo "serve did not come up:"; cat serve.log; exit 1; }
echo "serving $dev (pid $pid)"
step fvd list
echo; echo "device figures:"
printf '  size            %s bytes\n' "$(blockdev --getsize64 "$dev")"
for f in logical_block_size physical_block_size minimum_io_size optimal_io_size max_sectors_kb discard_granularity write_cache nr_requests; do
  printf '  %-15s %s\n' "$f" "$(cat /sys/block/${dev#/dev/}/queue/$f)"
done
step e2fsck -fp "$dev"
step resize2fs "$dev"
mkdir -p "$mnt"
step mount "$dev" "$mnt"
ls "$mnt"
show "head -c 32M /dev/urandom > $mnt/big.bin; 200 small files"
head -c 32M /dev/urandom > "$mnt/big.bin"
for i in $(seq 1 200); do echo "small file $i" > "$mnt/small-$i.txt"; done
sum=$(sha256sum "$mnt/big.bin" | cut -d' ' -f1)
step sync
step df -h "$mnt"
step umount "$mnt"
step kill -TERM "$pid"; wait "$pid"; pid=
cat serve.log
[ ! -e "$dev" ] && echo "device removed"
step fvd check demo.fvd
step fvd info demo.fvd
# Serve again and read everything back.
show "fvd serve demo.fvd --name demo > serve.out 2> serve.log &"
fvd serve demo.fvd --name demo > serve.out 2> serve.log &
pid=$!
for _ in $(seq 200); do grep -q /dev/ublkb serve.out 2>/dev/null && break; sleep 0.1; done
dev=$(head -1 serve.out)
step mount -o ro "$dev" "$mnt"
show "sha256sum $mnt/big.bin   # compared with the sum taken before the restart"
[ "$(sha256sum "$mnt/big.bin" | cut -d' ' -f1)" = "$sum" ] && echo "big.bin checksum matches after restart"
[ "$(cat "$mnt/small-200.txt")" = "small file 200" ] && echo "small files intact"
step umount "$mnt"
step kill -TERM "$pid"; wait "$pid"; pid=
echo; echo "demo finished OK"
