# tests/vm/e2e/12-kernel.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: ublk features named from GET_FEATURES; queue threads are I/O flushers (or say why not)
# timeout: 600
#
# serve --queues 2 logs exactly one "ublk on Linux <uname -r>: kernel features 0xHEX (NAMES); this
# device uses 0xHEX (NAMES)" line.  Both masks are decoded here again with the uapi bit numbers
# (a table of its own, not the daemon's) and must list exactly the bits set, in bit order; the
# device uses the ioctl-encoded commands; the kernel's offer matches its version (UPDATE_SIZE from
# 6.14 on, USER_RECOVERY_FAIL_IO not before 6.13).  `fvd list --json` gives one thread per queue,
# each a task of the daemon other than its main thread, each with ioFlusher true — what the worker
# read back with PR_GET_IO_FLUSHER from that thread itself — and the device does I/O.  Served with
# default options it has one queue: one queue thread, one mq entry in sysfs.  Served again
# without CAP_SYS_RESOURCE (setpriv drops it from the bounding set): one log line saying the queue
# threads are not I/O flushers and why, ioFlusher false everywhere, and the device still works.
# Online resize (resize_round): ext4 on a served 64M image, mounted, files written; shrinking the
# served image is refused in one line.  From 6.14 (UPDATE_SIZE): `fvd resize IMG +64M` grows image
# and device (blockdev --getsize64 = 128M at once), resize2fs grows the mounted ext4, a file past
# the old end is written, all files verify, e2fsck -f clean, and served again the device has 128M
# and the files.  Before 6.14: one line saying the kernel lacks UBLK_F_UPDATE_SIZE (6.14+) and the
# image is unchanged; the device and, after the stop, the image keep 64M.  From 6.14 also an
# encrypted 4M image grown to 8M while served: the new range reads zeros, data past the old end
# reads back after a re-serve.  From 6.14 also a compact image (64K chunks) with ext4 mounted
# grown from 64M to 128M: its table grows from one page to two and the journal moves up a page
# (header fields read with od), resize2fs grows the ext4, the files verify after a re-serve and
# fvd check is clean.  From 6.14 also a grow interrupted between the header write and
# UPDATE_SIZE (grow_recovery_round; the test hook FVD_TEST_FAULT=grow-after-header SIGKILLs the
# server there) on ext4 mounted on a 64M image served with --recovery-wait: the waiting device
# keeps 64M while the header says 128M; a serve that pretends the kernel lacks UPDATE_SIZE
# (FVD_TEST_FAULT=recover-without-update-size) recovers the same device at 64M and says in one
# line that the grown part is not visible; SIGKILLed again, a plain serve recovers the same device
# (same major:minor), logs each step, UPDATE_SIZE makes it 128M (blockdev, fvd list), the files
# verify on the mount that stayed, resize2fs grows it, a file past the old end verifies, e2fsck
# -f and fvd check are clean.  Before 6.14 that round is a skip (no online grow to interrupt).

# The UBLK_F_* bits of include/uapi/linux/ublk_cmd.h (Linux 7.3), by bit number.
UAPI_BITS=(SUPPORT_ZERO_COPY URING_CMD_COMP_IN_TASK NEED_GET_DATA USER_RECOVERY USER_RECOVERY_REISSUE
    UNPRIVILEGED_DEV CMD_IOCTL_ENCODE USER_COPY ZONED USER_RECOVERY_FAIL_IO UPDATE_SIZE AUTO_BUF_REG
    QUIESCE PER_IO_DAEMON BUF_REG_OFF_DAEMON BATCH_IO INTEGRITY SAFE_STOP_DEV NO_AUTO_PART_SCAN SHMEM_ZC
    IO_DESC_SIZE)

# decode HEX: the names of its set bits, space-separated, lowest first ("none" for 0).
decode() {
    local v=$(($1)) bit out=()
    for ((bit = 0; bit < 64; bit++)); do
        (((v >> bit) & 1)) || continue
        out+=("${UAPI_BITS[bit]:-bit $bit}")
    done
    ((${#out[@]})) && echo "${out[*]}" || echo none
}

# kernel_at_least MAJOR MINOR: uname -r is that version or newer.
kernel_at_least() {
    local maj min
    IFS=. read -r maj min _ <<< "$(uname -r)"
    ((maj > $1 || (maj == $1 && min >= $2)))
}

# queue_threads: "TID:IOFLUSHER" per queue thread of the served device, from fvd list --json.
queue_threads() {
    fvd list --json | node -e '
        const rows = JSON.parse(require("fs").readFileSync(0, "utf8"));
        const r = rows.find((x) => x.device === process.argv[1]);
        if (!r || !r.queueThreads) process.exit(3);
        for (const q of r.queueThreads) console.log(`${q.tid}:${q.ioFlusher}`);' "$SERVE_DEV"
}

# size_of IMAGE: its virtual size in bytes (fvd info --output=json).
size_of() {
    fvd info --output=json "$1" | node -e 'console.log(JSON.parse(require("fs").readFileSync(0, "utf8"))["virtual-size"])'
}

resize_round() {
    local M=$((1024 * 1024)) f
    must "fvd create r.fvd 64M" fvd create r.fvd 64M
    serve_must r.fvd
    check "[resize] mkfs.ext4 $SERVE_DEV" t mkfs.ext4 -q -F "$SERVE_DEV"
    mkdir -p "$D/r"
    if ! ensure "[resize] mount $SERVE_DEV" t mount -t ext4 "$SERVE_DEV" "$D/r"; then serve_stop; return 0; fi
    random_file "$D/r/a.bin" 8
    random_file "$D/r/b.bin" 1
    (cd "$D/r" && sha256sum a.bin b.bin > "$D/sums")
    sync
    fvd resize r.fvd -16M > "$D/shrink.out" 2> "$D/shrink.err" && not_ok "[resize] shrinking a served image succeeded" "$(cat "$D/shrink.out")"
    one_line_error "[resize] shrinking a served image is refused" "$D/shrink.err"
    if grep -q 'can only grow while served' "$D/shrink.err"; then ok "[resize] it says a served image can only grow"
    else not_ok "[resize] the refusal does not say a served image can only grow" "$(cat "$D/shrink.err")"; fi
    if kernel_at_least 6 14; then
        check "[resize] fvd resize r.fvd +64M of the served image" fvd resize r.fvd +64M
        expect "[resize] blockdev --getsize64 $SERVE_DEV shows the new size" "$(blockdev --getsize64 "$SERVE_DEV")" $((128 * M))
        grow_mounted_ext4 "[resize]" "$D/r" "$D/sums" $((128 * M))
        serve_stop "resized"
        expect "[resize] the image keeps 128M" "$(size_of r.fvd)" $((128 * M))
        check "[resize] fvd check r.fvd clean" fvd check r.fvd
        serve_must r.fvd
        expect "[resize] served again: $SERVE_DEV has the new size" "$(blockdev --getsize64 "$SERVE_DEV")" $((128 * M))
        if ensure "[resize] mount after re-serving" t mount -t ext4 "$SERVE_DEV" "$D/r"; then
            check "[resize] the files verify after re-serving" bash -c "cd '$D/r' && sha256sum -c '$D/sums'"
            check "[resize] umount" t umount "$D/r"
        fi
        serve_stop "re-served"

        # An encrypted image grows too: the new range reads zero plaintext through the queue
        # threads' own cipher, and data written past the old end reads back after a re-serve.
        (umask 077; printf 'resize passphrase\n' > "$D/r.key")
        must "fvd create --encrypt e.fvd 4M" fvd create --encrypt --key-file "$D/r.key" e.fvd 4M
        pattern_file 33.bin $M 0x33
        pattern_file zero.bin $((4 * M)) 0x00
        serve_must e.fvd --key-file "$D/r.key"
        write_dev "$SERVE_DEV" $((3 * M)) 33.bin
        check "[resize] fvd resize e.fvd 8M of a served encrypted image" fvd resize e.fvd 8M
        expect "[resize] encrypted: blockdev --getsize64 $SERVE_DEV" "$(blockdev --getsize64 "$SERVE_DEV")" $((8 * M))
        check_dev_equals "[resize] encrypted: the new range reads zeros" "$SERVE_DEV" $((4 * M)) zero.bin
        write_dev "$SERVE_DEV" $((6 * M)) 33.bin
        serve_stop "encrypted, resized"
        serve_must e.fvd --key-file "$D/r.key"
        check_dev_equals "[resize] encrypted, re-served: data below the old end" "$SERVE_DEV" $((3 * M)) 33.bin
        check_dev_equals "[resize] encrypted, re-served: data past the old end" "$SERVE_DEV" $((6 * M)) 33.bin
        serve_stop "encrypted, re-served"

        # A compact image grows too: at 64K chunks its lookup table fills one page at 64M and
        # needs two at 128M, so the table grows into the journal's space and the journal moves
        # up (FORMAT.md §12.5) under the mounted filesystem.
        must "fvd create --layout compact --chunk-size 64K cg.fvd 64M" fvd create --layout compact --chunk-size 64K cg.fvd 64M
        local j0
        j0=$(header_u64 cg.fvd 104)
        expect "[resize] compact: the table is one page" "$(header_u64 cg.fvd 96)" 4096
        serve_must cg.fvd
        check "[resize] compact: mkfs.ext4 $SERVE_DEV" t mkfs.ext4 -q -F "$SERVE_DEV"
        mkdir -p "$D/k"
        if ensure "[resize] compact: mount $SERVE_DEV" t mount -t ext4 "$SERVE_DEV" "$D/k"; then
            random_file "$D/k/a.bin" 8
            (cd "$D/k" && sha256sum a.bin > "$D/ksums")
            sync
            check "[resize] fvd resize cg.fvd +64M of a served compact image" fvd resize cg.fvd +64M
            expect "[resize] compact: blockdev --getsize64 $SERVE_DEV shows the new size" "$(blockdev --getsize64 "$SERVE_DEV")" $((128 * M))
            expect "[resize] compact: the header has the two-page table at once" "$(header_u64 cg.fvd 96)" 8192
            expect "[resize] compact: the journal moved up by a page" "$(header_u64 cg.fvd 104)" $((j0 + 4096))
            grow_mounted_ext4 "[resize] compact:" "$D/k" "$D/ksums" $((128 * M))
        fi
        serve_stop "compact, resized"
        expect "[resize] compact: the image keeps 128M" "$(size_of cg.fvd)" $((128 * M))
        check "[resize] compact: fvd check cg.fvd clean" fvd check cg.fvd
        serve_must cg.fvd
        if ensure "[resize] compact: mount after re-serving" t mount -t ext4 "$SERVE_DEV" "$D/k"; then
            check "[resize] compact: the files verify after re-serving" bash -c "cd '$D/k' && sha256sum -c '$D/ksums'"
            check "[resize] compact: umount" t umount "$D/k"
        fi
        serve_stop "compact, re-served"

        grow_recovery_round
    else
        skip "[grow-recover] an online grow interrupted before UPDATE_SIZE: no online grow before 6.14"
        fvd resize r.fvd +64M > "$D/grow.out" 2> "$D/grow.err" && not_ok "[resize] growing a served image succeeded on $(uname -r)" "$(cat "$D/grow.out")"
        one_line_error "[resize] growing a served image on $(uname -r) is refused" "$D/grow.err"
        if grep -q 'lacks UBLK_F_UPDATE_SIZE (6.14+)' "$D/grow.err" && grep -q 'image is unchanged' "$D/grow.err"; then
            ok "[resize] it says the kernel lacks UBLK_F_UPDATE_SIZE (6.14+) and the image is unchanged"
        else not_ok "[resize] the refusal does not name UBLK_F_UPDATE_SIZE (6.14+) and the unchanged image" "$(cat "$D/grow.err")"; fi
        expect "[resize] $SERVE_DEV keeps 64M" "$(blockdev --getsize64 "$SERVE_DEV")" $((64 * M))
        check "[resize] the files verify" bash -c "cd '$D/r' && sha256sum -c '$D/sums'"
        check "[resize] umount" t umount "$D/r"
        serve_stop "not resized"
        expect "[resize] the image keeps 64M" "$(size_of r.fvd)" $((64 * M))
        check "[resize] fvd check r.fvd clean" fvd check r.fvd
    fi
}

# header_u64 IMAGE OFFSET: the little-endian u64 header field at OFFSET (docs/FORMAT.md §2).
header_u64() {
    od -An -tu8 -j "$2" -N 8 "$1" | tr -d ' '
}

# list_size DEV: the size fvd list --json records for DEV (its state file), or "none".
list_size() {
    fvd list --json | node -e '
        const r = JSON.parse(require("fs").readFileSync(0, "utf8")).find((x) => x.device === process.argv[1]);
        console.log(r ? r.size : "none");' "$1"
}

# grow_mounted_ext4 LABEL MNT SUMS BYTES: after an online grow of $SERVE_DEV to BYTES, resize2fs
# grows the ext4 mounted at MNT to span it, a 60 MiB file (more than the old filesystem had room
# for, so blocks past the old end are written) and the files listed in SUMS verify, then umount
# and e2fsck -f clean.
grow_mounted_ext4() {
    local label=$1 mnt=$2 sums=$3 bytes=$4 bc bs
    check "$label resize2fs grows the mounted ext4" t resize2fs "$SERVE_DEV"
    bc=$(dumpe2fs -h "$SERVE_DEV" 2>/dev/null | sed -n 's/^Block count:\s*//p')
    bs=$(dumpe2fs -h "$SERVE_DEV" 2>/dev/null | sed -n 's/^Block size:\s*//p')
    expect "$label the ext4 spans the grown device" "$((bc * bs))" "$bytes"
    random_file "$mnt/c.bin" 60
    (cd "$mnt" && sha256sum c.bin >> "$sums")
    sync
    check "$label the files verify after writing past the old end" bash -c "cd '$mnt' && sha256sum -c '$sums'"
    check "$label umount" t umount "$mnt"
    check "$label e2fsck -f clean after the online grow" t e2fsck -f -n "$SERVE_DEV"
}

# grow_recovery_round: an online grow interrupted between the header write and UPDATE_SIZE (the
# test hook FVD_TEST_FAULT=grow-after-header SIGKILLs the server there) on a device served with
# --recovery-wait: the waiting device is smaller than the image, and the next serve recovers it.
grow_recovery_round() {
    local M=$((1024 * 1024)) fvd0=("${FVD[@]}") id devno
    must "fvd create g.fvd 64M" fvd create g.fvd 64M
    FVD=(env FVD_TEST_FAULT=grow-after-header "${fvd0[@]}")
    serve_must g.fvd --recovery-wait 60
    FVD=("${fvd0[@]}")
    id=$SERVE_ID devno=$(stat -c %t:%T "$SERVE_DEV")
    check "[grow-recover] mkfs.ext4 $SERVE_DEV" t mkfs.ext4 -q -F "$SERVE_DEV"
    mkdir -p "$D/g"
    if ! ensure "[grow-recover] mount $SERVE_DEV" t mount -t ext4 "$SERVE_DEV" "$D/g"; then serve_stop; return 0; fi
    random_file "$D/g/a.bin" 8
    (cd "$D/g" && sha256sum a.bin > "$D/gsums")
    sync
    fvd resize g.fvd +64M > "$D/gk.out" 2> "$D/gk.err" && not_ok "[grow-recover] the resize succeeded though the server was to die" "$(cat "$D/gk.out" "$SERVE_LOG")"
    wait_pid "$SERVE_PID" 30
    expect "[grow-recover] the server killed itself after the header write" "$WAIT_RC" 137 "$(cat "$D/gk.err" "$SERVE_LOG")"
    expect "[grow-recover] the image's header has the new size" "$(size_of g.fvd)" $((128 * M))
    expect "[grow-recover] the waiting device keeps the old size" "$(blockdev --getsize64 "/dev/ublkb$id")" $((64 * M))

    # A kernel without UPDATE_SIZE (simulated: the hook hides the feature from the recovery):
    # recovered at the device's size, one line says why the grown part is not visible.
    FVD=(env FVD_TEST_FAULT=recover-without-update-size "${fvd0[@]}")
    serve_must g.fvd --recovery-wait 60
    FVD=("${fvd0[@]}")
    expect "[grow-recover] without UPDATE_SIZE: the same device is recovered" "$SERVE_DEV" "/dev/ublkb$id" "$(cat "$SERVE_LOG")"
    expect "[grow-recover] without UPDATE_SIZE: one line says the grown part is not visible" "$(grep -c 'not visible until the device is re-created' "$SERVE_LOG" || true)" 1 "$(cat "$SERVE_LOG")"
    expect "[grow-recover] without UPDATE_SIZE: the device keeps the old size" "$(blockdev --getsize64 "$SERVE_DEV")" $((64 * M))
    expect "[grow-recover] without UPDATE_SIZE: fvd list records the device's size" "$(list_size "$SERVE_DEV")" $((64 * M))
    check "[grow-recover] without UPDATE_SIZE: the files verify" bash -c "cd '$D/g' && sha256sum -c '$D/gsums'"
    kill -KILL "$SERVE_PID"
    wait_pid "$SERVE_PID" 30
    expect "[grow-recover] without UPDATE_SIZE: SIGKILLed" "$WAIT_RC" 137

    serve_must g.fvd --recovery-wait 60
    expect "[grow-recover] the same device is recovered" "$SERVE_DEV" "/dev/ublkb$id" "$(cat "$SERVE_LOG")"
    expect "[grow-recover] same major:minor" "$(stat -c %t:%T "$SERVE_DEV")" "$devno"
    if grep -q "recovered device $id" "$SERVE_LOG" && grep -q "device $id: interrupted online grow: recovering at 67108864 bytes" "$SERVE_LOG" &&
        grep -q "device $id: UPDATE_SIZE to 134217728 bytes done" "$SERVE_LOG"; then
        ok "[grow-recover] the log names each step: $(grep -E 'interrupted online grow|UPDATE_SIZE to' "$SERVE_LOG" | tr '\n' '|')"
    else not_ok "[grow-recover] the log lacks the recovery's steps" "$(cat "$SERVE_LOG")"; fi
    expect "[grow-recover] blockdev --getsize64 shows the new size" "$(blockdev --getsize64 "$SERVE_DEV")" $((128 * M))
    expect "[grow-recover] fvd list records the new size" "$(list_size "$SERVE_DEV")" $((128 * M))
    check "[grow-recover] the files verify on the mounted ext4" bash -c "cd '$D/g' && sha256sum -c '$D/gsums'"
    grow_mounted_ext4 "[grow-recover]" "$D/g" "$D/gsums" $((128 * M))
    serve_stop "grow recovered"
    check "[grow-recover] fvd check g.fvd clean" fvd check g.fvd
}

scenario() {
    local M=$((1024 * 1024)) line re offered used tids t f
    must "fvd create k.fvd 64M" fvd create k.fvd 64M
    pattern_file 5a.bin $M 0x5a

    serve_must k.fvd --queues 2
    expect "one 'ublk on Linux' features line in the log" "$(grep -c 'ublk on Linux' "$SERVE_LOG" || true)" 1 "$(cat "$SERVE_LOG")"
    line=$(grep -o 'ublk on Linux .*' "$SERVE_LOG" | head -n 1)
    re='^ublk on Linux ([^:]+): kernel features (0x[0-9a-f]+) \(([^)]*)\); this device uses (0x[0-9a-f]+) \(([^)]*)\)$'
    if [[ $line =~ $re ]]; then
        ok "features line: $line"
        expect "it names the running kernel" "${BASH_REMATCH[1]}" "$(uname -r)"
        offered=${BASH_REMATCH[2]} used=${BASH_REMATCH[4]}
        expect "kernel features $offered named bit by bit" "${BASH_REMATCH[3]}" "$(decode "$offered")"
        expect "device flags $used named bit by bit" "${BASH_REMATCH[5]}" "$(decode "$used")"
        expect "the device's flags are a subset of the kernel's" "$((used & ~offered))" 0
        expect "the device uses the ioctl-encoded commands (CMD_IOCTL_ENCODE)" "$(((used >> 6) & 1))" 1
        if kernel_at_least 6 14; then
            expect "Linux >= 6.14 offers UPDATE_SIZE (online resize)" "$(((offered >> 10) & 1))" 1
        else
            expect "Linux < 6.14 does not offer UPDATE_SIZE" "$(((offered >> 10) & 1))" 0
        fi
        kernel_at_least 6 13 ||
            expect "Linux < 6.13 does not offer USER_RECOVERY_FAIL_IO" "$(((offered >> 9) & 1))" 0
    else
        not_ok "no parsable features line" "$(cat "$SERVE_LOG")"
    fi

    tids=$(queue_threads) || { not_ok "fvd list --json has no queueThreads for $SERVE_DEV" "$(fvd list --json)"; tids=''; }
    expect "one thread per queue in fvd list --json" "$(grep -c : <<< "$tids")" 2 "$tids"
    expect "the queue threads are distinct" "$(cut -d: -f1 <<< "$tids" | sort -u | wc -l)" 2 "$tids"
    for t in $(cut -d: -f1 <<< "$tids"); do
        if [[ $t != "$SERVE_PID" && -d /proc/$SERVE_PID/task/$t ]]; then ok "queue thread $t is a thread of the daemon (pid $SERVE_PID)"
        else not_ok "queue thread $t is not a worker thread of daemon $SERVE_PID" "$(ls /proc/"$SERVE_PID"/task)"; fi
    done
    for f in $tids; do expect "queue thread ${f%%:*}: PR_GET_IO_FLUSHER read back as set" "${f#*:}" true; done
    expect "no 'not I/O flushers' line with CAP_SYS_RESOURCE" "$(grep -c 'not I/O flushers' "$SERVE_LOG" || true)" 0 "$(cat "$SERVE_LOG")"
    write_dev "$SERVE_DEV" $((3 * M)) 5a.bin
    check_dev_equals "the device reads back what was written" "$SERVE_DEV" $((3 * M)) 5a.bin
    serve_stop

    # The default is one queue (one thread, one V8 isolate: README "Resident memory").
    serve_must k.fvd
    tids=$(queue_threads) || tids=''
    expect "served with default options: one queue thread in fvd list --json" "$(grep -c : <<< "$tids")" 1 "$tids"
    expect "served with default options: one hardware queue (/sys/block/${SERVE_DEV#/dev/}/mq)" \
        "$(ls "/sys/block/${SERVE_DEV#/dev/}/mq" | wc -l)" 1 "$(ls "/sys/block/${SERVE_DEV#/dev/}/mq")"
    check_dev_equals "the device reads back what was written" "$SERVE_DEV" $((3 * M)) 5a.bin
    serve_stop "default options"

    resize_round

    # Without CAP_SYS_RESOURCE: PR_SET_IO_FLUSHER is refused, said once, and nothing else changes.
    FVD=(setpriv --bounding-set=-sys_resource -- "${FVD[@]}")
    serve_must k.fvd --queues 2
    expect "the daemon lacks CAP_SYS_RESOURCE" "$(( ($(sed -n 's/^CapEff:\s*/0x/p' /proc/"$SERVE_PID"/status) >> 24) & 1 ))" 0
    expect "one 'not I/O flushers' line" "$(grep -c 'queue threads are not I/O flushers' "$SERVE_LOG" || true)" 1 "$(cat "$SERVE_LOG")"
    if grep -q 'PR_SET_IO_FLUSHER: EPERM; it needs CAP_SYS_RESOURCE' "$SERVE_LOG"; then ok "it says EPERM and what is needed"
    else not_ok "the line does not say EPERM and CAP_SYS_RESOURCE" "$(cat "$SERVE_LOG")"; fi
    tids=$(queue_threads) || tids=''
    expect "fvd list --json: two queue threads, neither an I/O flusher" "$(grep -c ':false$' <<< "$tids")" 2 "$tids"
    check_dev_equals "the device still reads its data" "$SERVE_DEV" $((3 * M)) 5a.bin
    serve_stop "without CAP_SYS_RESOURCE"
}
