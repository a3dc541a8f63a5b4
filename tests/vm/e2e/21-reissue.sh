# tests/vm/e2e/21-reissue.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: a write held across a hand-off: executed once by the old server with QUIESCE (7.x), reissued to the new one without (6.12)
# timeout: 300
#
# Which server executes a request that is in flight when the device changes hands
# (docs/DESIGN.md §7.5). A raw-like image over a raw base, served with --recovery-wait; the old
# server runs with the test hook FVD_TEST_HOLD_WRITE=OFFSET:8000, which holds the engine write at
# OFFSET for 8 s (longer than the new server's start) and logs its arrival and its end. A 4 KiB O_DIRECT|O_DSYNC write at OFFSET is
# issued: a FUA write, which every server hands to its engine (never the queue thread's fast path,
# whether or not the block is local by then), so each server's hook sees it if it gets it. Once
# the old server logs it held, `fvd serve --takeover` starts the new server, whose hook
# (OFFSET:0) logs every write at OFFSET it receives.
# - The device has UBLK_F_QUIESCE (7.x): the old server's QUIESCE_DEV drains it, it logs the
#   write done, and the new server never receives it: executed exactly once, nothing reissued.
# - It has not (6.12): the old server exits with the write still held (never done there), the
#   kernel reissues it (USER_RECOVERY_REISSUE), and the new server receives and executes it.
# Either way the guest's write completes without error, the device reads the base with the new
# 4 KiB, also after a clean stop and a fresh serve, and `fvd check` is clean.

scenario() {
    local base=$D/base.raw img=$D/img.fvd id old oldlog quiesce dd_pid
    # Inside block 128 (64 KiB blocks), still in the base: a copy-on-write as well.
    local offset=$(((8 << 20) + 4096))
    random_file "$base" 64
    head -c 4096 /dev/urandom > w.bin
    must "fvd create (raw-like over a raw base)" fvd create -b "$base" -F raw "$img" 64M
    FVD_TEST_HOLD_WRITE=$offset:8000 serve_must "$img" --recovery-wait 60
    id=$SERVE_ID old=$SERVE_PID oldlog=$SERVE_LOG
    quiesce=no
    grep -q "this device uses 0x[0-9a-f]* ([^)]*QUIESCE" "$SERVE_LOG" && quiesce=yes
    echo "# $(uname -r): the device $([[ $quiesce == yes ]] && echo has || echo lacks) UBLK_F_QUIESCE"

    t dd if=w.bin of="$SERVE_DEV" bs=4096 seek=$((offset / 4096)) count=1 oflag=direct,dsync conv=notrunc status=none 2> dd.err &
    dd_pid=$!
    local i
    for ((i = 0; i < 300; i++)); do grep -q "test hook: holding the write at $offset+4096" "$oldlog" && break; sleep 0.1; done
    if grep -q "test hook: holding the write at $offset+4096" "$oldlog"; then ok "the old server holds the FUA write at $offset in its engine"
    else not_ok "the old server never held the write at $offset" "$(cat "$oldlog")"; return 0; fi

    FVD_TEST_HOLD_WRITE=$offset:0 serve_must "$img" --takeover --recovery-wait 60
    wait_pid "$old" 30
    expect "the old server exits 0 after the hand-off" "$WAIT_RC" 0 "$(cat "$oldlog")"
    expect "the new server took over the same device" "$SERVE_DEV" "/dev/ublkb$id"
    wait_pid "$dd_pid" 60
    expect "the guest's write completes without error" "$WAIT_RC" 0 "$(cat dd.err)"

    local old_done new_got
    # (grep -c prints 0 and fails when nothing matches.)
    old_done=$(grep -c "test hook: write at $offset+4096 done" "$oldlog" || true)
    new_got=$(grep -c "test hook: holding the write at $offset+4096" "$SERVE_LOG" || true)
    handoff_quiesced "$oldlog" "hand-off" "$quiesce"
    if [[ $quiesce == yes ]]; then
        expect "with QUIESCE: the old server executed the held write before it exited" "$old_done" 1 "$(cat "$oldlog")"
        # Not vacuous: the write was still held when the hand-off began.
        local began ended
        began=$(grep -n "SIGHUP: handing" "$oldlog" | head -1 | cut -d: -f1 || true)
        ended=$(grep -n "test hook: write at $offset+4096 done" "$oldlog" | head -1 | cut -d: -f1 || true)
        if [[ -n $began && -n $ended ]] && ((ended > began)); then ok "with QUIESCE: the write was still held when the hand-off began (log lines $began, $ended)"
        else not_ok "with QUIESCE: the write was not in flight at the hand-off (SIGHUP line '$began', done line '$ended')" "$(cat "$oldlog")"; fi
        expect "with QUIESCE: the new server never received it (nothing reissued)" "$new_got" 0 "$(cat "$SERVE_LOG")"
    else
        expect "without QUIESCE: the old server exited with the write still held" "$old_done" 0 "$(cat "$oldlog")"
        expect "without QUIESCE: the kernel reissued it to the new server" "$new_got" 1 "$(echo "old server:"; cat "$oldlog"; echo "new server:"; cat "$SERVE_LOG")"
        expect "without QUIESCE: the new server executed it" "$(grep -c "test hook: write at $offset+4096 done" "$SERVE_LOG" || true)" 1 "$(cat "$SERVE_LOG")"
    fi

    cp "$base" model.raw
    dd if=w.bin of=model.raw bs=4096 seek=$((offset / 4096)) conv=notrunc status=none
    check "the device equals the base plus the write" \
        t bash -c "cmp <(dd if='$SERVE_DEV' iflag=direct bs=1M status=none) model.raw"
    serve_stop "after the hand-off"
    serve_must "$img"
    check "a fresh serve: the device equals the base plus the write" \
        t bash -c "cmp <(dd if='$SERVE_DEV' iflag=direct bs=1M status=none) model.raw"
    serve_stop "fresh"
    check "fvd check clean" fvd check "$img"
}
