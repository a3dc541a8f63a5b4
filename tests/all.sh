#!/usr/bin/env bash
# `make test`: the unit/property suite on this machine, then the ublk device suite (in a QEMU guest
# unless this kernel has ublk). Ends with the one line CI reads: the sum, "N passed, N failed".
# FVD_SKIP_DEVICE_TESTS=1 runs the first part only (e.g. on a machine without QEMU or root);
# FVD_TEST_FULL=1 runs every device scenario on both guest kernels (make test-full).
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

node build/tests/run.js 2>&1 | tee "$log"
unit_rc=${PIPESTATUS[0]}
read -r up uf < <(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -1 | awk '{print $1, $3}')
up=${up:-0} uf=${uf:-1}

dp=0 df=0 dev_rc=0
if [[ ${FVD_SKIP_DEVICE_TESTS:-0} != 1 ]]; then
  echo; echo "== ublk device suite =="
  # Both guest kernels (tests/vm/run-e2e-kernels.sh); FVD_TEST_FULL=1 (make test-full): every
  # scenario on both.
  full=(); [[ ${FVD_TEST_FULL:-0} == 1 ]] && full=(--full)
  bash tests/vm/run-e2e-kernels.sh "${full[@]}" 2>&1 | tee "$log"
  dev_rc=${PIPESTATUS[0]}
  read -r dp df < <(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -1 | awk '{print $1, $3}')
  dp=${dp:-0} df=${df:-1}
else
  echo "device suite skipped (FVD_SKIP_DEVICE_TESTS=1)"
fi
[[ $unit_rc -ne 0 && $uf -eq 0 ]] && uf=1
[[ $dev_rc -ne 0 && $df -eq 0 ]] && df=1
echo
echo "unit: $up passed, $uf failed; device: $dp passed, $df failed"
echo "$((up + dp)) passed, $((uf + df)) failed"
[[ $((uf + df)) -eq 0 ]]
