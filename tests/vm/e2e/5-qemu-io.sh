# tests/vm/e2e/5-qemu-io.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: QEMU's block layer on the device (qemu-io -f raw -t none -n), with data written by dd
# timeout: 240
#
# dd writes 0xa7 at 4 MiB; qemu-io (raw, cache=none, native AIO flag as a hypervisor opens it)
# writes 0x5a at 0 and reads it back, and reads dd's 0xa7; a second qemu-io with -i native
# (Linux AIO) writes 2 MiB of 0x3c at 8 MiB and reads everything back; dd reads qemu's data back.
# After the daemon stops, `fvd io` finds all three patterns (and zeros between) in the image.

# qemu_io NAME ARGS...: exit 0 and no failed pattern check in the output.
qemu_io() {
    local name=$1 out rc=0
    shift
    out=$(t qemu-io "$@" 2>&1) || rc=$?
    if ((rc == 0)) && ! grep -qiE 'fail|error|mismatch' <<< "$out"; then ok "$name"
    else not_ok "$name (qemu-io exit $rc)" "qemu-io $*"$'\n'"$out"; fi
}

scenario() {
    local img=$D/q.fvd M=$((1024 * 1024))
    must "fvd create $img 64M" fvd create "$img" 64M
    pattern_file a7.bin $M 0xa7
    pattern_file 5a.bin $M 0x5a
    serve_must "$img"
    check "dd writes 1 MiB of 0xa7 at 4 MiB (O_DIRECT, fsync)" write_dev "$SERVE_DEV" $((4 * M)) a7.bin
    qemu_io "qemu-io -f raw -t none -n: write -P 0x5a 0 1M, read -P 0x5a 0 1M" \
        -f raw -t none -n -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' "$SERVE_DEV"
    qemu_io "qemu-io -f raw -t none -n: read -P 0xa7 4M 1M (written by dd)" \
        -f raw -t none -n -c 'read -P 0xa7 4M 1M' "$SERVE_DEV"
    qemu_io "qemu-io -i native: write -P 0x3c 8M 2M, reads of all three patterns, zeros between" \
        -f raw -t none -n -i native -c 'write -P 0x3c 8M 2M' -c 'read -P 0x3c 8M 2M' \
        -c 'read -P 0x5a 0 1M' -c 'read -P 0xa7 4M 1M' -c 'read -P 0 1M 3M' -c 'flush' "$SERVE_DEV"
    check_dev_equals "dd reads back the 0x5a written by qemu-io" "$SERVE_DEV" 0 5a.bin
    serve_stop
    check "fvd io finds 0x5a, 0xa7, 0x3c and zeros in the image after the stop" fvd io \
        -c 'read -P 0x5a 0 1M' -c 'read -P 0 1M 3M' -c 'read -P 0xa7 4M 1M' -c 'read -P 0 5M 3M' \
        -c 'read -P 0x3c 8M 2M' -c 'read -P 0 10M 54M' "$img"
}
