#!/usr/bin/env bash
# `make bench-trace-dev` (inside a guest with ublk): where the time of a fresh copy-on-write
# image's requests goes. For each job (JOBS: fio's rw names, default "randread randwrite"; blocks
# of TRACE_BS, default 4k, at depth TRACE_QD, default 16; FIO_RUNTIME s each) and each serve mode
# (TRACE_MODES: "default" = default options, "noprefetch" = --no-prefetch, "falloc" = that with
# create --preallocation falloc, "nospin" = --no-prefetch and FVD_SPIN=0), a FRESH FVD image over
# the same raw base (BENCH_SIZE, filled with data) is served with FVD_TRACE set; prints fio's
# IOPS (the job's and each second's), the daemon's CPU µs per I/O and its split by thread, and the
# trace's per-stage summary (bench/trace-report.ts). Traces are kept in $FVD_VM_RESULTS when set.
# With FVD_PREFETCH_TRACE=1 (inherited by the daemon) the prefetcher's per-second lines are printed
# too (default mode).
# PROFILE=1: instead of the trace, run the daemon under `node --cpu-prof` (main thread and
# queue workers, one .cpuprofile each, in $out/prof-JOB-MODE/) and print the top self-time
# functions per thread (bench/cpuprofile-report.ts).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
FVD="node $root/build/daemon/cli.js"
RUNTIME=${FIO_RUNTIME:-10}
SIZE=${BENCH_SIZE:-1G}
MODES=${TRACE_MODES:-"default noprefetch"}
BS=${TRACE_BS:-4k}
QD=${TRACE_QD:-16}
dir=$(mktemp -d /tmp/fvd-trace.XXXXXX)
mount -t tmpfs -o size=3584M fvd-trace "$dir"
. "$root/bench/warm-memory.sh"   # warm_memory
out=${FVD_VM_RESULTS:-$dir}
pid=
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  umount "$dir" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
warm_memory "$dir"
modprobe ublk_drv 2>/dev/null || true
echo "trace bench: $(uname -r), $RUNTIME s per job, $BS blocks at depth $QD, size $SIZE, modes: $MODES"
truncate -s "$SIZE" "$dir/base.raw"
fio --name=fillbase --filename="$dir/base.raw" --rw=write --bs=1M --size="$SIZE" >/dev/null

# CLOCK_MONOTONIC in µs, near enough (10 ms; the guest never suspends): the profiles' window.
uptime_us() { awk '{ printf "%.0f\n", $1 * 1e6 }' /proc/uptime; }
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
# Per thread of the daemon: "tid name ticks system-ticks" (the name is the thread's comm).
thread_ticks() {
  for t in /proc/$1/task/*; do
    [ -r "$t/stat" ] && awk -v tid="${t##*/}" '{ n = $0; sub(/^[^(]*\(/, "", n); sub(/\).*$/, "", n); gsub(/ /, "_", n); sub(/^.*\) /, ""); print tid, n, $12 + $13, $13 }' "$t/stat"
  done
}

for job in ${JOBS:-randread randwrite}; do
  for mode in $MODES; do
    opts=(); spin=${FVD_SPIN:-}; create=()
    case $mode in
      noprefetch) opts=(--no-prefetch) ;;
      falloc) opts=(--no-prefetch); create=(--preallocation falloc) ;; # the image file allocated at create
      nospin) opts=(--no-prefetch); spin=0 ;; # queue threads block at once instead of polling
    esac
    rm -f "$dir"/cow.fvd*
    $FVD create "${create[@]}" -b "$dir/base.raw" -F raw "$dir/cow.fvd" >/dev/null
    trace="$out/trace-$job-$mode.bin"
    # (--cpu-prof is refused in NODE_OPTIONS: it goes on node's command line; workers inherit it.)
    serve=($FVD); tracevar=FVD_TRACE=$trace
    if [ "${PROFILE:-0}" = 1 ]; then
      profdir="$out/prof-$job-$mode"; rm -rf "$profdir"; mkdir -p "$profdir"
      serve=(node --cpu-prof --cpu-prof-dir="$profdir" --cpu-prof-interval="${PROFILE_INTERVAL_US:-500}" "$root/build/daemon/cli.js")
      tracevar=FVD_PROFILE=1
    fi
    env ${spin:+FVD_SPIN=$spin} "$tracevar" "${serve[@]}" serve "$dir/cow.fvd" "${opts[@]}" > "$dir/serve.out" 2> "$dir/serve.log" &
    pid=$!
    for _ in $(seq 300); do grep -q /dev/ublkb "$dir/serve.out" 2>/dev/null && break; sleep 0.1; done
    dev=$(head -1 "$dir/serve.out")
    [ -b "$dev" ] || { echo "serve failed:"; cat "$dir/serve.log"; exit 1; }
    w0=$(uptime_us)
    t0=$(cpu_ticks "$pid")
    thread_ticks "$pid" > "$dir/threads0"
    rm -f "$dir"/iops_iops.*.log
    res=$(fio --name=b --filename="$dev" --rw="$job" --bs="$BS" --iodepth="$QD" --direct=1 --ioengine=libaio \
      --runtime="$RUNTIME" --time_based=1 --size="$SIZE" --numjobs=1 --randrepeat=0 \
      --write_iops_log="$dir/iops" --log_avg_msec=1000 --output-format=json 2>/dev/null)
    t1=$(cpu_ticks "$pid")
    w1=$(uptime_us)
    thread_ticks "$pid" > "$dir/threads1"
    dpid=$pid; kill -TERM "$pid"; wait "$pid" || true; pid=
    kind=read; case $job in *write) kind=write ;; esac
    node -e "const j=JSON.parse(process.argv[1]).jobs[0]['$kind'];const cpu=($t1-$t0)*1e6/$(getconf CLK_TCK)/j.total_ios;
      console.log('== $job $BS qd$QD, fresh image over raw base, $mode: '+Math.round(j.iops)+' IOPS, mean lat '+(j.clat_ns.mean/1000).toFixed(0)+' µs, daemon CPU '+cpu.toFixed(0)+' µs/IO')" "$res"
    # The job's ramp: the first seconds of a fresh image are the ones a new VM lives through.
    echo "per-second IOPS: $(awk -F, '{ printf "%d ", $2 }' "$dir"/iops_iops.1.log 2>/dev/null)"
    # Where the daemon's CPU went during the job: each thread's share (tid = pid: the main thread;
    # the queue threads' ids are in the trace's closing log line; the rest: libuv pool, V8).
    qtids=$(sed -n 's/.*queue thread ids //p' "$dir/serve.log")
    # (in brackets: the part of that thread's time spent in the kernel)
    QTIDS=$qtids node -e "const fs=require('fs');const qs=(process.env.QTIDS||'').split(' ');const r=(f)=>new Map(fs.readFileSync(f,'utf8').trim().split('\\n').map((l)=>l.split(' ')).map(([t,n,c,k])=>[t,[n,+c,+k]]));
      const a=r(process.argv[1]),b=r(process.argv[2]);const rows=[...b].map(([t,[n,c,k]])=>[t===process.argv[3]?n+' '+t+' (main)':qs.includes(t)?n+' '+t+' (queue)':n+' '+t,c-(a.get(t)?.[1]??0),k-(a.get(t)?.[2]??0)]).filter((x)=>x[1]>0).sort((x,y)=>y[1]-x[1]);
      const tot=rows.reduce((s,x)=>s+x[1],0);console.log('daemon CPU by thread: '+rows.map(([n,c,k])=>n+' '+(100*c/tot).toFixed(0)+'% (kernel '+(100*k/c).toFixed(0)+'%)').join(', '))" "$dir/threads0" "$dir/threads1" "$dpid"
    if [ "${PROFILE:-0}" = 1 ]; then
      echo "(profiles: samples during the fio job only)"
      node "$root/build/bench/cpuprofile-report.js" --window "$w0" "$w1" "$profdir"/*.cpuprofile
    else
      grep -i trace "$dir/serve.log" || true
      node "$root/build/bench/trace-report.js" "$trace"
    fi
    echo
  done
done
