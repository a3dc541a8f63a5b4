#!/usr/bin/env bash
# `make bench-dev` (inside a guest with ublk, or on a host that has it): fio against
#   fvd        the FVD device, raw-like layout, image fully allocated beforehand
#   fvd-cow    the FVD device, fresh image over a raw base (copy-on-write/read path)
#   fvd-zc     (only when named in BENCH_TARGETS) as `fvd`, served with --zero-copy (the kernel
#              must offer AUTO_BUF_REG: 6.16+; the target's log line says whether it got it)
#   fvd-batch  (only when named in BENCH_TARGETS) as `fvd`, served with --batch-io (batched ublk
#              commands; the kernel must offer UBLK_F_BATCH_IO: 7.0+)
#   fvd-enc    (only when named in BENCH_TARGETS) as `fvd`, encrypted (AES-256-XTS, done by the
#              queue workers on the fast path)
#   fvd-cow-engine, fvd-cow-main, fvd-cow-nocor, fvd-cow-prefetch, fvd-cow-64k, fvd-cow-falloc,
#              fvd-cow-q2 (only when named)
#              as fvd-cow with the engine's copy-on-write (FVD_QUEUE_COW=0), with the writes the
#              queue threads store answered by the main thread (FVD_STORED_ANSWER=main, as with a
#              pending log), with --no-copy-on-read, with
#              prefetching on (the default options), created with 64 KiB blocks (the default
#              block size over a base before 4 KiB; fvd-cow-4k is a synonym of fvd-cow now), or
#              created with --preallocation falloc (a first write of a block then allocates
#              nothing, as loop's writes into its full copy of the base), or served with two
#              queues (--queues 2, the default before 1; every other fvd target has the default)
#   fvd-cow-before, fvd-cow-prefetch-before, fvd-before  (only when named, with
#              FVD_BEFORE=<another checkout's build/daemon/cli.js>) as fvd-cow /
#              fvd-cow-prefetch / fvd, served by that build: before/after ratios
#              in one guest boot; FVD_BEFORE_NODE=<a node binary> runs it on that Node (the same
#              build under two Node releases: FVD_BEFORE=$PWD/build/daemon/cli.js)
#   loop       kernel loop device, --direct-io=on, over a raw file
#   loop-sparse (only when named) the same over a never-written (sparse) raw file, new as
#              fvd-cow's images are (BENCH_FRESH): what the kernel's own path pays for allocating
#              the file on first writes, the peer of fvd-cow's writes (its reads are of holes: not
#              a peer of anything)
#   qcow2-nbd  a qcow2 image through qemu-nbd --cache=none --aio=native
#   qcow2-cow  (only when named) a fresh qcow2 overlay over a raw base through qemu-nbd: fvd-cow's peer
# Every backing file sits on the same tmpfs. Jobs: 4 KiB random read/write at depth 16, 128 KiB
# sequential read/write at depth 4; direct I/O, libaio, FIO_RUNTIME seconds each (default 20).
# BENCH_JOBS picks jobs by name (e.g. "randread"). Copy-on-write targets get a fresh image for
# every job (BENCH_FRESH=job, default) or one for all the jobs (BENCH_FRESH=target). Prints IOPS
# and MB/s per target and job, the ratios to loop, and for FVD targets the daemon's CPU time per
# I/O (user + system, µs; for qemu-nbd targets that of qemu-nbd). FIO_RATE_IOPS caps every job at
# that rate (fio --rate_iops): with every target at the same rate, CPU/IO compares the work per
# request — unthrottled, a target that waits more (fvd's queue threads poll while they wait)
# shows more CPU per I/O at fewer IOPS. Pick a rate every target reaches (the IOPS column says
# whether it did). Each target's files are deleted after its jobs: the guest's tmpfs holds about
# three 1 GiB files at most.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
FVD="node $root/build/daemon/cli.js"
# The build the *-before targets serve, on FVD_BEFORE_NODE where given.
FVD_BEFORE_CLI="${FVD_BEFORE_NODE:-node} ${FVD_BEFORE:-}"
RUNTIME=${FIO_RUNTIME:-20}
FIO_OPTS=()
[ -z "${FIO_RATE_IOPS:-}" ] || FIO_OPTS=(--rate_iops="$FIO_RATE_IOPS")
# BENCH_RAMP=S: fio runs each job S seconds before it starts counting (--ramp_time), and the
# daemon's CPU is counted from then on too. 0 (default): the job is measured from its first
# request, as issue 11's table asks. Under emulation a daemon just started runs its first
# seconds far below its steady rate (V8 compiles the request path, then the emulator translates
# the compiled code), so S > 0 gives the steady state; the writes of the ramp make blocks local.
RAMP=${BENCH_RAMP:-0}
ramp_note=
[ "$RAMP" = 0 ] || { FIO_OPTS+=(--ramp_time="$RAMP"); ramp_note=" after a ramp of $RAMP s"; }
SIZE=${BENCH_SIZE:-1G}
TARGETS=${BENCH_TARGETS:-"fvd fvd-cow loop qcow2-nbd"}
ROUNDS=${BENCH_ROUNDS:-1}   # rounds of all targets in turn; the table shows each figure's median
. "$root/bench/rounds.sh"   # round_targets: BENCH_ROTATE
dir=$(mktemp -d /tmp/fvd-bench.XXXXXX)
# A tmpfs of its own: every target's backing file in memory alike (the guest's /tmp is an overlay).
mount -t tmpfs -o size=3584M fvd-bench "$dir"
. "$root/bench/warm-memory.sh"   # warm_memory
results=$dir/results.tsv
pids=()
cleanup() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  losetup -D 2>/dev/null || true
  qemu-nbd -d /dev/nbd0 >/dev/null 2>&1 || true
  umount "$dir" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
warm_memory "$dir"
modprobe ublk_drv 2>/dev/null || true
modprobe nbd nbds_max=2 2>/dev/null || true
mkdir -p /run/lock   # qemu-nbd keeps its lock file there (a fresh guest /run lacks it)
mount | grep -q " $(df --output=target /tmp | tail -1) " || true
echo "bench: $(uname -r), backing files on $(df --output=fstype "$dir" | tail -1) at $dir, $RUNTIME s per job$ramp_note, size $SIZE${FIO_RATE_IOPS:+, every job capped at $FIO_RATE_IOPS IOPS}"

JOBS=()
for j in "randread 4k 16" "randwrite 4k 16" "read 128k 4" "write 128k 4"; do
  case " ${BENCH_JOBS:-randread randwrite read write} " in *" ${j%% *} "*) JOBS+=("$j") ;; esac
done

cpu_ticks() { # pid -> utime + stime in clock ticks (0 without a pid)
  [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || { echo 0; return; }
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

run_jobs() { # target device [daemon pid]
  local target=$1 dev=$2 dpid=${3:-}
  for j in "${JOBS[@]}"; do
    set -- $j
    local out t0 t1
    local ramp_sampler=
    if [ "$RAMP" = 0 ]; then t0=$(cpu_ticks "$dpid"); else (sleep "$RAMP"; cpu_ticks "$dpid" > "$dir/ticks0") & ramp_sampler=$!; fi
    out=$(fio --name=b --filename="$dev" --rw="$1" --bs="$2" --iodepth="$3" --direct=1 --ioengine=libaio \
      --runtime="$RUNTIME" --time_based=1 --size="$SIZE" --numjobs=1 --group_reporting=1 --randrepeat=0 \
      "${FIO_OPTS[@]}" --output-format=json 2>/dev/null)
    t1=$(cpu_ticks "$dpid")
    [ -z "$ramp_sampler" ] || { wait "$ramp_sampler"; t0=$(cat "$dir/ticks0"); } # fio may end first
    local kind=read; case $1 in *write) kind=write ;; esac
    local iops bw ios cpu
    iops=$(node -e "const j=JSON.parse(process.argv[1]).jobs[0]['$kind'];console.log(Math.round(j.iops))" "$out")
    bw=$(node -e "const j=JSON.parse(process.argv[1]).jobs[0]['$kind'];console.log((j.bw_bytes/1e6).toFixed(1))" "$out")
    ios=$(node -e "const j=JSON.parse(process.argv[1]).jobs[0]['$kind'];console.log(j.total_ios)" "$out")
    cpu=-
    [ -n "$dpid" ] && [ "$ios" -gt 0 ] && cpu=$(( (t1 - t0) * 1000000 / $(getconf CLK_TCK) / ios ))
    printf '%s\t%s-%s-qd%s\t%s\t%s\t%s\n' "$target" "$1" "$2" "$3" "$iops" "$bw" "$cpu" | tee -a "$results"
  done
}

# The qemu-nbd serving /dev/nbd0 (`qemu-nbd -c` runs it in the background): its CPU time is the
# peer's figure beside the fvd daemon's.
nbd_server_pid() { pgrep -n -x qemu-nbd || true; }

serve() { # image [options] -> sets $dev (no subshell: the pid must stay in this shell's list)
  local img=$1; shift
  ${SERVE_FVD:-$FVD} serve "$img" --depth 128 "$@" > "$img.out" 2> "$img.log" &
  pids+=($!)
  for _ in $(seq 300); do grep -q /dev/ublkb "$img.out" 2>/dev/null && break; sleep 0.1; done
  dev=$(head -1 "$img.out")
  [ -b "$dev" ] || { echo "serve $img failed:"; cat "$img.log"; exit 1; }
}

stop_last() { local p=${pids[-1]}; kill -TERM "$p"; wait "$p" || true; unset 'pids[-1]'; }

# The copy-on-write targets. One raw base per target; the image over it is created afresh for
# every job (BENCH_FRESH=job, the default: no job finds blocks an earlier job copied in, which
# made a job's figure depend on the one before it) or once for all the jobs (BENCH_FRESH=target).
cow_create() { # target image
  case $1 in
    fvd-cow-before|fvd-cow-prefetch-before) $FVD_BEFORE_CLI create -b "$dir/base.raw" -F raw "$2" >/dev/null ;;
    fvd-cow-64k) $FVD create --block-size 64K -b "$dir/base.raw" -F raw "$2" >/dev/null ;;
    fvd-cow-falloc) $FVD create --preallocation falloc -b "$dir/base.raw" -F raw "$2" >/dev/null ;;
    qcow2-cow) qemu-img create -q -f qcow2 -b "$dir/base.raw" -F raw "$2" ;;
    *) $FVD create -b "$dir/base.raw" -F raw "$2" >/dev/null ;;
  esac
}

cow_serve() { # target image -> $dev (an fvd daemon's pid last in pids)
  case $1 in
    fvd-cow|fvd-cow-4k|fvd-cow-64k|fvd-cow-falloc) serve "$2" --no-prefetch ;;
    fvd-cow-engine) FVD_QUEUE_COW=0 serve "$2" --no-prefetch ;;
    fvd-cow-main) FVD_STORED_ANSWER=main serve "$2" --no-prefetch ;;
    fvd-cow-nocor) serve "$2" --no-prefetch --no-copy-on-read ;;
    fvd-cow-q2) serve "$2" --no-prefetch --queues 2 ;;
    fvd-cow-prefetch) serve "$2" ;;
    fvd-cow-before) SERVE_FVD="$FVD_BEFORE_CLI" serve "$2" --no-prefetch ;;
    fvd-cow-prefetch-before) SERVE_FVD="$FVD_BEFORE_CLI" serve "$2" ;;
    qcow2-cow) qemu-nbd --cache=none --aio=native -f qcow2 -c /dev/nbd0 "$2"; sleep 1; dev=/dev/nbd0; nbd_pid=$(nbd_server_pid) ;;
  esac
}

# Runs "$@" once per set of jobs that gets a fresh disk: each job alone (BENCH_FRESH=job, the
# default) or all of them together (BENCH_FRESH=target), JOBS set to that set meanwhile.
per_fresh_set() {
  local all=("${JOBS[@]}") sets s
  sets=("${all[@]}"); [ "${BENCH_FRESH:-job}" = job ] || sets=(all)
  for s in "${sets[@]}"; do
    if [ "$s" = all ]; then JOBS=("${all[@]}"); else JOBS=("$s"); fi
    "$@"
  done
  JOBS=("${all[@]}")
}

cow_jobs() { # target image: a fresh image over base.raw, served, the jobs, gone
  cow_create "$1" "$2"
  cow_serve "$1" "$2"
  if [ "$1" = qcow2-cow ]; then run_jobs "$1" "$dev" "$nbd_pid"; qemu-nbd -d /dev/nbd0 >/dev/null
  else run_jobs "$1" "$dev" "${pids[-1]}"; stop_last; fi
  rm -f "$2"*
}

cow_target() { # target
  local t=$1 img=$dir/cow.fvd
  case $t in *-before) [ -n "${FVD_BEFORE:-}" ] || { echo "$t needs FVD_BEFORE"; exit 1; } ;; esac
  [ "$t" != qcow2-cow ] || img=$dir/cow.qcow2
  truncate -s "$SIZE" "$dir/base.raw"
  fio --name=fillbase --filename="$dir/base.raw" --rw=write --bs=1M --size="$SIZE" >/dev/null
  per_fresh_set cow_jobs "$t" "$img"
  rm -f "$dir/base.raw"
}

loop_sparse_jobs() { # a never-written raw file under loop, the jobs, gone
  truncate -s "$SIZE" "$dir/loop.raw"
  dev=$(losetup --direct-io=on -f --show "$dir/loop.raw")
  run_jobs loop-sparse "$dev"; losetup -d "$dev"; rm -f "$dir/loop.raw"
}

for round in $(seq "$ROUNDS"); do
for t in $(round_targets "$round"); do
  [ "$ROUNDS" -gt 1 ] && echo "round $round: $t"
  case $t in
    fvd|fvd-before)
      cli=$FVD serve_cli=
      if [ "$t" = fvd-before ]; then
        [ -n "${FVD_BEFORE:-}" ] || { echo "fvd-before needs FVD_BEFORE"; exit 1; }
        cli=$FVD_BEFORE_CLI serve_cli=$FVD_BEFORE_CLI
      fi
      $cli create "$dir/full.fvd" "$SIZE" >/dev/null
      SERVE_FVD=$serve_cli serve "$dir/full.fvd"
      fio --name=fill --filename="$dev" --rw=write --bs=1M --iodepth=8 --direct=1 --ioengine=libaio --size="$SIZE" >/dev/null
      run_jobs "$t" "$dev" "${pids[-1]}"; stop_last; rm -f "$dir"/full.fvd* ;;
    fvd-zc|fvd-batch)
      opt=--zero-copy; [ "$t" = fvd-zc ] || opt=--batch-io
      $FVD create "$dir/$t.fvd" "$SIZE" >/dev/null
      serve "$dir/$t.fvd" "$opt"
      grep -o 'fast path: .*\|batched I/O: .*\|zero copy: .*' "$dir/$t.fvd.log" | head -1
      fio --name=fill --filename="$dev" --rw=write --bs=1M --iodepth=8 --direct=1 --ioengine=libaio --size="$SIZE" >/dev/null
      run_jobs "$t" "$dev" "${pids[-1]}"; stop_last; rm -f "$dir/$t".fvd* ;;
    fvd-enc)
      head -c 32 /dev/urandom > "$dir/enc.key"
      $FVD create --encrypt --key-file "$dir/enc.key" "$dir/enc.fvd" "$SIZE" >/dev/null
      serve "$dir/enc.fvd" --key-file "$dir/enc.key"
      fio --name=fill --filename="$dev" --rw=write --bs=1M --iodepth=8 --direct=1 --ioengine=libaio --size="$SIZE" >/dev/null
      run_jobs fvd-enc "$dev" "${pids[-1]}"; stop_last; rm -f "$dir"/enc.fvd* "$dir/enc.key" ;;
    fvd-cow|fvd-cow-engine|fvd-cow-main|fvd-cow-nocor|fvd-cow-prefetch|fvd-cow-4k|fvd-cow-64k|fvd-cow-falloc|fvd-cow-q2|fvd-cow-before|fvd-cow-prefetch-before|qcow2-cow)
      cow_target "$t" ;;
    loop)
      truncate -s "$SIZE" "$dir/loop.raw"
      fio --name=fillloop --filename="$dir/loop.raw" --rw=write --bs=1M --size="$SIZE" >/dev/null
      dev=$(losetup --direct-io=on -f --show "$dir/loop.raw")
      run_jobs loop "$dev"; losetup -d "$dev"; rm -f "$dir/loop.raw" ;;
    loop-sparse) per_fresh_set loop_sparse_jobs ;;
    qcow2-nbd)
      qemu-img create -q -f qcow2 "$dir/img.qcow2" "$SIZE"
      qemu-nbd --cache=none --aio=native -f qcow2 -c /dev/nbd0 "$dir/img.qcow2"
      sleep 1
      fio --name=fillq --filename=/dev/nbd0 --rw=write --bs=1M --iodepth=8 --direct=1 --ioengine=libaio --size="$SIZE" >/dev/null
      run_jobs qcow2-nbd /dev/nbd0 "$(nbd_server_pid)"; qemu-nbd -d /dev/nbd0 >/dev/null; rm -f "$dir/img.qcow2" ;;
    *) echo "bench: unknown target $t (bench/device.sh's header lists them)" >&2; exit 2 ;;
  esac
done
done

echo
node - "$results" <<'JS'
const fs = require('fs');
const rows = fs.readFileSync(process.argv[2], 'utf8').trim().split('\n').map((l) => l.split('\t'));
const jobs = [...new Set(rows.map((r) => r[1]))];
const targets = [...new Set(rows.map((r) => r[0]))];
// The median over rounds of each (target, job): IOPS and MB/s of the same run.
const get = (t, j) => {
  const rs = rows.filter((r) => r[0] === t && r[1] === j).sort((a, b) => Number(a[2]) - Number(b[2]));
  return rs.length ? rs[(rs.length - 1) >> 1] : undefined;
};
const pad = (s, n) => String(s).padEnd(n);
console.log(pad('target', 15) + jobs.map((j) => pad(j, 46)).join(''));
for (const t of targets) {
  let line = pad(t, 15);
  for (const j of jobs) {
    const r = get(t, j), l = get('loop', j);
    const ratio = r && l ? ` ${(Number(r[2]) / Number(l[2])).toFixed(2)}x loop` : '';
    const cpu = r && r[4] && r[4] !== '-' ? ` ${r[4]} µs CPU/IO` : '';
    line += pad(r ? `${r[2]} IOPS ${r[3]} MB/s${ratio}${cpu}` : '-', 46);
  }
  console.log(line);
}
JS
