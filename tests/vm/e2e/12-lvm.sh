# tests/vm/e2e/12-lvm.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: compact images on LVM logical volumes: used as a filesystem; --grow-cmd lvextends the LV before allocation fails; without it a full LV is ENOSPC and the image stays clean
# timeout: 900
#
# A volume group on a loop device (lvm2 with its own lvm.conf: no udev in the guest). LV "grow"
# (24 MiB) holds a 256 MiB compact image served with --grow-cmd 'lvextend -An -L+16M %s'
# --grow-free 8M: mkfs.ext4, mount, a 48 MiB file written and synced (the image outgrows the LV
# several times), umount, stop; the LV has grown, the daemon logged its grow commands, `fvd
# check` is clean; served again (with --metrics-file), /dev/fvd/grow points at the device and
# mounts, the file's sha256 matches and e2fsck is clean, `fvd list --output=json` and the
# Prometheus file show request figures; after the stop the link and the file are gone. LV "full"
# (24 MiB) without a grow command: dd of 64 MiB with O_DIRECT fails with "No space left on
# device"; the daemon stops cleanly, `fvd check` is clean, and what dd wrote before the LV filled
# reads back.

lvm_cleanup() {
    [[ -n ${VG:-} ]] && vgremove -ff "$VG" > /dev/null 2>&1 || true
    [[ -n ${LOOP:-} ]] && { pvremove -ff -y "$LOOP" > /dev/null 2>&1 || true; losetup -d "$LOOP" 2>/dev/null || true; }
}

scenario() {
    if ! command -v lvcreate > /dev/null; then
        skip "lvm2 is not installed (tests/vm/prepare.sh installs it)"
        return 0
    fi
    local M=$((1024 * 1024)) lv size rc out sum
    mkdir -p lvm
    export LVM_SYSTEM_DIR=$D/lvm
    truncate -s 512M pv.img
    LOOP=$(losetup -f --show pv.img)
    VG=fvde2e$$
    trap lvm_cleanup EXIT
    # No udev here: LVM makes its device nodes itself; only our loop device is scanned.
    cat > lvm/lvm.conf <<CONF
devices { filter = [ "a|^$LOOP\$|", "r|.*|" ] obtain_device_list_from_udev = 0 }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
CONF
    must "pvcreate + vgcreate on $LOOP" bash -c "pvcreate -q -y '$LOOP' && vgcreate -q '$VG' '$LOOP'"

    # --- with a grow command -------------------------------------------------------------------
    must "lvcreate -L 24M $VG/grow" lvcreate -q -y -L 24M -n grow "$VG"
    lv=/dev/$VG/grow
    must "fvd create --layout compact on the LV (256 MiB virtual)" fvd create --force --layout compact "$lv" 256M
    serve_must "$lv" --grow-cmd "lvextend -q -An -L+16M %s" --grow-free 8M
    check "mkfs.ext4 on $SERVE_DEV" t mkfs.ext4 -q -E nodiscard,lazy_itable_init=1 "$SERVE_DEV"
    mkdir -p mnt
    must "mount $SERVE_DEV" t mount "$SERVE_DEV" mnt
    random_file big.bin 48
    sum=$(sha256sum big.bin | cut -d' ' -f1)
    check "write 48 MiB into the filesystem and sync (twice what the LV had)" t bash -c "cp big.bin mnt/ && sync"
    check "umount" t umount mnt
    serve_stop
    size=$(blockdev --getsize64 "$lv")
    if ((size >= 64 * M)); then ok "the LV grew from 24 MiB to $((size / M)) MiB"
    else not_ok "the LV did not grow enough: $size bytes" "$(cat "$SERVE_LOG")"; fi
    check "the daemon logged its grow commands, each one done" bash -c "grep -q 'grow command done' '$SERVE_LOG' && ! grep -q 'grow command failed' '$SERVE_LOG'"
    check "fvd check on the LV: clean" fvd check "$lv"
    serve_must "$lv" --metrics-file "$D/fvd.prom"
    # Operational visibility: a stable name, the figures in `fvd list`, Prometheus metrics.
    expect "/dev/fvd/grow points at the device" "$(readlink /dev/fvd/grow 2>&1)" "$SERVE_DEV"
    must "mount again (through /dev/fvd/grow)" t mount /dev/fvd/grow mnt
    expect "the file's sha256 after a restart" "$(sha256sum mnt/big.bin | cut -d' ' -f1)" "$sum"
    check "umount" t umount mnt
    check "e2fsck -f -n" t e2fsck -f -n "$SERVE_DEV"
    sleep 6 # figures are published every 5 s
    out=$(fvd list --output=json 2>&1)
    check "fvd list --output=json: the device is running" grep -q '"state": "running"' <<< "$out"
    check "fvd list --output=json: requests counted" grep -Eq '"requestsFast": [1-9]' <<< "$out"
    check "Prometheus textfile: fvd_requests_total with a non-zero fast-path count" grep -Eq '^fvd_requests_total\{name="grow",device="/dev/ublkb[0-9]+",path="fast"\} [1-9]' "$D/fvd.prom"
    # The mount, sha256 of the 48 MiB file and e2fsck read at least 48 MiB through the device.
    check "Prometheus textfile: fvd_bytes_total of reads at least the file's 48 MiB" awk -v min=$((48 * M)) '$1 ~ /^fvd_bytes_total\{.*op="read"\}$/ && $2 >= min {found = 1} END {exit !found}' "$D/fvd.prom"
    serve_stop
    check "after stop: /dev/fvd/grow and the metrics file are gone" bash -c "[[ ! -e /dev/fvd/grow && ! -L /dev/fvd/grow && ! -e '$D/fvd.prom' ]]"

    # --- without one: a full LV is ENOSPC ------------------------------------------------------
    must "lvcreate -L 24M $VG/full" lvcreate -q -y -L 24M -n full "$VG"
    lv=/dev/$VG/full
    must "fvd create --layout compact on the LV" fvd create --force --layout compact "$lv" 256M
    serve_must "$lv"
    random_file data.bin 64
    rc=0
    out=$(t dd if=data.bin of="$SERVE_DEV" bs=1M oflag=direct status=none 2>&1) || rc=$?
    if ((rc != 0)) && grep -q 'No space left on device' <<< "$out"; then ok "dd of 64 MiB onto a 24 MiB LV: No space left on device"
    else not_ok "dd of 64 MiB onto a 24 MiB LV: expected ENOSPC (exit $rc)" "$out"; fi
    check "the device still reads" t dd if="$SERVE_DEV" of=/dev/null bs=1M count=4 iflag=direct status=none
    serve_stop
    check "fvd check on the full LV: clean" fvd check "$lv"
    # What fitted was written: the first 4 MiB (the LV holds about 6 chunks past the metadata).
    must "fvd convert the LV's image to a raw file" fvd convert "$lv" flat.raw
    check "the first 4 MiB dd wrote (before the LV filled) read back" cmp -n $((4 * M)) data.bin flat.raw
    lvm_cleanup
    trap - EXIT
}
