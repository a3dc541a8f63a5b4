#!/usr/bin/env bash
# tests/vm/smoke.sh — smoke test of the QEMU guest harness (tests/vm/run.sh).
# `make test` runs it with --quick (tests/all.sh).
#
# Boots the guest in both init modes and checks, inside it: the kernel FVD_VM_KERNEL names (6.12 by
# default, or 7.3),
# ublk_drv + /dev/ublk-control, node, the project tree and cwd, that guest
# writes do not reach the host, ext4 + xfs on a loop device over tmpfs, and
# (systemd mode) that PID 1 is systemd and the system reaches "running".
# On the host it checks exit-code propagation, booting again after a boot panic (only
# before the command started), time-out (124) and cleanup,
# and prints the measured boot-to-command times.
#
# Usage: tests/vm/smoke.sh [--quick]     (--quick: skip the time-out check)
# Ends with "smoke: N passed, N failed"; exit 0 only when nothing failed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
quick=0; [[ ${1:-} == --quick ]] && quick=1
pass=0 fail=0
ok()     { pass=$((pass + 1)); echo "ok - $*"; }
not_ok() { fail=$((fail + 1)); echo "not ok - $*"; }
expect() { if [[ $2 == "$3" ]]; then ok "$1"; else not_ok "$1 (got '$2', want '$3')"; fi; }

"$here/prepare.sh" >/dev/null 2>&1 || { "$here/prepare.sh"; echo "smoke: 0 passed, 1 failed"; exit 1; }

work=$(mktemp -d /tmp/fvd-vm-smoke.XXXXXX)
trap 'rm -rf "$work"' EXIT
export FVD_VM_TIMING_FILE=$work/timing
export SMOKE_MARKER=/tmp/fvd-vm-smoke-marker.$$.$RANDOM SMOKE_CWD=$repo SMOKE_KERNEL=${FVD_VM_KERNEL:-6.12}
export FVD_VM_PASS_ENV="SMOKE_MARKER SMOKE_CWD SMOKE_KERNEL"
cd "$repo" || exit 1

# Checks run inside the guest; each prints "ok - ..." or "not ok - ...".
read -r -d '' guest_common <<'EOF'
check() {
    local name=$1 out; shift
    if out=$("$@" 2>&1); then echo "ok - $name"
    else echo "not ok - $name"; printf '%s\n' "$out" | tail -n 20 | sed 's/^/#   /'; fi
}
check "[$FVD_VM_MODE] kernel is $SMOKE_KERNEL ($(uname -r))" bash -c '[[ $(uname -r) == "$SMOKE_KERNEL".* ]]'
check "[$FVD_VM_MODE] modprobe ublk_drv + /dev/ublk-control" \
    bash -c 'modprobe ublk_drv && lsmod | grep -q "^ublk_drv" && test -c /dev/ublk-control'
check "[$FVD_VM_MODE] modprobe with parameters (nbd nbds_max=2)" \
    bash -c 'modprobe -r nbd && modprobe nbd nbds_max=2 && test -b /dev/nbd1 && ! test -e /dev/nbd2'
check "[$FVD_VM_MODE] node --version ($(node --version 2>&1))" bash -c '[[ $(node --version) == v20.* ]]'
check "[$FVD_VM_MODE] project tree visible, cwd kept" \
    bash -c 'test -f /work/main/package.json && [[ $PWD == "$SMOKE_CWD" ]]'
check "[$FVD_VM_MODE] root is an overlay (writable), results share mounted" \
    bash -c 'grep -q " /run/fvd-vm/results virtiofs " /proc/mounts && grep -q "^overlay / overlay" /proc/mounts \
             && echo guest > "$SMOKE_MARKER" && mkdir -p /var/lib/fvd-smoke /etc/fvd-smoke'
check "[$FVD_VM_MODE] mkfs.ext4 on loop over tmpfs + mount" bash -ec '
    d=$(mktemp -d); mount -t tmpfs -o size=700M tmpfs "$d"
    truncate -s 64M "$d/ext4.img"; dev=$(losetup -f --show "$d/ext4.img")
    mkfs.ext4 -q -F "$dev"; mkdir "$d/m"; mount "$dev" "$d/m"
    echo hello > "$d/m/f"; sync; umount "$d/m"; mount -o ro "$dev" "$d/m"
    grep -q hello "$d/m/f"; umount "$d/m"; losetup -d "$dev"
    truncate -s 320M "$d/xfs.img"; dev=$(losetup -f --show "$d/xfs.img")
    mkfs.xfs -q -f "$dev"; mount "$dev" "$d/m"; echo hello > "$d/m/f"; umount "$d/m"
    losetup -d "$dev"; umount "$d"'
check "[$FVD_VM_MODE] blkdiscard/fio/kmod present" bash -c 'command -v blkdiscard fio modprobe mkfs.xfs >/dev/null'
EOF
guest_systemd=$guest_common$'\n'$(cat <<'EOF'
check "[systemd] PID 1 is systemd" bash -c '[[ $(readlink /proc/1/exe) == */systemd ]]'
check "[systemd] systemctl --version ($(systemctl --version | head -n1))" systemctl --version
check "[systemd] is-system-running --wait = $(timeout 300 systemctl is-system-running --wait)" \
    bash -c '[[ $(systemctl is-system-running) == running ]] || { systemctl --failed; false; }'
check "[systemd] a transient unit runs (systemd-run --wait)" systemd-run --wait --quiet -p Type=oneshot /bin/true
EOF
)

run_mode() {  # mode-args... ; runs the guest checks, counts them, checks rc
    local label=$1 script=$2; shift 2
    local log=$work/$label.log rc
    "$here/run.sh" "$@" -- bash -c "$script"$'\nexit 0' > "$log" 2>"$log.err"
    rc=$?
    cat "$log"
    while read -r line; do
        case $line in "ok - "*) pass=$((pass + 1)) ;; "not ok - "*) fail=$((fail + 1)) ;; esac
    done < "$log"
    expect "[$label] guest run exits 0" "$rc" 0
    [[ $rc == 0 ]] || sed 's/^/#   /' "$log.err"
    [[ $(grep -c '^ok - ' "$log") -ge 8 ]] || not_ok "[$label] too few guest checks ran"
    if [[ -e $SMOKE_MARKER ]]; then not_ok "[$label] guest /tmp write leaked to host"
    else ok "[$label] guest /tmp write did not reach the host"; fi
}

echo "# busybox mode"
run_mode busybox "$guest_common"
"$here/run.sh" -- bash -c 'exit 7' >/dev/null 2>&1; expect "[busybox] exit code 7 propagates" "$?" 7
"$here/run.sh" -- /nonexistent-command >/dev/null 2>&1; expect "[busybox] missing command gives 127" "$?" 127
out=$("$here/run.sh" -- bash -c 'printf "a b\n"; printf "%s|" "$@"' _ 'x y' "'q'" 2>/dev/null)
expect "[busybox] argv quoting + clean stdout" "$out" $'a b\nx y|\'q\'|'
# A guest that dies before the command starts is booted once more; one that dies after, never.
err=$(FVD_VM_APPEND="rdinit=/nonexistent" "$here/run.sh" -- true 2>&1 >/dev/null); rc=$?
expect "[busybox] a boot that panics before the command gives 125" "$rc" 125
expect "[busybox] ... after booting once more" "$(grep -c 'booting again (2 of 2)' <<< "$err")" 1
# A kernel that oopsed while booting (here: taint D set from the command line) gets no command.
errf=$(mktemp)
out=$(FVD_VM_APPEND="sysctl.kernel.tainted=128" "$here/run.sh" -- echo ran 2>"$errf"); rc=$?
err=$(<"$errf")
expect "[busybox] a kernel that oopsed while booting gives 125" "$rc" 125
expect "[busybox] ... runs no command (stdout empty)" "$out" ""
expect "[busybox] ... says why on stderr" "$(grep -c 'oopsed while booting (tainted' <<< "$err")" 2
expect "[busybox] ... after booting once more" "$(grep -c 'booting again (2 of 2)' <<< "$err")" 1
out=$("$here/run.sh" -- bash -c 'echo c > /proc/sysrq-trigger' 2>"$errf"); rc=$?
err=$(<"$errf")
rm -f "$errf"
expect "[busybox] a panic after the command started gives 125" "$rc" 125
expect "[busybox] ... and is not booted again" "$(grep -c 'booting again' <<< "$err")" 0
expect "[busybox] ... the kernel's panic on stderr, not stdout" \
    "$(grep -q 'Kernel panic' <<< "$err" && echo yes || echo no),$(grep -q 'Kernel panic' <<< "$out" && echo yes || echo no)" yes,no

echo "# systemd mode"
run_mode systemd "$guest_systemd" --systemd
"$here/run.sh" --systemd -- bash -c 'exit 5' >/dev/null 2>&1; expect "[systemd] exit code 5 propagates" "$?" 5

if [[ $quick == 0 ]]; then
    echo "# time-out"
    mkdir -p "$work/tmp"
    t0=$SECONDS
    TMPDIR=$work/tmp "$here/run.sh" --timeout 20 -- sleep 1000 >/dev/null 2>&1
    expect "--timeout 20 gives 124" "$?" 124
    (( SECONDS - t0 < 60 )) && ok "time-out honoured ($((SECONDS - t0))s)" || not_ok "time-out took $((SECONDS - t0))s"
    # Our qemu/virtiofsd carry the run dir (under $work/tmp) on their command line.
    if pgrep -f "$work/tmp/" >/dev/null; then not_ok "processes left after time-out"
    else ok "no qemu/virtiofsd left after time-out"; fi
    [[ -z $(ls -A "$work/tmp") ]] && ok "run dir removed" || not_ok "run dir left: $(ls "$work/tmp")"
fi

echo "# timing (wall clock on this host, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
sed 's/^/#   /' "$FVD_VM_TIMING_FILE"
echo "smoke: $pass passed, $fail failed"
[[ $fail == 0 ]]
