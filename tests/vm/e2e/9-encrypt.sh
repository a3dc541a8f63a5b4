# tests/vm/e2e/9-encrypt.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: encrypted images served as devices: ext4 across restarts, no plaintext in the file, keys
# timeout: 420
#
# An encrypted raw-like image (fvd create --encrypt) is served with --key-file: mkfs.ext4, a file
# of a marker text plus random files, sync, stop. The image file must not contain the marker, and
# `fvd check --key-file` is clean. Served again with the key on stdin (--key-file -): sha256 of
# every file, e2fsck clean. `fvd serve` without the key and with a wrong key: one-line errors, no
# device added. `serve --instance` takes the key from KEY_FILE= (FVD_CONF_DIR) and from
# $CREDENTIALS_DIRECTORY/key. A compact encrypted image over a plaintext raw base holding the
# marker: the device reads the base (copy-on-read into the image), a write lands, and after the
# stop the image holds no plaintext while the base is unchanged.
# The queue workers serve encrypted images themselves (daemon/fast-crypt.ts): the final status
# lines of the first two daemons must count requests not sent "via engine" — on this raw-like
# image without a base every plain write is one, so the marker file's ciphertext was written by
# the workers, and the sha256 checks after the restart read what the workers decrypted.

MARKER='The quick brown fox keeps the secret plans under the floorboard.'

# bad_encrypted_serve NAME REGEX ARGS...: fvd serve must fail with one line matching REGEX.
bad_encrypted_serve() {
    local name=$1 re=$2 rc=0 before after
    shift 2
    before=$(ublk_nodes)
    E2E_IO_TIMEOUT=60 t "${FVD[@]}" serve "$@" > bad.out 2> bad.err < /dev/null || rc=$?
    if ((rc != 0 && rc != 124 && rc != 137)); then ok "$name: fvd serve exits $rc"
    else not_ok "$name: fvd serve exit $rc" "$(cat bad.out bad.err)"; fi
    one_line_error "$name" bad.err
    if grep -qE "$re" bad.err; then ok "$name: the message names the problem (/$re/)"
    else not_ok "$name: the message does not match /$re/" "$(cat bad.err)"; fi
    after=$(ublk_nodes)
    expect "$name: no ublk device or node added" "$after" "$before"
}

# fast_path_used NAME LOG: the daemon's last status line ("stopped; ...: N requests (M via
# engine)") counts requests the queue workers served themselves, with their own cipher.
fast_path_used() {
    local line
    line=$(grep -o 'stopped; .*' "$2" | tail -n 1)
    if [[ $line =~ ([0-9]+)\ requests\ \(([0-9]+)\ via\ engine\) ]]; then
        local total=${BASH_REMATCH[1]} slow=${BASH_REMATCH[2]}
        if ((total > slow)); then ok "$1: $((total - slow)) of $total requests served by the queue workers (encrypted fast path)"
        else not_ok "$1: no request took the fast path" "$line"; fi
    else not_ok "$1: no final status line in the daemon log" "$(tail -n 5 "$2")"; fi
}

# no_plaintext NAME FILE: the marker text does not occur in FILE.
no_plaintext() {
    local n
    n=$(grep -c -a -F "$MARKER" "$2" || true)
    expect "$1: the marker text is not in $(basename "$2")" "$n" 0
}

scenario() {
    local M=$((1024 * 1024)) img=$D/enc.fvd sum name inst creds
    (umask 077; head -c 32 /dev/urandom > "$D/disk.key")   # a binary key: raw bytes work as well as a passphrase
    printf 'wrong passphrase\n' > "$D/wrong.key"
    must "fvd create --encrypt $img 256M" fvd create --encrypt --key-file "$D/disk.key" "$img" 256M
    expect "fvd info shows the cipher without the key" "$(fvd info "$img" | grep -x 'encrypted: aes-256-xts')" 'encrypted: aes-256-xts'

    # --- ext4 on the encrypted device, across a restart ---
    serve_must "$img" --key-file "$D/disk.key"
    check "mkfs.ext4 $SERVE_DEV" t mkfs.ext4 -q -F "$SERVE_DEV"
    mkdir -p "$D/m" "$D/tree"
    { yes "$MARKER" || true; } | head -n 4000 > "$D/tree/secret.txt"   # (yes dies of SIGPIPE: pipefail)
    random_file "$D/tree/r1.bin" 24
    random_file "$D/tree/r2.bin" 3
    (cd "$D/tree" && sha256sum ./* > "$D/tree.sha256")
    ensure "mount $SERVE_DEV" t mount -t ext4 "$SERVE_DEV" "$D/m" || return 0
    check "copy the files (a marker text, 27 MiB random)" t cp -a "$D/tree/." "$D/m/"
    check "sync" t sync
    check "umount" t umount "$D/m"
    serve_stop "encrypted, written"
    fast_path_used "encrypted, written" "$SERVE_LOG"
    no_plaintext "after the first stop" "$img"
    check "fvd check --key-file: clean" fvd check --key-file "$D/disk.key" "$img"
    check "fvd check without the key: clean" fvd check "$img"

    # (serve_start would give the daemon /dev/null as stdin: an explicit redirection instead.)
    if cmd_serve "key on stdin (--key-file -)" "$D/disk.key" "${FVD[@]}" serve "$img" --key-file -; then
        if ensure "mount after the restart" t mount -t ext4 "$CMD_DEV" "$D/m"; then
            check "sha256sum -c of every file after the restart" t bash -c "cd '$D/m' && sha256sum -c --quiet '$D/tree.sha256'"
            check "umount" t umount "$D/m"
        fi
        check "e2fsck -f -n clean" t e2fsck -f -n "$CMD_DEV"
    fi
    cmd_stop "key on stdin"
    fast_path_used "key on stdin" "$CMD_ERR"

    # --- keys refused ---
    sum=$(sha256sum < "$img")
    bad_encrypted_serve "no key" 'encrypted: its key is needed \(--key-file' "$img"
    bad_encrypted_serve "wrong key" 'wrong key' "$img" --key-file "$D/wrong.key"
    bad_encrypted_serve "missing key file" 'cannot open key file' "$img" --key-file "$D/none.key"
    expect "the refused serves left the image unchanged" "$(sha256sum < "$img")" "$sum"

    # --- instance configuration: KEY_FILE= and the systemd credential ---
    mkdir -p "$D/conf" "$D/creds"
    printf 'IMAGE=%s\nKEY_FILE=%s\n' "$img" "$D/disk.key" > "$D/conf/enc.conf"
    printf 'IMAGE=%s\n' "$img" > "$D/conf/cred.conf"
    cp "$D/disk.key" "$D/creds/key"
    local what
    for what in "KEY_FILE= in the instance configuration|enc|" "the credential \$CREDENTIALS_DIRECTORY/key|cred|$D/creds"; do
        IFS='|' read -r name inst creds <<< "$what"
        if cmd_serve "$name" /dev/null env FVD_CONF_DIR="$D/conf" CREDENTIALS_DIRECTORY="$creds" "${FVD[@]}" serve --instance "$inst"; then
            check "$name: e2fsck -f -n of the encrypted ext4 is clean" t e2fsck -f -n "$CMD_DEV"
        fi
        cmd_stop "$name"
    done

    # --- a plaintext base under an encrypted compact image ---
    local base=$D/base.raw over=$D/over.fvd
    { yes "$MARKER" || true; } | head -c $((16 * M)) > "$base"
    local basesum
    basesum=$(sha256sum < "$base")
    must "fvd create --encrypt over a raw base (compact)" fvd create --encrypt --key-file "$D/disk.key" -b "$base" -F raw --layout compact "$over"
    serve_must "$over" --key-file "$D/disk.key" --no-prefetch
    check_dev_equals "the device reads the plaintext base" "$SERVE_DEV" 0 "$base"
    pattern_file 5a.bin $M 0x5a
    check "dd 1 MiB of 0x5a at 4 MiB" write_dev "$SERVE_DEV" $((4 * M)) 5a.bin
    check_dev_equals "and reads it back" "$SERVE_DEV" $((4 * M)) 5a.bin
    serve_stop "encrypted over a base"
    no_plaintext "copy-on-read of the base" "$over"
    expect "the base is unchanged" "$(sha256sum < "$base")" "$basesum"
    check "fvd io reads the write and the base through the image" \
        fvd io --key-file "$D/disk.key" -c 'read -P 0x5a 4M 1M' "$over"
    check "fvd prefetch makes it fully local" fvd prefetch -q --key-file "$D/disk.key" "$over"
    no_plaintext "after prefetch" "$over"
    check "fvd convert --key-file flattens it" fvd convert --key-file "$D/disk.key" "$over" "$D/flat.raw"
    cp "$base" "$D/expect.raw"
    dd if=5a.bin of="$D/expect.raw" bs=1M seek=4 conv=notrunc status=none
    check "the flattened disk is the base with the write" cmp "$D/flat.raw" "$D/expect.raw"
}

# cmd_serve NAME STDIN COMMAND...: starts COMMAND (an `fvd serve`) in the background with STDIN
# as its standard input; ok when it prints a block device within E2E_SERVE_TIMEOUT s. Sets
# CMD_PID and CMD_DEV; returns 1 (after not_ok) otherwise.
cmd_serve() {
    local name=$1 input=$2 i
    shift 2
    CMD_DEV='' CMD_OUT=$D/cmd.out CMD_ERR=$D/cmd.err
    # Emptied here, not only by the child's redirection: the loop below could otherwise read the
    # previous daemon's device line before the background child truncates the file.
    : > "$CMD_OUT"; : > "$CMD_ERR"
    "$@" > "$CMD_OUT" 2> "$CMD_ERR" < "$input" &
    CMD_PID=$!
    echo "$CMD_PID" >> "$E2E_STATE/pids"
    for ((i = 0; i < ${E2E_SERVE_TIMEOUT:-90} * 10; i++)); do
        [[ -s $CMD_OUT ]] && { CMD_DEV=$(head -n 1 "$CMD_OUT"); break; }
        kill -0 "$CMD_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [[ $CMD_DEV =~ ^/dev/ublkb[0-9]+$ && -b $CMD_DEV ]]; then ok "$name: served as $CMD_DEV"; return 0; fi
    not_ok "$name: no device" "$(cat "$CMD_OUT" "$CMD_ERR")"
    return 1
}
# cmd_stop NAME: SIGTERM to CMD_PID; it must exit 0.
cmd_stop() {
    kill -TERM "$CMD_PID" 2>/dev/null || true
    wait_pid "$CMD_PID" "${E2E_STOP_TIMEOUT:-120}"
    expect "$1: SIGTERM, exit 0" "$WAIT_RC" 0 "$(cat "$CMD_ERR")"
}
