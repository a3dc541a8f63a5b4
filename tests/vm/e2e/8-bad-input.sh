# tests/vm/e2e/8-bad-input.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: bad input to fvd serve: one-line errors, non-zero exit, no device left, first device unharmed
# timeout: 300
#
# a.fvd is served on --dev-id 0 with 0x77 at offset 0.  Then `fvd serve` of: an image with a
# corrupted magic, an image whose base file is gone, an image whose base is a FIFO (must not hang),
# another image on the occupied --dev-id 0, a.fvd again (locked by the first daemon), a path that
# does not exist.  Each must exit non-zero within the time-out with exactly one line on stderr that
# names the problem, leave the set of /dev/ublk[bc]* and /sys/block/ublkb* unchanged, and the first
# device must still read its data.  `fvd create --force` and `fvd convert --force` onto the served
# a.fvd must say "in use" and leave it whole (they used to truncate it before trying the lock).
# The image refused for the busy id must be left clean (fvd check).  Finally the first device stops
# cleanly and its data is in a.fvd.

# bad_serve NAME REGEX ARGS...: fvd serve ARGS must fail with one line matching REGEX (case-insensitive).
bad_serve() {
    local name=$1 re=$2 rc=0 before after
    shift 2
    before=$(ublk_nodes)
    E2E_IO_TIMEOUT=60 t "${FVD[@]}" serve "$@" > bad.out 2> bad.err || rc=$?
    if ((rc != 0 && rc != 124 && rc != 137)); then ok "$name: fvd serve $* exits $rc"
    elif ((rc == 0)); then not_ok "$name: fvd serve $* exited 0" "$(cat bad.out bad.err)"
    else not_ok "$name: fvd serve $* timed out (exit $rc)" "$(cat bad.out bad.err)"; fi
    one_line_error "$name" bad.err
    if grep -qiE "$re" bad.err; then ok "$name: the message names the problem (/$re/)"
    else not_ok "$name: the message does not match /$re/" "$(cat bad.err)"; fi
    [[ -s bad.out ]] && not_ok "$name: printed a device on stdout" "$(cat bad.out)"
    after=$(ublk_nodes)
    expect "$name: no ublk device or node added or removed" "$after" "$before"
    check_dev_equals "$name: the first device still reads its data" "$DEV0" 0 77.bin
}

# bad_cli NAME REGEX ARGS...: fvd ARGS must fail with one line matching REGEX (case-insensitive).
bad_cli() {
    local name=$1 re=$2 rc=0
    shift 2
    fvd "$@" > bad.out 2> bad.err || rc=$?
    if ((rc != 0 && rc != 124 && rc != 137)); then ok "$name: fvd $* exits $rc"
    else not_ok "$name: fvd $* exited $rc" "$(cat bad.out bad.err)"; fi
    one_line_error "$name" bad.err
    if grep -qiE "$re" bad.err; then ok "$name: the message names the problem (/$re/)"
    else not_ok "$name: the message does not match /$re/" "$(cat bad.err)"; fi
}

scenario() {
    local M=$((1024 * 1024))
    must "fvd create a.fvd 64M" fvd create a.fvd 64M
    cp a.fvd c.fvd && cp a.fvd e.fvd
    printf 'NOTFVD!!' | dd of=c.fvd conv=notrunc status=none       # the 8-byte magic at offset 0
    random_file base.raw 16
    must "fvd create -b base.raw -F raw d.fvd" fvd create -b base.raw -F raw d.fvd
    rm base.raw
    random_file fifo-base.raw 4
    must "fvd create -b fifo-base.raw -F raw f.fvd" fvd create -b fifo-base.raw -F raw f.fvd
    rm fifo-base.raw && mkfifo fifo-base.raw
    pattern_file 77.bin $M 0x77
    pattern_file 78.bin $M 0x78

    if [[ -e /dev/ublkc0 ]]; then not_ok "device id 0 is taken before the scenario starts" "$(ublk_nodes)"; fi
    serve_must a.fvd --dev-id 0
    expect "a.fvd served as /dev/ublkb0" "$SERVE_DEV" /dev/ublkb0
    DEV0=$SERVE_DEV
    check "dd 0x77 to the first device" write_dev "$DEV0" 0 77.bin

    bad_serve "corrupt magic" 'magic|not an fvd|format' c.fvd
    bad_serve "missing base" 'base|no such file|ENOENT' d.fvd
    bad_serve "base is a FIFO" 'not a regular file' f.fvd
    bad_serve "occupied --dev-id 0" 'in use|busy|occupied|exists' e.fvd --dev-id 0
    bad_serve "image already served (locked)" 'lock|in use|busy' a.fvd
    bad_serve "image already served, other --dev-id" 'lock|in use|busy' a.fvd --dev-id 1
    bad_serve "no such image" 'no such file|not found|ENOENT|does not exist' "$D/nonexistent.fvd"

    local size
    size=$(stat -c %s a.fvd)
    bad_cli "create --force onto the served image" 'in use' create --force a.fvd 1M
    bad_cli "convert --force onto the served image" 'in use' convert --force -O raw e.fvd a.fvd
    expect "the served a.fvd keeps its size" "$(stat -c %s a.fvd)" "$size"
    check_dev_equals "the first device still reads its data after the refused create/convert" "$DEV0" 0 77.bin

    check "the first device still takes writes (0x78 at 1 MiB)" write_dev "$DEV0" $M 78.bin
    check_dev_equals "and reads them back" "$DEV0" $M 78.bin
    serve_stop "first device"
    local out rc=0
    out=$(fvd check e.fvd 2>&1) || rc=$?
    if ((rc == 0)) && ! grep -qi 'not closed cleanly' <<< "$out"; then ok "e.fvd (refused for the busy id) left clean: fvd check exits 0"
    else not_ok "e.fvd (refused for the busy id) not clean (fvd check exit $rc)" "$out"; fi
    check "a.fvd holds 0x77 and 0x78 (fvd io read -P)" fvd io -c 'read -P 0x77 0 1M' -c 'read -P 0x78 1M 1M' a.fvd
}
