#!/usr/bin/env bash
# FVD vs qcow2 vs raw, on this machine, in one run, with one access pattern and one cache mode.
# Run by `make bench` (after `make build`). Takes roughly 1-3 minutes at the default size.
#
# Cases (same image size, request counts and queue depth for every engine):
#   (a) 4 KiB "random" writes to a FRESH image (every write allocates),
#   (b) 4 KiB "random" reads of a fully written image,
#   (c) 64 KiB sequential writes to a fresh image (this also fills the image that (b) reads).
# Engines:
#   fvd       FVD image, raw-like layout, driven by `fvd bench`
#   fvd-compact  FVD image, compact layout (chunk lookup table + journal: FVD's allocating path)
#   qcow2     qcow2 (default 64 KiB clusters), driven by `qemu-img bench -f qcow2`
#   raw-qemu  raw file, driven by `qemu-img bench -f raw`
#   raw-fvd   raw file, driven by `fvd bench -f raw` (same harness as fvd: shows harness differences)
# Opt-in (FVD_BENCH_TOOLS): fvd-uring and raw-uring, the same two over the io_uring backend
# (`fvd bench --io uring`) instead of node:fs and its libuv thread pool.
#
# Access pattern. `qemu-img bench` has no random mode: request i goes to (OFFSET + i*STEP) mod size
# (its --pattern is the byte written, not an access pattern). So "random" here is a stride
# permutation: STEP = P * 4 KiB where P is the largest prime <= 0.618 * (blocks in the image).
# The block count is a power of two and P is odd, so COUNT = blocks requests touch every 4 KiB
# block exactly once, in a scattered order (consecutive requests ~0.62 of the image apart; no two
# requests in flight are near each other). `fvd bench` gets the same -S and wraps the same way,
# so both tools issue the identical offset sequence. (fvd bench --pattern rand also exists, but
# qemu-img could not match it, and random-with-replacement would not allocate every block once.)
#
# Cache mode. fvd uses buffered node:fs pread/pwrite (libuv thread pool). qemu-img bench's default
# is cache=writeback with aio=threads: also buffered I/O through the page cache, from a thread
# pool. Both sides therefore use buffered I/O (qemu-img `-t writeback`, stated explicitly); O_DIRECT
# (-t none / -n) would be unfair since fvd cannot use it. No flushes are issued inside the timed
# loops (neither tool's default); `sync` runs between runs, outside the timing, so one run's dirty
# pages are not written back during the next. The 4 KiB read case reads page-cache-hot data on both
# sides, so it measures per-request CPU overhead, which is the engine cost under comparison.
# (See "Page supply" below for how fresh-image writes are kept comparable on this VM.)
# Writes use a non-zero fill byte (qemu-img --pattern=0xa5, fvd bench's default --fill 0xa5) so no
# zero detection can short-cut them.
#
# CPU us/op is the user+system CPU time of the bench process (bash `time`, the same way for both
# tools), minus that of the same command with a single request (process start, open, close),
# divided by the request count. It counts every thread (qemu-img's and libuv's I/O threads, so
# the kernel's page-cache work too), and it is much less sensitive than ops/s to other work on
# the machine, so it is the steadier measure of what each engine costs per request.
#
# Each case runs REPS times, engines interleaved within each repetition (in a rotating order, see
# below); the table shows medians.
#
# Environment: FVD_BENCH_DIR (temp dir parent, default /var/tmp), FVD_BENCH_SIZE_MIB (default 512,
# a power of two), FVD_BENCH_DEPTH (default 16), FVD_BENCH_REPS (default 5),
# FVD_BENCH_TOOLS (default "fvd fvd-compact qcow2 raw-qemu raw-fvd").
set -euo pipefail
cd "$(dirname "$0")/.."

NODE=${NODE:-node}
CLI=build/daemon/cli.js
SIZE_MIB=${FVD_BENCH_SIZE_MIB:-512}
DEPTH=${FVD_BENCH_DEPTH:-16}
REPS=${FVD_BENCH_REPS:-5}
TOOLS=${FVD_BENCH_TOOLS:-"fvd fvd-compact qcow2 raw-qemu raw-fvd"}
FILL=0xa5

die() { echo "bench/compare.sh: $*" >&2; exit 1; }

[[ -f $CLI && -f build/bench/report.js && -f build/bench/create-image.js ]] || die "build/ is missing: run 'make build' first"
(( SIZE_MIB > 0 && (SIZE_MIB & (SIZE_MIB - 1)) == 0 )) || die "FVD_BENCH_SIZE_MIB must be a power of two (got $SIZE_MIB)"

if ! command -v qemu-img >/dev/null; then
  [[ $(id -u) == 0 ]] || die "qemu-img is missing and not root: install qemu-utils"
  echo "installing qemu-utils (for qemu-img) ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q qemu-utils >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q qemu-utils >/dev/null; } \
    || die "could not install qemu-utils"
fi

mkdir -p "${FVD_BENCH_DIR:-/var/tmp}"
DIR=$(mktemp -d "${FVD_BENCH_DIR:-/var/tmp}/fvd-bench.XXXXXX")
trap 'rm -rf "$DIR"' EXIT

SIZE=$(( SIZE_MIB * 1024 * 1024 ))
BLOCKS=$(( SIZE / 4096 ))
PRIME=$(awk -v n="$BLOCKS" 'BEGIN {
  for (p = int(n * 0.618); p > 2; p--) { if (p % 2 == 0) continue; ok = 1
    for (d = 3; d * d <= p; d += 2) if (p % d == 0) { ok = 0; break }
    if (ok) { print p; exit } } print 1 }')
STEP=$(( PRIME * 4096 ))
COUNT4K=$BLOCKS
COUNT64K=$(( SIZE / 65536 ))
RESULTS=$DIR/results.tsv
: >"$RESULTS"

# fresh IMAGE for TOOL
fresh() {
  local tool=$1 img=$2
  rm -f "$img"
  case $tool in
    fvd | fvd-uring) "$NODE" build/bench/create-image.js --layout raw "$img" "$SIZE" ;;
    fvd-compact) "$NODE" build/bench/create-image.js --layout compact "$img" "$SIZE" ;;
    qcow2) qemu-img create -q -f qcow2 "$img" "$SIZE" ;;
    raw-qemu | raw-fvd | raw-uring) qemu-img create -q -f raw "$img" "$SIZE" ;;
  esac
}

# run_timed CMD...: stdout to $DIR/out, stderr to $DIR/err, "user system" CPU seconds to $DIR/time.
run_timed() {
  local TIMEFORMAT='%U %S'
  { time "$@" >"$DIR/out" 2>"$DIR/err"; } 2>"$DIR/time"
}

# bench_once TOOL IMAGE BENCH-ARGS...: one bench process; its output in $out, CPU in $DIR/time.
bench_once() {
  local tool=$1 img=$2
  shift 2
  case $tool in
    fvd | fvd-compact | raw-fvd | fvd-uring | raw-uring)
      local fmt=fvd io=node
      [[ $tool == raw-* ]] && fmt=raw
      [[ $tool == *-uring ]] && io=uring
      run_timed "$NODE" "$CLI" bench -f "$fmt" --io "$io" --json "$@" "$img" || die "fvd bench failed: $tool $*: $(<"$DIR/err")"
      ;;
    qcow2 | raw-qemu)
      local qfmt=qcow2 pat=() a
      [[ $tool == raw-qemu ]] && qfmt=raw
      for a in "$@"; do [[ $a == -w ]] && pat=(--pattern="$FILL"); done
      run_timed qemu-img bench -f "$qfmt" -t writeback -i threads "${pat[@]}" "$@" "$img" \
        || die "qemu-img bench failed: $tool $*: $(<"$DIR/err")"
      ;;
  esac
  out=$(<"$DIR/out")
}

# measure CASE TOOL IMAGE BENCH-ARGS...: runs one bench, appends "CASE TOOL OPS MIB" to RESULTS.
measure() {
  local c=$1 tool=$2 img=$3
  shift 3
  local count=0 bs=4096 out secs ops mib cpu i
  # the request count and buffer size, for turning qemu-img's elapsed time into ops/s and MiB/s
  local -a argv=("$@")
  for ((i = 0; i < ${#argv[@]}; i++)); do
    case ${argv[i]} in -c) count=${argv[i + 1]} ;; -s) bs=${argv[i + 1]} ;; esac
  done
  sync
  bench_once "$tool" "$img" "$@"
  case $tool in
    fvd | fvd-compact | raw-fvd | fvd-uring | raw-uring)
      ops=$(sed -E 's/.*"opsPerSecond":([0-9.e+-]+).*/\1/' <<<"$out")
      mib=$(sed -E 's/.*"mibPerSecond":([0-9.e+-]+).*/\1/' <<<"$out")
      ;;
    qcow2 | raw-qemu)
      secs=$(sed -nE 's/^Run completed in ([0-9.]+) seconds\.$/\1/p' <<<"$out")
      [[ -n $secs ]] || die "unexpected qemu-img bench output: $out"
      read -r ops mib < <(awk -v c="$count" -v b="$bs" -v s="$secs" 'BEGIN { if (s <= 0) s = 0.0005; printf "%.1f %.3f\n", c / s, c * b / 1048576 / s }')
      ;;
  esac
  # CPU of the process start, open and close: the same command with a single request, subtracted.
  local busy base
  busy=$(<"$DIR/time")
  for ((i = 0; i < ${#argv[@]}; i++)); do [[ ${argv[i]} == -c ]] && argv[i + 1]=1; done
  bench_once "$tool" "$img" "${argv[@]}"
  base=$(<"$DIR/time")
  cpu=$(awk -v c="$count" -v busy="$busy" -v base="$base" 'BEGIN { split(busy, a, " "); split(base, b, " ")
    v = (a[1] + a[2] - b[1] - b[2]) * 1e6 / (c - 1); printf "%.2f", v < 0 ? 0 : v }')
  printf '%s\t%s\t%s\t%s\t%s\n' "$c" "$tool" "$ops" "$mib" "$cpu" >>"$RESULTS"
  printf '  rep %s  %-2s %-11s %10.0f ops/s %8.1f MiB/s %7.2f us CPU/op\n' "$rep" "$c" "$tool" "$ops" "$mib" "$cpu"
}

A_ARGS=(-w -c "$COUNT4K" -d "$DEPTH" -s 4096 -S "$STEP")
B_ARGS=(-c "$COUNT4K" -d "$DEPTH" -s 4096 -S "$STEP")
C_ARGS=(-w -c "$COUNT64K" -d "$DEPTH" -s 65536)
READ_EXTRA=()

echo "FVD vs qcow2 vs raw: ${SIZE_MIB} MiB images in $DIR, depth $DEPTH, $REPS interleaved runs per case, medians"
echo "  (a) fvd bench ${A_ARGS[*]} IMAGE   |  qemu-img bench -t writeback -i threads --pattern=$FILL ${A_ARGS[*]} IMAGE"
echo "  (b) fvd bench --no-copy-on-read ${B_ARGS[*]} IMAGE  |  qemu-img bench -t writeback -i threads ${B_ARGS[*]} IMAGE"
echo "  (c) fvd bench ${C_ARGS[*]} IMAGE   |  qemu-img bench -t writeback -i threads --pattern=$FILL ${C_ARGS[*]} IMAGE"
echo "  stride: -S $STEP = $PRIME x 4 KiB (prime; $COUNT4K requests cover all $BLOCKS blocks once)"

LOAD=$(cut -d" " -f1 /proc/loadavg)
if awk -v l="$LOAD" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
  echo "warning: load average $LOAD on $(nproc) CPUs: other work is running, so the numbers will be noisy" \
    "(the runs are interleaved, so it hits every engine alike, but ratios can still swing)"
fi
# The engines' order rotates every repetition, so each engine runs in every position once per
# len(TOOLS) repetitions and position effects fall on every engine alike.
#
# Page supply. On this (virtual) machine, page-cache pages that were never used or were freed
# long ago cost ~10x more to fill than recently freed ones (64 KiB writes: ~300 MiB/s instead of
# ~2.5 GiB/s, for raw files as much as for any engine; most likely host faults on memory the
# balloon's free page reporting gave back). So every image is deleted right after its last use,
# and a warm-up file is written and deleted first: each write run then reuses just-freed pages,
# the same for every engine, instead of whichever engine came late in a row of fresh images
# paying ten times more.
rotate() {
  local k=$1
  shift
  local -a t=("$@")
  k=$(( k % ${#t[@]} ))
  echo "${t[@]:k}" "${t[@]:0:k}"
}

head -c "$SIZE" /dev/zero >"$DIR/warm-up"
rm -f "$DIR/warm-up"

START=$SECONDS
for rep in $(seq 1 "$REPS"); do
  # shellcheck disable=SC2086
  ORDER=$(rotate $((rep - 1)) $TOOLS)
  for tool in $ORDER; do
    fresh "$tool" "$DIR/a.$tool"
    measure a "$tool" "$DIR/a.$tool" "${A_ARGS[@]}"
    rm -f "$DIR/a.$tool"
  done
  for tool in $ORDER; do
    fresh "$tool" "$DIR/c.$tool"
    measure c "$tool" "$DIR/c.$tool" "${C_ARGS[@]}"
    # (b) reads the image (c) just filled completely, while it is in the page cache.
    READ_EXTRA=()
    [[ $tool == fvd* ]] && READ_EXTRA=(--no-copy-on-read)
    measure b "$tool" "$DIR/c.$tool" "${READ_EXTRA[@]}" "${B_ARGS[@]}"
    rm -f "$DIR/c.$tool"
  done
done

echo
echo "fvd bench vs qemu-img bench: ${SIZE_MIB} MiB images, queue depth $DEPTH, buffered I/O on both sides," \
  "median of $REPS runs ($(( SECONDS - START )) s in all; $(nproc) CPUs, load average now $(cut -d" " -f1-3 /proc/loadavg)," \
  "node $("$NODE" --version), $(qemu-img --version | head -1))"
"$NODE" build/bench/report.js "$RESULTS" \
  "a=(a) 4K stride-random write, fresh" \
  "b=(b) 4K stride-random read, full" \
  "c=(c) 64K sequential write, fresh"
