# tests/vm/e2e/12-kernel.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: ublk features named from GET_FEATURES; queue threads are I/O flushers (or say why not)
# timeout: 300
#
# serve --queues 2 logs exactly one "ublk on Linux <uname -r>: kernel features 0xHEX (NAMES); this
# device uses 0xHEX (NAMES)" line.  Both masks are decoded here again with the uapi bit numbers
# (a table of its own, not the daemon's) and must list exactly the bits set, in bit order; the
# device uses the ioctl-encoded commands; the kernel's offer matches its version (UPDATE_SIZE from
# 6.14 on, USER_RECOVERY_FAIL_IO not before 6.13).  `fvd list --json` gives one thread per queue,
# each a task of the daemon other than its main thread, each with ioFlusher true — what the worker
# read back with PR_GET_IO_FLUSHER from that thread itself — and the device does I/O.  Served again
# without CAP_SYS_RESOURCE (setpriv drops it from the bounding set): one log line saying the queue
# threads are not I/O flushers and why, ioFlusher false everywhere, and the device still works.

# The UBLK_F_* bits of include/uapi/linux/ublk_cmd.h (Linux 7.3), by bit number.
UAPI_BITS=(SUPPORT_ZERO_COPY URING_CMD_COMP_IN_TASK NEED_GET_DATA USER_RECOVERY USER_RECOVERY_REISSUE
    UNPRIVILEGED_DEV CMD_IOCTL_ENCODE USER_COPY ZONED USER_RECOVERY_FAIL_IO UPDATE_SIZE AUTO_BUF_REG
    QUIESCE PER_IO_DAEMON BUF_REG_OFF_DAEMON BATCH_IO INTEGRITY SAFE_STOP_DEV NO_AUTO_PART_SCAN SHMEM_ZC
    IO_DESC_SIZE)

# decode HEX: the names of its set bits, space-separated, lowest first ("none" for 0).
decode() {
    local v=$(($1)) bit out=()
    for ((bit = 0; bit < 64; bit++)); do
        (((v >> bit) & 1)) || continue
        out+=("${UAPI_BITS[bit]:-bit $bit}")
    done
    ((${#out[@]})) && echo "${out[*]}" || echo none
}

# kernel_at_least MAJOR MINOR: uname -r is that version or newer.
kernel_at_least() {
    local maj min
    IFS=. read -r maj min _ <<< "$(uname -r)"
    ((maj > $1 || (maj == $1 && min >= $2)))
}

# queue_threads: "TID:IOFLUSHER" per queue thread of the served device, from fvd list --json.
queue_threads() {
    fvd list --json | node -e '
        const rows = JSON.parse(require("fs").readFileSync(0, "utf8"));
        const r = rows.find((x) => x.device === process.argv[1]);
        if (!r || !r.queueThreads) process.exit(3);
        for (const q of r.queueThreads) console.log(`${q.tid}:${q.ioFlusher}`);' "$SERVE_DEV"
}

scenario() {
    local M=$((1024 * 1024)) line re offered used tids t f
    must "fvd create k.fvd 64M" fvd create k.fvd 64M
    pattern_file 5a.bin $M 0x5a

    serve_must k.fvd --queues 2
    expect "one 'ublk on Linux' features line in the log" "$(grep -c 'ublk on Linux' "$SERVE_LOG" || true)" 1 "$(cat "$SERVE_LOG")"
    line=$(grep -o 'ublk on Linux .*' "$SERVE_LOG" | head -n 1)
    re='^ublk on Linux ([^:]+): kernel features (0x[0-9a-f]+) \(([^)]*)\); this device uses (0x[0-9a-f]+) \(([^)]*)\)$'
    if [[ $line =~ $re ]]; then
        ok "features line: $line"
        expect "it names the running kernel" "${BASH_REMATCH[1]}" "$(uname -r)"
        offered=${BASH_REMATCH[2]} used=${BASH_REMATCH[4]}
        expect "kernel features $offered named bit by bit" "${BASH_REMATCH[3]}" "$(decode "$offered")"
        expect "device flags $used named bit by bit" "${BASH_REMATCH[5]}" "$(decode "$used")"
        expect "the device's flags are a subset of the kernel's" "$((used & ~offered))" 0
        expect "the device uses the ioctl-encoded commands (CMD_IOCTL_ENCODE)" "$(((used >> 6) & 1))" 1
        if kernel_at_least 6 14; then
            expect "Linux >= 6.14 offers UPDATE_SIZE (online resize)" "$(((offered >> 10) & 1))" 1
        else
            expect "Linux < 6.14 does not offer UPDATE_SIZE" "$(((offered >> 10) & 1))" 0
        fi
        kernel_at_least 6 13 ||
            expect "Linux < 6.13 does not offer USER_RECOVERY_FAIL_IO" "$(((offered >> 9) & 1))" 0
    else
        not_ok "no parsable features line" "$(cat "$SERVE_LOG")"
    fi

    tids=$(queue_threads) || { not_ok "fvd list --json has no queueThreads for $SERVE_DEV" "$(fvd list --json)"; tids=''; }
    expect "one thread per queue in fvd list --json" "$(grep -c : <<< "$tids")" 2 "$tids"
    expect "the queue threads are distinct" "$(cut -d: -f1 <<< "$tids" | sort -u | wc -l)" 2 "$tids"
    for t in $(cut -d: -f1 <<< "$tids"); do
        if [[ $t != "$SERVE_PID" && -d /proc/$SERVE_PID/task/$t ]]; then ok "queue thread $t is a thread of the daemon (pid $SERVE_PID)"
        else not_ok "queue thread $t is not a worker thread of daemon $SERVE_PID" "$(ls /proc/"$SERVE_PID"/task)"; fi
    done
    for f in $tids; do expect "queue thread ${f%%:*}: PR_GET_IO_FLUSHER read back as set" "${f#*:}" true; done
    expect "no 'not I/O flushers' line with CAP_SYS_RESOURCE" "$(grep -c 'not I/O flushers' "$SERVE_LOG" || true)" 0 "$(cat "$SERVE_LOG")"
    write_dev "$SERVE_DEV" $((3 * M)) 5a.bin
    check_dev_equals "the device reads back what was written" "$SERVE_DEV" $((3 * M)) 5a.bin
    serve_stop

    # Without CAP_SYS_RESOURCE: PR_SET_IO_FLUSHER is refused, said once, and nothing else changes.
    FVD=(setpriv --bounding-set=-sys_resource -- "${FVD[@]}")
    serve_must k.fvd --queues 2
    expect "the daemon lacks CAP_SYS_RESOURCE" "$(( ($(sed -n 's/^CapEff:\s*/0x/p' /proc/"$SERVE_PID"/status) >> 24) & 1 ))" 0
    expect "one 'not I/O flushers' line" "$(grep -c 'queue threads are not I/O flushers' "$SERVE_LOG" || true)" 1 "$(cat "$SERVE_LOG")"
    if grep -q 'PR_SET_IO_FLUSHER: EPERM; it needs CAP_SYS_RESOURCE' "$SERVE_LOG"; then ok "it says EPERM and what is needed"
    else not_ok "the line does not say EPERM and CAP_SYS_RESOURCE" "$(cat "$SERVE_LOG")"; fi
    tids=$(queue_threads) || tids=''
    expect "fvd list --json: two queue threads, neither an I/O flusher" "$(grep -c ':false$' <<< "$tids")" 2 "$tids"
    check_dev_equals "the device still reads its data" "$SERVE_DEV" $((3 * M)) 5a.bin
    serve_stop "without CAP_SYS_RESOURCE"
}
