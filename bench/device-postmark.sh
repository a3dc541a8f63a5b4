#!/usr/bin/env bash
# `make bench-postmark-dev` (inside a guest with ublk, or on a host that has it): PostMark on ext4
# in each device, the small-file workload of the FVD paper. One ext4 file system is made once in a
# raw file (the template, BENCH_SIZE, default 1G, never written afterwards); every round gives
# each target a fresh disk holding it:
#   loop       kernel loop device, --direct-io=on, over a copy of the raw file
#   fvd-fresh  a fresh FVD image over the raw base (`fvd create -b base.raw -F raw`), served with
#              default options (copy-on-read and background prefetching on)
#   fvd-fresh-64k  (only when named) fvd-fresh created with --block-size 64K (the default block
#              size over a base before 4 KiB)
#   fvd-fresh-q2  (only when named) fvd-fresh served with --queues 2 (the default before 1)
#   fvd-local  the same image made fully local first with `fvd prefetch` (every block in the
#              image, the base no longer read), served with default options
#   qcow2-nbd  a qcow2 overlay over the raw base through qemu-nbd --cache=none --aio=native
# BENCH_TARGETS picks targets, BENCH_ROUNDS (default 3) runs them in turn that many times.
# vm.dirty_bytes is 32M during the runs so that PostMark's writes reach the device rather than
# staying in the page cache. PostMark: PM_FILES (5000) files of 500-9770 bytes, PM_TRANSACTIONS
# (10000) transactions, fixed seed. Prints per round and target the files created per second
# (created files / the whole run's wall time, PostMark's own definition, timed here to the µs
# instead of PostMark's whole seconds) and transactions per second (transactions / the
# transaction phase), the ratio to loop in the same round, the CPU time of the serving process
# (fvd serve, qemu-nbd) during the run, then the medians; and the resident memory (VmRSS; at
# start also split into anonymous and file-backed) of each fvd daemon and of qemu-nbd right after
# the device appeared and after the run. No figure is asserted: the script fails only when
# something does not work.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
FVD="node $root/build/daemon/cli.js"
SIZE=${BENCH_SIZE:-1G}
TARGETS=${BENCH_TARGETS:-"loop fvd-fresh fvd-local qcow2-nbd"}
ROUNDS=${BENCH_ROUNDS:-3}
. "$root/bench/rounds.sh"   # round_targets: BENCH_ROTATE
FILES=${PM_FILES:-5000}
TRANSACTIONS=${PM_TRANSACTIONS:-10000}
command -v postmark >/dev/null || { echo "bench: postmark is not installed (apt-get install postmark)"; exit 1; }
for t in $TARGETS; do
  case $t in loop|fvd-fresh|fvd-fresh-64k|fvd-fresh-q2|fvd-local|qcow2-nbd) ;; *) echo "bench: unknown target $t (loop fvd-fresh fvd-fresh-64k fvd-fresh-q2 fvd-local qcow2-nbd)"; exit 1 ;; esac
done

dir=$(mktemp -d /tmp/fvd-postmark.XXXXXX)
# A tmpfs of its own: every target's backing file in memory alike (the guest's /tmp is an overlay).
mount -t tmpfs -o size=3584M fvd-postmark "$dir"
. "$root/bench/warm-memory.sh"   # warm_memory
mnt=$dir/mnt
mkdir "$mnt"
results=$dir/results.tsv   # target round created/s transactions/s wall-s daemon-cpu-s
memory=$dir/rss.tsv        # target round VmRSS-kB-at-start VmRSS-kB-after RssAnon-kB-at-start RssFile-kB-at-start
pids=() loopdev='' nbd=''
old_dirty_bytes=$(cat /proc/sys/vm/dirty_bytes) old_dirty_ratio=$(cat /proc/sys/vm/dirty_ratio)
cleanup() {
  umount "$mnt" 2>/dev/null || true
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  if [ -n "$loopdev" ]; then losetup -d "$loopdev" 2>/dev/null || true; fi
  if [ -n "$nbd" ]; then qemu-nbd -d "$nbd" >/dev/null 2>&1 || true; fi
  # Writing one of the pair zeroes the other: put back whichever was in force.
  if [ "$old_dirty_bytes" != 0 ]; then echo "$old_dirty_bytes" > /proc/sys/vm/dirty_bytes
  else echo "$old_dirty_ratio" > /proc/sys/vm/dirty_ratio; fi
  umount "$dir" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
warm_memory "$dir"
modprobe ublk_drv 2>/dev/null || true
modprobe nbd nbds_max=2 2>/dev/null || true
mkdir -p /run/lock   # qemu-nbd keeps its lock file there (a fresh guest /run lacks it)
echo $((32 << 20)) > /proc/sys/vm/dirty_bytes
echo "postmark bench: $(uname -r), $SIZE ext4 on $(df --output=fstype "$dir" | tail -1), $FILES files, $TRANSACTIONS transactions, $ROUNDS round(s), vm.dirty_bytes=32M"

# The template: an ext4 file system with its inode tables and journal written out now, so that no
# target's run includes ext4's background initialisation (lazy_itable_init) of its disk.
truncate -s "$SIZE" "$dir/base.raw"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$dir/base.raw"
chmod 444 "$dir/base.raw"   # a base is never written

cat > "$dir/pm.cfg" <<EOF
set location $mnt/pm
set number $FILES
set transactions $TRANSACTIONS
set size 500 9770
set seed 42
run
quit
EOF

cpu_ticks() { # pid -> utime + stime in clock ticks (0 without a pid)
  [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || { echo 0; return; }
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# "anon file" kB: the private part of VmRSS and the part mapped from files (node's binary, its
# libraries), which every node process on the host shares — what another daemon adds is the first.
rss_split_kb() { awk '/^RssAnon:/ { a = $2 } /^RssFile:/ { f = $2 } END { print a "\t" f }' "/proc/$1/status"; }

run_postmark() { # target round device [daemon pid]
  local target=$1 round=$2 dev=$3 dpid=${4:-} c0 c1 t0
  sync; echo 3 > /proc/sys/vm/drop_caches
  mount -t ext4 "$dev" "$mnt"
  mkdir "$mnt/pm"
  c0=$(cpu_ticks "$dpid")
  t0=$EPOCHREALTIME
  # Unbuffered, each line stamped as it arrives: the end of each phase to the µs.
  stdbuf -o0 postmark "$dir/pm.cfg" | while IFS= read -r line; do echo "$EPOCHREALTIME $line"; done > "$dir/pm.out"
  c1=$(cpu_ticks "$dpid")
  umount "$mnt"   # the rest of the writes reach the device before the next target starts
  awk -v t0="$t0" -v tx="$TRANSACTIONS" -v target="$target" -v round="$round" -v cpu="$(( c1 - c0 ))" -v hz="$(getconf CLK_TCK)" '
    / Creating files/ { created_at = $1 }
    / Performing transactions/ { tx_at = $1 }
    / Deleting files/ { end = $1 }
    / created \(/ { created = $2 }
    END {
      if (!created_at || !tx_at || !end || !created) { print "postmark output not understood" > "/dev/stderr"; exit 1 }
      printf "%s\t%s\t%.1f\t%.1f\t%.2f\t%s\n", target, round, created / (end - t0), tx / (tx_at - created_at), end - t0, (cpu > 0 ? sprintf("%.2f", cpu / hz) : "-")
    }' "$dir/pm.out" | tee -a "$results"
}

serve() { # image [options] -> sets $dev (no subshell: the pid must stay in this shell's list)
  local img=$1; shift
  $FVD serve "$img" "$@" > "$img.out" 2> "$img.log" &
  pids+=($!)
  for _ in $(seq 300); do grep -q /dev/ublkb "$img.out" 2>/dev/null && break; sleep 0.1; done
  dev=$(head -1 "$img.out")
  [ -b "$dev" ] || { echo "serve $img failed:"; cat "$img.log"; exit 1; }
}

stop_last() { local p=${pids[-1]}; kill -TERM "$p"; wait "$p" || true; unset 'pids[-1]'; }

run_fvd() { # target round image [serve options]
  local target=$1 round=$2 img=$3 start split
  shift 3
  serve "$img" "$@"
  start=$(rss_kb "${pids[-1]}"); split=$(rss_split_kb "${pids[-1]}")
  run_postmark "$target" "$round" "$dev" "${pids[-1]}"
  printf '%s\t%s\t%s\t%s\t%s\n' "$target" "$round" "$start" "$(rss_kb "${pids[-1]}")" "$split" >> "$memory"
  stop_last
  rm -f "$img"*
}

for round in $(seq "$ROUNDS"); do
  for t in $(round_targets "$round"); do
    case $t in
      loop)
        cp --sparse=always "$dir/base.raw" "$dir/loop.raw"; chmod 644 "$dir/loop.raw"
        loopdev=$(losetup --direct-io=on -f --show "$dir/loop.raw")
        run_postmark loop "$round" "$loopdev"
        losetup -d "$loopdev"; loopdev=''; rm -f "$dir/loop.raw" ;;
      fvd-fresh)
        $FVD create -b "$dir/base.raw" -F raw "$dir/fresh.fvd" >/dev/null
        run_fvd fvd-fresh "$round" "$dir/fresh.fvd" ;;
      fvd-fresh-64k)
        $FVD create --block-size 64K -b "$dir/base.raw" -F raw "$dir/fresh64k.fvd" >/dev/null
        run_fvd fvd-fresh-64k "$round" "$dir/fresh64k.fvd" ;;
      fvd-fresh-q2)
        $FVD create -b "$dir/base.raw" -F raw "$dir/fresh.fvd" >/dev/null
        run_fvd fvd-fresh-q2 "$round" "$dir/fresh.fvd" --queues 2 ;;
      fvd-local)
        $FVD create -b "$dir/base.raw" -F raw "$dir/local.fvd" >/dev/null
        $FVD prefetch -q "$dir/local.fvd"
        run_fvd fvd-local "$round" "$dir/local.fvd" ;;
      qcow2-nbd)
        qemu-img create -q -f qcow2 -b "$dir/base.raw" -F raw "$dir/overlay.qcow2"
        nbd=/dev/nbd0
        qemu-nbd --cache=none --aio=native -f qcow2 --pid-file="$dir/nbd.pid" -c "$nbd" "$dir/overlay.qcow2"
        sleep 1
        start=$(rss_kb "$(cat "$dir/nbd.pid")"); split=$(rss_split_kb "$(cat "$dir/nbd.pid")")
        run_postmark qcow2-nbd "$round" "$nbd" "$(cat "$dir/nbd.pid")"
        printf '%s\t%s\t%s\t%s\t%s\n' qcow2-nbd "$round" "$start" "$(rss_kb "$(cat "$dir/nbd.pid")")" "$split" >> "$memory"
        qemu-nbd -d "$nbd" >/dev/null; nbd=''; rm -f "$dir/overlay.qcow2" "$dir/nbd.pid" ;;
    esac
  done
done

echo
node - "$results" "$memory" <<'JS'
const fs = require('fs');
const read = (f) => fs.existsSync(f) ? fs.readFileSync(f, 'utf8').trim().split('\n').filter(Boolean).map((l) => l.split('\t')) : [];
const rows = read(process.argv[2]), mem = read(process.argv[3]);
const targets = [...new Set(rows.map((r) => r[0]))];
const rounds = [...new Set(rows.map((r) => r[1]))];
// The median (the lower middle one for an even count), as bench/device.sh shows.
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[(s.length - 1) >> 1] : NaN; };
const figure = (t, round, col) => { const r = rows.find((x) => x[0] === t && x[1] === round); return r ? Number(r[col]) : NaN; };
const pad = (s, n) => String(s).padEnd(n);
console.log(pad('target', 14) + pad('files created/s', 17) + pad('transactions/s', 16) + pad('created/s ÷ loop per round', 30) + pad('median', 8) + 'server CPU s');
for (const t of targets) {
  const created = rounds.map((r) => figure(t, r, 2)).filter((x) => !Number.isNaN(x));
  const tx = rounds.map((r) => figure(t, r, 3)).filter((x) => !Number.isNaN(x));
  const ratios = rounds.map((r) => figure(t, r, 2) / figure('loop', r, 2)).filter((x) => Number.isFinite(x));
  const cpu = rounds.map((r) => figure(t, r, 5)).filter((x) => !Number.isNaN(x));
  console.log(pad(t, 14) + pad(median(created).toFixed(0), 17) + pad(median(tx).toFixed(0), 16) +
    pad(ratios.length ? ratios.map((x) => x.toFixed(2)).join(' ') : '-', 30) +
    pad(ratios.length ? median(ratios).toFixed(2) + 'x' : '-', 8) + (cpu.length ? median(cpu).toFixed(1) : '-'));
}
if (mem.length) {
  console.log('\nresident memory (VmRSS, MiB; median over rounds, per round in brackets)');
  for (const t of [...new Set(mem.map((r) => r[0]))]) {
    const of = (col) => { const xs = mem.filter((r) => r[0] === t).map((r) => Number(r[col]) / 1024); return `${median(xs).toFixed(1)} [${xs.map((x) => x.toFixed(1)).join(' ')}]`; };
    console.log(`${pad(t, 14)}at start ${of(2)} (anonymous ${of(4)}, file-backed ${of(5)}), after the run ${of(3)}`);
  }
}
JS
