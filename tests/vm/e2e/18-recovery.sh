# tests/vm/e2e/18-recovery.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: ublk user recovery: SIGKILL under fio verify, re-serve takes the same device over, 0 errors
# timeout: 2100
#
# a) fio verify (crc32c, libaio, O_DIRECT, slowed by thinktime, which unlike --rate does not
#    catch up after a stall, so both kills land mid-run) on the raw
#    device of a raw-like image over a base and (E2E_LONG=1) of a compact image, served with
#    --recovery-wait 60.
#    The daemon is SIGKILLed twice during the run; each time the device stays (same major:minor),
#    `fvd serve` of the same image recovers it ("recovered device N"), fio ends 0 with 0 errors and
#    its verify passes; after a clean stop and a fresh serve `fio --verify_only` passes again and
#    `fvd check` is clean.
# b) an acknowledged O_DIRECT write that was never flushed (no fsync), then SIGKILL: after the
#    recovery the data reads back (its records came from the pending log), and again after a clean
#    stop and a fresh serve.
# f) the issue's test 1: ext4 on the device of a compact image (--recovery-wait 60), mounted, fio
#    verify (crc32c, libaio, O_DIRECT, thinktime) random writes to a 64 MiB file in it; the daemon
#    is SIGKILLed three times during the run and served again each time: the device stays (same
#    major:minor), the mount stays on it, fio ends 0 with 0 errors and its verify passes;
#    `fio --verify_only` passes again, and after umount `e2fsck -f -n` and `fvd check` are clean.
# a') the same with an encrypted compact image over a base (--key-file on every serve; like a) on
#    a compact image, only with E2E_LONG=1) and with a
#    compact image whose every chunk is shared with snapshot s1 (each first write copies it):
#    after one kill each and a clean stop `fvd check` is clean, and `snapshot -a s1` reads the data
#    s1 was taken with, untouched by the recovered writes.
# c) a server killed in the middle of its recovery (after START_USER_RECOVERY, before the tags are
#    fetched; held there by the test hook FVD_TEST_RECOVERY_PAUSE_MS): the device stays, a third
#    server completes the recovery, fio under it ends with 0 errors. On 6.12 that server's
#    START_USER_RECOVERY is refused (EINVAL) and it continues the interrupted recovery; on 7.x
#    the START is accepted; the log must name one of the two.
# h) (E2E_LONG=1 only) the failure branches of a continued recovery (DESIGN.md §7, "An
#    interrupted recovery"), on
#    one compact image served with --recovery-wait 600 (no warden expires it meanwhile):
#    h1) a server killed inside its recovery, then /dev/ublkcN held open by this shell: the next
#    serve fails within 90 s, exit non-zero, last stderr line the one error (6.12: "/dev/ublkcN is
#    still held (EBUSY)" from the continued recovery; 7.x: START_USER_RECOVERY still refused
#    (EBUSY) after 10 s); the device keeps waiting (/dev/ublkbN, /sys/block, `fvd list` "waiting
#    for a daemon"); released, a plain serve recovers it and the data reads back.
#    h2) a server killed with its descriptors mapped and no tag fetched (FVD_TEST_FAULT=
#    pause-after-map): on 6.12 the next serve fails in one line naming the mmap's EINVAL, the
#    device is deleted (nodes, sysfs, state file gone), a read held on it fails with EIO, and a
#    plain serve adds a fresh device with the data; on 7.x it recovers the device, the held read
#    completes.
#    h3) 6.12 only (skipped where START is accepted): a continued recovery whose END_USER_RECOVERY
#    never completes (FVD_TEST_FAULT=fetch-short leaves one tag unfetched) fails after its 30 s
#    limit in one line, within 120 s (no hang), the device deleted, the held read fails, a plain
#    serve adds a fresh device with the data; `fvd check` clean at the end.
# e) live restart: fio verify on a raw-like image over a base while the device is handed to a new
#    server three times, twice by `fvd serve --takeover` and once by `fvd stop --handoff` and a
#    plain re-serve: the old server exits 0 leaving the device, the same /dev/ublkbN is recovered
#    each time, fio ends with 0 errors and its verify passes; SIGHUP to a server without
#    --recovery-wait is ignored (it keeps serving) and `fvd stop --handoff` of it is refused.
# d) a device whose server does not come back. With --recovery-wait 5 and no re-serve, the warden
#    deletes it about 5 s after the SIGKILL: the held read fails with EIO, the state file goes,
#    the image checks clean and a fresh serve works. A re-serve before the deadline wins: the
#    device lives on past it and the old warden leaves it alone. With --recovery-wait 60, `fvd
#    list` says "waiting for a daemon" with the seconds left, `fvd stop` deletes the waiting
#    device, I/O held on it fails promptly with EIO, and nothing hangs.
# g) a waiting device deleted while its pending log holds acknowledged, unflushed writes: `fvd
#    stop` says how many records wait in the log and that the next serve applies them, an offline
#    resize refuses (image unchanged), the next serve applies them and the data reads back.
# i) a recovery that keeps the device's smaller geometry: served with --max-io 64k, SIGKILLed,
#    served again with the default 512k: the log says the device keeps its geometry (max I/O
#    65536) and it is recovered; then 1 MiB O_DIRECT writes (sixteen 64 KiB requests at once, on
#    many tags) into blocks still only in the base — copy-on-write, the engine's slow path, which
#    slices each tag's part of the request buffers by the recovered max I/O — read back equal,
#    the base elsewhere too, and again after a clean stop and a fresh serve; `fvd check` clean.

RW=60

# kill_and_recover IMG ID LABEL: SIGKILL the current daemon, check the device stays, re-serve.
kill_and_recover() {
    local img=$1 id=$2 label=$3 dead=$SERVE_PID devno
    devno=$(stat -c %t:%T "/dev/ublkb$id")
    echo "# SIGKILL to the daemon (pid $dead) [$label]"
    kill -KILL "$dead"
    wait_pid "$dead" 30
    expect "$label: daemon killed by SIGKILL" "$WAIT_RC" 137
    sleep 1
    if [[ -b /dev/ublkb$id ]]; then ok "$label: /dev/ublkb$id stays while no server runs"
    else not_ok "$label: /dev/ublkb$id disappeared with its server" "$(ublk_nodes)"; fi
    serve_must "$img" --recovery-wait $RW "${ROUND_OPTS[@]}"
    expect "$label: the new serve took over the same device" "$SERVE_DEV" "/dev/ublkb$id"
    if grep -q "recovered device $id" "$SERVE_LOG"; then ok "$label: log says recovered ($(grep -o 'recovered device.*' "$SERVE_LOG"))"
    else not_ok "$label: no 'recovered device $id' in the serve log" "$(cat "$SERVE_LOG")"; fi
    expect "$label: same major:minor" "$(stat -c %t:%T "/dev/ublkb$id")" "$devno"
}

# fio_job DEV NAME [extra fio options]: the verify job (same parameters for --verify_only). The
# thinktime stretches the write phase to about 36 s of pauses (48 MiB in ~34 KiB writes, 100 ms
# after every 4); half of that (50 ms) let fio end before the second kill on 7.3 under TCG.
fio_job() {
    local dev=$1 name=$2
    shift 2
    fio --name="$name" --filename="$dev" --size=48M --rw=randwrite --bs=4k-64k --ioengine=libaio --direct=1 \
        --iodepth=16 --verify=crc32c --verify_fatal=1 --randrepeat=1 --thinktime=100ms --thinktime_blocks=4 "$@"
}

# fio_round LAYOUT [KILLS]: fio verify on a fresh image of LAYOUT, KILLS (default 2) SIGKILLs.
fio_round() {
    local layout=$1 kills=${2:-2} img=$D/r-$1.fvd id fio_pid base=$D/base.raw k
    ROUND_OPTS=()
    case $layout in
    raw)
        [[ -f $base ]] || random_file "$base" 64
        must "fvd create (raw-like over a raw base)" fvd create -b "$base" -F raw "$img" 64M ;;
    compact)
        must "fvd create --layout compact" fvd create --layout compact "$img" 64M ;;
    encrypted)
        [[ -f $base ]] || random_file "$base" 64
        (umask 077; head -c 32 /dev/urandom > "$D/r.key")
        ROUND_OPTS=(--key-file "$D/r.key")
        must "fvd create --encrypt --layout compact over a raw base" fvd create --encrypt --key-file "$D/r.key" --layout compact -b "$base" -F raw "$img" 64M ;;
    snapshots)
        # Every chunk fio writes is shared with snapshot s1: each first write copies it (engine).
        must "fvd create --layout compact" fvd create --layout compact "$img" 64M
        check "fill 64 MiB with 0x5a" fvd io -c 'write -P 0x5a 0 64M' "$img"
        check "fvd snapshot -c s1" fvd snapshot -c s1 "$img" ;;
    esac
    serve_must "$img" --recovery-wait $RW "${ROUND_OPTS[@]}"
    id=$SERVE_ID
    if grep -q "USER_RECOVERY" "$SERVE_LOG"; then ok "$layout: the device was added with USER_RECOVERY"
    else not_ok "$layout: the features line does not name USER_RECOVERY" "$(cat "$SERVE_LOG")"; fi
    timeout -k 5 600 bash -c "$(declare -f fio_job); fio_job $SERVE_DEV verify-$layout" > "fio-$layout.log" 2>&1 &
    fio_pid=$!
    for ((k = 1; k <= kills; k++)); do
        sleep 3
        kill -0 "$fio_pid" 2>/dev/null && ok "$layout: fio still running before kill $k" || not_ok "$layout: fio ended before kill $k" "$(cat "fio-$layout.log")"
        kill_and_recover "$img" "$id" "$layout kill $k"
    done
    fio_verified "$layout, across $kills kill(s)" "$fio_pid" "fio-$layout.log"
    serve_stop "$layout after the recoveries"
    serve_must "$img" "${ROUND_OPTS[@]}"
    check "$layout: fio --verify_only after a clean stop and a fresh serve" \
        t bash -c "$(declare -f fio_job); fio_job $SERVE_DEV verify-$layout --verify_only --thinktime=0"
    serve_stop "$layout verify_only"
    check "$layout: fvd check clean" fvd check "${ROUND_OPTS[@]}" "$img"
    if [[ $layout == snapshots ]]; then
        check "snapshots: fvd snapshot -a s1 after the recoveries" fvd snapshot -a s1 "$img"
        check "snapshots: s1 still reads 0x5a everywhere (no recovered write reached it)" fvd io -c 'read -P 0x5a 0 64M' "$img"
        check "snapshots: fvd check clean after the revert" fvd check "$img"
    fi
    rm -f "$img"
}

# ext4_round: fio verify on a file of a mounted ext4 across three SIGKILLs (the issue's test 1).
ext4_round() {
    local img=$D/f.fvd id fio_pid k i src
    ROUND_OPTS=()
    must "fvd create --layout compact" fvd create --layout compact "$img" 128M
    serve_must "$img" --recovery-wait $RW
    id=$SERVE_ID
    must "mkfs.ext4" t mkfs.ext4 -q -F "$SERVE_DEV"
    mkdir -p m
    must "mount ext4" t mount -t ext4 "$SERVE_DEV" m
    timeout -k 5 600 bash -c "$(declare -f fio_job); fio_job m/fio.bin verify-ext4 --size=64M --thinktime_blocks=2" > fio-ext4.log 2>&1 &
    fio_pid=$!
    # the kills must hit the random writes, not the file's creation
    for ((i = 0; i < 600; i++)); do [[ -e m/fio.bin ]] && break; sleep 0.1; done
    for ((k = 1; k <= 3; k++)); do
        sleep 3
        kill -0 "$fio_pid" 2>/dev/null && ok "ext4: fio still running before kill $k" || not_ok "ext4: fio ended before kill $k" "$(cat fio-ext4.log)"
        kill_and_recover "$img" "$id" "ext4 kill $k"
        src=$(awk -v m="$D/m" '$2 == m { print $1 }' /proc/mounts)
        expect "ext4 kill $k: the mount stays on /dev/ublkb$id" "$src" "/dev/ublkb$id" "$(cat /proc/mounts)"
    done
    fio_verified "ext4, across 3 kills" "$fio_pid" fio-ext4.log
    check "ext4: fio --verify_only of the file after the kills" \
        t bash -c "$(declare -f fio_job); fio_job m/fio.bin verify-ext4 --size=64M --verify_only --thinktime=0"
    ensure "ext4: umount" t umount m || { umount -l m || true; }
    check "ext4: e2fsck -f -n clean after the kills" t e2fsck -f -n "$SERVE_DEV"
    serve_stop "ext4 after the recoveries"
    check "ext4: fvd check clean" fvd check "$img"
    rm -f "$img"
}

# Test hook: the recovering server pauses this long between START_USER_RECOVERY and fetching the
# tags (daemon/server.ts), so the test can kill it in the middle of a recovery.
recovery_kill_round() {
    local img=$D/k.fvd id fio_pid devno second
    ROUND_OPTS=()
    must "fvd create --layout compact" fvd create --layout compact "$img" 64M
    serve_must "$img" --recovery-wait $RW
    id=$SERVE_ID
    devno=$(stat -c %t:%T "/dev/ublkb$id")
    timeout -k 5 600 bash -c "$(declare -f fio_job); fio_job $SERVE_DEV verify-rk" > fio-rk.log 2>&1 &
    fio_pid=$!
    sleep 3
    kill -KILL "$SERVE_PID"
    wait_pid "$SERVE_PID" 30
    FVD_TEST_RECOVERY_PAUSE_MS=60000 "${FVD[@]}" serve "$img" --recovery-wait $RW > "$D/rk2.out" 2> "$D/rk2.err" &
    second=$!
    local i
    for ((i = 0; i < 900; i++)); do grep -q "START_USER_RECOVERY accepted" "$D/rk2.err" && break; sleep 0.1; done
    if grep -q "START_USER_RECOVERY accepted" "$D/rk2.err"; then ok "the second server is inside the recovery (START_USER_RECOVERY accepted)"
    else not_ok "the second server never reached START_USER_RECOVERY" "$(cat "$D/rk2.err")"; fi
    kill -KILL "$second" 2>/dev/null || true
    wait_pid "$second" 30
    expect "the second server, killed during its recovery" "$WAIT_RC" 137
    if [[ -b /dev/ublkb$id ]]; then ok "/dev/ublkb$id stays after a kill during recovery"; else not_ok "/dev/ublkb$id disappeared" "$(ublk_nodes)"; fi
    serve_must "$img" --recovery-wait $RW
    expect "a third server completes the recovery of the same device" "$SERVE_DEV" "/dev/ublkb$id"
    # 6.12 refuses its START_USER_RECOVERY (EINVAL) and it continues the interrupted recovery;
    # 7.x accepts it and the recovery starts again
    if grep -q "continuing that recovery" "$SERVE_LOG"; then ok "the third server continued the interrupted recovery (START_USER_RECOVERY refused on $(uname -r))"
    elif grep -q "START_USER_RECOVERY accepted" "$SERVE_LOG"; then ok "the third server started the recovery anew (START_USER_RECOVERY accepted on $(uname -r))"
    else not_ok "the third server's log names neither recovery path" "$(cat "$SERVE_LOG")"; fi
    expect "same major:minor after the interrupted recovery" "$(stat -c %t:%T "/dev/ublkb$id")" "$devno"
    fio_verified "across a kill and a kill during recovery" "$fio_pid" fio-rk.log
    serve_stop "after the interrupted recovery"
    check "kill during recovery: fvd check clean" fvd check "$img"
    rm -f "$img"
}

unflushed_round() {
    local img=$D/u.fvd id
    must "fvd create --layout compact" fvd create --layout compact "$img" 64M
    serve_must "$img" --recovery-wait $RW
    id=$SERVE_ID
    random_file u.bin 4
    check "4 MiB written with O_DIRECT, no fsync (acknowledged, not flushed)" \
        t dd if=u.bin of="$SERVE_DEV" bs=1M seek=8 oflag=direct conv=notrunc status=none
    local logs
    # this image's log (pending-DEV-INO.log): earlier rounds leave header-only logs of other images
    logs=/run/fvd/pending-$(stat -c %d-%i "$img").log
    if [[ -n $logs && $(stat -c %s "$logs") -gt 128 ]]; then ok "the pending log holds records ($(stat -c %s "$logs") bytes)"
    else not_ok "no pending log with records in /run/fvd" "$(ls -l /run/fvd 2>&1)"; fi
    kill_and_recover "$img" "$id" "unflushed"
    if grep -q "applied [0-9]* records of the previous server's pending log" "$SERVE_LOG"; then ok "the pending log was applied"
    else not_ok "no 'applied N records' in the serve log" "$(cat "$SERVE_LOG")"; fi
    check_dev_equals "the unflushed write reads back after the recovery" "$SERVE_DEV" $((8 << 20)) u.bin
    serve_stop "after the unflushed recovery"
    serve_must "$img"
    check_dev_equals "the unflushed write reads back after a clean stop and a fresh serve" "$SERVE_DEV" $((8 << 20)) u.bin
    serve_stop "fresh"
    check "fvd check clean" fvd check "$img"
    rm -f "$img"
}

# takeover IMG ID LABEL [serve options]: a new `fvd serve --takeover` of IMG recovers device ID.
takeover() {
    local img=$1 id=$2 label=$3 old=$SERVE_PID devno
    shift 3
    devno=$(stat -c %t:%T "/dev/ublkb$id")
    serve_must "$img" --takeover "$@"
    wait_pid "$old" 30
    expect "$label: the old server exits 0 after the hand-off" "$WAIT_RC" 0
    expect "$label: the new server took over the same device" "$SERVE_DEV" "/dev/ublkb$id"
    if grep -q "recovered device $id" "$SERVE_LOG"; then ok "$label: log says recovered"
    else not_ok "$label: no 'recovered device $id' in the serve log" "$(cat "$SERVE_LOG")"; fi
    expect "$label: same major:minor" "$(stat -c %t:%T "/dev/ublkb$id")" "$devno"
}

handoff_round() {
    local img=$D/h.fvd base=$D/base.raw id fio_pid old out rc oldlog quiesce
    [[ -f $base ]] || random_file "$base" 64
    must "fvd create (raw-like over a raw base)" fvd create -b "$base" -F raw "$img" 64M
    serve_must "$img" --recovery-wait $RW
    id=$SERVE_ID
    # The device asks for QUIESCE exactly when the kernel offers it (GET_FEATURES).
    quiesce=no
    grep -q "kernel features 0x[0-9a-f]* ([^)]*QUIESCE" "$SERVE_LOG" && quiesce=yes
    if [[ $quiesce == yes ]]; then
        grep -q "this device uses 0x[0-9a-f]* ([^)]*QUIESCE" "$SERVE_LOG" && ok "the kernel offers QUIESCE and the device uses it" || not_ok "the kernel offers QUIESCE but the device does not use it" "$(cat "$SERVE_LOG")"
    else
        echo "# this kernel ($(uname -r)) does not offer UBLK_F_QUIESCE: hand-offs take the reissue path"
    fi
    # Slower than the kill rounds (about 85 s of pauses; it was 145 s, while three hand-offs took
    # about 30 s under TCG): the hand-offs themselves pause fio, not its thinktime.
    timeout -k 5 600 bash -c "$(declare -f fio_job); fio_job $SERVE_DEV verify-handoff --thinktime=60ms --thinktime_blocks=1" > fio-handoff.log 2>&1 &
    fio_pid=$!
    sleep 3
    oldlog=$SERVE_LOG
    takeover "$img" "$id" "takeover 1"
    handoff_quiesced "$oldlog" "takeover 1" "$quiesce"
    sleep 3
    oldlog=$SERVE_LOG
    takeover "$img" "$id" "takeover 2 (recovery wait inherited)"
    handoff_quiesced "$oldlog" "takeover 2" "$quiesce"
    sleep 3
    kill -0 "$fio_pid" 2>/dev/null && ok "fio still running before the third hand-off" || not_ok "fio ended before the third hand-off" "$(cat fio-handoff.log)"
    old=$SERVE_PID
    rc=0; out=$(fvd stop --handoff "$id" 2>&1) || rc=$?
    expect "fvd stop --handoff $id exits 0" "$rc" 0 "$out"
    wait_pid "$old" 10
    expect "the server exits 0 after fvd stop --handoff" "$WAIT_RC" 0 "$(cat "$SERVE_LOG")"
    handoff_quiesced "$SERVE_LOG" "fvd stop --handoff" "$quiesce"
    if [[ -b /dev/ublkb$id ]]; then ok "/dev/ublkb$id stays after the hand-off"; else not_ok "/dev/ublkb$id is gone after fvd stop --handoff" "$(ublk_nodes)"; fi
    serve_must "$img" --recovery-wait $RW
    expect "a plain serve recovers the handed-over device" "$SERVE_DEV" "/dev/ublkb$id"
    fio_verified "across three hand-offs" "$fio_pid" fio-handoff.log
    serve_stop "after the hand-offs"
    check "hand-off: fvd check clean" fvd check "$img"

    # Without --recovery-wait the device cannot outlive its server: SIGHUP does nothing.
    serve_must "$img"
    kill -HUP "$SERVE_PID"
    sleep 2
    if kill -0 "$SERVE_PID" 2>/dev/null && grep -q "SIGHUP ignored" "$SERVE_LOG"; then ok "SIGHUP without --recovery-wait is ignored: the server keeps serving"
    else not_ok "SIGHUP without --recovery-wait stopped the server or said nothing" "$(cat "$SERVE_LOG")"; fi
    rc=0; out=$(fvd stop --handoff "$SERVE_ID" 2>&1) || rc=$?
    if ((rc != 0)) && [[ $out == *"without --recovery-wait"* && $(wc -l <<< "$out") -eq 1 ]]; then ok "fvd stop --handoff without --recovery-wait: one-line refusal (exit $rc)"
    else not_ok "fvd stop --handoff without --recovery-wait: exit $rc" "$out"; fi
    check "the device still answers after the refusal" t dd if="$SERVE_DEV" of=/dev/null bs=64k count=4 iflag=direct status=none
    serve_stop "no recovery"
    rm -f "$img"
}

expiry_round() {
    local img=$D/e.fvd id dd_pid dead log i list t0 t1
    must "fvd create" fvd create "$img" 64M
    serve_must "$img" --recovery-wait 5
    id=$SERVE_ID dead=$SERVE_PID log=$SERVE_LOG
    sleep 1
    if pgrep -f "__warden $dead " > /dev/null; then ok "expiry: the serve started its warden"
    else not_ok "expiry: no warden process for pid $dead" "$(ps -eo pid,args | grep -v grep | grep fvd)"; fi
    kill -KILL "$dead"
    wait_pid "$dead" 30
    t0=$(date +%s.%N)
    timeout -k 5 120 dd if="/dev/ublkb$id" of=/dev/null bs=4k count=1 iflag=direct status=none 2> dd.err &
    dd_pid=$!
    sleep 1
    kill -0 "$dd_pid" 2>/dev/null && ok "expiry: a read on the waiting device is held" || not_ok "expiry: the read did not wait" "$(cat dd.err)"
    wait_pid "$dd_pid" 60
    t1=$(date +%s.%N)
    # dd's own failure (exit 1, "Input/output error"), not timeout's 124/137.
    if [[ $WAIT_RC == 1 ]] && grep -qi 'error' dd.err; then ok "expiry: the held read failed when the device expired (dd: $(tr '\n' ' ' < dd.err))"
    else not_ok "expiry: the held read did not fail with an I/O error (dd: $WAIT_RC)" "$(cat dd.err)"; kill -KILL "$dd_pid" 2>/dev/null || true; fi
    echo "# the read was released $(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }") s after the SIGKILL (recovery-wait 5)"
    if device_gone "$id" 30; then ok "expiry: /dev/ublkb$id is gone without any command"
    else not_ok "expiry: /dev/ublkb$id still exists" "$(ublk_nodes)"; fi
    [[ ! -e /run/fvd/ublkb$id.json ]] && ok "expiry: its state file is removed" || not_ok "expiry: state file left" "$(cat /run/fvd/ublkb$id.json)"
    if grep -q "warden of /dev/ublkb$id: deleted" "$log"; then ok "expiry: one log line ($(grep -o 'warden of.*' "$log"))"
    else not_ok "expiry: no warden line in the server's log" "$(cat "$log")"; fi
    for ((i = 0; i < 50; i++)); do pgrep -f "__warden $dead " > /dev/null || break; sleep 0.1; done
    pgrep -f "__warden $dead " > /dev/null && not_ok "expiry: the warden is still running" "$(pgrep -af __warden)" || ok "expiry: the warden exited"
    check "expiry: fvd check clean" fvd check "$img"
    serve_must "$img" --recovery-wait 5
    ok "expiry: a fresh serve of the image gets a device ($SERVE_DEV)"
    serve_stop "after the expiry"
    rm -f "$img"
}

race_round() {
    # 40 s, not 5: under TCG on a loaded host a serve alone took 5–20 s to start, and a re-serve
    # that comes after the deadline rightly finds the device deleted (the 5 s round shows that
    # side); 20 s was once too short in CI.
    local img=$D/x.fvd id dead log t0 left
    must "fvd create" fvd create "$img" 64M
    serve_must "$img" --recovery-wait 40
    id=$SERVE_ID dead=$SERVE_PID log=$SERVE_LOG
    sleep 1
    kill -KILL "$dead"
    wait_pid "$dead" 30
    t0=$(date +%s)
    serve_must "$img" --recovery-wait 40
    expect "re-serve: the new serve took over the same device before the deadline" "$SERVE_DEV" "/dev/ublkb$id"
    if grep -q "recovered device $id" "$SERVE_LOG"; then ok "re-serve: it recovered the waiting device ($(grep -o 'recovered device.*' "$SERVE_LOG"), $(($(date +%s) - t0)) s after the kill)"
    else not_ok "re-serve: no 'recovered device $id' (the device had expired before it came?)" "$(cat "$SERVE_LOG" "$log")"; fi
    left=$((t0 + 43 - $(date +%s)))
    ((left > 0)) && sleep "$left"
    if [[ -b /dev/ublkb$id ]] && t dd if="/dev/ublkb$id" of=/dev/null bs=4k count=1 iflag=direct status=none; then
        ok "re-serve: past the first server's deadline the device lives and reads"
    else not_ok "re-serve: the device was expired under its new server" "$(ublk_nodes; cat "$log")"; fi
    if grep -q "warden of /dev/ublkb$id: deleted" "$log"; then not_ok "re-serve: the old warden deleted a device taken over" "$(cat "$log")"
    else ok "re-serve: the old warden left it alone ($(grep -o 'warden of.*' "$log" || echo 'no line'))"; fi
    pgrep -f "__warden $dead " > /dev/null && not_ok "re-serve: the old warden still runs" "$(pgrep -af __warden)" || ok "re-serve: the old warden exited"
    pgrep -f "__warden $SERVE_PID " > /dev/null && ok "re-serve: the new server has its own warden" || not_ok "re-serve: no warden for the new server" "$(pgrep -af __warden)"
    serve_stop "after the re-serve"
    sleep 1
    pgrep -f "__warden $SERVE_PID " > /dev/null && not_ok "re-serve: the warden outlives a clean stop" "$(pgrep -af __warden)" || ok "re-serve: a clean stop ends the warden too"
    rm -f "$img"
}

waiting_round() {
    local img=$D/w.fvd id dd_pid dead
    must "fvd create" fvd create "$img" 64M
    serve_must "$img" --recovery-wait 60
    id=$SERVE_ID dead=$SERVE_PID
    kill -KILL "$dead"
    wait_pid "$dead" 30
    sleep 1
    timeout -k 5 120 dd if=/dev/zero of="/dev/ublkb$id" bs=4k count=1 oflag=direct status=none 2> dd.err &
    dd_pid=$!
    sleep 2
    kill -0 "$dd_pid" 2>/dev/null && ok "I/O on the waiting device is held (not failed)" || not_ok "I/O on the waiting device did not wait" "$(cat dd.err)"
    # (here, not in the 5 s round: under TCG one `fvd list` can take longer than 5 s)
    local list
    list=$(fvd list 2>&1) || true
    echo "# fvd list with a waiting device: $list"
    if grep -qE "waiting for a daemon: deleted in [0-9]+ s" <<< "$list"; then ok "fvd list shows the device waiting, with the seconds left"
    else not_ok "fvd list does not show the waiting state" "$list"; fi
    list=$(fvd list --output=json 2>&1) || true
    if grep -q '"state": "waiting"' <<< "$list" && grep -qE '"expiresIn": [0-9]+' <<< "$list"; then ok "fvd list --output=json: state waiting, expiresIn"
    else not_ok "JSON list without waiting/expiresIn" "$list"; fi
    local sum out rc=0
    sum=$(sha256sum < "$img")
    out=$(fvd resize "$img" 128M 2>&1) || rc=$?
    if ((rc != 0)) && grep -q "is waiting for this image's server" <<< "$out" && [[ $(sha256sum < "$img") == "$sum" ]]; then ok "an offline resize of the image refuses while its device waits (image unchanged): $out"
    else not_ok "fvd resize of an image whose device waits did not refuse, or changed it (exit $rc)" "$out"; fi
    check "fvd stop $id deletes the waiting device" fvd stop "$id"
    wait_pid "$dd_pid" 20
    if [[ $WAIT_RC == 1 ]]; then ok "held I/O failed after fvd stop (dd exit $WAIT_RC)"
    else not_ok "held I/O did not fail promptly (dd: $WAIT_RC)" "$(cat dd.err)"; kill -KILL "$dd_pid" 2>/dev/null || true; fi
    if device_gone "$id" 10; then ok "/dev/ublkb$id is gone"
    else not_ok "/dev/ublkb$id still exists after fvd stop" "$(ublk_nodes)"; fi
    [[ ! -e /run/fvd/ublkb$id.json ]] && ok "its state file is removed" || not_ok "state file left" "$(cat /run/fvd/ublkb$id.json)"
    check "fvd check clean" fvd check "$img"
}

stopped_pending_round() {
    local img=$D/p.fvd id out rc=0 sum
    must "fvd create --layout compact" fvd create --layout compact "$img" 64M
    serve_must "$img" --recovery-wait $RW
    id=$SERVE_ID
    random_file p.bin 4
    check "4 MiB written with O_DIRECT, no fsync" t dd if=p.bin of="$SERVE_DEV" bs=1M seek=4 oflag=direct conv=notrunc status=none
    kill -KILL "$SERVE_PID"
    wait_pid "$SERVE_PID" 30
    out=$(fvd stop "$id" 2>&1) || rc=$?
    expect "fvd stop of the waiting device exits 0" "$rc" 0 "$out"
    if grep -qE "^[0-9]+ records of writes it acknowledged are in /run/fvd/pending-.*the next 'fvd serve $img' applies them" <<< "$out"; then ok "fvd stop names the pending writes: $(tail -1 <<< "$out")"
    else not_ok "fvd stop of a device with pending writes does not mention them" "$out"; fi
    device_gone "$id" 10 && ok "/dev/ublkb$id is gone" || not_ok "/dev/ublkb$id still exists after fvd stop" "$(ublk_nodes)"
    sum=$(sha256sum < "$img")
    rc=0; out=$(fvd resize "$img" 128M 2>&1) || rc=$?
    if ((rc != 0)) && grep -q "records of writes a dead server acknowledged" <<< "$out" && [[ $(sha256sum < "$img") == "$sum" ]]; then ok "an offline resize refuses while the writes are pending (image unchanged)"
    else not_ok "offline resize with pending writes: exit $rc, or the image changed" "$out"; fi
    serve_must "$img"
    if grep -q "applied [0-9]* records of the previous server's pending log" "$SERVE_LOG"; then ok "the next serve applied the pending log"
    else not_ok "no 'applied N records' in the serve log" "$(cat "$SERVE_LOG")"; fi
    check_dev_equals "the acknowledged write reads back after the device was deleted and served again" "$SERVE_DEV" $((4 << 20)) p.bin
    serve_stop "after applying the pending log"
    check "fvd check clean" fvd check "$img"
    rm -f "$img"
}

# --- h) the failure branches of a continued recovery (DESIGN.md §7, "An interrupted recovery") ---

# interrupt_recovery IMG LABEL: SIGKILL the current server, then a second one inside its recovery
# (after START_USER_RECOVERY, before /dev/ublkcN is opened: FVD_TEST_RECOVERY_PAUSE_MS). On 6.12
# every later START of the device is then refused (EINVAL).
interrupt_recovery() {
    local img=$1 label=$2 second i err=$D/cf-int.err
    kill -KILL "$SERVE_PID"
    wait_pid "$SERVE_PID" 30
    FVD_TEST_RECOVERY_PAUSE_MS=120000 "${FVD[@]}" serve "$img" --recovery-wait $RW > /dev/null 2> "$err" &
    second=$!
    echo "$second" >> "$E2E_STATE/pids"
    for ((i = 0; i < 900; i++)); do grep -q "START_USER_RECOVERY accepted" "$err" && break; sleep 0.1; done
    if grep -q "START_USER_RECOVERY accepted" "$err"; then ok "$label: a server was killed inside its recovery (after START_USER_RECOVERY)"
    else not_ok "$label: the second server never reached START_USER_RECOVERY" "$(cat "$err")"; fi
    kill -KILL "$second" 2>/dev/null || true
    wait_pid "$second" 30
}

# serve_fails LABEL IMG LIMIT WANT [ENV=V...]: a serve of IMG (--recovery-wait) that must fail
# within LIMIT s: exit status non-zero and no time-out, the last stderr line is fvd's error and
# matches WANT (an extended regex), and no other line does. Sets FAIL_LOG, FAIL_SECS, FAIL_HUNG.
serve_fails() {
    local label=$1 img=$2 limit=$3 want=$4 rc t0 last pid t
    shift 4
    FAIL_LOG=$D/cf-fail$((++CF_N)).err
    t0=$(date +%s)
    env "$@" "${FVD[@]}" serve "$img" --recovery-wait $RW > /dev/null 2> "$FAIL_LOG" &
    pid=$!
    echo "$pid" >> "$E2E_STATE/pids"
    wait_pid "$pid" "$limit"
    rc=$WAIT_RC
    FAIL_SECS=$(($(date +%s) - t0))
    FAIL_HUNG=no
    if [[ $rc == timeout ]]; then
        FAIL_HUNG=yes
        not_ok "$label: the serve hung (killed after $limit s)" "$(cat "$FAIL_LOG"; for t in /proc/$pid/task/*; do echo "task ${t##*/}: $(cat "$t/comm") $(cat "$t/wchan")"; cat "$t/stack" 2>/dev/null | head -n 12; done)"
        kill -KILL "$pid" 2>/dev/null || true
        wait_pid "$pid" 30
        return 0
    fi
    if ((rc != 0)); then ok "$label: the serve exits $rc after $FAIL_SECS s (limit $limit s)"
    else not_ok "$label: the serve exited 0" "$(cat "$FAIL_LOG")"; fi
    last=$(tail -n 1 "$FAIL_LOG")
    if [[ $last == fvd* && $last =~ $want && $(grep -cE -- "$want" "$FAIL_LOG") == 1 ]]; then ok "$label: one-line error: $last"
    else not_ok "$label: the last stderr line is not one line naming '$want'" "$(cat "$FAIL_LOG")"; fi
}

# held_read DEV: a direct read of DEV in the background (it waits while the device has no server).
held_read() {
    timeout -k 5 300 dd if="$1" of=/dev/null bs=4k count=1 iflag=direct status=none 2> "$D/cf-held.err" &
    HELD_PID=$!
}

contfail_round() {
    # RW for every serve of this round (dynamic scope): no warden of a killed server may expire
    # the device while the round works on it
    local RW=600 img=$D/cf.fvd id list continued=no pid i
    CF_N=0
    must "fvd create --layout compact" fvd create --layout compact "$img" 64M
    random_file cf.bin 1
    serve_must "$img" --recovery-wait $RW
    id=$SERVE_ID
    check "cf: 1 MiB written O_DIRECT + fsync" write_dev "$SERVE_DEV" $((4 << 20)) cf.bin

    # h1) /dev/ublkcN held by someone else (as by a dead server's process that has not exited).
    interrupt_recovery "$img" "cdev held"
    if exec 9<> "/dev/ublkc$id"; then ok "cdev held: this shell holds /dev/ublkc$id open"
    else not_ok "cdev held: cannot open /dev/ublkc$id" "$(ublk_nodes)"; fi
    # 6.12: START refused (EINVAL), the continued recovery cannot open /dev/ublkcN (EBUSY);
    # 7.x: START itself is refused with EBUSY while /dev/ublkcN is open, retried for 10 s
    if [[ $(uname -r) == 6.12* ]]; then
        serve_fails "cdev held" "$img" 90 "cannot be recovered now: /dev/ublkc$id is still held \\(EBUSY\\)"
    else
        serve_fails "cdev held" "$img" 90 "device $id cannot be recovered now: START_USER_RECOVERY still refused \\(EBUSY\\) after 10 s: /dev/ublkc$id is still held"
    fi
    if grep -q "recovery of device $id failed before START_USER_RECOVERY; it keeps waiting" "$FAIL_LOG"; then ok "cdev held: the log says the device keeps waiting"
    else not_ok "cdev held: no 'keeps waiting' line" "$(cat "$FAIL_LOG")"; fi
    if [[ -b /dev/ublkb$id && -e /sys/block/ublkb$id ]]; then ok "cdev held: /dev/ublkb$id and /sys/block/ublkb$id stay"
    else not_ok "cdev held: the device is gone" "$(ublk_nodes)"; fi
    list=$(fvd list 2>&1) || true
    echo "# fvd list: $list"
    if grep -q "waiting for a daemon" <<< "$list"; then ok "cdev held: fvd list shows the device waiting"
    else not_ok "cdev held: fvd list does not show the device waiting" "$list"; fi
    exec 9>&-
    serve_must "$img" --recovery-wait $RW
    expect "cdev held: once /dev/ublkc$id is released a plain serve recovers the same device" "$SERVE_DEV" "/dev/ublkb$id" "$(cat "$SERVE_LOG")"
    if grep -q "continuing that recovery" "$SERVE_LOG"; then ok "cdev held: ... by continuing the interrupted recovery"; continued=yes
    elif grep -q "START_USER_RECOVERY accepted" "$SERVE_LOG"; then ok "cdev held: ... by starting the recovery anew (START accepted on $(uname -r))"
    else not_ok "cdev held: the log names neither recovery path" "$(cat "$SERVE_LOG")"; fi
    check_dev_equals "cdev held: the data reads back after the recovery" "$SERVE_DEV" $((4 << 20)) cf.bin

    # h2) the dead server had mapped the descriptors (FVD_TEST_FAULT=pause-after-map holds its
    # queue there, before any fetch): on 6.12 the mapping belongs to its memory, mmap answers EINVAL.
    kill -KILL "$SERVE_PID"
    wait_pid "$SERVE_PID" 30
    FVD_TEST_FAULT=pause-after-map "${FVD[@]}" serve "$img" --recovery-wait $RW > /dev/null 2> "$D/cf-map.err" &
    pid=$!
    echo "$pid" >> "$E2E_STATE/pids"
    for ((i = 0; i < 900; i++)); do grep -q "test hook: descriptors mapped" "$D/cf-map.err" && break; sleep 0.1; done
    if grep -q "/dev/ublkc$id" "/proc/$pid/maps" 2>/dev/null; then ok "mapped: the second server mapped /dev/ublkc$id and fetched nothing"
    else not_ok "mapped: no mapping of /dev/ublkc$id in the second server" "$(cat "$D/cf-map.err")"; fi
    kill -KILL "$pid" 2>/dev/null || true
    wait_pid "$pid" 30
    held_read "/dev/ublkb$id"
    if [[ $continued == yes ]]; then
        serve_fails "mapped" "$img" 90 "device $id cannot be recovered \\(queue [0-9]+: mmap of /dev/ublkc$id queue [0-9]+ descriptors failed: EINVAL\\)"
        if device_gone "$id" 10; then ok "mapped: the device is stopped and deleted (/dev/ublk[bc]$id, /sys/block/ublkb$id gone)"
        else not_ok "mapped: the device is still there" "$(ublk_nodes)"; fi
        wait_pid "$HELD_PID" 30
        if [[ $WAIT_RC != 0 && $WAIT_RC != timeout ]]; then ok "mapped: the held read fails ($WAIT_RC: $(head -n 1 "$D/cf-held.err"))"
        else not_ok "mapped: the held read ended with '$WAIT_RC'" "$(cat "$D/cf-held.err")"; fi
        [[ ! -e /run/fvd/ublkb$id.json ]] && ok "mapped: the state file is gone" || not_ok "mapped: /run/fvd/ublkb$id.json stays" "$(ls /run/fvd)"
        serve_must "$img" --recovery-wait $RW
        if ! grep -q "recovering device" "$SERVE_LOG"; then ok "mapped: a plain serve adds a fresh device ($SERVE_DEV)"
        else not_ok "mapped: the next serve tried a recovery" "$(cat "$SERVE_LOG")"; fi
    else
        serve_must "$img" --recovery-wait $RW
        expect "mapped: on $(uname -r) a plain serve recovers the same device" "$SERVE_DEV" "/dev/ublkb$id" "$(cat "$SERVE_LOG")"
        if grep -q "START_USER_RECOVERY accepted" "$SERVE_LOG"; then ok "mapped: START_USER_RECOVERY accepted: the recovery starts anew"
        else not_ok "mapped: no 'START_USER_RECOVERY accepted'" "$(cat "$SERVE_LOG")"; fi
        wait_pid "$HELD_PID" 60
        expect "mapped: the held read completes" "$WAIT_RC" 0 "$(cat "$D/cf-held.err")"
    fi
    check_dev_equals "mapped: the data reads back" "$SERVE_DEV" $((4 << 20)) cf.bin

    # h3) END_USER_RECOVERY that never completes (a tag fetched by no one: FVD_TEST_FAULT=fetch-short
    # leaves the last tag unfetched): after 30 s one line, the device deleted. 6.12 only: where
    # START is accepted there is no continued recovery and the END is our own.
    if [[ $continued == yes ]]; then
        id=$SERVE_ID
        interrupt_recovery "$img" "END times out"
        held_read "/dev/ublkb$id"
        serve_fails "END times out" "$img" 120 "device $id cannot be recovered \\(END_USER_RECOVERY did not complete within 30 s\\)" FVD_TEST_FAULT=fetch-short
        if [[ $FAIL_HUNG == no ]]; then
            ((FAIL_SECS >= 30)) && ok "END times out: after the 30 s limit ($FAIL_SECS s)" || not_ok "END times out: failed after $FAIL_SECS s, before the limit" "$(cat "$FAIL_LOG")"
        fi
        if device_gone "$id" 10; then ok "END times out: the device is stopped and deleted"
        else not_ok "END times out: the device is still there" "$(ublk_nodes)"; fi
        wait_pid "$HELD_PID" 30
        if [[ $WAIT_RC != 0 && $WAIT_RC != timeout ]]; then ok "END times out: the held read fails ($WAIT_RC: $(head -n 1 "$D/cf-held.err"))"
        else not_ok "END times out: the held read ended with '$WAIT_RC'" "$(cat "$D/cf-held.err")"; fi
        serve_must "$img" --recovery-wait $RW
        if ! grep -q "recovering device" "$SERVE_LOG"; then ok "END times out: a plain serve adds a fresh device ($SERVE_DEV)"
        else not_ok "END times out: the next serve tried a recovery" "$(cat "$SERVE_LOG")"; fi
        check_dev_equals "END times out: the data reads back" "$SERVE_DEV" $((4 << 20)) cf.bin
    else
        skip "END times out: START_USER_RECOVERY is accepted after an interrupted recovery on $(uname -r): no continued recovery, so no bounded END to reach"
    fi
    serve_stop "after the continued-recovery failures"
    check "cf: fvd check clean" fvd check "$img"
    rm -f "$img"
}

geometry_round() {
    local img=$D/geo.fvd base=$D/base.raw id
    ROUND_OPTS=()
    [[ -f $base ]] || random_file "$base" 64
    must "fvd create (raw-like over a raw base)" fvd create -b "$base" -F raw "$img" 64M
    serve_must "$img" --recovery-wait $RW --max-io 64k
    id=$SERVE_ID
    kill_and_recover "$img" "$id" "geometry"
    if grep -q "device $id keeps its geometry.*max I/O 65536" "$SERVE_LOG"; then ok "geometry: the recovering server keeps the device's max I/O of 64 KiB"
    else not_ok "geometry: no 'keeps its geometry ... max I/O 65536' in the serve log" "$(cat "$SERVE_LOG")"; fi
    random_file geo.bin 4
    check "geometry: 4 MiB in 1 MiB O_DIRECT writes into blocks only in the base (copy-on-write)" \
        t dd if=geo.bin of="$SERVE_DEV" bs=1M seek=20 oflag=direct conv=notrunc status=none
    check_dev_equals "geometry: the copy-on-write data reads back" "$SERVE_DEV" $((20 << 20)) geo.bin
    head -c $((4 << 20)) "$base" > geo-base.bin
    check_dev_equals "geometry: the base reads through elsewhere" "$SERVE_DEV" 0 geo-base.bin
    serve_stop "after the geometry recovery"
    serve_must "$img"
    check_dev_equals "geometry: the data after a clean stop and a fresh serve" "$SERVE_DEV" $((20 << 20)) geo.bin
    serve_stop "geometry, fresh"
    check "geometry: fvd check clean" fvd check "$img"
    rm -f "$img" geo.bin geo-base.bin
}

scenario() {
    # the short rounds first: a slow guest's time limit then cuts the long fio rounds, not these
    expiry_round
    race_round
    waiting_round
    unflushed_round
    stopped_pending_round
    geometry_round
    ext4_round
    fio_round raw
    # The same on a compact image (the ext4 and kill-during-recovery rounds serve compact images
    # too) and on an encrypted one: with E2E_LONG=1 (make test-full), not in make test (CI's time).
    if long_rounds; then
        fio_round compact
        fio_round encrypted 1
    else
        skip "fio verify across kills on a compact and on an encrypted image: E2E_LONG=1 (make test-full) runs them"
    fi
    fio_round snapshots 1
    recovery_kill_round
    # The failure branches of a continued recovery (h) with E2E_LONG=1 (make test-full), which
    # also runs them on 6.12, where most of their branches are.
    if long_rounds; then contfail_round
    else skip "the failure branches of a continued recovery (h): E2E_LONG=1 (make test-full) runs them"; fi
    handoff_round
}
