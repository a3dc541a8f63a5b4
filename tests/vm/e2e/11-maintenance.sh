# tests/vm/e2e/11-maintenance.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: commit, resize, rebase between serves: refused while served; the device shows each result
# timeout: 600
#
# base.raw (32 MiB random) under img.fvd (48 MiB, compact).  Served: 4 MiB written at 8 MiB (over
# the base) and 4 MiB at 40 MiB (past its end); model.img (base.raw + zeros to 48 MiB) gets the
# same.  While served, `fvd commit` and `fvd rebase` of img.fvd each fail with one line naming the
# lock (a served image grows online: scenario 15), and base.raw is unchanged.  Stopped: `fvd commit` → base.raw equals the
# model (grown to 48 MiB) and nothing is local in img.fvd; served again, the device equals the
# model.  `fvd resize +16M` → a 64 MiB device, the new range zeros.  `fvd rebase -b ""` → base.raw
# moved away, the device still equals the model.  `fvd check` clean.
#
# Encrypted (encrypted_scenario): ebase.raw (16 MiB random) under enc.fvd (24 MiB, compact,
# --encrypt).  Served with --key-file: a marker text written over the base and past its end; the
# image file holds no marker.  `fvd commit` without the key: one-line error, image and base
# unchanged (sha256); with --key-file: ebase.raw (grown to 24 MiB) equals the model and holds the
# marker in plaintext.  `fvd resize +8M` without the key; `fvd rebase -b ""` with the key on stdin
# (copies the base in, encrypted); ebase.raw moved away; served again with the key, the device
# equals the model; the image file still holds no marker; `fvd check --key-file` clean.

M=$((1024 * 1024))

# refused [--why ERE] NAME FVD-ARGS...: the command fails (not by time-out) with one line naming
# the lock, or with --why, naming that reason.
refused() {
    local why='in use by another process \(locked\)' what='the lock' rc=0
    if [[ $1 == --why ]]; then why=$2 what="why ($2)"; shift 2; fi
    local name=$1
    shift
    fvd "$@" > /dev/null 2> err.txt || rc=$?
    if ((rc != 0 && rc != 124 && rc != 137)); then ok "$name: refused (exit $rc)"; else not_ok "$name: exit $rc" "$(cat err.txt)"; fi
    one_line_error "$name" err.txt
    if grep -Eq "$why" err.txt; then ok "$name: names $what"
    else not_ok "$name: the error does not name $what" "$(cat err.txt)"; fi
}

scenario() {
    local img=$D/img.fvd base=$D/base.raw base_sum
    random_file base.raw 32
    base_sum=$(sha256sum < base.raw)
    cp base.raw model.img && truncate -s $((48 * M)) model.img
    random_file w1.bin 4
    random_file w2.bin 4
    must "fvd create -b base.raw -F raw --layout compact img.fvd 48M" fvd create -b "$base" -F raw --layout compact "$img" 48M

    serve_must "$img"
    check "dd 4 MiB at 8 MiB (over the base)" write_dev "$SERVE_DEV" $((8 * M)) w1.bin
    check "dd 4 MiB at 40 MiB (past the base's end)" write_dev "$SERVE_DEV" $((40 * M)) w2.bin
    dd if=w1.bin of=model.img bs=1M seek=8 conv=notrunc status=none
    dd if=w2.bin of=model.img bs=1M seek=40 conv=notrunc status=none
    refused "fvd commit of the served image" commit "$img"
    # (A served image, compact too, grows online: scenario 15.)
    refused "fvd rebase of the served image" rebase -b '' "$img"
    expect "base.raw unchanged while served" "$(sha256sum < base.raw)" "$base_sum"
    serve_stop "after the writes"

    check "fvd commit img.fvd (into base.raw, growing it)" fvd commit "$img"
    expect "base.raw = the model after commit (48 MiB)" "$(sha256sum < base.raw)" "$(sha256sum < model.img)"
    expect "nothing local in img.fvd after commit" \
        "$(fvd info --json "$img" | grep -o '"bytesLocal": [0-9]*')" '"bytesLocal": 0'
    serve_must "$img"
    expect "device size 48 MiB" "$(t blockdev --getsize64 "$SERVE_DEV" 2>&1)" $((48 * M))
    check_dev_equals "after commit the device equals the model" "$SERVE_DEV" 0 model.img
    serve_stop "after commit"

    check "fvd resize img.fvd +16M" fvd resize "$img" +16M
    truncate -s $((64 * M)) model.img
    serve_must "$img"
    expect "device size 64 MiB after resize" "$(t blockdev --getsize64 "$SERVE_DEV" 2>&1)" $((64 * M))
    check_dev_equals "after resize the device equals the model (the new 16 MiB read zeros)" "$SERVE_DEV" 0 model.img
    serve_stop "after resize"

    check "fvd rebase -b '' img.fvd (standalone)" fvd rebase -b '' "$img"
    must "move base.raw away" mv base.raw base.gone
    serve_must "$img"
    check_dev_equals "standalone, base gone: the device equals the model" "$SERVE_DEV" 0 model.img
    serve_stop "standalone"
    check "fvd check of the image exits 0" fvd check "$img"
    encrypted_scenario
}

ENC_MARKER='Commit me in plaintext, keep me encrypted in the overlay, please.'

encrypted_scenario() {
    local img=$D/enc.fvd base=$D/ebase.raw key=$D/enc.key sums n rc=0
    (umask 077; printf 'a maintenance passphrase\n' > "$key")
    random_file ebase.raw 16
    cp ebase.raw emodel.img && truncate -s $((24 * M)) emodel.img
    { yes "$ENC_MARKER" || true; } | head -c $((2 * M)) > marker.bin   # (yes dies of SIGPIPE: pipefail)
    must "fvd create --encrypt -b ebase.raw enc.fvd 24M" \
        fvd create --encrypt --key-file "$key" -b "$base" -F raw --layout compact "$img" 24M

    serve_must "$img" --key-file "$key"
    check "encrypted: dd the marker at 4 MiB (over the base)" write_dev "$SERVE_DEV" $((4 * M)) marker.bin
    check "encrypted: dd the marker at 20 MiB (past the base's end)" write_dev "$SERVE_DEV" $((20 * M)) marker.bin
    dd if=marker.bin of=emodel.img bs=1M seek=4 conv=notrunc status=none
    dd if=marker.bin of=emodel.img bs=1M seek=20 conv=notrunc status=none
    serve_stop "encrypted, written"
    n=$(grep -c -a -F "$ENC_MARKER" "$img" || true)
    expect "encrypted: the image file holds no marker text" "$n" 0

    sums=$(sha256sum "$img" "$base")
    fvd commit "$img" > /dev/null 2> err.txt || rc=$?
    if ((rc != 0 && rc != 124 && rc != 137)); then ok "encrypted: fvd commit without the key refused (exit $rc)"
    else not_ok "encrypted: fvd commit without the key: exit $rc" "$(cat err.txt)"; fi
    one_line_error "encrypted: fvd commit without the key" err.txt
    expect "encrypted: the refused commit changed nothing" "$(sha256sum "$img" "$base")" "$sums"

    check "encrypted: fvd commit --key-file (into ebase.raw, growing it)" fvd commit --key-file "$key" "$img"
    expect "encrypted: ebase.raw = the model after commit (24 MiB, plaintext)" "$(sha256sum < "$base")" "$(sha256sum < emodel.img)"
    n=$(grep -c -a -F "$ENC_MARKER" "$base" || true)
    if ((n > 0)); then ok "encrypted: the committed base holds the marker in plaintext"
    else not_ok "encrypted: no marker text in the committed base"; fi

    check "encrypted: fvd resize +8M without the key" fvd resize "$img" +8M
    truncate -s $((32 * M)) emodel.img
    check "encrypted: fvd rebase -b '' --key-file - (standalone)" bash -c "$(printf '%q ' "${FVD[@]}") rebase -b '' --key-file - '$img' < '$key'"
    must "encrypted: move ebase.raw away" mv "$base" "$D/ebase.gone"
    n=$(grep -c -a -F "$ENC_MARKER" "$img" || true)
    expect "encrypted: after rebase -b '' the image file holds no marker text" "$n" 0
    serve_must "$img" --key-file "$key"
    expect "encrypted: device size 32 MiB" "$(t blockdev --getsize64 "$SERVE_DEV" 2>&1)" $((32 * M))
    check_dev_equals "encrypted: standalone, base gone: the device equals the model" "$SERVE_DEV" 0 emodel.img
    serve_stop "encrypted, standalone"
    check "encrypted: fvd check --key-file exits 0" fvd check --key-file "$key" "$img"
}
