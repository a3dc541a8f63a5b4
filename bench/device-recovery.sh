#!/usr/bin/env bash
# `make bench-recovery-dev` (inside a guest with ublk, or on a host that has it): how many daemon
# deaths a device survives under write load, and the pause the guest sees in each.
#
# A raw-like image over a 256 MiB raw base (so copy-on-write runs through the engine) is served
# with --recovery-wait. fio writes with crc32c verify (random 4–64 KiB writes, depth 16, O_DIRECT,
# restarted whenever a run ends) while, CYCLES times (default 20), the script waits INTERVAL
# seconds (default 2) and then either SIGKILLs the daemon and starts `fvd serve` again at once
# (MODE=kill, what systemd's Restart=on-failure does with RestartSec=0) or runs `fvd serve
# --takeover` (MODE=takeover, a live restart). A probe reads 4 KiB with O_DIRECT back to back and
# logs each read's latency; the longest read of a cycle is the pause the guest saw. Reported: fio
# runs and their errors (every run must end 0 with its verify passed), the device node (it must
# never change), and the pause and the daemon's own recovery time ("recovered device N in X ms"),
# median and max. Figures from TCG guests are relative: compare modes and builds in one boot.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
FVD="node $root/build/daemon/cli.js"
CYCLES=${CYCLES:-20}
INTERVAL=${INTERVAL:-2}
MODE=${MODE:-kill}
[[ $MODE == kill || $MODE == takeover ]] || { echo "MODE must be kill or takeover" >&2; exit 2; }
dir=$(mktemp -d /tmp/fvd-bench-rec.XXXXXX)
mount -t tmpfs -o size=1G fvd-bench-rec "$dir"
pid='' fio_pid='' probe_pid=''
cleanup() {
  [[ -n $probe_pid ]] && kill "$probe_pid" 2>/dev/null
  [[ -n $fio_pid ]] && kill "$fio_pid" 2>/dev/null
  [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  # The last server's warden and the probe's last dd may still hold files here for a moment;
  # a busy tmpfs must not turn a clean run into exit 1 (the trap's status is the script's).
  local i
  for ((i = 0; i < 50; i++)); do umount "$dir" 2>/dev/null && break; sleep 0.1; done
  mountpoint -q "$dir" && umount -l "$dir" 2>/dev/null
  rm -rf "$dir" 2>/dev/null || true
}
trap cleanup EXIT
modprobe ublk_drv 2>/dev/null || true
echo "bench-recovery: $(uname -r), mode $MODE, $CYCLES cycles every $INTERVAL s"

n=0
serve() { # [options] -> $dev, $pid; log in $dir/serve$n.log
  n=$((n + 1))
  $FVD serve "$dir/r.fvd" --recovery-wait 120 "$@" > "$dir/serve$n.out" 2> "$dir/serve$n.log" &
  pid=$!
  local i
  for ((i = 0; i < 1200; i++)); do
    [[ -s $dir/serve$n.out ]] && { dev=$(head -n 1 "$dir/serve$n.out"); return 0; }
    kill -0 "$pid" 2>/dev/null || { cat "$dir/serve$n.log" >&2; exit 1; }
    sleep 0.05
  done
  echo "fvd serve printed no device" >&2; exit 1
}

head -c 256M /dev/urandom > "$dir/base.raw"
$FVD create -b "$dir/base.raw" -F raw "$dir/r.fvd" 256M > /dev/null
serve
devno=$(stat -c %t:%T "$dev")

runs=0 failed=0
start_fio() {
  runs=$((runs + 1))
  fio --name=rec --filename="$dev" --size=192M --rw=randwrite --bs=4k-64k --ioengine=libaio --direct=1 --iodepth=16 \
    --verify=crc32c --verify_fatal=1 --randseed=$runs --thinktime=20ms --thinktime_blocks=8 > "$dir/fio$runs.log" 2>&1 &
  fio_pid=$!
}
end_fio() {
  local rc=0
  wait "$fio_pid" || rc=$?
  if ((rc != 0)) || ! grep -qE 'err= *0' "$dir/fio$runs.log"; then failed=$((failed + 1)); echo "fio run $runs failed (exit $rc):"; tail -n 5 "$dir/fio$runs.log"; fi
}
probe() {
  local s e
  while :; do
    s=$(date +%s%N)
    dd if="$dev" of=/dev/null bs=4k count=1 skip=$((RANDOM % 4096)) iflag=direct status=none 2>> "$dir/probe.err" || echo "probe read failed" >> "$dir/probe.err"
    e=$(date +%s%N)
    echo "$(((e - s) / 1000000))" >> "$dir/probe.ms"
  done
}

start_fio
probe & probe_pid=$!
pauses=() recoveries=()
for ((c = 1; c <= CYCLES; c++)); do
  kill -0 "$fio_pid" 2>/dev/null || { end_fio; start_fio; }
  sleep "$INTERVAL"
  : > "$dir/probe.ms"
  if [[ $MODE == kill ]]; then
    kill -KILL "$pid"; wait "$pid" 2>/dev/null || true
    serve
  else
    old=$pid
    serve --takeover
    wait "$old" || { echo "cycle $c: the old server did not exit 0" >&2; exit 1; }
  fi
  [[ $(stat -c %t:%T "$dev") == "$devno" ]] || { echo "cycle $c: the device node changed" >&2; exit 1; }
  sleep 1 # the probe's read that waited through the pause has completed
  pauses+=("$(sort -n "$dir/probe.ms" | tail -n 1)")
  r=$(grep -o 'recovered device [0-9]* in [0-9]* ms' "$dir/serve$n.log" | awk '{print $5}') ||
    { echo "cycle $c: the new server did not recover the device:" >&2; cat "$dir/serve$n.log" >&2; exit 1; }
  recoveries+=("$r")
done
kill "$probe_pid"; wait "$probe_pid" 2>/dev/null || true; probe_pid=''
end_fio; fio_pid=''
stats() { sort -n | awk '{ a[NR] = $1 } END { m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "median %d ms, max %d ms (n=%d)", m, a[NR], NR }'; }
# (grep -c prints 0 and exits 1 when nothing matched: `|| echo 0` would print a second 0)
probe_errors=$(grep -c failed "$dir/probe.err" 2>/dev/null || true)
echo "cycles: $CYCLES ($MODE), device node unchanged; fio runs: $runs, failed: $failed; probe read errors: ${probe_errors:-0}"
echo "pause seen by the guest (longest 4 KiB read per cycle): $(printf '%s\n' "${pauses[@]}" | stats)"
echo "daemon recovery (START_USER_RECOVERY to LIVE): $(printf '%s\n' "${recoveries[@]}" | stats)"
((failed == 0 && ${probe_errors:-0} == 0))
