# tests/vm/e2e/22-batch-io.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: serve --batch-io (ublk UBLK_F_BATCH_IO): every route, fio verify, with zero copy, a stop under load, refusals
# timeout: 900
#
# Where the kernel offers BATCH_IO (7.0+): an FVD image over a 64 MiB raw base served with
# --batch-io --queues 2 --no-prefetch. The device's flags have BATCH_IO and the log says the
# commands are batched. Each route once (base bytes read on the queue thread, a 4 KiB
# copy-on-write through the engine, a local write twice and read back), then fio randwrite +
# verify (crc32c, 4k–128k, iodepth 32, 2 jobs, O_DIRECT); the device's sha256 equals its sha256
# served again one command per request, and fvd check is clean. Batched and zero copy together:
# the device has both, fio verify passes. A SIGTERM while fio keeps 32 requests in flight: the
# daemon exits 0 and deletes the device (the batched fetches end, nothing hangs). With
# --recovery-wait: one line saying batched I/O is not for it, the device has no BATCH_IO bit and
# works. Without BATCH_IO (6.12): one line saying what the kernel lacks, the device works; the rest
# is a skip.

# has_batch_io MASK: BATCH_IO (bit 15) set.
has_batch_io() {
    local m=$(($1))
    (((m >> 15) & 1))
}

batch_routes() {
    expect "the log says the commands are batched" "$(grep -c 'ublk I/O: batched commands (UBLK_F_BATCH_IO)' "$SERVE_LOG" || true)" 1 "$(cat "$SERVE_LOG")"
    routes_then_differential "batched I/O" b.fvd 15
}

zero_copy_round() {
    if ! has_zero_copy "$(offered_flags)"; then
        skip "batched with zero copy: this kernel offers $(offered_flags) without AUTO_BUF_REG + USER_COPY"
        return 0
    fi
    must "fvd create -b base.raw -F raw z.fvd" fvd create -b base.raw -F raw z.fvd
    serve_must z.fvd --batch-io --zero-copy --no-prefetch
    expect "batched + zero copy: the device has BATCH_IO, AUTO_BUF_REG and USER_COPY" \
        "$(has_batch_io "$(device_flags)" && has_zero_copy "$(device_flags)" && echo yes || echo no)" yes "$(cat "$SERVE_LOG")"
    check_dev_equals "batched + zero copy: base bytes read back" "$SERVE_DEV" $((8 * 1024 * 1024)) base8.bin
    fio_randwrite_verify "batched + zero copy"
    serve_stop "batched, zero copy"
    check "fvd check z.fvd clean" fvd check z.fvd
}

stop_under_load() {
    local fio_pid
    must "fvd create s.fvd 64M" fvd create s.fvd 64M
    serve_must s.fvd --batch-io
    fio --name=load --filename="$SERVE_DEV" --ioengine=libaio --direct=1 --iodepth=32 --rw=randrw --bs=4k \
        --time_based --runtime=60 > load-fio.log 2>&1 &
    fio_pid=$!
    sleep 3
    serve_stop "batched, SIGTERM with fio's requests in flight"
    wait_pid "$fio_pid" 60
    [[ $WAIT_RC != timeout ]] && ok "fio ends once the device is gone" || { not_ok "fio still runs after the stop" "$(tail -n 20 load-fio.log)"; kill -KILL "$fio_pid" 2>/dev/null || true; }
    check "fvd check s.fvd clean after the stop" fvd check s.fvd
}

recovery_refused() {
    local M=$((1024 * 1024))
    must "fvd create r.fvd 16M" fvd create r.fvd 16M
    serve_must r.fvd --batch-io --recovery-wait 60
    expect "with --recovery-wait: one line, batched I/O is not for it" \
        "$(grep -c 'batched I/O: not with --recovery-wait' "$SERVE_LOG" || true)" 1 "$(cat "$SERVE_LOG")"
    expect "with --recovery-wait: the device has no BATCH_IO bit" "$((($(device_flags) >> 15) & 1))" 0 "$(cat "$SERVE_LOG")"
    write_dev "$SERVE_DEV" $((2 * M)) 5a.bin
    check_dev_equals "with --recovery-wait: a write reads back" "$SERVE_DEV" $((2 * M)) 5a.bin
    serve_stop "recovery, one command per request"
}

scenario() {
    feature_fixtures b.fvd
    # --no-prefetch: base blocks stay in the base until read or written, so each route is taken.
    serve_must b.fvd --batch-io --queues 2 --no-prefetch
    if ! has_batch_io "$(offered_flags)"; then
        feature_refused BATCH_IO 15 'batched I/O: this kernel .* lacks UBLK_F_BATCH_IO (Linux 7.0+); one command per request'
        return 0
    fi
    expect "the device has BATCH_IO" "$(has_batch_io "$(device_flags)" && echo yes || echo no)" yes "$(cat "$SERVE_LOG")"
    batch_routes
    zero_copy_round
    stop_under_load
    recovery_refused
}
