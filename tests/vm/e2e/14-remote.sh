# tests/vm/e2e/14-remote.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: a template over HTTP (nginx on the guest's loopback): mounted, read, prefetched, server stopped, -EIO while down, recovery, daemon recovered while it is down
# timeout: 1300
#
# tpl.raw = ext4 built with mkfs.ext4 -d, served by nginx (nginx-light; the guest runs the host's
# root file system, so the host's nginx is here) on 127.0.0.1; img.fvd = fvd create -b
# http://127.0.0.1:PORT/tpl.raw -F raw.  Served: mounted, every file reads back right (sha256);
# the prefetcher makes the image fully local ("prefetch done" logged with the bytes fetched), fvd
# info shows the remote figures; nginx stopped: after dropping the page cache every file still
# reads right.  Then a second image, served without prefetching, with a 10 s retry budget: the
# first MiB read (copy-on-read), nginx stopped: a direct read of a block not yet local fails
# (EIO) within the budget, the local MiB still reads, a write works, the daemon stays up; nginx
# back: the failed range reads the template's bytes, and the whole device equals the template
# plus the write. A third image, served with --recovery-wait: its first MiB written back in
# place and flushed (local for sure: copy-on-read's copies are soft, a SIGKILL may lose them),
# nginx stopped, the daemon SIGKILLed, a read issued meanwhile: the next serve recovers the same
# device anyway ("recovering anyway"), the held read returns the local MiB, an absent block fails
# (EIO), a write works; nginx back: the device equals the template plus the write. Last, `serve`
# with nginx down: one line of error, no device added.

NGINX_PORT=18080
# shellcheck source=../nginx-conf.sh
source "$(dirname "${BASH_SOURCE[0]}")/../nginx-conf.sh"

nginx_start() {
    local bin
    bin=$(command -v nginx || echo /usr/sbin/nginx)
    mkdir -p "$D/nginx"
    nginx_conf "$D/nginx" "$NGINX_PORT" "$D/www" > "$D/nginx/nginx.conf"
    # In this shell (not under check/ensure, whose $(...) would wait for nginx's output to end).
    "$bin" -c "$D/nginx/nginx.conf" -p "$D/nginx" -e "$D/nginx/error.log" < /dev/null > "$D/nginx/out" 2>&1 &
    NGINX_PID=$!
    echo "$NGINX_PID" >> "$E2E_STATE/pids"
}
nginx_ready() {
    local i
    for ((i = 0; i < 300; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$NGINX_PORT") 2>/dev/null && return 0
        sleep 0.1
    done
    cat "$D/nginx/out" "$D/nginx/error.log" 2>/dev/null
    return 1
}
nginx_stop() {
    kill -KILL "$NGINX_PID" 2>/dev/null
    wait "$NGINX_PID" 2>/dev/null || true
}

scenario() {
    if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
        skip "nginx is not installed (apt-get install nginx-light; tests/vm/prepare.sh does)"
        return 0
    fi
    ip link set lo up 2>/dev/null || busybox ip link set lo up
    local tpl=$D/www/tpl.raw img=$D/img.fvd url="http://127.0.0.1:$NGINX_PORT/tpl.raw" i
    mkdir -p www src/big src/small m
    random_file src/big/40m.bin 40
    random_file src/big/9m.bin 9
    for ((i = 0; i < 60; i++)); do head -c $((RANDOM * 3 % 70000)) "$E2E_STATE/random.pool" > "src/small/f$i"; done
    must "mkfs.ext4 -d (a 128 MiB template holding the tree)" \
        bash -c "truncate -s 128M '$tpl' && mkfs.ext4 -q -F -d src '$tpl'"
    (cd src && find . -type f -print0 | sort -z | xargs -0 sha256sum) > src.sha256
    # A generous budget for everything (an emulated guest on a busy host can be very slow), and a
    # 10 s one for the outage: served with --remote-config remote-outage.conf.
    printf '[http://127.0.0.1:%s/]\nretry-budget = 60s\nstall-timeout = 20s\n' "$NGINX_PORT" > remote.conf
    printf '[http://127.0.0.1:%s/]\nretry-budget = 10s\nstall-timeout = 5s\n' "$NGINX_PORT" > remote-outage.conf
    export FVD_REMOTE_CONFIG=$D/remote.conf
    nginx_start; ensure "nginx serves the template on 127.0.0.1:$NGINX_PORT" nginx_ready || exit 1

    must "fvd create -b $url -F raw img.fvd" fvd create -b "$url" -F raw "$img"
    check "fvd info names the URL and its identity" \
        bash -c "${FVD[*]} info '$img' | grep -q 'base image: $url (raw, 128 MiB)' && ${FVD[*]} info '$img' | grep -Eq '^base identity: size=134217728 etag='"

    serve_must "$img" --remote-config "$D/remote.conf"
    ensure "mount the template's ext4 through the image" t mount -t ext4 "$SERVE_DEV" m || exit 1
    check "every template file reads back with the right sha256 ($(wc -l < src.sha256) files)" \
        t bash -c "cd m && sha256sum -c --quiet ../src.sha256"
    for ((i = 0; i < 1200; i++)); do grep -q 'prefetch done' "$SERVE_LOG" && break; sleep 0.1; done
    if grep -qE 'prefetch done: .*remote [0-9.]+ [KMG]?i?B fetched' "$SERVE_LOG"; then ok "prefetched to fully local ($(grep -o 'remote [^)]*' "$SERVE_LOG" | tail -1))"
    else not_ok "prefetching did not finish within 120 s" "$(cat "$SERVE_LOG")"; fi
    check "fvd info of the served image: fully local, remote figures from the daemon" \
        bash -c "${FVD[*]} info '$img' | tee info.out | grep -q 'fully local: yes' && grep -q 'remote (served as $SERVE_DEV)' info.out"
    nginx_stop
    check "nginx stopped: after dropping the page cache every file still reads right" \
        t bash -c "sync && echo 3 > /proc/sys/vm/drop_caches && cd m && sha256sum -c --quiet ../src.sha256"
    check "umount" t umount m
    serve_stop "fully local"

    # --- an outage while not yet local ---------------------------------------------------------
    nginx_start; ensure "nginx back" nginx_ready || exit 1
    local img2=$D/img2.fvd
    must "fvd create img2.fvd over the URL" fvd create -b "$url" -F raw "$img2"
    serve_must "$img2" --no-prefetch --remote-config "$D/remote-outage.conf"
    check "read the first MiB (copy-on-read makes it local)" t dd if="$SERVE_DEV" of=first.bin iflag=direct bs=1M count=1 status=none
    sleep 1
    nginx_stop
    local t0=$SECONDS rc=0
    t dd if="$SERVE_DEV" of=/dev/null iflag=direct bs=64k skip=$((100 * 16)) count=1 status=none 2> dd.err || rc=$?
    local took=$((SECONDS - t0))
    if [[ $rc -ne 0 ]] && grep -qi 'input/output error' dd.err; then ok "server down: a read of an absent block fails with EIO (after ${took} s; budget 10 s)"
    else not_ok "server down: the read of an absent block did not fail with EIO (rc $rc)" "$(cat dd.err "$SERVE_LOG")"; fi
    if ((took <= 60)); then ok "no hang beyond the retry budget (${took} s; budget 10 s)"; else not_ok "the failing read took ${took} s"; fi
    check "server down: the local first MiB still reads the same" \
        t bash -c "cmp <(dd if='$SERVE_DEV' iflag=direct bs=1M count=1 status=none) first.bin"
    random_file patch.bin 1
    check "server down: a 1 MiB direct write works" t dd if=patch.bin of="$SERVE_DEV" oflag=direct bs=1M seek=64 conv=notrunc status=none
    if kill -0 "$SERVE_PID" 2>/dev/null; then ok "the daemon is still running"; else not_ok "the daemon died during the outage" "$(cat "$SERVE_LOG")"; fi
    nginx_start; ensure "nginx back" nginx_ready || exit 1
    check "server back: the failed range reads the template's bytes" \
        t bash -c "cmp <(dd if='$SERVE_DEV' iflag=direct bs=64k skip=1600 count=1 status=none) <(dd if='$tpl' bs=64k skip=1600 count=1 status=none)"
    cp "$tpl" model.raw
    dd if=patch.bin of=model.raw bs=1M seek=64 conv=notrunc status=none
    check "server back: the whole device equals the template plus the write" \
        t bash -c "cmp <(dd if='$SERVE_DEV' iflag=direct bs=1M status=none) model.raw"
    serve_stop "after the outage"
    check "fvd check of the outage image (server up)" fvd check "$img2"

    # --- the daemon killed while the server is down: the device is recovered anyway -------------
    local img4=$D/img4.fvd id4 held
    must "fvd create img4.fvd over the URL" fvd create -b "$url" -F raw "$img4"
    serve_must "$img4" --no-prefetch --recovery-wait 120 --remote-config "$D/remote-outage.conf"
    id4=$SERVE_ID
    check "recovery: read the first MiB" t dd if="$SERVE_DEV" of=first4.bin iflag=direct bs=1M count=1 status=none
    # Written back and flushed, so it is local for sure: copy-on-read's copies are soft (FVD's
    # lazy bitmap updates), and a SIGKILL may lose them — the block then reads from the base again.
    check "recovery: the first MiB written back in place and flushed" \
        t dd if=first4.bin of="$SERVE_DEV" oflag=direct conv=notrunc,fsync bs=1M count=1 status=none
    nginx_stop
    kill -KILL "$SERVE_PID"
    wait_pid "$SERVE_PID" 30
    expect "recovery: daemon killed by SIGKILL while the server is down" "$WAIT_RC" 137
    # A read issued while no server runs: the kernel holds it until the recovery.
    t dd if="/dev/ublkb$id4" of=held.bin iflag=direct bs=1M count=1 status=none 2> held.err &
    held=$!
    serve_must "$img4" --no-prefetch --recovery-wait 120 --remote-config "$D/remote-outage.conf"
    expect "recovery with the server down: the same device" "$SERVE_DEV" "/dev/ublkb$id4"
    if grep -q "recovering anyway" "$SERVE_LOG" && grep -q "recovered device $id4" "$SERVE_LOG"; then ok "recovery with the server down: recovered anyway ($(grep -o 'recovering anyway.*' "$SERVE_LOG"))"
    else not_ok "recovery with the server down: no 'recovering anyway' and 'recovered device $id4' in the log" "$(cat "$SERVE_LOG")"; fi
    # fvd info answers from the metadata and, from the server's run-time record (refreshed every
    # 5 s), says the base is unreachable. (Its own open attempt waits one retry budget: 10 s.)
    for ((i = 0; i < 100; i++)); do
        FVD_REMOTE_CONFIG=$D/remote-outage.conf t "${FVD[@]}" info "$img4" > info4.out 2>&1 && grep -q "remote (served as $SERVE_DEV): base unreachable since the recovery" info4.out && break
        sleep 0.1
    done
    if grep -q "remote (served as $SERVE_DEV): base unreachable since the recovery" info4.out && grep -q "^base reachable: no: .*ECONNREFUSED" info4.out; then ok "recovery, server down: fvd info says the base is unreachable ($(grep -o 'base unreachable since the recovery[^,]*, [0-9.]*% local' info4.out))"
    else not_ok "recovery, server down: fvd info does not say the base is unreachable" "$(cat info4.out)"; fi
    wait_pid "$held" 60
    if [[ $WAIT_RC == 0 ]] && cmp -s held.bin first4.bin; then ok "recovery: the read held while no server ran returns the local MiB"
    else not_ok "recovery: the held read ended $WAIT_RC" "$(cat held.err)"; fi
    check "recovery, server down: the local first MiB reads the same" \
        t bash -c "cmp <(dd if='$SERVE_DEV' iflag=direct bs=1M count=1 status=none) first4.bin"
    rc=0
    t dd if="$SERVE_DEV" of=/dev/null iflag=direct bs=64k skip=1600 count=1 status=none 2> dd4.err || rc=$?
    if [[ $rc -ne 0 ]] && grep -qi 'input/output error' dd4.err; then ok "recovery, server down: a read of an absent block fails with EIO"
    else not_ok "recovery, server down: the read of an absent block did not fail with EIO (rc $rc)" "$(cat dd4.err "$SERVE_LOG")"; fi
    check "recovery, server down: a 1 MiB direct write works" t dd if=patch.bin of="$SERVE_DEV" oflag=direct bs=1M seek=64 conv=notrunc status=none
    nginx_start; ensure "nginx back" nginx_ready || exit 1
    check "recovery, server back: the whole device equals the template plus the write" \
        t bash -c "cmp <(dd if='$SERVE_DEV' iflag=direct bs=1M status=none) model.raw"
    check "recovery, server back: the log says the base opened" grep -q "reachable again: opened" "$SERVE_LOG"
    for ((i = 0; i < 100; i++)); do
        t "${FVD[@]}" info "$img4" > info4.out 2>&1 && grep -q "remote (served as $SERVE_DEV): .* fetched" info4.out && break
        sleep 0.1
    done
    if grep -q "remote (served as $SERVE_DEV): .* fetched" info4.out && ! grep -q "unreachable" info4.out; then ok "recovery, server back: fvd info shows the remote figures again"
    else not_ok "recovery, server back: fvd info still says unreachable or shows no remote figures" "$(cat info4.out)"; fi
    serve_stop "recovered with the server down"
    check "fvd check of the recovered image (server up)" fvd check "$img4"
    # img2 is fully local now (the whole device was read): a fresh image for the refusal below.
    must "fvd create img3.fvd over the URL" fvd create -b "$url" -F raw "$D/img3.fvd"
    nginx_stop
    check "fvd check of the fully local image (server down)" fvd check "$img"

    # --- the server down at serve start: one line, no device -----------------------------------
    local before rc=0
    before=$(ublk_nodes)
    t "${FVD[@]}" serve "$D/img3.fvd" --remote-config "$D/remote-outage.conf" > down.out 2> down.err || rc=$?
    if [[ $rc -ne 0 && ! -s down.out ]]; then ok "serve with the server down exits $rc without a device path"
    else not_ok "serve with the server down: exit $rc, stdout '$(cat down.out)'" "$(cat down.err)"; fi
    one_line_error "serve with the server down" down.err
    expect "serve with the server down added no ublk device" "$(ublk_nodes)" "$before"
}
