# tests/vm/e2e/6-systemd.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: systemd fvd@.service: start only when the device works, StatusText, clean stop, bad image
# timeout: 420
#
# Needs systemd as PID 1 (the --systemd guest boot); skipped otherwise.  `make install` (PREFIX
# /usr/local: CLI + unit), /var/lib/fvd/test.fvd created with the installed `fvd`.  `systemctl
# start fvd@test` returns 0 and right after it the new /dev/ublkbN has the image's size and reads;
# StatusText shows figures; data written with dd; `systemctl stop` returns 0, the device is gone,
# the unit is inactive (not failed), `fvd check` exits 0 and `fvd io read -P` finds the data.
# fvd@bad (an image with a corrupted magic) fails to start (`systemctl start` non-zero), its log
# has the one-line error, and no device is left behind.

scenario() {
    if [[ $(readlink /proc/1/exe 2>/dev/null) != */systemd ]]; then
        skip "PID 1 is not systemd (run it in the --systemd guest boot)"
        return 0
    fi
    local M=$((1024 * 1024)) st img=/var/lib/fvd/test.fvd before dev id out rc
    st=$(timeout 120 systemctl is-system-running --wait 2>&1 || true)
    echo "# systemctl is-system-running: $st"

    if make -s -C "$REPO" -n -o build install PREFIX=/usr/local 2>/dev/null | grep -q 'fvd@.service'; then
        check "make install (PREFIX=/usr/local, build not redone)" \
            t make -s -C "$REPO" -o build -o deps install PREFIX=/usr/local
    else
        echo "# make install does not install the unit yet: installing by hand"
        check "install by hand (unit to /etc/systemd/system, /usr/local/bin/fvd symlink)" bash -c "
            install -m 0644 '$REPO/systemd/fvd@.service' /etc/systemd/system/fvd@.service &&
            chmod +x '$REPO/build/daemon/cli.js' && ln -sf '$REPO/build/daemon/cli.js' /usr/local/bin/fvd"
    fi
    check "systemctl daemon-reload" t systemctl daemon-reload
    check "systemctl cat fvd@test finds the unit" t systemctl cat fvd@test.service
    # shellcheck disable=SC2034  # used by fvd() in lib.sh
    local FVD=(/usr/local/bin/fvd)
    mkdir -p /var/lib/fvd
    rm -f "$img" /var/lib/fvd/bad.fvd
    must "fvd create $img 128M (installed fvd)" fvd create "$img" 128M

    before=$(ublk_nodes)
    rc=0; out=$(t systemctl start fvd@test 2>&1) || rc=$?
    # Right after `systemctl start` returned: the device must work, no waiting.
    dev=$(comm -13 <(tr ' ' '\n' <<< "$before" | sort) <(ublk_nodes | tr ' ' '\n' | sort) | grep -m1 '^/dev/ublkb' || true)
    local size_now read_rc=0
    size_now=$( [[ -n $dev ]] && t blockdev --getsize64 "$dev" 2>&1 || echo "no new /dev/ublkb*")
    [[ -n $dev ]] && { t dd if="$dev" of=/dev/null bs=64k count=16 iflag=direct status=none 2>dd.err || read_rc=$?; }
    if ((rc == 0)); then ok "systemctl start fvd@test returns 0"
    else not_ok "systemctl start fvd@test failed (exit $rc)" "$out"$'\n'"$(journalctl -u fvd@test -o cat --no-pager -n 20 2>&1)"; exit 1; fi
    expect "right after start: blockdev --getsize64 $dev = 128 MiB" "$size_now" $((128 * M))
    if [[ -n $dev ]] && ((read_rc == 0)); then ok "right after start: a 1 MiB O_DIRECT read of $dev succeeds"
    else not_ok "right after start: reading ${dev:-(no device)} failed" "$(cat dd.err 2>/dev/null)"; fi
    [[ -n $dev ]] || exit 1
    id=${dev#/dev/ublkb}
    expect "fvd@test is active" "$(systemctl show -p ActiveState --value fvd@test)" active

    pattern_file 6b.bin $((4 * M)) 0x6b
    check "dd 4 MiB of 0x6b at 1 MiB (O_DIRECT, fsync)" write_dev "$dev" $M 6b.bin
    # STATUS= is refreshed every 5 s: wait for figures that include our I/O.
    local status i
    for ((i = 0; i < 150; i++)); do
        status=$(systemctl show -p StatusText --value fvd@test)
        [[ $status =~ ([0-9]+)\ requests && ${BASH_REMATCH[1]} -gt 0 ]] && break
        sleep 0.1
    done
    if [[ $status =~ ^serving\ $dev\ .*[0-9]+\ requests ]]; then ok "StatusText has figures: '$status'"
    else not_ok "StatusText without figures (or no requests counted within 15 s): '$status'" \
        "$(systemctl status --no-pager fvd@test 2>&1)"; fi

    rc=0; out=$(t systemctl stop fvd@test 2>&1) || rc=$?
    expect "systemctl stop fvd@test returns 0" "$rc" 0 "$out"
    if device_gone "$id" 10; then ok "after stop: $dev (and ublkc$id) deleted"
    else not_ok "after stop: $dev still there" "$(ublk_nodes)"; fi
    expect "after stop: fvd@test inactive (not failed)" "$(systemctl show -p ActiveState --value fvd@test)" inactive \
        "$(journalctl -u fvd@test -o cat --no-pager -n 20 2>&1)"
    echo "# fvd@test log: $(journalctl -u fvd@test -o cat --no-pager 2>/dev/null | grep -E '^fvd' | tail -n 3 | tr '\n' '|')"
    check "fvd check $img exits 0" fvd check "$img"
    check "fvd io read -P 0x6b 1M 4M: the data is in the image" fvd io -c 'read -P 0x6b 1M 4M' -c 'read -P 0 0 1M' "$img"

    # A bad image: the start must fail and leave nothing behind.
    cp "$img" /var/lib/fvd/bad.fvd
    printf 'NOTFVD!!' | dd of=/var/lib/fvd/bad.fvd conv=notrunc status=none
    before=$(ublk_nodes)
    rc=0; out=$(t systemctl start fvd@bad 2>&1) || rc=$?
    if ((rc != 0 && rc != 124)); then ok "systemctl start fvd@bad (corrupted magic) fails (exit $rc)"
    else not_ok "systemctl start fvd@bad (corrupted magic) exit $rc" "$out"; fi
    expect "fvd@bad: no device left behind" "$(ublk_nodes)" "$before"
    out=$(journalctl -u fvd@bad -o cat --no-pager 2>&1 | grep '^fvd serve' | head -n 1 || true)
    if [[ -n $out ]]; then ok "fvd@bad: the journal has the error: $out"
    else not_ok "fvd@bad: no 'fvd serve: ...' error line in the journal" "$(journalctl -u fvd@bad -o cat --no-pager 2>&1)"; fi
    t systemctl stop fvd@bad > /dev/null 2>&1 || true
    t systemctl reset-failed fvd@bad > /dev/null 2>&1 || true
    expect "fvd@bad: still no device after its restart attempts are stopped" "$(ublk_nodes)" "$before"
    if [[ -z ${FVD_IN_VM:-} ]]; then rm -f "$img" /var/lib/fvd/bad.fvd; fi
}
