#!/usr/bin/env bash
# `make bench-queues-dev` (inside a guest with ublk, or on a host that has it): what a second
# thread per queue could give — the load balancing UBLK_F_PER_IO_DAEMON (6.16+) allows, where any
# thread may serve any tag of a queue. One fvd image (raw-like, fully allocated, on a tmpfs)
# served three ways, fio 4 KiB random reads and writes (direct, libaio), interleaved rounds:
#   q2-split   --queues 2; fio two jobs of depth 8, one pinned to each CPU: both queues busy
#   q2-pinned  --queues 2; fio one job of depth 16 pinned to CPU 0: blk-mq maps the submitting
#              CPU to its queue, so every request is queue 0's and one thread serves them all —
#              the skewed load PER_IO_DAEMON's balancing is for
#   q1-split   --queues 1; fio as q2-split: one thread for both CPUs' requests
#   NAME-nospin  (only when named in QUEUE_CONFIGS) NAME with FVD_SPIN=0: the queue threads block
#              in io_uring_enter at once instead of polling first (daemon/ublk/spin-policy.ts)
# For each: IOPS, each queue thread's CPU share of the run (utime + stime of its task), the
# daemon's CPU per I/O (µs), and how much of the machine was idle (/proc/stat). A second thread
# for a queue can add IOPS only where that queue's thread is saturated (near 100 %) while CPU is
# left idle for it. FIO_RUNTIME (default 10) s per job, BENCH_ROUNDS (default 3) rounds, medians.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
FVD="node $root/build/daemon/cli.js"
RUNTIME=${FIO_RUNTIME:-10}
ROUNDS=${BENCH_ROUNDS:-3}
SIZE=${BENCH_SIZE:-1G}
CONFIGS=${QUEUE_CONFIGS:-"q2-split q2-pinned q1-split"}
dir=$(mktemp -d /tmp/fvd-bench.XXXXXX)
mount -t tmpfs -o size=2G fvd-bench "$dir"
results=$dir/results.tsv
pid=
cleanup() {
  [ -z "$pid" ] || { kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; }
  umount "$dir" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
modprobe ublk_drv 2>/dev/null || true
echo "bench-queues: $(uname -r), $(nproc) CPUs, image on tmpfs, $RUNTIME s per job, $ROUNDS rounds"
hz=$(getconf CLK_TCK)

img=$dir/img.fvd
$FVD create "$img" "$SIZE" > /dev/null
# Fully allocated, so every request takes the queue threads' fast path.
$FVD serve "$img" --queues 1 > "$dir/fill.out" 2> "$dir/fill.log" &
pid=$!
for _ in $(seq 300); do grep -q /dev/ublkb "$dir/fill.out" 2>/dev/null && break; sleep 0.1; done
dd if=/dev/urandom of="$(head -1 "$dir/fill.out")" bs=1M count=$(($(numfmt --from=iec "$SIZE") >> 20)) oflag=direct status=none
kill -TERM "$pid"; wait "$pid" || true; pid=

task_ticks() { # pid tid -> utime + stime of that thread
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/task/$2/stat" 2>/dev/null || echo 0
}
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
cpu_idle() { awk '/^cpu / { print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }

run_config() { # config round
  local cfg=$1 queues=2 fioargs=(--numjobs=2 --iodepth=8 --cpus_allowed=0,1 --cpus_allowed_policy=split) spin=()
  case $cfg in *-nospin) spin=(env FVD_SPIN=0) ;; esac
  case ${cfg%-nospin} in
    q2-split) ;;
    q2-pinned) fioargs=(--numjobs=1 --iodepth=16 --cpus_allowed=0) ;;
    q1-split) queues=1 ;;
    *) echo "unknown config $cfg"; exit 1 ;;
  esac
  "${spin[@]}" $FVD serve "$img" --queues "$queues" --depth 128 > "$dir/s.out" 2> "$dir/s.log" &
  pid=$!
  for _ in $(seq 300); do grep -q /dev/ublkb "$dir/s.out" 2>/dev/null && break; sleep 0.1; done
  local dev tids
  dev=$(head -1 "$dir/s.out")
  [ -b "$dev" ] || { echo "serve failed:"; cat "$dir/s.log"; exit 1; }
  tids=$($FVD list --json | node -e '
    const r = JSON.parse(require("fs").readFileSync(0, "utf8")).find((x) => x.device === process.argv[1]);
    console.log(r.queueThreads.map((q) => q.tid).join(" "));' "$dev")
  for rw in randread randwrite; do
    local t0=() t1=() p0 p1 i0 i1 out
    for t in $tids; do t0+=("$(task_ticks "$pid" "$t")"); done
    p0=$(proc_ticks "$pid"); i0=$(cpu_idle)
    out=$(fio --name=q --filename="$dev" --rw=$rw --bs=4k --direct=1 --ioengine=libaio "${fioargs[@]}" \
      --runtime="$RUNTIME" --time_based=1 --group_reporting=1 --randrepeat=0 --output-format=json 2>/dev/null)
    p1=$(proc_ticks "$pid"); i1=$(cpu_idle)
    for t in $tids; do t1+=("$(task_ticks "$pid" "$t")"); done
    local kind=read; [ $rw = randwrite ] && kind=write
    local iops ios busy="" k=0
    iops=$(node -e "console.log(Math.round(JSON.parse(process.argv[1]).jobs[0]['$kind'].iops))" "$out")
    ios=$(node -e "console.log(JSON.parse(process.argv[1]).jobs[0]['$kind'].total_ios)" "$out")
    for t in $tids; do
      busy+="${busy:+/}$(( (t1[k] - t0[k]) * 100 / hz / RUNTIME ))"
      k=$((k + 1))
    done
    local cpuio=$(( (p1 - p0) * 1000000 / hz / (ios > 0 ? ios : 1) ))
    local idle
    idle=$(node -e 'const [a, b] = [process.argv[1], process.argv[2]].map((s) => s.split(" ").map(Number));
      console.log(Math.round((100 * (b[0] - a[0])) / (b[1] - a[1])))' "$i0" "$i1")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$cfg" "$rw" "$2" "$iops" "$busy" "$cpuio" "$idle" | tee -a "$results"
  done
  kill -TERM "$pid"; wait "$pid" || true; pid=
}

printf 'config\tjob\tround\tIOPS\tqueue threads busy %%\tdaemon CPU/IO µs\tmachine idle %%\n'
set -- $CONFIGS
for ((r = 1; r <= ROUNDS; r++)); do
  # Each round starts with the next config (rotation), so no config always runs first.
  n=$#
  for ((i = 0; i < n; i++)); do
    idx=$(( (i + r - 1) % n + 1 ))
    run_config "${!idx}" "$r"
  done
done

echo
echo "medians over $ROUNDS rounds:"
node -e '
const rows = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map((l) => l.split("\t"));
const med = (a) => { const s = [...a].sort((x, y) => x - y); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
const keys = [...new Set(rows.map((r) => r[0] + "\t" + r[1]))];
console.log("config\tjob\tIOPS\tqueue threads busy %\tdaemon CPU/IO µs\tmachine idle %");
for (const k of keys) {
  const g = rows.filter((r) => r[0] + "\t" + r[1] === k);
  const busy = g[0][4].split("/").map((_, i) => med(g.map((r) => Number(r[4].split("/")[i])))).join("/");
  console.log([k, med(g.map((r) => Number(r[3]))), busy, med(g.map((r) => Number(r[5]))), med(g.map((r) => Number(r[6])))].join("\t"));
}' "$results"
