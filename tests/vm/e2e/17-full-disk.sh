# tests/vm/e2e/17-full-disk.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: the file system under the image fills up: -ENOSPC to the guest, writes again after space
# timeout: 1200
#
# For a raw-like (sparse) and a compact (growing) 160 MiB image on a 96 MiB ext4 (a loop device)
# that also holds a 16 MiB filler file: the guest writes the whole disk with O_DIRECT. The write
# fails with "No space left on device" — the daemon completes the request with -ENOSPC, which ublk
# hands to the block layer as BLK_STS_NOSPC — and not with a generic I/O error; the daemon stays
# up; a flush of the device (sync) succeeds (the journal was allocated at create, so metadata needs
# no new space); what dd wrote before the failure reads back. The filler is deleted: 8 MiB more
# written where the first write stopped succeed and read back. Clean stop, `fvd check` clean, and
# served again the device holds both parts.

full_round() {
    local layout=$1 M=$((1024 * 1024)) fs=$D/fs-$1 loop img rc done_mib dev
    truncate -s 96M "$D/full-$layout.disk"
    loop=$(losetup -f --show "$D/full-$layout.disk")
    must "mkfs.ext4 (96 MiB, no reserved blocks) [$layout]" t mkfs.ext4 -q -F -m 0 "$loop"
    mkdir -p "$fs"
    must "mount [$layout]" t mount -t ext4 "$loop" "$fs"
    must "a 16 MiB filler file [$layout]" t dd if=/dev/zero of="$fs/filler" bs=1M count=16 conv=fsync status=none
    img=$fs/img.fvd
    must "fvd create --layout $layout 160M [$layout]" fvd create --layout "$layout" "$img" 160M
    serve_must "$img" --queues 1 --no-prefetch
    dev=$SERVE_DEV
    # 160 MiB of test data without 160 MiB of urandom (slow under emulation): the suite's random
    # pool three times, each MiB stamped with its number so no two MiB are alike.
    random_file pool.bin 64
    cat pool.bin pool.bin pool.bin > big.bin
    truncate -s $((160 * M)) big.bin
    for ((i = 0; i < 160; i++)); do printf 'MiB %08d %s' "$i" "$layout" | dd of=big.bin bs=1 seek=$((i * M)) conv=notrunc status=none; done

    rc=0; t dd if=big.bin of="$dev" bs=1M oflag=direct 2> dd.err || rc=$?
    done_mib=$(sed -n 's/^\([0-9]*\)+[0-9]* records out$/\1/p' dd.err | tail -n 1)
    done_mib=${done_mib:-0}
    if ((rc != 0)) && grep -q 'No space left on device' dd.err; then
        ok "[$layout] writing 160 MiB fails with 'No space left on device' after $done_mib MiB (-ENOSPC reached the guest)"
    else not_ok "[$layout] writing the whole disk: exit $rc, want a failure with ENOSPC" "$(cat dd.err)"; fi
    if ((done_mib >= 16 && done_mib < 160)); then ok "[$layout] $done_mib MiB written before the file system was full"
    else not_ok "[$layout] $done_mib MiB written before ENOSPC (want 16..159)"; fi
    if kill -0 "$SERVE_PID" 2>/dev/null; then ok "[$layout] the daemon is up"; else not_ok "[$layout] the daemon died on ENOSPC" "$(tail -n 20 "$SERVE_LOG")"; fi
    check "[$layout] a flush of the device succeeds on the full file system" t sync "$dev"
    head -c $((done_mib * M)) big.bin > part1.bin
    check_dev_equals "[$layout] the $done_mib MiB written before ENOSPC read back" "$dev" 0 part1.bin

    rm -f "$fs/filler"
    sync -f "$fs" 2>/dev/null || true
    dd if=big.bin of=part2.bin bs=1M skip="$done_mib" count=8 status=none
    check "[$layout] space freed: 8 MiB more at ${done_mib} MiB (O_DIRECT, fsync)" write_dev "$dev" $((done_mib * M)) part2.bin
    check_dev_equals "[$layout] ... and they read back" "$dev" $((done_mib * M)) part2.bin
    echo "# [$layout] daemon's failure lines: $(grep -E 'requests? failed' "$SERVE_LOG" | cut -c1-160 | tr '\n' '|')"
    serve_stop "[$layout] full disk"
    check "[$layout] fvd check: clean" fvd check "$img"
    serve_must "$img" --queues 1 --no-prefetch
    check_dev_equals "[$layout] served again: the first part" "$SERVE_DEV" 0 part1.bin
    check_dev_equals "[$layout] served again: the part written after space was freed" "$SERVE_DEV" $((done_mib * M)) part2.bin
    serve_stop "[$layout] again"
    t umount "$fs" || true
    losetup -d "$loop" 2>/dev/null || true
    rm -f big.bin pool.bin part1.bin part2.bin "$D/full-$layout.disk"
}

scenario() {
    full_round raw
    full_round compact
}
