#!/usr/bin/env bash
# `make bench-prefetch-dev` (inside a guest with ublk, or on a host that has it): what `fvd serve`'s
# background prefetching costs the guest, measured on the device.
#
# A 1 GiB raw base of non-zero data, an FVD image over it whose first 64 MiB (the guest's working
# set) were read and written back unchanged, so they are local. The image is served with prefetching
# (latency share PREFETCH_SHARE %, default 10) and, for each job — fio 4 KiB random reads, then
# writes, at depth 16 over the working set, FIO_RUNTIME seconds (default 30) — the script alternates
# SIGUSR2 (resume) and SIGUSR1 (pause) every PHASE_MS (default 2000), starting with prefetching on.
# fio logs its mean completion latency every 100 ms; each sample is assigned to the phase it lies in
# (skipping the first 500 ms of a phase and its last 300 ms, for the switch and for fio's start-up
# offset), and the mean of the "on" samples is compared with the mean of the "off" samples of the
# same run — over all phases, and again from the second pair of phases on (the first "on" phase
# holds fio's start, when the guest turns from idle to busy while the prefetcher was copying at full
# speed). Interleaving at this grain is what makes the comparison hold on a machine whose speed
# drifts by tens of percent over seconds: separate runs seconds apart differed by ±20 % with
# identical settings. Last, a fresh image is served with the guest idle: the time until the daemon
# logs that the image is fully local.
#
# PHASE_ORDERS (default "on") runs the jobs once per order named, in turn, on the same served image:
# `on` alternates on, off, on, off … (the first phase holds fio's start, the guest's turn from idle
# to busy); `off` alternates starting with off (then the start falls in an "off" phase); `abba`
# runs on, off, off, on, on, off … (a drift linear in time weighs on both equally). Comparing `on`
# with `off` in one boot tells how much of the "all phases" rise is fio's start rather than
# prefetching.
#
# Prefetching continues from job to job (its progress is persisted); the output says how far it
# got, since a finished prefetcher makes "on" equal to "off".
#
# PREFETCH_BASES (default "local") names where the base lives, each measured in turn in the same
# boot: `local` (a file), `http` (nginx-light on the guest's loopback, http://127.0.0.1/…) and
# `nbd` (qemu-nbd, read-only, nbd://127.0.0.1/…). A remote base prefetches in larger pieces
# (defaultChunkBytes: 8 MiB over HTTP, 2 MiB over NBD) and its copies wait on a server process
# that shares the guest's CPUs; `PREFETCH_BASES="local http nbd"` compares what prefetching costs
# the guest from each. The remote lines add the bytes fetched and the rate.
#
# FVD_CLI (default "node <this tree>/build/daemon/cli.js") runs another build's CLI under this same
# script, so two builds compare in one guest boot on identical steps.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
FVD=${FVD_CLI:-node $root/build/daemon/cli.js}
# shellcheck source=../tests/vm/nginx-conf.sh
source "$root/tests/vm/nginx-conf.sh"
RUNTIME=${FIO_RUNTIME:-30}
PHASE_MS=${PHASE_MS:-2000}
PHASE_S=$(awk "BEGIN { print $PHASE_MS / 1000 }")
SHARE=${PREFETCH_SHARE:-10}
BASES=${PREFETCH_BASES:-local}
ORDERS=${PHASE_ORDERS:-on}
for order in $ORDERS; do
  case $order in on|off|abba) ;; *) echo "PHASE_ORDERS: unknown order '$order' (on, off, abba)"; exit 2 ;; esac
done
# phase_mode ORDER I: whether prefetching runs (on) or is paused (off) in phase I of ORDER.
phase_mode() {
  local first=on other=off k=$2
  [ "$1" = off ] && first=off other=on
  [ "$1" = abba ] && k=$(( ($2 + 1) / 2 ))
  if (( k % 2 == 0 )); then echo $first; else echo $other; fi
}
dir=$(mktemp -d /tmp/fvd-bench-pf.XXXXXX)
mount -t tmpfs -o size=3G fvd-bench-pf "$dir"
pid='' server_pid=''
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  umount "$dir" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
modprobe ublk_drv 2>/dev/null || true
echo "bench-prefetch: $(uname -r), files on $(df --output=fstype "$dir" | tail -1), $RUNTIME s per job, phases of $PHASE_MS ms, share $SHARE %, bases: $BASES, phase orders: $ORDERS"

serve() { # image [options] -> $dev, $pid, log in $image.log
  local img=$1; shift
  FVD_PREFETCH_TRACE=${FVD_PREFETCH_TRACE:-} $FVD serve "$img" "$@" > "$img.out" 2> "$img.log" &
  pid=$!
  for _ in $(seq 300); do grep -q /dev/ublkb "$img.out" 2>/dev/null && break; sleep 0.1; done
  dev=$(head -1 "$img.out")
  [ -b "$dev" ] || { echo "serve $img failed:"; cat "$img.log"; exit 1; }
}
stop() { kill -TERM "$pid"; wait "$pid" || true; pid=''; }

# The base's location for `fvd create -b` ($url), with its server started ($server_pid).
start_base() { # local|http|nbd
  server_pid=''
  case $1 in
    local) url=$dir/base.raw ;;
    http)
      mkdir -p "$dir/nginx"
      nginx_conf "$dir/nginx" 18080 "$dir" > "$dir/nginx/nginx.conf"
      "$(command -v nginx || echo /usr/sbin/nginx)" -c "$dir/nginx/nginx.conf" -p "$dir/nginx" -e "$dir/nginx/error.log" < /dev/null > /dev/null 2>&1 &
      server_pid=$! url=http://127.0.0.1:18080/base.raw port=18080 ;;
    nbd)
      qemu-nbd --read-only --persistent --shared=8 --format=raw --bind=127.0.0.1 --port=10810 --export-name=base "$dir/base.raw" 2> "$dir/qemu-nbd.log" &
      server_pid=$! url=nbd://127.0.0.1:10810/base port=10810 ;;
    *) echo "PREFETCH_BASES: unknown base '$1' (local, http, nbd)"; exit 2 ;;
  esac
  if [ -n "$server_pid" ]; then
    for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0; sleep 0.1; done
    echo "the $1 server did not start"; exit 1
  fi
}
stop_base() { [ -z "$server_pid" ] || { kill -TERM "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=''; }; }

fio --name=fillbase --filename="$dir/base.raw" --rw=write --bs=1M --size=1G >/dev/null
for base in $BASES; do
start_base "$base"
echo "== base: $base ($url)"
$FVD create -b "$url" -F raw "$dir/img.fvd" >/dev/null
serve "$dir/img.fvd" --no-prefetch
# The working set made local by writing back what it reads: copy-on-read alone does not make it
# so, by design (a hint past the outstanding cap is dropped, its block left to the prefetcher;
# after one 1 MiB dd pass 48.5-58.5 of the 64 MiB were local).
dd if="$dev" of="$dev" iflag=direct oflag=direct conv=notrunc bs=1M count=64 status=none
stop
# This tree's CLI, not $FVD: the format is the same, and an older CLI prints no "data:" line.
echo "  working set: $(node "$root/build/daemon/cli.js" info "$dir/img.fvd" | grep -E '^data:')"

serve "$dir/img.fvd" --prefetch-share "$SHARE"
for order in $ORDERS; do
for rw in randread randwrite; do
  rm -f "$dir"/lat_clat.*.log "$dir"/iops_iops.*.log "$dir/phases"
  t0=$(date +%s%N)
  fio --name=b --filename="$dev" --rw=$rw --bs=4k --iodepth=16 --direct=1 --ioengine=libaio \
    --offset=0 --size=64M --runtime="$RUNTIME" --time_based=1 --randrepeat=0 \
    --write_lat_log="$dir/lat" --write_iops_log="$dir/iops" --log_avg_msec=100 > /dev/null 2>&1 &
  fio_pid=$!
  i=0
  while kill -0 "$fio_pid" 2>/dev/null; do
    phase=$(phase_mode "$order" $i)
    if [ $phase = on ]; then kill -USR2 "$pid"; else kill -USR1 "$pid"; fi
    echo "$(( ($(date +%s%N) - t0) / 1000000 )) $phase" >> "$dir/phases"
    sleep "$PHASE_S"
    i=$((i + 1))
  done
  wait "$fio_pid" || true
  kill -USR2 "$pid"   # prefetching back on for the next job
  node - "$rw" "$order" "$dir/phases" "$dir"/lat_clat.1.log "$dir"/iops_iops.1.log <<'JS'
const fs = require('fs');
const [rw, order, phasesFile, latFile, iopsFile] = process.argv.slice(2);
const phases = fs.readFileSync(phasesFile, 'utf8').trim().split('\n').map((l) => { const [t, m] = l.split(' '); return { t: Number(t), m }; });
// Per log: sums over all phases, and from the third phase on (the first pair holds fio's start,
// when the guest turns from idle — the prefetcher copying at full speed — to busy).
function phaseSums(file) {
  const all = { on: [0, 0], off: [0, 0] }, later = { on: [0, 0], off: [0, 0] };
  for (const line of fs.readFileSync(file, 'utf8').trim().split('\n')) {
    const [t, v] = line.split(',').map((x) => Number(x));
    const from = t - 100; // the sample averages the 100 ms before t
    for (let i = 0; i < phases.length; i++) {
      const start = phases[i].t, end = i + 1 < phases.length ? phases[i + 1].t : Infinity;
      if (from >= start + 500 && t <= end - 300) {
        for (const sums of i >= 2 ? [all, later] : [all]) { sums[phases[i].m][0] += v; sums[phases[i].m][1]++; }
      }
    }
  }
  return { all, later };
}
const mean = (sums, m) => sums[m][0] / sums[m][1];
const rise = (sums) => { const r = (mean(sums, 'on') / mean(sums, 'off') - 1) * 100; return `${r >= 0 ? '+' : ''}${r.toFixed(1)} %`; };
const lat = phaseSums(latFile); // ns
const us = (sums, m) => (mean(sums, m) / 1000).toFixed(1);
console.log(`${rw} (order ${order}): mean latency off ${us(lat.all, 'off')} us (${lat.all.off[1]} samples), on ${us(lat.all, 'on')} us (${lat.all.on[1]} samples): ${rise(lat.all)}; ` +
  `from the second pair of phases: off ${us(lat.later, 'off')} us, on ${us(lat.later, 'on')} us: ${rise(lat.later)}`);
const iops = phaseSums(iopsFile); // requests per second over each 100 ms
console.log(`${rw} (order ${order}): IOPS off ${mean(iops.all, 'off').toFixed(0)}, on ${mean(iops.all, 'on').toFixed(0)}: ${rise(iops.all)}; ` +
  `from the second pair of phases: off ${mean(iops.later, 'off').toFixed(0)}, on ${mean(iops.later, 'on').toFixed(0)}: ${rise(iops.later)}`);
JS
done
done
stop
echo "  $(grep -o 'prefetch [0-9.]*% [a-z]*.*' "$dir/img.fvd.log" | tail -1)"
# Logged once, when the first estimate (taken as fio starts) opened the budget; the probes that
# replace it are in the FVD_PREFETCH_TRACE=1 lines.
grep -o 'latency baseline [0-9.]* µs' "$dir/img.fvd.log" | head -1 | sed 's/^/  first /' || true
[ -n "${FVD_PREFETCH_TRACE:-}" ] && grep 'prefetch trace' "$dir/img.fvd.log" | sed 's/^/  /'

# Time to fully local while the guest is idle (the first image's space back first: the tmpfs
# holds the base and two fully local images at most).
rm -f "$dir"/img.fvd*
$FVD create -b "$url" -F raw "$dir/idle.fvd" >/dev/null
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
rm -f "$dir"/idle.fvd*
stop_base
done
