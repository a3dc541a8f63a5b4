#!/usr/bin/env bash
# tests/vm/run-e2e-kernels.sh — the device suite on both guest kernels (what `make test` runs).
#
# Usage: tests/vm/run-e2e-kernels.sh [--full]
#
# Runs tests/vm/run-e2e.sh once per entry of E2E_KERNEL_PLAN, a list of KERNEL:SCENARIOS
# (SCENARIOS comma-separated, or "all"). Default: every scenario on 7.3 (the newest ublk), and on
# 6.12 those whose path through the kernel differs from 7.x: 7 kill (ext4 under write load) and
# stale-device cleanup, 15 features and queue threads, 19 zero copy (which 6.12 lacks: the
# refusal), 21 a write in flight across a hand-off (reissued on 6.12, drained by QUIESCE on 7.x:
# the two paths side by side), 22 batched I/O (which 6.12 lacks: the refusal). The others test the
# engine, the daemon and systemd through the device the same way on either kernel; they run on
# 6.12 with --full (make test-full): every scenario on both kernels.
# E2E_ALT_FVD (a command for fvd, e.g. "/path/to/node24 build/daemon/cli.js"; tests/all.sh sets it
# on CI) serves the devices of the runs on kernel E2E_ALT_KERNEL (default 6.12): the daemon on a
# second Node.js release there, on the machine's own everywhere else.
# Where the host kernel has ublk there is no guest to choose: run-e2e.sh runs everything once.
#
# Output: each run's lines as they come, then one summary line per kernel and, as the very last
# line, exactly "N passed, N failed" summed over the runs. Exit 0 only when nothing failed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
plan=${E2E_KERNEL_PLAN:-"7.3:all 6.12:7,15,19,21,22"}
[[ ${1:-} == --full ]] && plan="7.3:all 6.12:all"

if bash "$here/host-has-ublk.sh" -q; then exec bash "$here/run-e2e.sh"; fi

log=$(mktemp /tmp/fvd-e2e-kernels.XXXXXX.log)
trap 'rm -f "$log"' EXIT
pass=0 fail=0 summary=()
for entry in $plan; do
    kernel=${entry%%:*} scen=${entry#*:} t0=$SECONDS p='' f='' fvd=() on=''
    if [[ -n ${E2E_ALT_FVD:-} && $kernel == "${E2E_ALT_KERNEL:-6.12}" ]]; then
        fvd=(E2E_FVD="$E2E_ALT_FVD") on=" with the daemon on $E2E_ALT_FVD"
    fi
    echo "## === guest kernel $kernel: scenarios $scen$on"
    # shellcheck disable=SC2086  # the scenario list splits on purpose
    env "${fvd[@]}" FVD_VM_KERNEL="$kernel" bash "$here/run-e2e.sh" ${scen//,/ } 2>&1 | tee "$log" |
        sed -u -E "s/^([0-9]+ passed, [0-9]+ failed)\$/## [kernel $kernel] \1/"
    rc=${PIPESTATUS[0]}
    read -r p _ f _ < <(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1) || true
    p=${p:-0} f=${f:-1}
    [[ $rc != 0 && $f == 0 ]] && f=1
    pass=$((pass + p)) fail=$((fail + f))
    summary+=("## kernel $kernel ($scen)$on: $p passed, $f failed, $((SECONDS - t0))s")
done
printf '%s\n' "${summary[@]}"
echo "$pass passed, $fail failed"
[[ $fail == 0 ]]
