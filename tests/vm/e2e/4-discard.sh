# tests/vm/e2e/4-discard.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: blkdiscard / blkdiscard -z over written data and over base data read back as zeros
# timeout: 300
#
# img.fvd (128 MiB; raw-like layout, then again compact) over base.raw (64 MiB of random data).  A model file (base.raw + zeros to
# 128 MiB) gets every write and every zeroing the device gets.  Written by dd: 32 MiB at 64 MiB
# (beyond the base) and 4 MiB at 8 MiB (over base data).  Then blkdiscard and blkdiscard -z,
# aligned and unaligned, over written data, over untouched base data and over both: each range
# reads back as zeros (cmp with /dev/zero), 1 MiB either side still equals the model, the whole
# device equals the model, and again after a daemon restart.  base.raw is never changed.

M=$((1024 * 1024))

model_zero() { dd if=/dev/zero of=model.img bs=64k oflag=seek_bytes seek="$1" iflag=count_bytes count="$2" conv=notrunc status=none; }
model_write() { dd if="$2" of=model.img bs=1M oflag=seek_bytes seek="$1" conv=notrunc status=none; }

# same_as_model NAME OFFSET LENGTH: the device's bytes equal the model's.
same_as_model() {
    local name=$1 off=$2 len=$3 out rc=0
    out=$(cmp <(read_dev "$SERVE_DEV" "$off" "$len") \
        <(dd if=model.img bs=64k iflag=skip_bytes,count_bytes skip="$off" count="$len" status=none) 2>&1) || rc=$?
    if ((rc == 0)); then ok "$name"; else not_ok "$name" "$out"; fi
}

# zero_range NAME BLKDISCARD-OPTS OFFSET LENGTH: zero it on the device and in the model, then
# check the range reads as zeros and 1 MiB either side is intact.
zero_range() {
    local name=$1 opts=$2 off=$3 len=$4 out rc=0 lo hi
    # shellcheck disable=SC2086
    check "$name: blkdiscard $opts -o $off -l $len" t blkdiscard $opts -o "$off" -l "$len" "$SERVE_DEV"
    model_zero "$off" "$len"
    out=$(cmp -n "$len" <(read_dev "$SERVE_DEV" "$off" "$len") /dev/zero 2>&1) || rc=$?
    if ((rc == 0)); then ok "$name: the range reads back as zeros"
    else not_ok "$name: the range does not read back as zeros" "$out"; fi
    lo=$((off > M ? off - M : 0))
    hi=$((off + len + M > SIZE ? SIZE : off + len + M))
    same_as_model "$name: 1 MiB before the range intact" "$lo" $((off - lo))
    same_as_model "$name: 1 MiB after the range intact" $((off + len)) $((hi - off - len))
}

# discard_round LAYOUT: the whole sequence on a new image of that layout over base.raw.
discard_round() {
    local layout=$1 img=$D/img-$1.fvd base=$D/base.raw base_sum SCEN="$SCEN $1"
    SIZE=$((128 * M))
    random_file base.raw 64
    base_sum=$(sha256sum < base.raw)
    cp base.raw model.img && truncate -s "$SIZE" model.img
    random_file w1.bin 32
    random_file w2.bin 4
    must "fvd create --layout $layout -b base.raw -F raw 128M" fvd create --layout "$layout" -b "$base" -F raw "$img" 128M
    serve_must "$img"
    expect "device size 128 MiB" "$(t blockdev --getsize64 "$SERVE_DEV" 2>&1)" "$SIZE"
    check "dd 32 MiB at 64 MiB (beyond the base)" write_dev "$SERVE_DEV" $((64 * M)) w1.bin
    model_write $((64 * M)) w1.bin
    check "dd 4 MiB at 8 MiB (over base data)" write_dev "$SERVE_DEV" $((8 * M)) w2.bin
    model_write $((8 * M)) w2.bin
    same_as_model "whole device = base + written data before any discard" 0 "$SIZE"

    zero_range "discard over written data (aligned, 68M+8M)" "" $((68 * M)) $((8 * M))
    zero_range "write-zeroes over written data (unaligned, 80M+4.5K, 3M+1K)" "-z" $((80 * M + 4608)) $((3 * M + 1024))
    zero_range "discard over base data (aligned, 16M+8M)" "" $((16 * M)) $((8 * M))
    zero_range "write-zeroes over written + base data (10M+4M)" "-z" $((10 * M)) $((4 * M))
    zero_range "discard over base data (unaligned, 40M+8K, 1M+4K)" "" $((40 * M + 8192)) $((M + 4096))
    zero_range "write-zeroes over base data (unaligned, 50M+512, 2M+3K)" "-z" $((50 * M + 512)) $((2 * M + 3072))
    zero_range "discard across the base's end (60M+8M)" "" $((60 * M)) $((8 * M))
    same_as_model "whole device = model after all discards" 0 "$SIZE"
    serve_stop "after discards"
    expect "base.raw unchanged (sha256)" "$(sha256sum < base.raw)" "$base_sum"
    serve_must "$img"
    same_as_model "after a restart the whole device still equals the model" 0 "$SIZE"
    serve_stop "final"
    check "fvd check of the image exits 0" fvd check "$img"
}

scenario() {
    discard_round raw
    discard_round compact
}
