#!/usr/bin/env bash
# Reading a compressed qcow2 template: fvd's reader against QEMU's own, on this machine, in one run.
# Run by `make bench` (after `make build`); a few minutes at the default size.
#
# The template: a raw disk of FVD_BENCH_QCOW2_MIB (default 1024) MiB whose first ~60 % is a tar
# stream of /usr (binaries, libraries, text: what an OS image holds) and the rest zeros, converted
# with `qemu-img convert -c` (zlib, 64 KiB clusters) and once more with compression_type=zstd.
# Each round flattens the template to a raw file with both tools, page cache warm for both:
#   qemu-img  `qemu-img convert -t writeback -f qcow2 -O raw T out.raw`   (8 coroutines, decompression
#             on its thread pool, zero regions left sparse; `-t writeback` so that it flushes the
#             output at the end as fvd convert does — its default cache mode, unsafe, never syncs)
#   fvd       `fvd convert -f qcow2 -O raw T out.raw`          (the engine's qcow2 reader; zero pieces left
#             sparse)
# MiB/s = virtual size / wall time. Rounds (FVD_BENCH_REPS, default 3) interleave the two tools in
# a random order per round; the table shows medians and the ratio fvd / qemu-img (> 1: fvd
# faster). `sync` between runs, outside the timing. FVD_BEFORE=<another checkout's build/daemon/cli.js> adds that fvd to every round
# (its column and the ratio this fvd / that one): before/after figures from one run.
set -euo pipefail
cd "$(dirname "$0")/.."

NODE=${NODE:-node}
CLI=build/daemon/cli.js
MIB=${FVD_BENCH_QCOW2_MIB:-1024}
REPS=${FVD_BENCH_REPS:-3}
die() { echo "bench/qcow2.sh: $*" >&2; exit 1; }
[[ -f $CLI ]] || die "build/ is missing: run 'make build' first"
command -v qemu-img >/dev/null || bash tests/host-tools.sh
command -v qemu-img >/dev/null || die "qemu-img is missing: install qemu-utils"

mkdir -p "${FVD_BENCH_DIR:-/var/tmp}"
DIR=$(mktemp -d "${FVD_BENCH_DIR:-/var/tmp}/fvd-bench-qcow2.XXXXXX")
trap 'rm -rf "$DIR"' EXIT

echo "making a ${MIB} MiB disk (tar of /usr, then zeros) and its compressed qcow2 templates ..."
truncate -s "${MIB}M" "$DIR/disk.raw"
(tar cf - /usr 2>/dev/null || true) | head -c $(( MIB * 1024 * 1024 * 6 / 10 )) | dd of="$DIR/disk.raw" conv=notrunc status=none
qemu-img convert -c -f raw -O qcow2 "$DIR/disk.raw" "$DIR/zlib.qcow2"
qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$DIR/disk.raw" "$DIR/zstd.qcow2"
rm -f "$DIR/disk.raw"

now() { date +%s.%N; }
# run TOOL TEMPLATE → seconds
run() {
  local tool=$1 t=$2 t0 t1
  rm -f "$DIR/out.raw"; sync
  t0=$(now)
  if [[ $tool == qemu-img ]]; then qemu-img convert -t writeback -f qcow2 -O raw "$t" "$DIR/out.raw"
  elif [[ $tool == fvd-before ]]; then "$NODE" "$FVD_BEFORE" convert -f qcow2 -O raw "$t" "$DIR/out.raw"
  else "$NODE" "$CLI" convert -f qcow2 -O raw "$t" "$DIR/out.raw"; fi
  t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# Both tools must produce the same bytes (checked once per template, outside the timing).
for c in zlib zstd; do
  qemu-img convert -f qcow2 -O raw "$DIR/$c.qcow2" "$DIR/ref.raw"
  "$NODE" "$CLI" convert -f qcow2 -O raw "$DIR/$c.qcow2" "$DIR/out.raw"
  cmp -s "$DIR/ref.raw" "$DIR/out.raw" || die "fvd convert -f qcow2 differs from qemu-img convert for the $c template"
  rm -f "$DIR/ref.raw" "$DIR/out.raw"
done

before=${FVD_BEFORE:+ | fvd before MiB/s | fvd / fvd before}
echo
echo "| template ($MIB MiB virtual) | file size | qemu-img convert MiB/s | fvd convert MiB/s | fvd / qemu-img$before |"
echo "|---|---|---|---|---|${FVD_BEFORE:+---|---|}"
for c in zlib zstd; do
  t=$DIR/$c.qcow2
  q=() f=() b=()
  for ((r = 0; r < REPS; r++)); do
    # Each round in a random order: a run's time depends on what the run before it left (its
    # output's blocks just freed, its dirty pages), which a fixed order turns into a bias.
    for tool in $(printf '%s\n' qemu-img fvd ${FVD_BEFORE:+fvd-before} | shuf); do
      case $tool in
        qemu-img) q+=("$(run qemu-img "$t")") ;;
        fvd) f+=("$(run fvd "$t")") ;;
        fvd-before) b+=("$(run fvd-before "$t")") ;;
      esac
    done
  done
  qm=$(printf '%s\n' "${q[@]}" | median) fm=$(printf '%s\n' "${f[@]}" | median) bm=0
  [[ -z ${FVD_BEFORE:-} ]] || bm=$(printf '%s\n' "${b[@]}" | median)
  size=$(du -m --apparent-size "$t" | cut -f1)
  awk -v c="$c" -v s="$size" -v m="$MIB" -v q="$qm" -v f="$fm" -v b="$bm" 'BEGIN {
    printf "| %s-compressed, 64 KiB clusters | %d MiB | %.0f | %.0f | %.2f× |", c, s, m / q, m / f, q / f
    if (b > 0) printf " %.0f | %.2f× |", m / b, b / f
    printf "\n" }'
done
echo "(node $("$NODE" --version), $(qemu-img --version | head -1); medians of $REPS interleaved rounds)"
