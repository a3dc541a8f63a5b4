# tests/vm/e2e/10-snapshot.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: internal snapshots of a served compact image: the device's writes never reach a snapshot
# timeout: 400
#
# img.fvd (64 MiB, compact, 1 MiB chunks) over base.raw (32 MiB of random data), with a model file
# per state.  v1: dd writes over base data and beyond the base; stop; `fvd snapshot -c v1`.  Served
# again, the device reads v1; then writes that hit shared chunks — small unaligned ones (the queue
# worker must hand them to the engine, which copies the chunk), the same chunk again right after
# (now private: the worker's fast path), a 16 MiB write across many shared chunks, blkdiscard of
# a shared chunk — and the device equals the model v2.  While served, `snapshot -c` fails with
# "in use" and `snapshot -l` lists v1.  Stop; `snapshot -c v2`; `snapshot -a v1` and serve: the
# device reads exactly v1 (no write reached v1's chunks); `snapshot -a v2`: exactly v2; a restart
# keeps it.  `fvd check` is clean throughout, `snapshot -d` works, base.raw is never changed.

M=$((1024 * 1024))

model_write() { dd if="$3" of="$1" bs=1M oflag=seek_bytes seek="$2" conv=notrunc status=none; }
model_zero() { dd if=/dev/zero of="$1" bs=64k oflag=seek_bytes seek="$2" iflag=count_bytes count="$3" conv=notrunc status=none; }

# device_is NAME MODEL: the whole device equals MODEL.
device_is() {
    local out rc=0
    out=$(cmp <(read_dev "$SERVE_DEV" 0 "$SIZE") "$2" 2>&1) || rc=$?
    if ((rc == 0)); then ok "$1"; else not_ok "$1" "$out"; fi
}

scenario() {
    local img=$D/img.fvd base_sum list
    SIZE=$((64 * M))
    random_file base.raw 32
    base_sum=$(sha256sum < base.raw)
    cp base.raw v1.img && truncate -s "$SIZE" v1.img
    random_file w1.bin 8
    random_file w2.bin 4
    random_file w3.bin 16
    head -c 65536 "$E2E_STATE/random.pool" > s1.bin
    printf 'second write to the same chunk' | dd of=s1.bin conv=notrunc status=none
    head -c 4096 /dev/urandom > s2.bin

    must "fvd create --layout compact -b base.raw -F raw 64M" fvd create --layout compact -b "$D/base.raw" -F raw "$img" 64M
    serve_must "$img"
    check "dd 8 MiB at 2 MiB (over base data)" write_dev "$SERVE_DEV" $((2 * M)) w1.bin
    model_write v1.img $((2 * M)) w1.bin
    check "dd 4 MiB at 40 MiB (beyond the base)" write_dev "$SERVE_DEV" $((40 * M)) w2.bin
    model_write v1.img $((40 * M)) w2.bin
    device_is "device = v1 before the snapshot" v1.img
    serve_stop "before the first snapshot"
    check "fvd snapshot -c v1" fvd snapshot -c v1 "$img"
    check "fvd check after snapshot -c v1" fvd check "$img"

    serve_must "$img"
    device_is "served with a snapshot: the device still reads v1" v1.img
    cp v1.img v2.img
    check "64 KiB at 3 MiB + 4 KiB (inside a shared chunk: the engine copies it)" write_dev "$SERVE_DEV" $((3 * M + 4096)) s1.bin
    model_write v2.img $((3 * M + 4096)) s1.bin
    check "4 KiB at 3 MiB + 512 KiB (the same chunk, now private: fast path)" write_dev "$SERVE_DEV" $((3 * M + 512 * 1024)) s2.bin
    model_write v2.img $((3 * M + 512 * 1024)) s2.bin
    check "16 MiB at 5 MiB + 4 KiB (across shared chunks, base data and unmapped chunks)" write_dev "$SERVE_DEV" $((5 * M + 4096)) w3.bin
    model_write v2.img $((5 * M + 4096)) w3.bin
    check "blkdiscard 1 MiB at 41 MiB (a whole shared chunk)" t blkdiscard -o $((41 * M)) -l "$M" "$SERVE_DEV"
    model_zero v2.img $((41 * M)) "$M"
    check "blkdiscard -z 8 KiB at 42 MiB + 4 KiB (part of a shared chunk)" t blkdiscard -z -o $((42 * M + 4096)) -l 8192 "$SERVE_DEV"
    model_zero v2.img $((42 * M + 4096)) 8192
    device_is "device = v2 after writes to shared chunks" v2.img
    check_fails "fvd snapshot -c while served fails" fvd snapshot -c busy "$img"
    list=$(fvd snapshot -l "$img" 2>&1 || true)
    if grep -q ' v1 ' <<< "$list"; then ok "fvd snapshot -l while served lists v1"; else not_ok "fvd snapshot -l while served" "$list"; fi
    serve_stop "after writes to shared chunks"

    check "fvd snapshot -c v2" fvd snapshot -c v2 "$img"
    check "fvd snapshot -a v1" fvd snapshot -a v1 "$img"
    serve_must "$img"
    device_is "after snapshot -a v1 the device reads exactly v1" v1.img
    serve_stop "v1"
    check "fvd snapshot -a v2" fvd snapshot -a v2 "$img"
    serve_must "$img"
    device_is "after snapshot -a v2 the device reads exactly v2" v2.img
    serve_stop "v2"
    serve_must "$img"
    device_is "after a restart: still v2" v2.img
    serve_stop "final"
    check "fvd check exits 0" fvd check "$img"
    check "fvd snapshot -d v1" fvd snapshot -d v1 "$img"
    check "fvd snapshot -d v2" fvd snapshot -d v2 "$img"
    check "fvd check exits 0 after deleting every snapshot" fvd check "$img"
    check "fvd convert -O raw of the image" fvd convert -O raw "$img" flat.raw
    check "the flattened image equals v2" cmp flat.raw v2.img
    expect "base.raw unchanged (sha256)" "$(sha256sum < base.raw)" "$base_sum"
}
