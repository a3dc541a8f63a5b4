#!/usr/bin/env bash
# tests/vm/e2e.sh — end-to-end scenarios of `fvd serve` on a real ublk device.
#
# Runs where ublk exists: inside the QEMU guest (tests/vm/run.sh -- bash tests/vm/e2e.sh ...) or
# directly on a host whose kernel has ublk.  The host entry point is tests/vm/run-e2e.sh.
#
# Usage: tests/vm/e2e.sh [SCENARIO...]     SCENARIO = number or name (1 or fs), default: all.
#   1 fs          ext4 and xfs on the device, files + sha256 across a daemon restart, fsck
#   2 base        FVD image over a raw base holding ext4: read, modify, persist, base untouched
#   3 fio         fio verify=crc32c, libaio O_DIRECT, 2 queues, iodepth 32, 2 jobs; re-verify
#   4 discard     blkdiscard / blkdiscard -z over written data and base data; whole-device model
#   5 qemu-io     QEMU's block layer (-t none -n) on the device, and data written by dd
#   6 systemd     fvd@.service: start/ready, StatusText, stop, check, bad image (needs systemd PID 1)
#   7 kill        kill -9 under write load: no hung device, re-serve same id, journal replay,
#                 fsynced data intact, e2fsck clean
#   8 bad-input   corrupt image, missing base, busy --dev-id, locked image: one-line errors
#   9 encrypt     encrypted image served with its key (file, stdin, KEY_FILE=, credential)
#  10 snapshot    internal snapshots of a served compact image
#  11 maintenance commit, resize, rebase refused while served, right between serves
#  12 lvm         compact image on an LVM LV grown by --grow-cmd; ENOSPC without it
#  13 qcow2       ext4 in a compressed qcow2 template: served, prefetched, template deleted
#  14 remote      ext4 template over HTTP (nginx): served, prefetched, outage and return, a
#                 daemon SIGKILLed during the outage recovered anyway
#  15 kernel      ublk features named from GET_FEATURES; queue threads are I/O flushers
#  16 storage-faults  dm-flakey/dm-error under the image and under its base: errors, no crash,
#                 replay, flushed data intact
#  17 full-disk   the image's file system fills up: -ENOSPC to the guest, writes again after space
#  18 recovery    serve --recovery-wait: SIGKILL under fio verify, the next serve recovers the same
#                 device (0 errors), also with ext4 mounted on it (e2fsck clean); unflushed
#                 acknowledged write kept (pending log); fvd stop of a waiting device
#  19 zero-copy   serve --zero-copy (AUTO_BUF_REG + USER_COPY): every route, fio verify, recovery
#                 keeps it; on kernels without it one line and copies
#  20 queue-cow   copy-on-write on the queue threads: scattered O_DIRECT writes racing a reader,
#                 copy-on-read and prefetch, a SIGKILL and recovery; the device equals a model
#  21 reissue     a write held in the old server across a hand-off: QUIESCE (7.x) drains it there,
#                 nothing reissued; without QUIESCE (6.12) the kernel reissues it to the new one
#
# Output: one line per check, "ok - [N name] ..." or "not ok - [N name] ..." (with the evidence
# indented below it), "# ..." comments, and as the last line exactly "N passed, N failed".
# Exit status 0 only when nothing failed.
#
# Environment: E2E_WORK (work dir, default /tmp/fvd-e2e, a tmpfs of E2E_TMPFS_SIZE is mounted
# there), E2E_FVD (command for fvd, default "node <repo>/build/daemon/cli.js"), E2E_IO_TIMEOUT
# (s per device command, 180), E2E_SCENARIO_TIMEOUT (s, overrides each scenario's own limit).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export REPO
REPO=$(cd "$here/../.." && pwd)
root=${E2E_WORK:-/tmp/fvd-e2e}
t_start=$SECONDS

[[ $(id -u) == 0 ]] || { echo "not ok - e2e.sh must run as root"; echo "0 passed, 1 failed"; exit 1; }

# --- scenario selection --------------------------------------------------------------------------
all=()
for f in "$here"/e2e/[0-9]*-*.sh; do all+=("$f"); done
want=("$@")
[[ ${#want[@]} -gt 0 ]] || want=(all)
files=()
for w in "${want[@]}"; do
    matched=0
    for f in "${all[@]}"; do
        b=$(basename "$f" .sh)   # e.g. 1-fs
        if [[ $w == all || $w == "${b%%-*}" || $w == "${b#*-}" || $w == "$b" ]]; then
            files+=("$f"); matched=1
        fi
    done
    ((matched)) || { echo "not ok - unknown scenario '$w'"; echo "0 passed, 1 failed"; exit 1; }
done

# --- environment ---------------------------------------------------------------------------------
export E2E_STATE
E2E_STATE=$(mktemp -d /tmp/fvd-e2e-state.XXXXXX)
: > "$E2E_STATE/tally"
: > "$E2E_STATE/pids"
mkdir -p "$root"
mounted_root=0
if ! mountpoint -q "$root"; then
    mount -t tmpfs -o "size=${E2E_TMPFS_SIZE:-2560M},mode=755" fvd-e2e "$root"
    mounted_root=1
fi
modprobe ublk_drv 2>/dev/null || true
dmesg -n 1 2>/dev/null || true     # keep kernel messages off the console (they stay in dmesg)

# shellcheck source=e2e/lib.sh
source "$here/e2e/lib.sh"

echo "# fvd e2e: kernel $(uname -r), $(nproc) cpus, node $(node --version 2>&1), fvd: ${FVD[*]} ($("${FVD[@]}" --version 2>&1))"
echo "# mode: ${FVD_VM_MODE:-host}, PID 1: $(readlink /proc/1/exe 2>/dev/null || echo '?'), work dir $root"
if [[ ! -c /dev/ublk-control ]]; then
    SCEN=setup not_ok "/dev/ublk-control missing (modprobe ublk_drv failed)" "$(modprobe ublk_drv 2>&1)"
    echo "0 passed, 1 failed"; exit 1
fi
if [[ ! -f $REPO/build/daemon/cli.js && -z ${E2E_FVD:-} ]]; then
    SCEN=setup not_ok "$REPO/build/daemon/cli.js missing: run 'make build' first"
    echo "0 passed, 1 failed"; exit 1
fi

count() { grep -c "^$1\$" "$E2E_STATE/tally" || true; }

# cleanup_scenario DIR: what a scenario may leave behind when it fails or times out.
cleanup_scenario() {
    local dir=$1 pid m
    # Our daemons (and only ours) still running: SIGTERM, then SIGKILL.
    while read -r pid; do
        [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || continue
        echo "# cleanup: daemon pid $pid still running, stopping it"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done < "$E2E_STATE/pids"
    : > "$E2E_STATE/pids"
    # Devices left waiting for a server (serve --recovery-wait): deleted, or later umounts hang.
    for st in /run/fvd/ublkb*.json; do
        [[ -f $st ]] && grep -q '"fileId"' "$st" || continue
        m=$(sed -n 's/.*"devId": \([0-9]*\).*/\1/p' "$st" | head -n 1)
        echo "# cleanup: deleting device $m left waiting for its server"
        timeout 30 "${FVD[@]}" stop "$m" 2>&1 | sed 's/^/#   /' || true
    done
    # Mounts under the scenario's directory, deepest first.
    for m in $(awk -v d="$dir" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
        echo "# cleanup: unmounting $m"
        timeout 30 umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    # Device-mapper devices of the storage-fault scenarios (over loop devices of its files).
    dmsetup ls 2>/dev/null | awk '$1 ~ /^fvde2e-/ {print $1}' | while read -r m; do
        dmsetup remove --noudevsync --force "$m" 2>/dev/null || true
    done
    # Loop devices over its files.
    losetup -n -O NAME,BACK-FILE 2>/dev/null | awk -v d="$dir" 'index($2, d) == 1 {print $1}' |
        while read -r l; do losetup -d "$l" 2>/dev/null || true; done
    rm -rf "$dir"
}

# --- run ----------------------------------------------------------------------------------------
summary=()
for f in "${files[@]}"; do
    b=$(basename "$f" .sh)
    label="${b%%-*} ${b#*-}"
    title=$(sed -n 's/^# title: //p' "$f" | head -n 1)
    limit=${E2E_SCENARIO_TIMEOUT:-$(sed -n 's/^# timeout: \([0-9]*\).*/\1/p' "$f" | head -n 1)}
    limit=${limit:-600}
    dir=$root/s${b%%-*}
    rm -rf "$dir"; mkdir -p "$dir"
    echo "# --- scenario $label: $title (time limit ${limit}s)"
    p0=$(count ok) f0=$(count fail) s0=$(count skip) t0=$SECONDS rc=0
    DMESG_MARK=$(dmesg 2>/dev/null | wc -l || echo 0)
    # shellcheck disable=SC2016
    SCEN=$label D=$dir DMESG_MARK=$DMESG_MARK timeout -k 20 "$limit" bash -c '
        set -eEuo pipefail
        source "$1"; source "$2"
        # Only in this shell: a subshell that fails makes its parent command fail, and that one
        # reports it here.
        SCEN_PID=$BASHPID
        trap '\''rc=$?; [[ $BASHPID != "$SCEN_PID" ]] || not_ok "scenario aborted: line $LINENO: $BASH_COMMAND (exit $rc)"'\'' ERR
        cd "$D"
        scenario' e2e "$here/e2e/lib.sh" "$f" || rc=$?
    p1=$(count ok) f1=$(count fail)
    export DMESG_MARK
    if [[ $rc == 124 || $rc == 137 ]]; then
        SCEN=$label not_ok "scenario timed out after ${limit}s (hung device or daemon?)" \
            "$(ps -eo pid,stat,wchan:24,etime,args | grep -E ' (PID|STAT)|cli\.js|fio|dd |mkfs|fsck|mount|qemu-io|blkdiscard|sha256sum|cp |cmp ' | grep -v -E 'grep|run-command|job\.sh')"
    elif [[ $rc != 0 && $f1 == "$f0" ]]; then
        SCEN=$label not_ok "scenario exited $rc without a failed check"
    elif [[ $rc == 0 && $p1 == "$p0" && $f1 == "$f0" && $(count skip) == "$s0" ]]; then
        SCEN=$label not_ok "scenario ran no checks"
    fi
    cleanup_scenario "$dir"
    p1=$(count ok) f1=$(count fail)
    if [[ $(count skip) != "$s0" && $p1 == "$p0" && $f1 == "$f0" ]]; then
        summary+=("# scenario $label: skipped ($((SECONDS - t0))s)")
    else
        summary+=("# scenario $label: $((p1 - p0)) passed, $((f1 - f0)) failed ($((SECONDS - t0))s)")
    fi
    echo "${summary[-1]}"
done

((mounted_root)) && { umount "$root" 2>/dev/null || umount -l "$root" 2>/dev/null || true; }
passed=$(count ok) failed=$(count fail)
rm -rf "$E2E_STATE"
echo "# --- summary (${FVD_VM_MODE:-host}, $((SECONDS - t_start))s)"
printf '%s\n' "${summary[@]}"
echo "$passed passed, $failed failed"
[[ $failed == 0 ]]
