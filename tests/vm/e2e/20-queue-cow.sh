# tests/vm/e2e/20-queue-cow.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: copy-on-write on the queue threads: scattered writes racing reads, copy-on-read, prefetch and a kill
# timeout: 900
#
# A fresh FVD image over a 64 MiB random raw base, served with 2 queues, with 64 KiB blocks (so that
# most writes copy part of a block) or the default 4 KiB (every write is whole blocks: stored on the
# queue threads, several blocks at a time). 300 small O_DIRECT writes (4–16 KiB inside one 64 KiB
# block, or a whole block, 16 at a time, no two on the same sectors) are made on the device and the
# same writes on a model copy of the base, while a reader streams the whole device (base reads on
# the queue threads, copy-on-read hints racing the writes). The differential: the whole device
# equals the model. Rounds: FVD_QUEUE_COW=all (partial blocks' copy-on-write on the queue threads
# too) without prefetch; the default (whole blocks) with a slow prefetch (its copies race the
# writes), at 64 KiB (E2E_LONG=1 only) and at 4 KiB blocks; FVD_QUEUE_COW=all with the daemon
# SIGKILLed in the middle of the writes and the device recovered by the next serve (the writes held
# meanwhile complete, nothing acknowledged is lost, and the image served once more still equals the
# model; the killed server never drains its queues' answered writes — FVD_TEST_HOLD_STORED — so
# their records are only in the queue logs); without a pending log (so the queue threads answer
# their stored writes), a FLUSH and then a SIGKILL while more writes run: every write before the
# FLUSH is found by the next serve; with FVD_QUEUE_COW=0 (the engine's copy-on-write, the same
# answers; 4 KiB blocks; E2E_LONG=1 only). The closing log of each queue-thread round counts the
# blocks stored on the queue threads (the path was taken); fvd check is clean after every round, the
# base's sha256 never changes, and a later serve reads the model. Last, copy-on-read yields to a
# busy guest: fio 4K random reads at QD16 leave their blocks unhinted (the stop's log counts them),
# reads one at a time are hinted.

# make_writes SEED COUNT > LIST: "offset length fill" lines, 4 KiB-aligned, 1–4 slots of 4 KiB
# inside one 64 KiB block or (one in ten) the whole block, no slot used twice (so the order of
# concurrent writes does not matter).
make_writes() {
    awk -v seed="$1" -v n="$2" -v blocks=1024 'BEGIN {
        srand(seed)
        while (made < n) {
            b = int(rand() * blocks); k = 1 + int(rand() * 4); s = int(rand() * (17 - k))
            if (rand() < 0.1) { k = 16; s = 0 }   # a whole block: stored as it is
            clash = 0
            for (i = 0; i < k; i++) if (used[b * 16 + s + i]) clash = 1
            if (clash) continue
            for (i = 0; i < k; i++) used[b * 16 + s + i] = 1
            printf "%d %d %d\n", (b * 16 + s) * 4096, k * 4096, 1 + made % 64
            made++
        }
    }'
}

# apply_model LIST: the writes onto model.raw, in order (one process: the list is long).
apply_model() {
    node -e '
        const fs = require("fs");
        const [list, model] = process.argv.slice(1);
        const fd = fs.openSync(model, "r+");
        for (const line of fs.readFileSync(list, "utf8").trim().split("\n")) {
            const [off, len, fill] = line.split(" ").map(Number);
            fs.writeSync(fd, Buffer.alloc(len, fill), 0, len, off);
        }
        fs.closeSync(fd);' "$1" model.raw
}

# write_device LIST LOG: the writes onto the device, 16 at a time, each its own O_DIRECT dd
# (nocreat: once a killed server's device is gone, a dd must fail, not make a file in its place).
write_device() {
    xargs -P 16 -L 1 sh -c 'dd if="pat/$3" of="$0" bs="$2" count=1 seek="$1" oflag=direct,seek_bytes conv=notrunc,nocreat status=none' "$SERVE_DEV" < "$1" > "$2" 2>&1
}

# reader: the whole device streamed once (base reads, copy-on-read hints), in the background.
start_reader() {
    dd if="$SERVE_DEV" of=/dev/null iflag=direct bs=64k status=none &
    READER=$!
}

# device_is_model LABEL: the whole device equals model.raw.
device_is_model() {
    local out rc=0
    out=$(cmp <(read_dev "$SERVE_DEV" 0 $((64 << 20))) model.raw 2>&1) || rc=$?
    if ((rc == 0)); then ok "$1: the whole device equals the model"; else not_ok "$1: the device differs from the model" "$out"; fi
}

# queue_cow_count: the blocks the last stopped serve stored on its queue threads (0 if no line).
queue_cow_count() {
    sed -n 's/.*copy-on-write on the queue threads: \([0-9]*\) blocks.*/\1/p' "$SERVE_LOG" | tail -n 1 | grep . || echo 0
}
# queue_in_place_count: of the last serve, the writes into blocks local already that the queue
# threads wrote in place (DESIGN.md §2.5 step 2).
queue_in_place_count() {
    sed -n 's/.*copy-on-write on the queue threads: .* \([0-9]*\) writes in place.*/\1/p' "$SERVE_LOG" | tail -n 1 | grep . || echo 0
}

# cow_round LABEL SEED [SERVE OPTIONS]: a fresh image, writes racing a reader, the differential.
cow_round() {
    local label=$1 seed=$2 rc n
    shift 2
    rm -f q.fvd
    must "$label: fvd create $BLOCK_OPT -b base.raw -F raw" fvd create $BLOCK_OPT -b base.raw -F raw q.fvd
    cp base.raw model.raw
    make_writes "$seed" 300 > "w$seed.list"
    apply_model "w$seed.list"
    serve_must q.fvd --queues 2 "$@"
    start_reader
    rc=0; write_device "w$seed.list" "w$seed.log" || rc=$?
    expect "$label: 300 scattered O_DIRECT writes succeed" "$rc" 0 "$(tail -n 20 "w$seed.log")"
    wait "$READER" || not_ok "$label: the reader failed"
    device_is_model "$label"
    serve_stop "$label"
    n=$(queue_cow_count)
    if ((n > 0)); then ok "$label: $n blocks stored on the queue threads ($(queue_in_place_count) writes in place)"
    else not_ok "$label: no block stored on the queue threads" "$(cat "$SERVE_LOG")"; fi
    # No --recovery-wait, so no pending log: the queue threads answer what they store.
    if grep -q "copy-on-write on the queue threads: .*(answered there)" "$SERVE_LOG"; then ok "$label: the queue threads answered their stored writes"
    else not_ok "$label: the stored writes were not answered on the queue threads" "$(cat "$SERVE_LOG")"; fi
    check "$label: fvd check clean" fvd check q.fvd
}

# flush_kill_round: without a pending log (no --recovery-wait) the queue threads answer the writes
# they store and the main thread queues their records later (docs/DESIGN.md §2.5); a FLUSH takes
# every queue's records into its commit first (here the only drain: FVD_TEST_HOLD_STORED).
# 300 writes, a FLUSH of the device (`sync DEV`:
# fsync), then 300 more writes racing a SIGKILL of the daemon. The next serve must find every
# write made before the FLUSH; each 4 KiB slot equals the base with the first writes or with all
# of them (a write after the FLUSH is there or not: a volatile write cache may lose it).
flush_kill_round() {
    local rc dead writer out i
    rm -f q.fvd
    must "flush+kill: fvd create -b base.raw -F raw" fvd create -b base.raw -F raw q.fvd
    make_writes 53 600 > w53.list
    head -n 300 w53.list > w53a.list
    tail -n 300 w53.list > w53b.list
    cp base.raw model.raw
    apply_model w53a.list
    cp model.raw model-a.raw
    apply_model w53b.list
    # The main thread drains the queues' answered writes only when a FLUSH comes (a test hook):
    # the FLUSH alone must take the first 300 writes' records into its commit.
    export FVD_TEST_HOLD_STORED=1
    serve_must q.fvd --queues 2 --no-prefetch --dev-id 6
    unset FVD_TEST_HOLD_STORED
    dead=$SERVE_PID
    rc=0; write_device w53a.list w53a.log || rc=$?
    expect "flush+kill: 300 writes succeed" "$rc" 0 "$(tail -n 20 w53a.log)"
    check "flush+kill: a FLUSH of the device (sync: fsync of the block device)" t sync "$SERVE_DEV"
    write_device w53b.list w53b.log &
    writer=$!
    sleep 0.5
    echo "# SIGKILL to the daemon (pid $dead) while 300 more writes run"
    kill -KILL "$dead"
    wait_pid "$dead" 30
    wait_pid "$writer" 120
    if [[ $WAIT_RC != timeout ]]; then ok "flush+kill: the writes after the kill end (I/O errors), no hang"
    else not_ok "flush+kill: writes still blocked 120 s after the kill"; kill -KILL "$writer" 2>/dev/null || true; fi
    # The dead server's block device goes away by itself (its /dev/ublkc6 stays until the next
    # serve on that id deletes it): wait, as a new device 6 must not race its removal.
    for ((i = 0; i < 300; i++)); do [[ -b /dev/ublkb6 ]] || break; sleep 0.1; done
    [[ ! -b /dev/ublkb6 ]] || not_ok "flush+kill: /dev/ublkb6 still a block device 30 s after the kill"
    serve_must q.fvd --no-prefetch --dev-id 6
    out=$(read_dev "$SERVE_DEV" 0 $((64 << 20)) | node -e '
        const fs = require("fs");
        const dev = fs.readFileSync(0), a = fs.readFileSync("model-a.raw"), all = fs.readFileSync("model.raw");
        let bad = 0, later = 0;
        for (let at = 0; at < a.length; at += 4096) {
            const d = dev.subarray(at, at + 4096);
            if (d.equals(a.subarray(at, at + 4096))) continue;
            if (d.equals(all.subarray(at, at + 4096))) later++;
            else bad++;
        }
        console.log(`${bad} ${later}`);')
    if [[ ${out%% *} == 0 ]]; then ok "flush+kill: every write before the FLUSH is there (${out#* } slots of later writes too)"
    else not_ok "flush+kill: $out (slots differing from both models, slots of later writes)"; fi
    serve_stop "flush+kill, served again"
    check "flush+kill: fvd check clean" fvd check q.fvd
}

kill_round() {
    local rc n dev dead writer
    rm -f q.fvd
    must "kill: fvd create $BLOCK_OPT -b base.raw -F raw" fvd create $BLOCK_OPT -b base.raw -F raw q.fvd
    cp base.raw model.raw
    make_writes 77 400 > w77.list
    apply_model w77.list
    # The main thread leaves the queues' answered writes in their rings (a test hook): at the
    # kill their records are only in the queue logs, which the recovery must apply.
    export FVD_TEST_HOLD_STORED=1
    serve_must q.fvd --queues 2 --no-prefetch --recovery-wait 60
    unset FVD_TEST_HOLD_STORED
    dev=$SERVE_DEV dead=$SERVE_PID
    write_device w77.list w77.log &
    writer=$!
    sleep 1.5
    kill -KILL "$dead"
    wait_pid "$dead" 30
    serve_must q.fvd --queues 2 --no-prefetch --recovery-wait 60
    expect "kill: the next serve took the same device over" "$SERVE_DEV" "$dev" "$(cat "$SERVE_LOG")"
    rc=0; wait "$writer" || rc=$?
    expect "kill: every write held across the kill completes" "$rc" 0 "$(tail -n 20 w77.log)"
    device_is_model "kill"
    serve_stop "kill, recovered"
    n=$(queue_cow_count)
    if ((n > 0)); then
        ok "kill: the recovered daemon stored $n blocks on the queue threads"
        # --recovery-wait keeps a pending log: each queue's record goes to its own queue log
        # before the answer (FORMAT.md §14.4); the kill above tested that it is applied.
        if grep -q "copy-on-write on the queue threads: .*(answered there)" "$SERVE_LOG"; then ok "kill: with a pending log too, the queue threads answered them"
        else not_ok "kill: with a pending log, the stored writes were not answered on the queue threads" "$(cat "$SERVE_LOG")"; fi
    else ok "kill: the writes were done before the kill (the recovered daemon stored none)"; fi
    check "kill: fvd check clean" fvd check q.fvd
    serve_must q.fvd --no-prefetch
    device_is_model "kill, served again"
    serve_stop "served again"
}

off_round() {
    local rc
    rm -f q.fvd
    must "off: fvd create $BLOCK_OPT -b base.raw -F raw" fvd create $BLOCK_OPT -b base.raw -F raw q.fvd
    cp base.raw model.raw
    make_writes 91 150 > w91.list
    apply_model w91.list
    export FVD_QUEUE_COW=0
    serve_must q.fvd --queues 2 --no-prefetch
    unset FVD_QUEUE_COW
    rc=0; write_device w91.list w91.log || rc=$?
    expect "off: FVD_QUEUE_COW=0, 150 writes succeed" "$rc" 0 "$(tail -n 20 w91.log)"
    device_is_model "off (engine copy-on-write)"
    serve_stop "off"
    expect "off: no block stored on the queue threads" "$(queue_cow_count)" 0 "$(cat "$SERVE_LOG")"
}

# busy_round: copy-on-read yields to a busy guest (docs/DESIGN.md §2.2): 4K random reads at QD16
# are answered from the base without hints; reads one at a time are hinted and copied.
busy_round() {
    local rc hints busy
    rm -f q.fvd
    must "busy: fvd create -b base.raw -F raw" fvd create -b base.raw -F raw q.fvd
    serve_must q.fvd --queues 1 --no-prefetch
    rc=0; t fio --name=busy --filename="$SERVE_DEV" --rw=randread --bs=4k --iodepth=16 --direct=1 \
        --ioengine=libaio --runtime=3 --time_based=1 --size=48M > busy-fio.log 2>&1 || rc=$?
    expect "busy: fio 4K random reads at QD16 succeed" "$rc" 0 "$(tail -n 20 busy-fio.log)"
    # Hints resume once the queue has been quiet for COR_QUIET_MS (100 ms); the 512 reads below
    # can all finish within that on a quiet host, so they start after a pause.
    sleep 1
    check "busy: reads one at a time (QD1) of the last 8 MiB" t dd if="$SERVE_DEV" of=/dev/null iflag=direct bs=16k skip=$((56 * 64)) count=512 status=none
    serve_stop "busy"
    hints=$(sed -n 's/.*copy-on-read hints: \([0-9]*\),.*/\1/p' "$SERVE_LOG" | tail -n 1)
    busy=$(sed -n 's/.*; \([0-9]*\) base reads not hinted while the queue was busy.*/\1/p' "$SERVE_LOG" | tail -n 1)
    if [[ -n $busy ]] && ((busy > 0)); then ok "busy: $busy base reads at QD16 were not hinted"
    else not_ok "busy: no base read skipped its hint while the queue was busy" "$(cat "$SERVE_LOG")"; fi
    if [[ -n $hints ]] && ((hints >= 64)); then ok "busy: $hints hints from the reads one at a time (8 MiB in 16 KiB reads)"
    else not_ok "busy: reads one at a time were not hinted ($hints)" "$(cat "$SERVE_LOG")"; fi
}

BLOCK_OPT="" # fvd create's block size option for the rounds (empty: the default)

scenario() {
    local i base_sum
    mkdir -p pat
    for ((i = 1; i <= 64; i++)); do pattern_file "pat/$i" 65536 "0x$(printf '%02x' "$i")"; done
    random_file base.raw 64
    base_sum=$(sha256sum < base.raw)
    # FVD_QUEUE_COW=all: partial blocks' copy-on-write on the queue threads too (the default
    # stores only whole blocks there: the prefetch rounds below). 64 KiB blocks, so that most
    # writes are partial blocks (the default over a base is 4 KiB: every write here whole blocks).
    BLOCK_OPT="--block-size 64K"
    export FVD_QUEUE_COW=all
    cow_round "no prefetch, all on the queue threads" 11 --no-prefetch
    kill_round
    unset FVD_QUEUE_COW
    # A slow prefetch: its copies run through the whole round instead of making the base local
    # first. At 64 KiB blocks partial blocks go to the engine and whole ones to the queue threads,
    # racing each other; at 4 KiB (the default) every write is stored on the queue threads.
    # The 64 KiB round and the engine's copy-on-write (off_round) with E2E_LONG=1 (make test-full),
    # not in make test (CI's time): the 4 KiB round races prefetch copies against the writes too.
    if long_rounds; then
        cow_round "prefetch, 64K blocks (whole blocks on the queue threads)" 23 --prefetch-rate 4M
    fi
    BLOCK_OPT=""
    cow_round "prefetch, 4K blocks (the default)" 29 --prefetch-rate 4M
    flush_kill_round
    if long_rounds; then off_round
    else skip "the prefetch round at 64K blocks and the round with FVD_QUEUE_COW=0: E2E_LONG=1 (make test-full) runs them"; fi
    busy_round
    expect "the base's sha256 never changed" "$(sha256sum < base.raw)" "$base_sum"
}
