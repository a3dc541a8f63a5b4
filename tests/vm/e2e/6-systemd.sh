# tests/vm/e2e/6-systemd.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: systemd fvd@.service: start only when the device works, StatusText, clean stop, bad image
# timeout: 900
#
# Needs systemd as PID 1 (the --systemd guest boot); skipped otherwise.  `make install` (PREFIX
# /usr/local: CLI + unit), /var/lib/fvd/test.fvd created with the installed `fvd`.  `systemctl
# start fvd@test` returns 0 and right after it the new /dev/ublkbN has the image's size and reads;
# StatusText shows figures; data written with dd; while fio verify writes, `systemctl restart`
# hands the device to a new server (same node, "recovered device N") and a SIGKILL of the server
# is recovered by Restart=on-failure, fio ends with 0 errors; fvd@exp (Restart=no, RECOVERY_WAIT=5)
# killed: fvd-expire@exp deletes its device and the held read fails; `systemctl stop` returns 0, the device is gone,
# the unit is inactive (not failed), `fvd check` exits 0 and `fvd io read -P` finds the data.
# ext4 round: fvd@test started again, ext4 on its device, mounted, fio verify writing a file in it,
# the server SIGKILLed three times with nothing but Restart=on-failure to bring it back: each time
# a restarted server recovers the same device, the mount stays, fio ends with 0 errors, e2fsck -f
# clean after umount, `fvd check` clean.
# Pinned node: `make install INSTALL_NODE=` with a node outside PATH, fvd@test's server runs it
# (/proc/MAINPID/exe) and its device reads; the default install is put back.
# fvd@bad (an image with a corrupted magic) fails to start (`systemctl start` non-zero), its log
# has the one-line error, and no device is left behind.
# The lock-down (sandbox_checks): `systemd-analyze security` rates the installed unit at most 4.0
# and LimitCORE is 0; fvd@enc serves an encrypted image whose key comes as a credential
# (LoadCredential=key:... in a drop-in), data written through the device reads back with the key and
# is not in the file in the clear, the key is not in the journal; fvd@out (IMAGE= in /srv) fails
# with a one-line hint naming ReadWritePaths=, and starts once a drop-in adds it.

# new_ublkb BEFORE: the first /dev/ublkbN present now that BEFORE (an earlier ublk_nodes) lacked.
new_ublkb() { comm -13 <(tr ' ' '\n' <<< "$1" | sort) <(ublk_nodes | tr ' ' '\n' | sort) | grep -m1 '^/dev/ublkb' || true; }

# recoveries ID: how many "recovered device ID" lines fvd@test's journal holds.
recoveries() { journalctl -u fvd@test -o cat --no-pager 2>/dev/null | grep -c "recovered device $1" || true; }

# kill_until_recovered ID WANT TENTHS: SIGKILL fvd@test's server, then wait up to TENTHS × 0.1 s
# for systemd to run another one (active, a new MainPID) and the journal to count WANT
# recoveries of device ID; 0 when all that happened.
kill_until_recovered() {
    local id=$1 want=$2 tenths=$3 mainpid i
    mainpid=$(systemctl show -p MainPID --value fvd@test)
    kill -KILL "$mainpid"
    for ((i = 0; i < tenths; i++)); do
        [[ $(systemctl show -p MainPID --value fvd@test) != "$mainpid" && $(systemctl show -p ActiveState --value fvd@test) == active ]] \
            && (($(recoveries "$id") >= want)) && return 0
        sleep 0.1
    done
    return 1
}

# start_unit INSTANCE LABEL: systemctl start fvd@INSTANCE; UNIT_DEV = the /dev/ublkbN it added
# ('' if none); an ok line when the start returned 0 with a new device, else not ok with its log.
start_unit() {
    local inst=$1 label=$2 before rc=0 out
    before=$(ublk_nodes)
    out=$(t systemctl start "fvd@$inst" 2>&1) || rc=$?
    UNIT_DEV=$(new_ublkb "$before")
    if ((rc == 0)) && [[ -n $UNIT_DEV ]]; then ok "systemctl start fvd@$inst ($label) returns 0: $UNIT_DEV"
    else not_ok "systemctl start fvd@$inst ($label) failed (exit $rc, device '${UNIT_DEV:-none}')" "$out"$'\n'"$(journalctl -u "fvd@$inst" -o cat --no-pager -n 20 2>&1)"; fi
}

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
    dev=$(new_ublkb "$before")
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

    # systemctl restart keeps the device: the server hands it over (ExecStop: fvd stop --handoff
    # during a restart job) and the new one recovers it, while fio verify writes to it.
    local devno fio_pid mainpid
    devno=$(stat -c %t:%T "$dev")
    mainpid=$(systemctl show -p MainPID --value fvd@test)
    timeout -k 5 300 fio --name=restart --filename="$dev" --offset=$((64 * M)) --size=48M --rw=randwrite --bs=4k-64k \
        --ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1 --randrepeat=1 \
        --thinktime=250ms --thinktime_blocks=4 > fio-restart.log 2>&1 &
    fio_pid=$!
    sleep 3
    rc=0; out=$(t systemctl restart fvd@test 2>&1) || rc=$?
    expect "systemctl restart fvd@test (fio verify running) returns 0" "$rc" 0 "$out"$'\n'"$(journalctl -u fvd@test -o cat --no-pager -n 20 2>&1)"
    expect "after restart: the same device node (major:minor)" "$(stat -c %t:%T "$dev" 2>&1)" "$devno"
    if [[ $(systemctl show -p MainPID --value fvd@test) != "$mainpid" ]] && (($(recoveries "$id") >= 1)); then
        ok "after restart: a new server recovered device $id"
    else not_ok "after restart: no new server recovered device $id" "$(journalctl -u fvd@test -o cat --no-pager -n 30 2>&1)"; fi
    kill -0 "$fio_pid" 2>/dev/null && ok "fio was still running when the restart returned" || not_ok "fio ended before the restart returned" "$(cat fio-restart.log)"
    # A crash: SIGKILL to the server; Restart=on-failure starts one that recovers the device.
    sleep 2
    kill -0 "$fio_pid" 2>/dev/null && ok "fio still running before the SIGKILL" || not_ok "fio ended before the SIGKILL" "$(cat fio-restart.log)"
    kill_until_recovered "$id" 2 600 || true
    expect "after SIGKILL: systemd restarted fvd@test (active)" "$(systemctl show -p ActiveState --value fvd@test)" active "$(journalctl -u fvd@test -o cat --no-pager -n 20 2>&1)"
    if (($(recoveries "$id") >= 2)); then ok "after SIGKILL: Restart=on-failure recovered device $id"
    else not_ok "after SIGKILL: no second 'recovered device $id' in the journal" "$(journalctl -u fvd@test -o cat --no-pager -n 30 2>&1)"; fi
    expect "after SIGKILL: the same device node (major:minor)" "$(stat -c %t:%T "$dev" 2>&1)" "$devno"
    fio_verified "across systemctl restart and a crash" "$fio_pid" fio-restart.log

    rc=0; out=$(t systemctl stop fvd@test 2>&1) || rc=$?
    expect "systemctl stop fvd@test returns 0" "$rc" 0 "$out"
    if device_gone "$id" 10; then ok "after stop: $dev (and ublkc$id) deleted"
    else not_ok "after stop: $dev still there" "$(ublk_nodes)"; fi
    expect "after stop: fvd@test inactive (not failed)" "$(systemctl show -p ActiveState --value fvd@test)" inactive \
        "$(journalctl -u fvd@test -o cat --no-pager -n 20 2>&1)"
    echo "# fvd@test log: $(journalctl -u fvd@test -o cat --no-pager 2>/dev/null | grep -E '^fvd' | tail -n 3 | tr '\n' '|')"
    check "fvd check $img exits 0" fvd check "$img"
    check "fvd io read -P 0x6b 1M 4M: the data is in the image" fvd io -c 'read -P 0x6b 1M 4M' -c 'read -P 0 0 1M' "$img"

    ext4_kills "$img"
    pinned_node_round "$img"

    # A unit that gives up (here Restart=no) after its server died: fvd-expire@exp deletes the
    # waiting device RECOVERY_WAIT (5) seconds later, its held I/O fails, nothing hangs.
    local eimg=/var/lib/fvd/exp.fvd edev eid dd_pid
    rm -f "$eimg"
    must "fvd create $eimg 64M" fvd create "$eimg" 64M
    mkdir -p /etc/fvd /etc/systemd/system/fvd@exp.service.d
    printf 'RECOVERY_WAIT=5\n' > /etc/fvd/exp.conf
    printf '[Service]\nRestart=no\n' > /etc/systemd/system/fvd@exp.service.d/norestart.conf
    check "systemctl daemon-reload (fvd@exp: Restart=no)" t systemctl daemon-reload
    start_unit exp "Restart=no, RECOVERY_WAIT=5"
    edev=$UNIT_DEV
    if [[ -n $edev ]]; then
        eid=${edev#/dev/ublkb}
        kill -KILL "$(systemctl show -p MainPID --value fvd@exp)"
        sleep 1
        timeout -k 5 120 dd if="$edev" of=/dev/null bs=4k count=1 iflag=direct status=none 2> dd-exp.err &
        dd_pid=$!
        if device_gone "$eid" 40; then ok "fvd@exp gave up: fvd-expire@exp deleted $edev"
        else not_ok "fvd@exp gave up: $edev still there after 40 s" "$(journalctl -u fvd-expire@exp -o cat --no-pager 2>&1; fvd list 2>&1)"; fi
        wait_pid "$dd_pid" 20
        if [[ $WAIT_RC != timeout && $WAIT_RC != 0 ]]; then ok "the read held on the waiting device failed (dd exit $WAIT_RC)"
        else not_ok "the held read did not fail (dd: $WAIT_RC)" "$(cat dd-exp.err)"; kill -KILL "$dd_pid" 2>/dev/null || true; fi
        if journalctl -u fvd-expire@exp -o cat --no-pager 2>/dev/null | grep -q "deleted: no server took it over"; then ok "fvd-expire@exp logged the deletion"
        else not_ok "no deletion line in fvd-expire@exp's journal" "$(journalctl -u fvd-expire@exp -o cat --no-pager 2>&1)"; fi
    fi
    rm -rf /etc/systemd/system/fvd@exp.service.d /etc/fvd/exp.conf
    t systemctl daemon-reload > /dev/null 2>&1 || true
    t systemctl reset-failed fvd@exp > /dev/null 2>&1 || true

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

    sandbox_checks
}

# ext4_kills IMG: issue 12's test 2 — ext4 mounted on fvd@test's device, fio verify writing a file
# in it, the server SIGKILLed three times and nothing else: Restart=on-failure alone brings back a
# server that recovers the same device each time; the mount stays, fio ends with 0 errors, and
# e2fsck -f is clean after umount.
ext4_kills() {
    local img=$1 before dev id devno out rc fio_pid k i n0 src
    before=$(ublk_nodes)
    rc=0; out=$(t systemctl start fvd@test 2>&1) || rc=$?
    expect "ext4 round: systemctl start fvd@test returns 0" "$rc" 0 "$out"
    dev=$(new_ublkb "$before")
    [[ -n $dev ]] || { not_ok "ext4 round: no new /dev/ublkb* after the start" "$(ublk_nodes)"; return 0; }
    id=${dev#/dev/ublkb}
    devno=$(stat -c %t:%T "$dev")
    must "ext4 round: mkfs.ext4 on $dev" t mkfs.ext4 -q -F "$dev"
    mkdir -p m
    must "ext4 round: mount" t mount -t ext4 "$dev" m
    timeout -k 5 600 fio --name=ext4-systemd --filename=m/fio.bin --size=48M --rw=randwrite --bs=4k-64k \
        --ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1 --randrepeat=1 \
        --thinktime=250ms --thinktime_blocks=2 > fio-ext4.log 2>&1 &
    fio_pid=$!
    # The kills must hit the random writes, not the file's creation.
    for ((i = 0; i < 600; i++)); do [[ -e m/fio.bin ]] && break; sleep 0.1; done
    n0=$(recoveries "$id")
    for ((k = 1; k <= 3; k++)); do
        sleep 3
        kill -0 "$fio_pid" 2>/dev/null && ok "ext4 round: fio still running before kill $k" || not_ok "ext4 round: fio ended before kill $k" "$(cat fio-ext4.log)"
        if kill_until_recovered "$id" $((n0 + k)) 900; then ok "ext4 kill $k: Restart=on-failure alone brought back a server that recovered device $id"
        else not_ok "ext4 kill $k: no recovery of device $id by a restarted server within 90 s" "$(journalctl -u fvd@test -o cat --no-pager -n 30 2>&1)"; fi
        expect "ext4 kill $k: the same device node (major:minor)" "$(stat -c %t:%T "$dev" 2>&1)" "$devno"
        src=$(awk -v m="$D/m" '$2 == m { print $1 }' /proc/mounts)
        expect "ext4 kill $k: the mount stays on $dev" "$src" "$dev" "$(cat /proc/mounts)"
    done
    fio_verified "ext4 under systemd, across 3 kills" "$fio_pid" fio-ext4.log
    ensure "ext4 round: umount" t umount m || { umount -l m || true; }
    check "ext4 round: e2fsck -f -n clean after the kills" t e2fsck -f -n "$dev"
    rc=0; out=$(t systemctl stop fvd@test 2>&1) || rc=$?
    expect "ext4 round: systemctl stop fvd@test returns 0" "$rc" 0 "$out"
    check "ext4 round: fvd check $img exits 0" fvd check "$img"
}

# pinned_node_round IMG: `make install INSTALL_NODE=` with a node that is not on PATH (a copy of the
# guest's node under /opt): bin/fvd becomes a script, fvd@test's server runs that node
# (/proc/MAINPID/exe, through the wrapper's exec and the unit's sandbox) and its device reads; then
# the default install (bin/fvd a symlink, #!/usr/bin/env node) is put back.
pinned_node_round() {
    local img=$1 pinned=/opt/fvd-e2e-node/node pid rc out
    mkdir -p /opt/fvd-e2e-node
    cp "$(readlink -f "$(command -v node)")" "$pinned"
    check "make install INSTALL_NODE=$pinned" t make -s -C "$REPO" -o build -o deps install PREFIX=/usr/local INSTALL_NODE="$pinned"
    if [[ -f /usr/local/bin/fvd && ! -L /usr/local/bin/fvd ]]; then ok "INSTALL_NODE: /usr/local/bin/fvd is a script, not the symlink"
    else not_ok "INSTALL_NODE: /usr/local/bin/fvd is not a script" "$(ls -l /usr/local/bin/fvd 2>&1)"; fi
    check "systemctl daemon-reload (pinned node)" t systemctl daemon-reload
    start_unit test "installed with INSTALL_NODE=$pinned"
    if [[ -n $UNIT_DEV ]]; then
        pid=$(systemctl show -p MainPID --value fvd@test)
        expect "fvd@test's server runs the pinned node (/proc/$pid/exe)" "$(readlink "/proc/$pid/exe" 2>&1)" "$pinned"
        check "pinned node: a 1 MiB O_DIRECT read of $UNIT_DEV" t dd if="$UNIT_DEV" of=/dev/null bs=64k count=16 iflag=direct status=none
        rc=0; out=$(t systemctl stop fvd@test 2>&1) || rc=$?
        expect "pinned node: systemctl stop fvd@test returns 0" "$rc" 0 "$out"
    fi
    check "make install (default again: bin/fvd the symlink)" t make -s -C "$REPO" -o build -o deps install PREFIX=/usr/local
    check "systemctl daemon-reload" t systemctl daemon-reload
    rm -rf /opt/fvd-e2e-node
}

# The locked-down unit (systemd/fvd@.service): its exposure score as systemd rates the installed
# unit, an encrypted image served with its key as a systemd credential (LoadCredential=), and an
# image outside /var/lib/fvd (read-only to the service) refused with a hint, then served once a
# drop-in allows its directory.
sandbox_checks() {
    local score out rc dev before key=/etc/fvd/enc.key enc=/var/lib/fvd/enc.fvd M=$((1024 * 1024))
    out=$(systemd-analyze security --no-pager fvd@test.service 2>&1 || true)
    score=$(sed -n 's/.*Overall exposure level for fvd@test.service: \([0-9.]*\).*/\1/p' <<< "$out")
    if [[ -n $score ]] && awk -v s="$score" 'BEGIN { exit !(s <= 4.0) }'; then
        ok "systemd-analyze security fvd@test.service: exposure $score (at most 4.0, OK)"
    else not_ok "systemd-analyze security fvd@test.service: exposure '${score:-?}', want at most 4.0" "$(tail -n 25 <<< "$out")"; fi
    expect "fvd@test: LimitCORE=0 (no core dumps of a process holding keys)" "$(systemctl show -p LimitCORE --value fvd@test)" 0

    # --- an encrypted image, its key a credential ---
    mkdir -p /etc/fvd
    (umask 077; head -c 32 /dev/urandom > "$key")
    rm -f "$enc"
    must "fvd create --encrypt $enc 64M" fvd create --encrypt --key-file "$key" "$enc" 64M
    mkdir -p /etc/systemd/system/fvd@enc.service.d
    printf '[Service]\nLoadCredential=key:%s\n' "$key" > /etc/systemd/system/fvd@enc.service.d/key.conf
    check "systemctl daemon-reload (fvd@enc drop-in: LoadCredential=key:$key)" t systemctl daemon-reload
    start_unit enc "key from the credential"
    dev=$UNIT_DEV
    if [[ -n $dev ]]; then
        pattern_file 5e.bin $((2 * M)) 0x5e
        check "fvd@enc: dd 2 MiB of 0x5e at 3 MiB (O_DIRECT, fsync)" write_dev "$dev" $((3 * M)) 5e.bin
        check_dev_equals "fvd@enc: the device reads the data back" "$dev" $((3 * M)) 5e.bin
    fi
    rc=0; out=$(t systemctl stop fvd@enc 2>&1) || rc=$?
    expect "systemctl stop fvd@enc returns 0" "$rc" 0 "$out"
    check "fvd@enc: the data is in the image (fvd io --key-file, read -P 0x5e)" fvd io --key-file "$key" -c 'read -P 0x5e 3M 2M' "$enc"
    expect "fvd@enc: 0x5e is not in the image file in the clear" "$(head -c $((64 * M)) "$enc" | grep -c -a -F "$(head -c 64 5e.bin)" || true)" 0
    out=$(journalctl -u fvd@enc -o cat --no-pager 2>&1 || true)
    if grep -q -a -F "$(od -An -tx1 "$key" | tr -d ' \n' | head -c 16)" <<< "$out"; then not_ok "fvd@enc: the key (hex) appears in the journal"
    else ok "fvd@enc: the key does not appear in the journal (hex)"; fi

    # --- an image outside /var/lib/fvd: read-only to the service until a drop-in allows it ---
    mkdir -p /srv/fvd-e2e
    rm -f /srv/fvd-e2e/out.fvd
    must "fvd create /srv/fvd-e2e/out.fvd 32M" fvd create /srv/fvd-e2e/out.fvd 32M
    printf 'IMAGE=/srv/fvd-e2e/out.fvd\n' > /etc/fvd/out.conf
    before=$(ublk_nodes)
    rc=0; out=$(t systemctl start fvd@out 2>&1) || rc=$?
    if ((rc != 0 && rc != 124)); then ok "systemctl start fvd@out (image in /srv, not allowed) fails (exit $rc)"
    else not_ok "systemctl start fvd@out (image in /srv) exit $rc: the service could write outside /var/lib/fvd" "$out"; fi
    out=$(journalctl -u fvd@out -o cat --no-pager 2>&1 | grep '^fvd serve' | head -n 1 || true)
    if [[ $out == *'ReadWritePaths=/srv/fvd-e2e'* ]]; then ok "fvd@out: the journal says what to add: $out"
    else not_ok "fvd@out: no 'ReadWritePaths=/srv/fvd-e2e' hint in the journal" "$(journalctl -u fvd@out -o cat --no-pager -n 20 2>&1)"; fi
    expect "fvd@out: no device left behind" "$(ublk_nodes)" "$before"
    t systemctl stop fvd@out > /dev/null 2>&1 || true
    t systemctl reset-failed fvd@out > /dev/null 2>&1 || true
    mkdir -p /etc/systemd/system/fvd@out.service.d
    printf '[Service]\nReadWritePaths=/srv/fvd-e2e\n' > /etc/systemd/system/fvd@out.service.d/rw.conf
    check "systemctl daemon-reload (fvd@out drop-in: ReadWritePaths=/srv/fvd-e2e)" t systemctl daemon-reload
    rc=0; out=$(t systemctl start fvd@out 2>&1) || rc=$?
    expect "systemctl start fvd@out with the drop-in returns 0" "$rc" 0 "$out"$'\n'"$(journalctl -u fvd@out -o cat --no-pager -n 20 2>&1)"
    rc=0; out=$(t systemctl stop fvd@out 2>&1) || rc=$?
    expect "systemctl stop fvd@out returns 0" "$rc" 0 "$out"
    check "fvd check /srv/fvd-e2e/out.fvd exits 0" fvd check /srv/fvd-e2e/out.fvd
}
