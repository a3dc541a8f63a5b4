#!/usr/bin/env bash
# `make test`: the unit/property suite on this machine, then the ublk device suite (in QEMU guests
# unless this kernel has ublk). Ends with the one line CI reads: the sum, "N passed, N failed".
# FVD_SKIP_DEVICE_TESTS=1 runs the first part only (e.g. on a machine without QEMU or root);
# FVD_TEST_FULL=1 runs every device scenario on both guest kernels, with their long rounds
# (E2E_LONG=1), and the guest harness's self-test (make test-full).
# FVD_ALT_NODE=/path/to/node (set by .ci/run to a Node.js 24 binary): the unit files that lean on
# what changes between Node.js releases (FVD_ALT_NODE_TESTS, a file-name pattern; "." for all) run
# again on that Node, and the daemon of the device scenarios on the 6.12 guest runs on it
# (scenario 1 alone where this kernel has ublk); their counts are added to the sum.
# FVD_TEST_JOBS (default 2): unit test processes run side by side (tests/run.ts).
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# counts LOG: "passed failed" from the last summary line of LOG (one failure if there is none).
counts() {
  local p f
  read -r p f < <(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$1" | tail -1 | awk '{print $1, $3}')
  echo "${p:-0} ${f:-1}"
}

# run_part LABEL COMMAND...: runs COMMAND, its output to the terminal and to $log; sets P and F
# from its summary line (one failure when it failed without saying why) and prints its time.
run_part() {
  local label=$1 t0=$SECONDS rc
  shift
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  read -r P F < <(counts "$log")
  [[ $rc -ne 0 && $F -eq 0 ]] && F=1
  echo "# $label: $((SECONDS - t0)) s"
}

# The guest harness's self-test, its summary line in the form counts reads.
smoke_quick() {
  bash tests/vm/smoke.sh --quick 2>&1 | sed -u -E 's/^smoke: ([0-9]+ passed, [0-9]+ failed)$/\1/'
  return "${PIPESTATUS[0]}"
}

bash tests/host-tools.sh   # qemu-utils for the qcow2 tests (they report a skip without it)
# Real servers for the remote-base tests (nginx, qemu-nbd, nbdkit): installed when missing.
bash tests/install-test-deps.sh
jobs=${FVD_TEST_JOBS:-2}
run_part "unit suite on $(node --version)" node build/tests/run.js --jobs "$jobs"
up=$P uf=$F

# On the second Node: the files over koffi (libc, libzstd, io_uring, sd_notify, direct I/O, the
# queue's structures), node:crypto, node:zlib (also driven through its internals: decode-into.ts)
# and zstd (Node 24 has its own zstd; 20 uses the system's libzstd through koffi), fetch
# and node:net (remote bases, net's onread), the engine over node:fs, and make install.
alt_tests=${FVD_ALT_NODE_TESTS:-'(?:^|/)(?:libc|libzstd|uring|sd-notify|direct-io|daemon-unit|crypto|fast-crypt|encryption|encryption-unaligned|qcow2|qcow2-base|qcow2-bad-input|qcow2-decode-pool|decode-into|remote-http|remote-nbd|nbd-pipeline|prefetch-pipeline|remote-engine|remote-cli|remote-config|image|metrics|secrets|install)(?=\.test\.js$)'}
ap=0 af=0
if [[ -n ${FVD_ALT_NODE:-} ]]; then
  echo; echo "== unit files matching /$alt_tests/ on Node.js $("$FVD_ALT_NODE" --version) ($FVD_ALT_NODE) =="
  run_part "unit suite on $("$FVD_ALT_NODE" --version)" "$FVD_ALT_NODE" build/tests/run.js "$alt_tests" --jobs "$jobs"
  ap=$P af=$F
fi

dp=0 df=0
if [[ ${FVD_SKIP_DEVICE_TESTS:-0} != 1 ]]; then
  echo; echo "== ublk device suite =="
  # Both guest kernels (tests/vm/run-e2e-kernels.sh), the 6.12 runs with the daemon on the second
  # Node.js; FVD_TEST_FULL=1 (make test-full): every scenario on both, with the long rounds some
  # keep out of make test (E2E_LONG=1).
  full=(); [[ ${FVD_TEST_FULL:-0} == 1 ]] && full=(--full) && export E2E_LONG=1
  alt_fvd=${FVD_ALT_NODE:+$FVD_ALT_NODE $PWD/build/daemon/cli.js}
  alt=(); [[ -n $alt_fvd ]] && alt=(E2E_ALT_FVD="$alt_fvd")
  host_ublk=0; bash tests/vm/host-has-ublk.sh -q && host_ublk=1
  run_part "device suite" env "${alt[@]}" bash tests/vm/run-e2e-kernels.sh "${full[@]}"
  dp=$P df=$F
  # Where this kernel has ublk there is one run, on the machine's Node: scenario 1 again on the
  # second.
  if [[ -n $alt_fvd && $host_ublk == 1 ]]; then
    echo; echo "== ublk device scenario 1 with the daemon on Node.js $("$FVD_ALT_NODE" --version) =="
    run_part "device scenario 1 on $("$FVD_ALT_NODE" --version)" env E2E_FVD="$alt_fvd" bash tests/vm/run-e2e.sh 1
    dp=$((dp + P)) df=$((df + F))
  fi
  # The guest harness itself (exit codes, argv quoting, booting again after a boot panic): with
  # FVD_TEST_FULL=1, or alone by `make test-vm-harness`.
  if [[ ${FVD_TEST_FULL:-0} == 1 && $host_ublk == 0 ]]; then
    echo; echo "== guest harness (tests/vm/smoke.sh --quick) =="
    run_part "guest harness" smoke_quick
    dp=$((dp + P)) df=$((df + F))
  fi
else
  echo "device suite skipped (FVD_SKIP_DEVICE_TESTS=1)"
fi
echo
echo "unit: $up passed, $uf failed;${FVD_ALT_NODE:+ unit on $("$FVD_ALT_NODE" --version): $ap passed, $af failed;} device: $dp passed, $df failed"
echo "$((up + ap + dp)) passed, $((uf + af + df)) failed"
[[ $((uf + af + df)) -eq 0 ]]
