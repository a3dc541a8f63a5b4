# tests/vm/e2e/lib.sh — helpers shared by the end-to-end scenarios (sourced, never run).
#
# Each scenario runs in its own bash (see tests/vm/e2e.sh) with `set -euo pipefail`, this file
# and the scenario file sourced, in a fresh directory $D on a tmpfs.  Results are one line per
# check ("ok - ..." / "not ok - ...") on stdout, and one word per check appended to
# $E2E_STATE/tally, which e2e.sh counts.  A failing check prints what it saw (command output,
# daemon log, dmesg tail) as "#   " lines right below it.
#
# Everything that touches a ublk device runs under `timeout` (io / t): a hung device must fail
# the check, not hang the run.

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)}
if [[ -n ${E2E_FVD:-} ]]; then read -ra FVD <<< "$E2E_FVD"; else FVD=(node "$REPO/build/daemon/cli.js"); fi
E2E_IO_TIMEOUT=${E2E_IO_TIMEOUT:-180}   # seconds for one command that touches a device
SCEN=${SCEN:-?}                         # scenario label, set by e2e.sh
D=${D:-/tmp}                            # scenario's work directory, set by e2e.sh
SERVE_N=0

# --- results ----------------------------------------------------------------------------------
indent() { sed 's/^/#   /'; }
ok() { echo "ok - [$SCEN] $*"; echo ok >> "$E2E_STATE/tally"; }
# skip REASON: the scenario cannot run here (counted apart, neither passed nor failed).
skip() { echo "# skip - [$SCEN] $*"; echo skip >> "$E2E_STATE/tally"; }
# long_rounds: true with E2E_LONG=1 (make test-full) — rounds kept out of make test for CI's time;
# a scenario runs them under it and reports a skip with the reason otherwise.
long_rounds() { [[ ${E2E_LONG:-0} == 1 ]]; }
# not_ok MESSAGE [TEXT]: TEXT (output that explains the failure) is printed indented, followed by
# the tail of the current daemon's stderr and of the kernel log.
not_ok() {
    echo "not ok - [$SCEN] $1"
    echo fail >> "$E2E_STATE/tally"
    [[ -n ${2:-} ]] && printf '%s\n' "$2" | tail -n 40 | indent
    evidence
    return 0
}
evidence() {
    if [[ -n ${SERVE_LOG:-} && -s ${SERVE_LOG:-} ]]; then
        echo "#   --- daemon stderr ($SERVE_LOG, last 15 lines):"
        tail -n 15 "$SERVE_LOG" | indent
    fi
    local k
    k=$(dmesg 2>/dev/null | tail -n +"$((${DMESG_MARK:-0} + 1))" | tail -n 12)
    if [[ -n $k ]]; then
        echo "#   --- dmesg since the scenario started (last 12 lines):"
        printf '%s\n' "$k" | indent
    else
        echo "#   --- dmesg: no kernel messages since the scenario started"
    fi
}

# check NAME COMMAND...: ok when COMMAND exits 0; otherwise not ok with its output.
check() {
    local name=$1 out rc=0
    shift
    out=$("$@" 2>&1) || rc=$?
    if ((rc == 0)); then ok "$name"; else not_ok "$name (exit $rc from: $*)" "$out"; fi
    return 0
}
# ensure NAME COMMAND...: like check, but returns 1 when it failed (use: ensure ... || return 0).
ensure() {
    local name=$1 out rc=0
    shift
    out=$("$@" 2>&1) || rc=$?
    if ((rc == 0)); then ok "$name"; return 0; fi
    not_ok "$name (exit $rc from: $*)" "$out"
    return 1
}
# check_fails NAME COMMAND...: ok when COMMAND exits non-zero (but not by time-out, 124).
check_fails() {
    local name=$1 out rc=0
    shift
    out=$("$@" 2>&1) || rc=$?
    if ((rc != 0 && rc != 124 && rc != 137)); then ok "$name"; else not_ok "$name (exit $rc from: $*)" "$out"; fi
    return 0
}
# expect NAME GOT WANT [TEXT]
expect() {
    if [[ $2 == "$3" ]]; then ok "$1"; else not_ok "$1 (got '$2', want '$3')" "${4:-}"; fi
    return 0
}
# must DESCRIPTION COMMAND...: a set-up step. On failure: one "not ok" with the output, and the
# scenario ends (exit 1; e2e.sh then cleans up).
must() {
    local name=$1 out rc=0
    shift
    out=$("$@" 2>&1) || rc=$?
    ((rc == 0)) && return 0
    not_ok "$name (exit $rc from: $*) — scenario aborted" "$out"
    exit 1
}

# --- commands ---------------------------------------------------------------------------------
# t COMMAND...: COMMAND under the I/O time-out (SIGKILL 5 s after SIGTERM).
t() { timeout -k 5 "$E2E_IO_TIMEOUT" "$@"; }
fvd() { t "${FVD[@]}" "$@"; }

# random_file PATH SIZE_MIB: random content, from the suite-wide pool (urandom is slow under TCG).
random_file() {
    local mib=$2 pool=$E2E_STATE/random.pool
    [[ -s $pool ]] || head -c 64M /dev/urandom > "$pool"
    if ((mib <= 64)); then
        head -c "$((mib * 1024 * 1024))" "$pool" > "$1"
    else
        head -c "$((mib * 1024 * 1024))" /dev/urandom > "$1"
    fi
    # make each file distinct even when it comes from the pool
    printf '%s %s %s' "$1" "$RANDOM" "$(date +%s%N)" | dd of="$1" conv=notrunc status=none
}
# pattern_file PATH SIZE BYTE(0xNN): SIZE bytes all equal to BYTE.
pattern_file() {
    head -c "$2" /dev/zero | tr '\0' "\\$(printf '%03o' "$3")" > "$1"
}
# read_dev DEV OFFSET LENGTH: bytes of the device on stdout (O_DIRECT, byte offsets).
read_dev() {
    t dd if="$1" iflag=direct,skip_bytes,count_bytes skip="$2" count="$3" bs=1M status=none
}
# write_dev DEV OFFSET FILE: FILE onto the device at OFFSET (O_DIRECT, then fsync).
write_dev() {
    t dd if="$3" of="$1" oflag=direct,seek_bytes seek="$2" bs=1M conv=notrunc,fsync status=none
}
# check_dev_equals NAME DEV OFFSET FILE: ok when the device holds FILE's bytes at OFFSET.
check_dev_equals() {
    local out rc=0
    out=$(cmp <(read_dev "$2" "$3" "$(stat -c %s "$4")") "$4" 2>&1) || rc=$?
    if ((rc == 0)); then ok "$1"; else not_ok "$1" "$out"; fi
}

# --- fvd serve --------------------------------------------------------------------------------
# serve_start IMAGE [SERVE OPTIONS]: starts `fvd serve` in the background and waits (up to
# E2E_SERVE_TIMEOUT s) for the device path on its stdout.  Sets SERVE_PID, SERVE_DEV (/dev/ublkbN),
# SERVE_ID (N), SERVE_LOG (its stderr).  Returns 1 (after not_ok) if it exited or timed out.
serve_start() {
    local img=$1 i rc
    shift
    SERVE_N=$((SERVE_N + 1))
    SERVE_OUT=$D/serve$SERVE_N.out SERVE_LOG=$D/serve$SERVE_N.err SERVE_DEV='' SERVE_ID=''
    : > "$SERVE_OUT" # the poll below may run before the background job opened it
    "${FVD[@]}" serve "$img" "$@" > "$SERVE_OUT" 2> "$SERVE_LOG" &
    SERVE_PID=$!
    echo "$SERVE_PID" >> "$E2E_STATE/pids"
    for ((i = 0; i < ${E2E_SERVE_TIMEOUT:-90} * 10; i++)); do
        if [[ $(wc -l < "$SERVE_OUT") -ge 1 ]]; then
            SERVE_DEV=$(head -n 1 "$SERVE_OUT")
            SERVE_ID=${SERVE_DEV#/dev/ublkb}
            if [[ $SERVE_DEV =~ ^/dev/ublkb[0-9]+$ && -b $SERVE_DEV ]]; then return 0; fi
            not_ok "fvd serve $img $* printed '$SERVE_DEV', which is no block device" "$(ls -l /dev/ublk* 2>&1)"
            return 1
        fi
        if ! kill -0 "$SERVE_PID" 2>/dev/null; then
            rc=0; wait "$SERVE_PID" || rc=$?
            not_ok "fvd serve $img $* exited ($rc) before printing a device" "$(cat "$SERVE_OUT" "$SERVE_LOG")"
            return 1
        fi
        sleep 0.1
    done
    not_ok "fvd serve $img $* printed no device within ${E2E_SERVE_TIMEOUT:-90} s" "$(cat "$SERVE_OUT" "$SERVE_LOG")"
    return 1
}
# serve_must IMAGE [OPTIONS]: serve_start, or end the scenario.
serve_must() { serve_start "$@" || exit 1; }

# wait_pid PID SECONDS: waits for our child PID to exit; sets WAIT_RC to its exit code, or to
# "timeout".  (Not in $(...): only this shell can collect its child's exit code.)
wait_pid() {
    local pid=$1 i
    WAIT_RC=0
    for ((i = 0; i < $2 * 10; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null || WAIT_RC=$?   # (2>/dev/null: no "Killed" job notice)
            return 0
        fi
        sleep 0.1
    done
    WAIT_RC=timeout
}
# fio_verified LABEL PID LOG: waits (up to 400 s) for a fio verify job started in the background
# by this shell; ok/not ok lines for its exit status and for 0 errors with the verify passed.
fio_verified() {
    local label=$1 pid=$2 log=$3
    wait_pid "$pid" 400
    expect "$label: fio (write + verify) exits 0" "$WAIT_RC" 0 "$(cat "$log")"
    if grep -qE 'err= *0' "$log" && ! grep -qiE 'verify.*(bad|fail)|crc32c.*wanted' "$log"; then ok "$label: fio reports 0 errors"
    else not_ok "$label: fio reports errors" "$(cat "$log")"; fi
}
# device_gone ID [SECONDS]: true once /dev/ublkbID, /dev/ublkcID and /sys/block/ublkbID are gone.
device_gone() {
    local i
    for ((i = 0; i < ${2:-5} * 10; i++)); do
        [[ ! -e /dev/ublkb$1 && ! -e /dev/ublkc$1 && ! -e /sys/block/ublkb$1 ]] && return 0
        sleep 0.1
    done
    return 1
}
# serve_stop [LABEL]: SIGTERM to the daemon; checks exit 0 within E2E_STOP_TIMEOUT s and that the
# device is gone (ok/not ok lines).  Kills it (-9) if it does not stop.
serve_stop() {
    local label=${1:-} rc
    [[ -n $label ]] && label=" ($label)"
    kill -TERM "$SERVE_PID"
    wait_pid "$SERVE_PID" "${E2E_STOP_TIMEOUT:-120}"
    rc=$WAIT_RC
    if [[ $rc == timeout ]]; then
        not_ok "SIGTERM: daemon$label did not exit within ${E2E_STOP_TIMEOUT:-120} s" "$(ps -o pid,stat,wchan:20,args -p "$SERVE_PID" 2>&1)"
        kill -KILL "$SERVE_PID" 2>/dev/null || true
        return 0
    fi
    expect "SIGTERM: daemon$label exits 0" "$rc" 0 "$(cat "$SERVE_LOG")"
    if device_gone "$SERVE_ID" 10; then ok "SIGTERM: $SERVE_DEV$label deleted"
    else not_ok "SIGTERM: $SERVE_DEV$label still exists after the daemon exited" "$(ls -l /dev/ublk* 2>&1; ls /sys/block)"; fi
}

# device_flags: the "this device uses 0xHEX" mask of the current serve's features line.
device_flags() {
    sed -n 's/.*this device uses \(0x[0-9a-f]*\).*/\1/p' "$SERVE_LOG" | tail -n 1
}
# offered_flags: the "kernel features 0xHEX" mask of the current serve's features line.
offered_flags() {
    sed -n 's/.*kernel features \(0x[0-9a-f]*\).*/\1/p' "$SERVE_LOG" | tail -n 1
}
# has_zero_copy MASK: AUTO_BUF_REG (bit 11) and USER_COPY (bit 7) both set.
has_zero_copy() {
    local m=$(($1))
    (((m >> 11) & 1 && (m >> 7) & 1))
}
# dev_sha: sha256 of the whole device of the current serve (O_DIRECT).
dev_sha() {
    t dd if="$SERVE_DEV" iflag=direct bs=1M status=none | sha256sum | cut -d' ' -f1
}

# fio_randwrite_verify LABEL: fio randwrite + crc32c verify over the first 64 MiB of the served
# device (2 jobs × 32 MiB, 4k–128k, iodepth 32, libaio, O_DIRECT); one ok/not ok line.
fio_randwrite_verify() {
    local label=$1 rc=0
    local job=(--name=verify --filename="$SERVE_DEV" --ioengine=libaio --direct=1 --iodepth=32
        --numjobs=2 --size=32M --offset_increment=32M --rw=randwrite --bsrange=4k-128k
        --randrepeat=1 --verify=crc32c --verify_fatal=1 --group_reporting)
    t fio "${job[@]}" > verify-fio.log 2>&1 || rc=$?
    if [[ $rc == 0 ]] && grep -q 'err= 0' verify-fio.log && ! grep -qiE 'verify: bad|bad magic|verify failed|io_u error|fio: pid=' verify-fio.log; then
        ok "$label: fio randwrite + verify (crc32c, 2 jobs × 32 MiB, 4k–128k, iodepth 32)"
    else not_ok "$label: fio (exit $rc)" "$(tail -n 40 verify-fio.log)"; fi
}
# feature_fixtures IMAGE: what routes_then_differential and feature_refused read — 5a.bin (1 MiB
# of 0x5a), 4k.bin (4 KiB of 0xc3), a 64 MiB random base.raw and base8.bin (its 4 MiB at 8 MiB) —
# and IMAGE, an FVD image over base.raw.
feature_fixtures() {
    pattern_file 5a.bin $((1024 * 1024)) 0x5a
    pattern_file 4k.bin 4096 0xc3
    random_file base.raw 64
    dd if=base.raw of=base8.bin bs=1M skip=8 count=4 status=none
    must "fvd create -b base.raw -F raw $1" fvd create -b base.raw -F raw "$1"
}
# routes_then_differential WHAT IMAGE BIT: the served IMAGE (an FVD image over base.raw, served
# with the ublk feature WHAT, device flag bit BIT) on each route once — base bytes read on the
# queue thread, a 4 KiB copy-on-write into a base block (the rest of the block still the base's),
# 1 MiB written twice (the second time local) — then fio randwrite + verify. The differential: its
# sha256 equals the device's served again without WHAT (no bit BIT); fvd check clean. Stops both.
routes_then_differential() {
    local what=$1 img=$2 bit=$3 M=$((1024 * 1024)) sum_with sum_without
    check_dev_equals "$what: base bytes, read on the queue thread" "$SERVE_DEV" $((8 * M)) base8.bin
    write_dev "$SERVE_DEV" $((20 * M + 8192)) 4k.bin
    check_dev_equals "$what: a 4 KiB copy-on-write into a base block reads back" "$SERVE_DEV" $((20 * M + 8192)) 4k.bin
    dd if=base.raw of=around.bin bs=4096 skip=$((20 * 256)) count=2 status=none
    check_dev_equals "$what: the rest of that block kept the base's bytes" "$SERVE_DEV" $((20 * M)) around.bin
    write_dev "$SERVE_DEV" $((3 * M)) 5a.bin
    write_dev "$SERVE_DEV" $((3 * M)) 5a.bin # now local
    check_dev_equals "$what: 1 MiB written twice reads back (the second time local)" "$SERVE_DEV" $((3 * M)) 5a.bin
    fio_randwrite_verify "$what"
    sum_with=$(dev_sha)
    serve_stop "$what"
    check "fvd check $img clean after $what" fvd check "$img"
    serve_must "$img"
    expect "served again without $what: no such bit" "$((($(device_flags) >> bit) & 1))" 0 "$(cat "$SERVE_LOG")"
    sum_without=$(dev_sha)
    expect "the device's sha256 with $what equals its sha256 without" "$sum_with" "$sum_without"
    serve_stop "without $what"
}
# feature_refused WHAT BIT LINE: the serve just started asked for a ublk feature (device flag bit
# BIT) the kernel lacks: its log has LINE (a grep pattern), the device lacks the bit, and it
# works (5a.bin written at 3 MiB reads back, base8.bin reads at 8 MiB); stops it, skips the rest.
feature_refused() {
    local what=$1 bit=$2 line=$3 M=$((1024 * 1024))
    if grep -q "$line" "$SERVE_LOG"; then ok "one line: the kernel lacks $what, served without it"
    else not_ok "no line saying the kernel lacks $what" "$(cat "$SERVE_LOG")"; fi
    expect "the device has no $what bit" "$((($(device_flags) >> bit) & 1))" 0 "$(cat "$SERVE_LOG")"
    write_dev "$SERVE_DEV" $((3 * M)) 5a.bin
    check_dev_equals "the device reads back what was written" "$SERVE_DEV" $((3 * M)) 5a.bin
    check_dev_equals "base bytes read through the device" "$SERVE_DEV" $((8 * M)) base8.bin
    serve_stop "$what refused"
    skip "$what on the device: this kernel offers $(offered_flags) without it"
}

# ublk_nodes: the current /dev/ublkb* and /dev/ublkc* names and /sys/block/ublkb* entries.
ublk_nodes() { { ls -d /dev/ublkb* /dev/ublkc* /sys/block/ublkb* 2>/dev/null || true; } | sort | tr '\n' ' '; }

# handoff_quiesced LOG LABEL QUIESCE: the old server's log LOG shows how it left the device at a
# hand-off: drained by QUIESCE_DEV when QUIESCE is yes (the device has UBLK_F_QUIESCE, 7.x; the
# features line of its serve says so), else the reissue fallback, naming the kernel's lack of it
# (6.12).
handoff_quiesced() {
    local log=$1 label=$2 quiesce=$3
    if [[ $quiesce == yes ]]; then
        if grep -q "hand-off: device quiesced (QUIESCE_DEV .*): no request is left to reissue" "$log"; then ok "$label: QUIESCE_DEV drained the old server ($(grep -o 'QUIESCE_DEV [0-9]* ms, queues drained [0-9]* ms' "$log"))"
        else not_ok "$label: the device has QUIESCE but the old server did not quiesce it" "$(cat "$log")"; fi
    elif grep -q "hand-off without QUIESCE_DEV (the kernel has no UBLK_F_QUIESCE): requests in flight at the exit are reissued" "$log"; then ok "$label: no QUIESCE on this kernel: the old server says it falls back to reissue"
    else not_ok "$label: no QUIESCE fallback line in the old server's log" "$(cat "$log")"; fi
}

# one_line_error NAME STDERR-FILE: ok when the file is exactly one line, starts with "fvd", and is
# no internal error (no stack trace).
one_line_error() {
    local lines
    lines=$(grep -c '' "$2" || true)
    if [[ $lines == 1 ]] && grep -q '^fvd' "$2" && ! grep -qi 'internal error' "$2"; then
        ok "$1: one-line error: $(cat "$2")"
    else
        not_ok "$1: want one line of error on stderr, got $lines" "$(cat "$2")"
    fi
}
