# tests/vm/e2e/19-zero-copy.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: serve --zero-copy (ublk AUTO_BUF_REG + USER_COPY): every route, fio verify, recovery keeps it
# timeout: 900
#
# Where the kernel offers AUTO_BUF_REG and USER_COPY (6.16+): an FVD image over a 64 MiB raw base
# served with --zero-copy --queues 2 --no-prefetch (base blocks stay in the base until touched). The
# device's flags (the features line) hold both bits and the log says the fast path is zero copy.
# Each route once: base bytes read through the queue thread (copied into the request by user copy),
# a 4 KiB write into a base block (copy-on-write: the engine gets the data by user copy), the same
# bytes read back and rewritten in place (local, but below 64 KiB: user copy through the tag's
# buffer; the 1 MiB transfers of the compact round and fio's blocks of 64 KiB and more go from and
# to the request's pages). Then fio randwrite + verify (crc32c, 4k–128k, iodepth 32, 2 jobs,
# O_DIRECT) over the whole device. The differential: the device's sha256 under zero copy equals its
# sha256 served again with copies, and fvd check is clean. A compact image: unwritten chunks read as
# zeros, also right after a written 1 MiB in the same dd buffer. An encrypted image with
# --zero-copy: one line saying zero copy is not for encrypted images, and the device works with
# copies. Recovery: served with --zero-copy --recovery-wait 60, SIGKILLed, a serve without
# --zero-copy takes the same device over and serves it as it was added (zero copy), the data reads
# back.
# Without the two features (6.12): one line saying what the kernel lacks, the device has neither bit
# and works; the rest is a skip.

# zero_copy_routes: the served z.fvd (zero copy) on each route, then fio verify and the differential.
zero_copy_routes() {
    expect "the log says the fast path is zero copy" "$(grep -c 'fast path: zero copy of local blocks' "$SERVE_LOG" || true)" 1 "$(cat "$SERVE_LOG")"
    routes_then_differential "zero copy" z.fvd 11
}

compact_round() {
    local M=$((1024 * 1024))
    must "fvd create --layout compact c.fvd 64M" fvd create --layout compact c.fvd 64M
    serve_must c.fvd --zero-copy
    expect "compact: the device has AUTO_BUF_REG" "$((($(device_flags) >> 11) & 1))" 1 "$(cat "$SERVE_LOG")"
    check_dev_equals "compact: unwritten chunks read as zeros (copied into the request)" "$SERVE_DEV" $((16 * M)) zero.bin
    write_dev "$SERVE_DEV" $((5 * M)) 5a.bin
    # One dd buffer for both 1 MiB blocks: zeros that never reached the request would leave the
    # first block's 0x5a bytes in the second.
    cat 5a.bin <(head -c $M /dev/zero) > 5a-then-zero.bin
    check_dev_equals "compact: a write, then unwritten chunks, read back in one dd" "$SERVE_DEV" $((5 * M)) 5a-then-zero.bin
    serve_stop "compact, zero copy"
    check "fvd check c.fvd clean" fvd check c.fvd
}

encrypted_round() {
    local M=$((1024 * 1024))
    (umask 077; printf 'zero copy passphrase\n' > "$D/e.key")
    must "fvd create --encrypt e.fvd 16M" fvd create --encrypt --key-file "$D/e.key" e.fvd 16M
    serve_must e.fvd --key-file "$D/e.key" --zero-copy
    expect "encrypted: one line, zero copy is not for encrypted images" \
        "$(grep -c 'zero copy: not for an encrypted image' "$SERVE_LOG" || true)" 1 "$(cat "$SERVE_LOG")"
    expect "encrypted: the device has no AUTO_BUF_REG bit" "$((($(device_flags) >> 11) & 1))" 0 "$(cat "$SERVE_LOG")"
    write_dev "$SERVE_DEV" $((2 * M)) 5a.bin
    check_dev_equals "encrypted: a write reads back (with copies)" "$SERVE_DEV" $((2 * M)) 5a.bin
    serve_stop "encrypted"
}

recovery_round() {
    local M=$((1024 * 1024)) dev dead
    # A fresh image over the base (fio overwrote all of z.fvd's).
    must "fvd create -b base.raw -F raw r.fvd" fvd create -b base.raw -F raw r.fvd
    serve_must r.fvd --zero-copy --recovery-wait 60 --no-prefetch
    dev=$SERVE_DEV dead=$SERVE_PID
    write_dev "$SERVE_DEV" $((40 * M)) 5a.bin
    kill -KILL "$dead"
    wait_pid "$dead" 30
    serve_must r.fvd --recovery-wait 60 --no-prefetch # (the recovering serve: no --zero-copy)
    expect "recovery: the serve without --zero-copy took the same device over" "$SERVE_DEV" "$dev" "$(cat "$SERVE_LOG")"
    expect "recovery: the device keeps AUTO_BUF_REG" "$((($(device_flags) >> 11) & 1))" 1 "$(cat "$SERVE_LOG")"
    expect "recovery: served as it was added (zero copy)" "$(grep -c 'fast path: zero copy of local blocks' "$SERVE_LOG" || true)" 1 "$(cat "$SERVE_LOG")"
    check_dev_equals "recovery: data written before the kill reads back" "$SERVE_DEV" $((40 * M)) 5a.bin
    write_dev "$SERVE_DEV" $((44 * M)) 5a.bin
    check_dev_equals "recovery: a new write reads back" "$SERVE_DEV" $((44 * M)) 5a.bin
    check_dev_equals "recovery: base bytes read back" "$SERVE_DEV" $((8 * M)) base8.bin
    serve_stop "recovered, zero copy"
    check "fvd check r.fvd clean after the recovery" fvd check r.fvd
}

scenario() {
    local M=$((1024 * 1024))
    pattern_file zero.bin $((4 * M)) 0x00
    feature_fixtures z.fvd
    # --no-prefetch: base blocks stay in the base until read or written, so each route is taken.
    serve_must z.fvd --zero-copy --queues 2 --no-prefetch
    if ! has_zero_copy "$(offered_flags)"; then
        feature_refused AUTO_BUF_REG 11 'zero copy: this kernel .* lacks UBLK_F_AUTO_BUF_REG (Linux 6.16+) or USER_COPY; serving with copies'
        return 0
    fi
    expect "the device has AUTO_BUF_REG and USER_COPY" "$(has_zero_copy "$(device_flags)" && echo yes || echo no)" yes "$(cat "$SERVE_LOG")"
    zero_copy_routes
    compact_round
    encrypted_round
    recovery_round
}
