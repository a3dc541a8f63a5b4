# tests/vm/e2e/1-fs.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: ext4 and xfs on the device: files + sha256 across daemon restarts, fsck clean
# timeout: 480
#
# serve → the printed /dev/ublkbN exists with the image's size; mkfs.ext4, mount, write large and
# small files, sync, umount, SIGTERM (exit 0, device gone), serve again (fresh gendisk, so every
# read goes through the daemon), mount, sha256sum -c, umount, e2fsck -f -n.  Then the same with
# mkfs.xfs / xfs_repair -n on the same image, and finally `fvd check` of the image.

# make_tree DIR: two large random files and 150 small ones (0..16 KiB, some empty) in subdirs.
make_tree() {
    local dir=$1 i
    mkdir -p "$dir/big" "$dir/small/a" "$dir/small/b"
    random_file "$dir/big/48m.bin" 48
    random_file "$dir/big/9m.bin" 9
    for ((i = 0; i < 150; i++)); do
        head -c $((RANDOM % 16384)) "$E2E_STATE/random.pool" > "$dir/small/$([[ $((i % 2)) == 0 ]] && echo a || echo b)/f$i"
    done
    printf 'x' > "$dir/small/one-byte"
    : > "$dir/small/empty"
    (cd "$dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$dir.sha256"
}

# fs_round TYPE: mkfs, write, restart the daemon, verify, fsck.  Uses/updates SERVE_*.
fs_round() {
    local fs=$1 tree=$D/tree-$1 nfiles
    make_tree "$tree"
    nfiles=$(wc -l < "$tree.sha256")
    case $fs in
        ext4) check "mkfs.ext4 $SERVE_DEV" t mkfs.ext4 -q -F "$SERVE_DEV" ;;
        xfs) check "mkfs.xfs $SERVE_DEV" t mkfs.xfs -q -f "$SERVE_DEV" ;;
    esac
    mkdir -p "$D/m"
    ensure "[$fs] mount $SERVE_DEV" t mount -t "$fs" "$SERVE_DEV" "$D/m" || return 0
    check "[$fs] copy $nfiles files (48 MiB + 9 MiB + small) onto it" t cp -a "$tree/." "$D/m/"
    check "[$fs] sync" t sync
    check "[$fs] umount" t umount "$D/m"
    serve_stop "$fs written"
    serve_must "$IMG"
    expect "[$fs] served again as a block device of the same size" "$(t blockdev --getsize64 "$SERVE_DEV" 2>&1)" "$SIZE"
    if ! ensure "[$fs] mount after the restart" t mount -t "$fs" "$SERVE_DEV" "$D/m"; then return 0; fi
    local got
    got=$(cd "$D/m" && find . -type f | wc -l)
    expect "[$fs] $nfiles files after the restart" "$got" "$nfiles"
    check "[$fs] sha256sum -c of every file after the restart" \
        t bash -c "cd '$D/m' && sha256sum -c --quiet '$tree.sha256'"
    check "[$fs] umount" t umount "$D/m"
    case $fs in
        ext4) check "[ext4] e2fsck -f -n clean" t e2fsck -f -n "$SERVE_DEV" ;;
        xfs) check "[xfs] xfs_repair -n clean" t xfs_repair -n "$SERVE_DEV" ;;
    esac
    rm -rf "$tree"
}

scenario() {
    IMG=$D/fs.fvd SIZE=$((512 * 1024 * 1024))
    must "fvd create $IMG 512M" fvd create "$IMG" 512M
    serve_must "$IMG"
    ok "fvd serve printed $SERVE_DEV, a block device"
    [[ -e /sys/block/ublkb$SERVE_ID ]] && ok "/sys/block/ublkb$SERVE_ID exists" \
        || not_ok "/sys/block/ublkb$SERVE_ID missing" "$(ls /sys/block)"
    expect "blockdev --getsize64 $SERVE_DEV = image size" "$(t blockdev --getsize64 "$SERVE_DEV" 2>&1)" "$SIZE"
    fs_round ext4
    fs_round xfs
    serve_stop "final"
    check "fvd check of the image after clean stops exits 0" fvd check "$IMG"
}
