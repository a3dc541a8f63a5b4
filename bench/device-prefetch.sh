#!/usr/bin/env bash
# `make bench-prefetch-dev` (inside a guest with ublk, or on a host that has it): what `fvd serve`'s
# background prefetching costs the guest, measured on the device.
#
# A 1 GiB raw base of non-zero data, an FVD image over it whose first 64 MiB (the guest's working
# set) were read once, so copy-on-read made them local. Then, BENCH_ROUNDS times, alternating:
#   off  fvd serve --no-prefetch
#   on   fvd serve (prefetching, latency share PREFETCH_SHARE %, default 10)
# and in each, fio 4 KiB random reads and writes at depth 16 over the working set, FIO_RUNTIME
# seconds each. Prints IOPS and mean completion latency per job and mode, the rise of the mean
# latency with prefetching on, and how far prefetching got. Last, a fresh image is served with the
# guest idle: the time until the daemon logs that the image is fully local.
#
# Each "on" run continues where the previous one stopped (the prefetcher's progress is persisted),
# so the base is never fully copied before the last round at these settings. Compare each round's
# off/on pair: the runs are seconds apart, but this machine's speed drifts.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
FVD="node $root/build/daemon/cli.js"
RUNTIME=${FIO_RUNTIME:-10}
ROUNDS=${BENCH_ROUNDS:-2}
SHARE=${PREFETCH_SHARE:-10}
dir=$(mktemp -d /tmp/fvd-bench-pf.XXXXXX)
mount -t tmpfs -o size=3G fvd-bench-pf "$dir"
pid=''
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  umount "$dir" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
modprobe ublk_drv 2>/dev/null || true
echo "bench-prefetch: $(uname -r), files on $(df --output=fstype "$dir" | tail -1), $RUNTIME s per job, $ROUNDS rounds, share $SHARE %"

serve() { # image [options] -> $dev, $pid, log in $image.log
  local img=$1; shift
  FVD_PREFETCH_TRACE=${FVD_PREFETCH_TRACE:-} $FVD serve "$img" --queues 2 --depth 128 "$@" > "$img.out" 2> "$img.log" &
  pid=$!
  for _ in $(seq 300); do grep -q /dev/ublkb "$img.out" 2>/dev/null && break; sleep 0.1; done
  dev=$(head -1 "$img.out")
  [ -b "$dev" ] || { echo "serve $img failed:"; cat "$img.log"; exit 1; }
}
stop() { kill -TERM "$pid"; wait "$pid" || true; pid=''; }

fio --name=fillbase --filename="$dir/base.raw" --rw=write --bs=1M --size=1G >/dev/null
$FVD create -b "$dir/base.raw" -F raw "$dir/img.fvd" >/dev/null
serve "$dir/img.fvd" --no-prefetch
dd if="$dev" of=/dev/null iflag=direct bs=1M count=64 status=none   # the working set, made local
stop

results=$dir/results.tsv
for round in $(seq "$ROUNDS"); do
  for mode in off on; do
    if [ "$mode" = off ]; then serve "$dir/img.fvd" --no-prefetch; else serve "$dir/img.fvd" --prefetch-share "$SHARE"; fi
    for rw in randread randwrite; do
      out=$(fio --name=b --filename="$dev" --rw=$rw --bs=4k --iodepth=16 --direct=1 --ioengine=libaio \
        --offset=0 --size=64M --runtime="$RUNTIME" --time_based=1 --randrepeat=0 --output-format=json 2>/dev/null)
      kind=read; [ $rw = randwrite ] && kind=write
      node -e "const j=JSON.parse(process.argv[1]).jobs[0]['$kind'];console.log([$round,'$mode','$rw',Math.round(j.iops),(j.clat_ns.mean/1000).toFixed(1)].join('\t'))" "$out" | tee -a "$results"
    done
    stop
    [ "$mode" = on ] && echo "  $(grep -o 'prefetch [0-9.]*% [a-z]*.*' "$dir/img.fvd.log" | tail -1)"
    [ -n "${FVD_PREFETCH_TRACE:-}" ] && [ "$mode" = on ] && grep 'prefetch trace' "$dir/img.fvd.log" | sed 's/^/  /'
    [ "$mode" = on ] && { grep -o 'latency baseline [0-9.]* µs' "$dir/img.fvd.log" | tail -1 | sed 's/^/  /' || true; }
  done
done

echo
node - "$results" <<'JS'
const rows = require('fs').readFileSync(process.argv[2], 'utf8').trim().split('\n').map((l) => l.split('\t'));
for (const rw of ['randread', 'randwrite']) {
  for (const r of [...new Set(rows.map((x) => x[0]))]) {
    const off = rows.find((x) => x[0] === r && x[1] === 'off' && x[2] === rw);
    const on = rows.find((x) => x[0] === r && x[1] === 'on' && x[2] === rw);
    if (!off || !on) continue;
    const rise = ((Number(on[4]) / Number(off[4]) - 1) * 100).toFixed(1);
    console.log(`${rw} round ${r}: ${off[3]} -> ${on[3]} IOPS, mean latency ${off[4]} -> ${on[4]} us (${rise >= 0 ? '+' : ''}${rise} %)`);
  }
}
JS

# Time to fully local while the guest is idle (the first image's space back first: the tmpfs
# holds the base and two fully local images at most).
rm -f "$dir"/img.fvd*
$FVD create -b "$dir/base.raw" -F raw "$dir/idle.fvd" >/dev/null
t0=$(date +%s.%N)
serve "$dir/idle.fvd"
for _ in $(seq 1200); do grep -q 'prefetch done' "$dir/idle.fvd.log" && break; sleep 0.1; done
t1=$(date +%s.%N)
if grep -q 'prefetch done' "$dir/idle.fvd.log"; then
  echo "idle guest: 1 GiB base fully local $(node -e "console.log((${t1} - ${t0}).toFixed(1))") s after serve started"
else
  echo "idle guest: not fully local after 120 s: $(tail -3 "$dir/idle.fvd.log")"
fi
stop
