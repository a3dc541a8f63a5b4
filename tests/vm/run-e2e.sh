#!/usr/bin/env bash
# tests/vm/run-e2e.sh — host entry point of the end-to-end device suite (tests/vm/e2e.sh).
#
# Usage: tests/vm/run-e2e.sh [SCENARIO...]     (numbers or names, default: all; see e2e.sh)
#
# Without ublk on the host (the usual case): runs tests/vm/prepare.sh, then one busybox-mode guest
# boot for every selected scenario but 6, and one --systemd guest boot for scenario 6, all on the
# guest kernel FVD_VM_KERNEL (6.12, the default, or 7.3; tests/vm/all-kernels.sh runs both).
# With ublk on the host (tests/vm/host-has-ublk.sh): runs e2e.sh directly; scenario 6 only if
# systemd is PID 1, else it is reported skipped.
#
# Output: the guests' check lines as they come ("ok - ...", "not ok - ...", "# ..."), each part's
# own summary as "# [part] N passed, N failed", timings, and as the very last line exactly
# "N passed, N failed".  Exit 0 only when nothing failed (a guest that timed out, crashed or gave
# no summary counts as a failure).
#
# Knobs: E2E_BUSYBOX_TIMEOUT (s, default 3600) and E2E_SYSTEMD_TIMEOUT (s, default 1500) bound each
# guest boot (run.sh --timeout); FVD_VM_* knobs of run.sh apply; E2E_* knobs of e2e.sh are passed
# into the guest.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
t_start=$SECONDS
pass=0 fail=0 skipped=0
timings=()

want=("$@")
[[ ${#want[@]} -gt 0 ]] || want=(all)
plain=() sysd=()
# Every scenario file's number, in order (a list written out by hand once missed the newest ones).
every=$(for f in "$here"/e2e/[0-9]*-*.sh; do b=${f##*/}; echo "${b%%-*}"; done | sort -n)
for w in "${want[@]}"; do
    case $w in
        all) for n in $every; do if [[ $n == 6 ]]; then sysd+=(6); else plain+=("$n"); fi; done ;;
        6 | systemd | 6-systemd) sysd+=(6) ;;
        *) plain+=("$w") ;;
    esac
done

[[ $(id -u) == 0 ]] || { echo "not ok - run-e2e.sh must run as root (qemu/virtiofsd, ublk)"; echo "0 passed, 1 failed"; exit 1; }
if [[ ! -f build/daemon/cli.js ]]; then
    echo "# build/daemon/cli.js missing: make build"
    make -s build || { echo "not ok - make build failed"; echo "0 passed, 1 failed"; exit 1; }
fi

# Pass the suite's knobs into the guest.
pass_env=""
for v in $(compgen -e | grep '^E2E_' || true); do pass_env+=" $v"; done
export FVD_VM_PASS_ENV="${FVD_VM_PASS_ENV:-}$pass_env"

# part LABEL COMMAND...: runs COMMAND (the guest or e2e.sh), streams its output with its summary
# line renamed, and adds its counts (or one failure if it gave no summary / failed without one).
part() {
    local label=$1 log rc t0=$SECONDS summary p f s
    shift
    log=$(mktemp /tmp/fvd-e2e-"${label// /-}".XXXXXX.log)
    echo "# === $label: $*"
    rc=0
    "$@" 2>&1 < /dev/null | tee "$log" | sed -u -E "s/^([0-9]+ passed, [0-9]+ failed)\$/# [$label] \\1/" || rc=${PIPESTATUS[0]}
    summary=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1 || true)
    s=$(grep -c '^# skip - ' "$log" || true)
    skipped=$((skipped + s))
    if [[ -n $summary ]]; then
        read -r p _ f _ <<< "$summary"
        pass=$((pass + p)) fail=$((fail + f))
        if [[ $rc != 0 && $f == 0 ]]; then
            echo "not ok - [$label] exited $rc although its checks passed"; fail=$((fail + 1))
        fi
    else
        case $rc in
            124) echo "not ok - [$label] timed out (the guest was killed; see the output above)" ;;
            125) echo "not ok - [$label] the VM harness failed (exit 125; rerun with FVD_VM_DEBUG=1)" ;;
            *) echo "not ok - [$label] ended without a summary line (exit $rc)" ;;
        esac
        fail=$((fail + 1))
    fi
    timings+=("# [$label] $((SECONDS - t0))s, exit $rc")
    rm -f "$log"
}

if bash "$here/host-has-ublk.sh" -q; then
    echo "# the host kernel has ublk: running the suite directly (no guest)"
    [[ ${#plain[@]} -gt 0 ]] && part host bash "$here/e2e.sh" "${plain[@]}"
    if [[ ${#sysd[@]} -gt 0 ]]; then
        if [[ $(readlink /proc/1/exe 2>/dev/null) == */systemd ]]; then
            part host-systemd bash "$here/e2e.sh" 6
        else
            echo "# skip - [6 systemd] the host's PID 1 is not systemd"
            skipped=$((skipped + 1))
        fi
    fi
else
    kernel=${FVD_VM_KERNEL:-6.12}
    export FVD_VM_KERNEL=$kernel
    t0=$SECONDS
    if out=$(bash "$here/prepare.sh" 2>&1); then
        timings+=("# [prepare $kernel] $((SECONDS - t0))s")
    else
        echo "not ok - tests/vm/prepare.sh failed"
        printf '%s\n' "$out" | tail -n 30 | sed 's/^/#   /'
        echo "0 passed, 1 failed"
        exit 1
    fi
    [[ ${#plain[@]} -gt 0 ]] &&
        part "busybox $kernel" bash "$here/run.sh" --timeout "${E2E_BUSYBOX_TIMEOUT:-3600}" -- bash "$here/e2e.sh" "${plain[@]}"
    [[ ${#sysd[@]} -gt 0 ]] &&
        part "systemd $kernel" bash "$here/run.sh" --systemd --timeout "${E2E_SYSTEMD_TIMEOUT:-1500}" -- bash "$here/e2e.sh" "${sysd[@]}"
fi

echo "# --- timings (wall clock, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
printf '%s\n' "${timings[@]}"
echo "# total $((SECONDS - t_start))s${skipped:+, $skipped skipped}"
echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
