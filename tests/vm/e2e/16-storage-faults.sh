# tests/vm/e2e/16-storage-faults.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: the disk under the image fails: write and read errors (dm-flakey, dm-error), a failing base
# timeout: 1500
#
# The storage under the image is a device-mapper device over a loop device, whose table is
# switched while the daemon serves (dmsetup load, suspend, resume: each fault starts after the I/O
# in flight drained):
#
#   image: a compact image on ext4 over dm.  8 MiB written through the device with O_DIRECT and
#   fsync (acknowledged and flushed).  Then dm-flakey with error_writes (reads work, writes fail):
#   a further write + fsync fails for the guest, the flushed data still reads, the daemon stays up
#   and logs the failures in a few lines (one per burst, not one per request).  Then dm-error (all
#   I/O fails) with the page cache dropped: reading the flushed data fails for the guest, the daemon
#   stays up.  Storage back (linear): the daemon stops and deletes its device (it may report the
#   failed flush); the file system is repaired (e2fsck -fy) and mounted again; `fvd check` is clean;
#   served again (journal replay) the 8 MiB read back exactly; a clean stop; `fvd check` clean.
#
#   base: an FVD image (the base, on ext4 over dm, mounted read-only) under a compact image on
#   tmpfs, prefetching off.  The device reads base data; a write lands.  Base switched to dm-error,
#   page cache dropped: reading base-only blocks fails, the written and the copied-on-read blocks
#   still read, a write that needs a copy from the base fails, a whole-block write succeeds.  Base
#   back: the base-only blocks read right, the failed write left its block reading the base, clean
#   stop, `fvd check` clean, the base file unchanged.

# dm_make NAME MIB: a loop device over a sparse file and a dm device /dev/mapper/fvde2e-NAME over
# it (linear); sets DM_LOOP and DM_SECTORS.
# (No udevd in the guest: dmsetup does not wait for one, and makes /dev/mapper/NAME itself.)
dm_make() {
    truncate -s "$2M" "$D/$1.disk"
    DM_LOOP=$(losetup -f --show "$D/$1.disk")
    DM_SECTORS=$(blockdev --getsz "$DM_LOOP")
    dmsetup create --noudevsync "fvde2e-$1" --table "0 $DM_SECTORS linear $DM_LOOP 0"
    dmsetup mknodes "fvde2e-$1"
    [[ -b /dev/mapper/fvde2e-$1 ]]
}
# dm_switch NAME TABLE: the new table takes over. Suspended without freezing the file system on
# it (--nolockfs: a freeze could itself fail on a failing table), after in-flight I/O drained.
dm_switch() {
    t dmsetup load --noudevsync "fvde2e-$1" --table "$2" && t dmsetup suspend --noudevsync --nolockfs "fvde2e-$1" &&
        t dmsetup resume --noudevsync "fvde2e-$1"
}
drop_caches() { sync 2>/dev/null || true; echo 3 > /proc/sys/vm/drop_caches; }
# failure_lines LOG: the daemon's lines about failed requests (one per burst: daemon/request-errors.ts).
failure_lines() { grep -c -E 'requests? failed' "$1" || true; }
daemon_alive() { kill -0 "$SERVE_PID" 2>/dev/null; }

image_faults() {
    local M=$((1024 * 1024)) loop sectors img lines0 lines rc dev t0 secs
    dm_make img 256 > dm.out 2>&1 || { not_ok "dm device over a loop device (image) — scenario aborted" "$(cat dm.out)"; exit 1; }
    loop=$DM_LOOP sectors=$DM_SECTORS
    must "mkfs.ext4 on dm" t mkfs.ext4 -q -F /dev/mapper/fvde2e-img
    mkdir -p fsA
    must "mount" t mount -t ext4 /dev/mapper/fvde2e-img fsA
    img=$D/fsA/img.fvd
    must "fvd create --layout compact $img 64M" fvd create --layout compact "$img" 64M
    serve_must "$img" --queues 1 --no-prefetch
    random_file flushed.bin 8
    random_file later.bin 4
    check "8 MiB written at 0 (O_DIRECT, fsync): acknowledged and flushed" write_dev "$SERVE_DEV" 0 flushed.bin

    # --- writes fail (dm-flakey error_writes: always down, reads pass) ---
    lines0=$(failure_lines "$SERVE_LOG")
    t0=$SECONDS
    check "dm-flakey error_writes under the image's file system" dm_switch img "0 $sectors flakey $loop 0 0 3600 1 error_writes"
    rc=0; write_dev "$SERVE_DEV" $((16 * M)) later.bin 2> later.err || rc=$?
    if ((rc != 0)); then ok "write + fsync while writes fail: the guest gets an error (exit $rc: $(head -c 120 later.err | tr '\n' ' '))"
    else not_ok "write + fsync while writes fail succeeded: the failure was hidden from the guest"; fi
    check_dev_equals "while writes fail: the flushed 8 MiB still read" "$SERVE_DEV" 0 flushed.bin
    if daemon_alive; then ok "while writes fail: the daemon is up"; else not_ok "the daemon died while writes failed" "$(tail -n 20 "$SERVE_LOG")"; fi

    # --- everything fails (dm-error), nothing cached ---
    check "dm-error under the image's file system" dm_switch img "0 $sectors error"
    drop_caches
    rc=0; read_dev "$SERVE_DEV" 0 $((8 * M)) > /dev/null 2> read.err || rc=$?
    if ((rc != 0)); then ok "read while the disk fails: the guest gets an error (exit $rc)"
    else not_ok "read while the disk fails succeeded (served from where?)"; fi
    if daemon_alive; then ok "while all I/O fails: the daemon is up"; else not_ok "the daemon died while all I/O failed" "$(tail -n 20 "$SERVE_LOG")"; fi
    sleep 2 # let the last burst end (the daemon reports a burst after 1 s without failures)
    lines=$(($(failure_lines "$SERVE_LOG") - lines0))
    secs=$((SECONDS - t0))
    if ((lines >= 1 && lines <= 4 + secs / 10)); then ok "failures logged in $lines line(s) over ${secs}s (one per burst)"
    else not_ok "failure log lines: $lines over ${secs}s (want 1 .. $((4 + secs / 10)): one per burst)" "$(grep -E 'fail' "$SERVE_LOG" | tail -n 8)"; fi
    echo "# daemon's failure lines: $(grep -E 'requests? failed' "$SERVE_LOG" | cut -c1-200 | tr '\n' '|')"

    # --- storage back ---
    check "storage back (linear)" dm_switch img "0 $sectors linear $loop 0"
    kill -TERM "$SERVE_PID"
    wait_pid "$SERVE_PID" "${E2E_STOP_TIMEOUT:-120}"
    if [[ $WAIT_RC != timeout ]]; then ok "SIGTERM after the faults: the daemon exits ($WAIT_RC; 1 = it reports the failed flush)"
    else not_ok "SIGTERM after the faults: the daemon did not exit" "$(tail -n 20 "$SERVE_LOG")"; kill -KILL "$SERVE_PID" 2>/dev/null || true; fi
    if device_gone "$SERVE_ID" 10; then ok "after the faults: $SERVE_DEV deleted"; else not_ok "$SERVE_DEV left behind"; fi
    echo "# daemon's last lines: $(tail -n 3 "$SERVE_LOG" | cut -c1-200 | tr '\n' '|')"
    t umount fsA || t umount -l fsA || true
    rc=0; t e2fsck -fy /dev/mapper/fvde2e-img > fsck.out 2>&1 || rc=$?
    if ((rc <= 2)); then ok "e2fsck -fy of the image's file system (exit $rc)"; else not_ok "e2fsck -fy exit $rc" "$(tail -n 20 fsck.out)"; fi
    must "mount again" t mount -t ext4 /dev/mapper/fvde2e-img fsA
    check "fvd check after the faults: clean" fvd check "$img"
    serve_must "$img" --queues 1 --no-prefetch
    check_dev_equals "served again (journal replayed): the flushed 8 MiB read back exactly" "$SERVE_DEV" 0 flushed.bin
    serve_stop "after the faults"
    check "fvd check at the end: clean" fvd check "$img"
    t umount fsA || true
}

base_faults() {
    local M=$((1024 * 1024)) loop sectors sum top=$D/top.fvd rc
    dm_make base 128 > dm.out 2>&1 || { not_ok "dm device over a loop device (base) — scenario aborted" "$(cat dm.out)"; exit 1; }
    loop=$DM_LOOP sectors=$DM_SECTORS
    must "mkfs.ext4 (base)" t mkfs.ext4 -q -F /dev/mapper/fvde2e-base
    mkdir -p fsB
    must "mount (base, rw)" t mount -t ext4 /dev/mapper/fvde2e-base fsB
    random_file base.raw 32
    must "the base: an FVD image (convert -O fvd)" fvd convert -O fvd base.raw fsB/base.fvd
    must "umount (base)" t umount fsB
    must "mount (base, read-only)" t mount -t ext4 -o ro /dev/mapper/fvde2e-base fsB
    sum=$(sha256sum < fsB/base.fvd)
    # 64 KiB blocks: the 4 KiB write below is then part of a block (a copy from the base).
    must "fvd create top over the FVD base" fvd create --layout compact --block-size 64K -b fsB/base.fvd -F fvd "$top" 48M
    serve_must "$top" --queues 1 --no-prefetch
    random_file w1.bin 1
    head -c $((64 * 1024)) /dev/zero | tr '\0' '\133' > blk.bin
    head -c 4096 /dev/zero | tr '\0' '\134' > part.bin
    check "write 1 MiB at 4 MiB" write_dev "$SERVE_DEV" $((4 * M)) w1.bin
    dd if=base.raw of=b8.bin bs=1M skip=8 count=1 status=none
    dd if=base.raw of=b16.bin bs=1M skip=16 count=1 status=none
    dd if=base.raw of=b20.bin bs=64k skip=320 count=1 status=none
    check_dev_equals "reads base data at 8 MiB (copied on read)" "$SERVE_DEV" $((8 * M)) b8.bin

    check "the base's disk fails (dm-error)" dm_switch base "0 $sectors error"
    drop_caches
    rc=0; read_dev "$SERVE_DEV" $((16 * M)) $M > /dev/null 2>&1 || rc=$?
    if ((rc != 0)); then ok "base-only blocks while the base fails: the guest gets an error"; else not_ok "a base-only read succeeded while the base failed"; fi
    check_dev_equals "while the base fails: the written 1 MiB reads" "$SERVE_DEV" $((4 * M)) w1.bin
    check_dev_equals "while the base fails: the copied-on-read 1 MiB reads" "$SERVE_DEV" $((8 * M)) b8.bin
    rc=0; write_dev "$SERVE_DEV" $((20 * M + 4096)) part.bin 2>/dev/null || rc=$?
    if ((rc != 0)); then ok "a 4 KiB write into a base block (needs a copy from the base) fails"; else not_ok "a copy-on-write from a failing base succeeded"; fi
    check "a whole-block write (no copy needed) succeeds" write_dev "$SERVE_DEV" $((24 * M)) blk.bin
    if daemon_alive; then ok "while the base fails: the daemon is up"; else not_ok "the daemon died while its base failed" "$(tail -n 20 "$SERVE_LOG")"; fi

    check "the base's disk is back" dm_switch base "0 $sectors linear $loop 0"
    drop_caches
    check_dev_equals "base back: base-only blocks read right" "$SERVE_DEV" $((16 * M)) b16.bin
    check_dev_equals "base back: the failed write's block reads its base data" "$SERVE_DEV" $((20 * M)) b20.bin
    check_dev_equals "base back: the whole-block write is there" "$SERVE_DEV" $((24 * M)) blk.bin
    serve_stop "base faults"
    check "fvd check (top): clean" fvd check "$top"
    expect "the base file is unchanged" "$(sha256sum < fsB/base.fvd)" "$sum"
    t umount fsB || true
}

scenario() {
    modprobe dm-flakey 2>/dev/null || true
    if ! command -v dmsetup > /dev/null || ! dmsetup targets 2>/dev/null | grep -q '^flakey'; then
        skip "dmsetup or the dm-flakey target is missing (modprobe dm-flakey)"
        return 0
    fi
    image_faults
    base_faults
}
