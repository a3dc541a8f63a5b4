# Sourced by the device benchmarks: warm_memory DIR writes the machine's available memory (less a
# margin, at most what the tmpfs DIR holds) once through DIR and frees it again. Why: in the QEMU
# guest the guest's RAM is a host memfd, and the first time the guest uses one of its pages the
# host faults it in and zeroes it — under TCG 3-4x the cost of a 128 KiB write into tmpfs (README,
# "Correction"). Without this, a target whose timed job wrote into new pages (a fresh image's
# first writes) paid that, and a target filled before its job (loop) did not. BENCH_WARM=0 skips.
warm_memory() {
  [ "${BENCH_WARM:-1}" = 1 ] || return 0
  local mb room
  mb=$(( $(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo) / 1024 - 512 )) # the daemons', fio's room
  room=$(( $(df -m --output=avail "$1" | tail -1) - 64 ))
  [ "$mb" -le "$room" ] || mb=$room
  [ "$mb" -gt 0 ] || return 0
  dd if=/dev/zero of="$1/.warm" bs=1M count="$mb" status=none
  rm -f "$1/.warm"
  echo "bench: wrote $mb MiB of free memory once before measuring (BENCH_WARM=0 skips)"
}
