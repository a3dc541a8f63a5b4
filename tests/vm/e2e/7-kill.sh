# tests/vm/e2e/7-kill.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: kill -9 of the daemon under write load: no hung device, journal replay, fsynced data intact
# timeout: 420
#
# Deterministic by construction: ext4 on the device (--dev-id 3); flushed.bin (16 MiB) written
# and sync'ed; fio (O_DIRECT random writes, time-based, so it is certainly running) starts;
# once >= 16 MiB of it reached the device and during.bin (8 MiB, conv=fsync) completed under that
# load, the daemon gets SIGKILL.  Then: fio and umount return (I/O errors, no hang), the block
# device goes away, `fvd info --json` says the image is dirty, `fvd serve --dev-id 3` succeeds
# (removing the dead device if the kernel kept it), mount (ext4 journal recovery) finds both
# files with their sha256, umount, e2fsck -f -n clean, clean stop, `fvd check` exits 0.
# Then the same on the raw device of a compact-layout image (see raw_round).

scenario() {
    local img=$D/k.fvd id=3 fio_pid rc w0 w i sum1 sum2 info
    must "fvd create $img 256M" fvd create "$img" 256M
    serve_must "$img" --dev-id $id
    expect "served on --dev-id $id" "$SERVE_DEV" /dev/ublkb$id
    local dead_pid=$SERVE_PID
    must "mkfs.ext4" t mkfs.ext4 -q -F "$SERVE_DEV"
    mkdir -p m
    must "mount" t mount -t ext4 "$SERVE_DEV" m
    random_file flushed.bin 16
    random_file during.bin 8
    sum1=$(sha256sum < flushed.bin) sum2=$(sha256sum < during.bin)
    must "write flushed.bin + sync" t bash -c "cp flushed.bin m/ && sync"

    # (timeout directly, not the t function: a backgrounded function would be a subshell)
    timeout -k 5 "$E2E_IO_TIMEOUT" fio --name=load --filename=m/load.bin --size=96M --rw=randwrite --bs=64k --ioengine=libaio \
        --direct=1 --iodepth=16 --time_based --runtime=300 > fio.log 2>&1 &
    fio_pid=$!
    # wait until the load really reaches the device: >= 16 MiB more written (field 7 = sectors)
    w0=$(awk '{print $7}' /sys/block/ublkb$id/stat)
    for ((i = 0; i < 600; i++)); do
        w=$(awk '{print $7}' /sys/block/ublkb$id/stat 2>/dev/null || echo 0)
        ((w - w0 >= 32768)) && break
        sleep 0.1
    done
    if ((w - w0 >= 32768)); then ok "write load running ($(((w - w0) / 2048)) MiB written by then)"
    else not_ok "write load did not start within 60 s" "$(cat fio.log)"; fi
    check "during.bin written with conv=fsync under load" \
        t dd if=during.bin of=m/during.bin bs=1M conv=fsync status=none
    kill -0 "$fio_pid" 2>/dev/null && ok "fio still writing at the kill" || not_ok "fio ended before the kill" "$(cat fio.log)"

    echo "# SIGKILL to the daemon (pid $dead_pid); bash may report it as 'Killed'"
    kill -KILL "$dead_pid"
    wait_pid "$dead_pid" 30
    expect "daemon killed by SIGKILL" "$WAIT_RC" 137
    wait_pid "$fio_pid" 90
    rc=$WAIT_RC
    if [[ $rc != timeout ]]; then ok "fio ended (exit $rc) after the kill: I/O failed, no hang"
    else not_ok "fio still blocked 90 s after the kill (hung device)" \
        "$(ps -o pid,stat,wchan:24,args -p "$fio_pid" 2>&1; cat fio.log)"; kill -KILL "$fio_pid" 2>/dev/null || true; fi
    if timeout 60 umount m 2>umount.err; then ok "umount of the fs on the dead device returns"
    else not_ok "umount of the fs on the dead device failed or hung" "$(cat umount.err)"; umount -l m || true; fi
    if [[ ! -b /dev/ublkb$id ]] || device_gone_b $id 30; then ok "no block device /dev/ublkb$id left hanging"
    else not_ok "/dev/ublkb$id still a block device 30 s after the kill" "$(ls -l /dev/ublk*; cat /sys/block/ublkb$id/stat)"; fi
    echo "# after the kill: $(ublk_nodes)"
    local leftover=0
    [[ -e /dev/ublkc$id ]] && leftover=1

    info=$(fvd info --json "$img" 2>&1) || true
    if grep -q '"dirty": true' <<< "$info"; then ok "fvd info --json: dirty (not closed cleanly) before the reopen"
    else not_ok "fvd info --json does not say dirty after the kill" "$info"; fi

    serve_must "$img" --dev-id $id
    ok "fvd serve --dev-id $id succeeds again"
    if ((leftover)); then
        if grep -q "removing stale device $id" "$SERVE_LOG"; then ok "the dead device $id was cleaned up by the new serve"
        else not_ok "the new serve did not report removing the dead device $id" "$(cat "$SERVE_LOG")"; fi
    fi
    expect "device size after the reopen" "$(t blockdev --getsize64 "$SERVE_DEV" 2>&1)" $((256 << 20))
    ensure "mount after the crash (ext4 journal recovery)" t mount -t ext4 "$SERVE_DEV" m || exit 1
    expect "flushed.bin (synced before the load) intact" "$(t sha256sum < m/flushed.bin 2>&1)" "$sum1"
    expect "during.bin (fsync'ed under load, before the kill) intact" "$(t sha256sum < m/during.bin 2>&1)" "$sum2"
    check "umount" t umount m
    check "e2fsck -f -n clean after the recovery mount" t e2fsck -f -n "$SERVE_DEV"
    serve_stop "after the recovery"
    check "fvd check of the image exits 0" fvd check "$img"
    rm -f "$img"
    raw_round
}

# raw_round: the same kill on the raw device of a compact-layout image (allocating writes, so
# the journal matters most): 32 MiB written + fsync'ed, fio time-based random writes on
# [64M,128M), 16 MiB written with O_DSYNC (FUA/flush) under that load, SIGKILL, the device goes
# away, the next serve on the same id cleans up, and both fsync'ed ranges read back exactly.
raw_round() {
    local img=$D/k2.fvd id=3 fio_pid w0 w i SCEN="$SCEN compact raw"
    must "fvd create --layout compact $img 128M" fvd create --layout compact "$img" 128M
    serve_must "$img" --dev-id $id
    local dead_pid=$SERVE_PID
    random_file a.bin 32
    random_file b.bin 16
    check "32 MiB at 0 written with O_DIRECT + fsync" write_dev "$SERVE_DEV" 0 a.bin
    timeout -k 5 "$E2E_IO_TIMEOUT" fio --name=load --filename="$SERVE_DEV" --offset=64M --size=64M \
        --rw=randwrite --bs=4k-64k --ioengine=libaio --direct=1 --iodepth=16 --time_based --runtime=300 \
        > fio-raw.log 2>&1 &
    fio_pid=$!
    w0=$(awk '{print $7}' /sys/block/ublkb$id/stat)
    for ((i = 0; i < 600; i++)); do
        w=$(awk '{print $7}' /sys/block/ublkb$id/stat 2>/dev/null || echo 0)
        ((w - w0 >= 16384)) && break
        sleep 0.1
    done
    if ((w - w0 >= 16384)); then ok "random-write load running on the raw device ($(((w - w0) / 2048)) MiB by then)"
    else not_ok "random-write load did not start within 60 s" "$(cat fio-raw.log)"; fi
    check "16 MiB at 32 MiB written with O_DIRECT|O_DSYNC under load" \
        t dd if=b.bin of="$SERVE_DEV" bs=1M seek=32 oflag=direct,dsync conv=notrunc status=none
    echo "# SIGKILL to the daemon (pid $dead_pid); bash may report it as 'Killed'"
    kill -KILL "$dead_pid"
    wait_pid "$dead_pid" 30
    expect "daemon killed by SIGKILL" "$WAIT_RC" 137
    wait_pid "$fio_pid" 90
    if [[ $WAIT_RC != timeout ]]; then ok "fio ended (exit $WAIT_RC) after the kill: no hang"
    else not_ok "fio still blocked 90 s after the kill (hung device)" "$(cat fio-raw.log)"; kill -KILL "$fio_pid" 2>/dev/null || true; fi
    if device_gone_b $id 30; then ok "no block device /dev/ublkb$id left hanging"
    else not_ok "/dev/ublkb$id still a block device 30 s after the kill" "$(ublk_nodes)"; fi
    serve_must "$img" --dev-id $id
    ok "fvd serve --dev-id $id succeeds again (replaying the journal of a compact image)"
    check_dev_equals "the 32 MiB fsync'ed before the load read back exactly" "$SERVE_DEV" 0 a.bin
    check_dev_equals "the 16 MiB written O_DSYNC under load read back exactly" "$SERVE_DEV" $((32 << 20)) b.bin
    serve_stop "after the recovery"
    check "fvd check of the compact image exits 0" fvd check "$img"
}

# device_gone_b ID SECONDS: true once /dev/ublkbID is no block device any more.
device_gone_b() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        [[ ! -b /dev/ublkb$1 ]] && return 0
        sleep 0.1
    done
    return 1
}
