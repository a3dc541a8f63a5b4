#!/usr/bin/env bash
# tests/vm/host-has-ublk.sh — exit 0 when the HOST kernel can serve ublk devices,
# i.e. /dev/ublk-control exists or `modprobe ublk_drv` makes it appear.
# Callers then run the device-level suite directly instead of in the QEMU guest:
#
#   if tests/vm/host-has-ublk.sh; then run-suite; else tests/vm/run.sh -- run-suite; fi
#
# -q: no message on stderr.  Exit 1 otherwise.
quiet=0; [[ ${1:-} == -q ]] && quiet=1
say() { [[ $quiet == 1 ]] || printf 'host-has-ublk: %s\n' "$*" >&2; }

if [[ -c /dev/ublk-control ]]; then
    say "yes: /dev/ublk-control exists"; exit 0
fi
if command -v modprobe >/dev/null && modprobe -q ublk_drv 2>/dev/null; then
    # devtmpfs creates the node synchronously, udev may still be renaming: wait a bit.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        [[ -c /dev/ublk-control ]] && { say "yes: loaded ublk_drv"; exit 0; }
        sleep 0.2
    done
fi
say "no: no /dev/ublk-control and modprobe ublk_drv failed (kernel $(uname -r)) — use tests/vm/run.sh"
exit 1
