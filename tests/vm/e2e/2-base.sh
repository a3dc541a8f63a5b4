# tests/vm/e2e/2-base.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: FVD image over a raw base holding ext4: base files readable, changes persist, base untouched
# timeout: 360
#
# base.raw = ext4 built with mkfs.ext4 -d from a tree of files; img.fvd = fvd create -b base.raw
# -F raw.  Served: every base file reads back right (sha256).  Then the same modifications are made
# on the device and on a model copy of the tree (overwrite inside a large file, append, delete,
# new files); after a daemon restart the device's tree matches the model, e2fsck is clean, and
# base.raw's sha256 never changed.  Last, a fresh image over the same base is served with a slow
# prefetch (--prefetch-rate 4M) while the guest reads: the queue workers' request timing must reach
# the prefetcher's latency budget (the daemon logs the baseline it measured), SIGUSR1/SIGUSR2 pause
# and resume prefetching, and the device must read the base exactly.

# modify DIR: the same changes, on the mounted device or on the model.
modify() {
    local dir=$1
    dd if="$D/patch.bin" of="$dir/big/24m.bin" bs=64k seek=80 conv=notrunc status=none   # 5 MiB in
    cat "$D/patch.bin" >> "$dir/small/f3"
    printf 'appended line\n' >> "$dir/small/f4"
    rm "$dir/small/f5" "$dir/big/3m.bin"
    mkdir -p "$dir/new"
    cp "$D/new.bin" "$dir/new/new.bin"
    printf 'hello from the overlay\n' > "$dir/new/hello.txt"
}

scenario() {
    local i base=$D/base.raw img=$D/img.fvd
    mkdir -p src/big src/small m
    random_file src/big/24m.bin 24
    random_file src/big/3m.bin 3
    for ((i = 0; i < 100; i++)); do head -c $((RANDOM * 3 % 70000)) "$E2E_STATE/random.pool" > "src/small/f$i"; done
    random_file patch.bin 1
    random_file new.bin 6
    must "mkfs.ext4 -d (a 256 MiB raw base holding the tree)" \
        bash -c "truncate -s 256M '$base' && mkfs.ext4 -q -F -d src '$base'"
    local base_sum
    base_sum=$(sha256sum < "$base")
    (cd src && find . -type f -print0 | sort -z | xargs -0 sha256sum) > src.sha256
    must "fvd create -b base.raw -F raw img.fvd" fvd create -b "$base" -F raw "$img"

    serve_must "$img"
    expect "device size = base size (256 MiB)" "$(t blockdev --getsize64 "$SERVE_DEV" 2>&1)" $((256 << 20))
    ensure "mount the base's ext4 through the FVD image" t mount -t ext4 "$SERVE_DEV" m || exit 1
    check "every base file reads back with the right sha256 ($(wc -l < src.sha256) files)" \
        t bash -c "cd m && sha256sum -c --quiet ../src.sha256"
    cp -a src model
    check "modify files on the device (overwrite, append, delete, create)" t bash -c "$(declare -f modify); D='$D' modify m"
    modify model
    (cd model && find . -type f -print0 | sort -z | xargs -0 sha256sum) > model.sha256
    check "sync + umount" t bash -c "sync && umount m"
    serve_stop "after modifying"
    expect "base.raw unchanged after serving and writing" "$(sha256sum < "$base")" "$base_sum"

    serve_must "$img"
    ensure "mount after the restart" t mount -t ext4 "$SERVE_DEV" m || exit 1
    check "after the restart every file matches the modified model ($(wc -l < model.sha256) files)" \
        t bash -c "cd m && sha256sum -c --quiet ../model.sha256"
    expect "after the restart the file count matches the model" \
        "$(cd m && find . -type f -not -path './lost+found/*' | wc -l)" "$(wc -l < model.sha256)"
    if [[ ! -e m/small/f5 && ! -e m/big/3m.bin ]]; then ok "deleted files stay deleted"
    else not_ok "deleted files are back" "$(ls -l m/small/f5 m/big/3m.bin 2>&1)"; fi
    check "umount" t umount m
    check "e2fsck -f -n clean" t e2fsck -f -n "$SERVE_DEV"
    serve_stop "final"
    expect "base.raw still unchanged (sha256)" "$(sha256sum < "$base")" "$base_sum"
    check "fvd check of the image exits 0" fvd check "$img"

    local img2=$D/img2.fvd
    must "fvd create -b base.raw -F raw img2.fvd" fvd create -b "$base" -F raw "$img2"
    serve_must "$img2" --prefetch-rate 4M --prefetch-share 10
    check "4 KiB direct reads while prefetching (4096 requests)" \
        t dd if="$SERVE_DEV" of=/dev/null iflag=direct bs=4k count=4096 status=none
    local i
    for ((i = 0; i < 50; i++)); do grep -q 'latency baseline' "$SERVE_LOG" && break; sleep 0.1; done
    if grep -qE 'prefetch: guest request latency baseline [0-9.]+ µs; .*\+10%' "$SERVE_LOG"; then
        ok "the prefetcher measured the guest's request latency ($(grep -o 'baseline [0-9.]* µs' "$SERVE_LOG"))"
    else not_ok "no latency baseline from the queue workers reached the prefetcher" "$(cat "$SERVE_LOG")"; fi
    kill -USR1 "$SERVE_PID"
    for ((i = 0; i < 50; i++)); do grep -q 'prefetch paused (SIGUSR1)' "$SERVE_LOG" && break; sleep 0.1; done
    if grep -q 'prefetch paused (SIGUSR1)' "$SERVE_LOG"; then ok "SIGUSR1 pauses prefetching"
    else not_ok "SIGUSR1 did not pause prefetching" "$(cat "$SERVE_LOG")"; fi
    kill -USR2 "$SERVE_PID"
    for ((i = 0; i < 50; i++)); do grep -q 'prefetch resumed (SIGUSR2)' "$SERVE_LOG" && break; sleep 0.1; done
    if grep -q 'prefetch resumed (SIGUSR2)' "$SERVE_LOG"; then ok "SIGUSR2 resumes prefetching"
    else not_ok "SIGUSR2 did not resume prefetching" "$(cat "$SERVE_LOG")"; fi
    check "the device reads the base exactly while prefetching" \
        t bash -c "cmp <(dd if='$SERVE_DEV' iflag=direct bs=1M status=none) '$base'"
    serve_stop "prefetching"
    expect "base.raw unchanged after prefetching" "$(sha256sum < "$base")" "$base_sum"
}
