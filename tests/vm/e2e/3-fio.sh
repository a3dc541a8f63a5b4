# tests/vm/e2e/3-fio.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: fio verify=crc32c on the raw device (libaio, O_DIRECT, 2 queues, iodepth 32, 2 jobs)
# timeout: 480
#
# A 256 MiB image (raw-like layout, ring transfers; then a 128 MiB compact one, synchronous
# transfers) served with --queues 2.  fio: 2 jobs × 128 MiB of random writes (4k–128k
# blocks, each job its own half), iodepth 32, then fio's verify pass reads everything back and
# checks crc32c.  The daemon is restarted and fio --verify_only re-reads the same blocks (the data
# persisted in the image).  Then sequential 1 MiB writes (above max-io, so split requests) with
# io_uring and verify.  fio must report no errors and no verify failures.

# fio_ok NAME LOG-FILE RC: the run exited 0, reported err=0 and no verify failure.
fio_ok() {
    local name=$1 log=$2 rc=$3
    if [[ $rc == 0 ]] && grep -q 'err= 0' "$log" &&
        ! grep -qiE 'verify: bad|bad magic|verify failed|crc32c.*(mismatch|bad)|io_u error|fio: pid=' "$log"; then
        ok "$name: $(grep -E '^ *(READ|WRITE):' "$log" | sed 's/^ *//; s/ (.*io=/ io=/; s/, run=.*//' | tr '\n' ' ')"
    else
        not_ok "$name (fio exit $rc)" "$(grep -viE '^ *(lat|clat|slat|bw|iops|cpu|IO depths|submit|complete|issued|latency) ' "$log" | grep -v '^ *|' | tail -n 40)"
    fi
}

# serve_memory LABEL [LIMIT-BYTES]: reports VmRSS/VmHWM of the running `fvd serve` ("# fvd serve
# VmRSS ...") and, with a limit, checks VmRSS below it. Request buffers are faulted in as used and
# trimmed to 64 KiB per tag once idle for 5 s (daemon/ublk/queue-loop.ts), not 2 queues × depth ×
# 512 KiB resident from the start.
serve_memory() {
    local label=$1 limit=${2:-} rss hwm
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$SERVE_PID/status")
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$SERVE_PID/status")
    echo "# fvd serve VmRSS $((rss / 1024)) MiB, VmHWM $((hwm / 1024)) MiB ($label)"
    [[ -z $limit ]] || expect "$label: fvd serve VmRSS < $limit B" "$((rss * 1024 < limit))" 1 "VmRSS ${rss} kB, VmHWM ${hwm} kB"
}

# fio_round LAYOUT SIZE-MIB: create, serve, randwrite+verify, restart, verify_only, sequential.
fio_round() {
    local layout=$1 mib=$2 img=$D/fio-$1.fvd rc l="[$1 layout]"
    must "fvd create --layout $layout $img ${mib}M" fvd create --layout "$layout" "$img" "${mib}M"
    serve_must "$img" --queues 2 --depth 64
    expect "$l the queue workers' fast path transfers: ${FVD_FAST_IO:-ring}" \
        "$(grep -o 'fast path: [a-z]* transfers' "$SERVE_LOG" | head -1)" "fast path: ${FVD_FAST_IO:-ring} transfers"
    expect "$l the device has 2 hardware queues" "$(find /sys/block/ublkb"$SERVE_ID"/mq -mindepth 1 -maxdepth 1 | wc -l)" 2
    local job=(--name=fvd-verify --filename="$SERVE_DEV" --ioengine=libaio --direct=1 --iodepth=32
        --numjobs=2 --size=$((mib / 2))M --offset_increment=$((mib / 2))M --rw=randwrite --bsrange=4k-128k
        --randrepeat=1 --verify=crc32c --verify_fatal=1 --group_reporting)
    rc=0; t fio "${job[@]}" > fio1.log 2>&1 || rc=$?
    fio_ok "$l fio randwrite + verify (crc32c, libaio, direct, 2 jobs × $((mib / 2)) MiB, iodepth 32)" fio1.log $rc
    serve_stop "$layout, after fio"
    serve_must "$img" --queues 2 --depth 64
    rc=0; t fio "${job[@]}" --verify_only > fio2.log 2>&1 || rc=$?
    fio_ok "$l after a daemon restart fio --verify_only finds the same data" fio2.log $rc
    rc=0
    t fio --name=fvd-seq --filename="$SERVE_DEV" --ioengine=io_uring --direct=1 --iodepth=8 --numjobs=1 \
        --size="${mib}M" --rw=write --bs=1M --verify=crc32c --verify_fatal=1 > fio3.log 2>&1 || rc=$?
    fio_ok "$l fio sequential 1 MiB writes + verify (io_uring, direct, iodepth 8)" fio3.log $rc
    # Right after the jobs: Node's ~70-80 MiB plus the buffers the jobs touched (up to 512 KiB per
    # tag), reported only; 7 s later the trim has run: asserted (2 × 64 MiB populated would fail).
    serve_memory "$l after the fio jobs"
    sleep 7 # tags idle for 5 s give back their buffer above 64 KiB
    serve_memory "$l after the fio jobs, 7 s idle" 100000000
    serve_stop "$layout, final"
    check "$l fvd check of the image exits 0" fvd check "$img"
    rm -f "$img"
}

scenario() {
    # The scenario directory is on the guest's overlay root, where the worker picks ring
    # transfers; the compact round forces the synchronous ones (daemon/direct-io.ts).
    FVD_FAST_IO=ring fio_round raw 256
    FVD_FAST_IO=memory fio_round compact 128
}
