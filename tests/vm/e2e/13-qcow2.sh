# tests/vm/e2e/13-qcow2.sh — sourced by tests/vm/e2e.sh (with lib.sh), runs `scenario` in $D.
# title: FVD image over a compressed qcow2 template holding ext4: served, prefetched, template deleted
# timeout: 900
#
# base.raw = ext4 built with mkfs.ext4 -d from a tree of files; tmpl.qcow2 = `qemu-img convert -c`
# of it (zlib-compressed clusters; unused space left unallocated); img.fvd = fvd create -b
# tmpl.qcow2 -F qcow2.  Served: every file reads back right (sha256) and a new file is written.
# Stopped: `fvd prefetch` makes the image fully local; the template (never modified, sha256) is
# deleted; served again: every file, old and new, reads back right and e2fsck is clean.
# tmplz.qcow2 = the same disk with zstd-compressed clusters (on Node 20 decoded by the system's
# libzstd through koffi, on newer Node by node:zlib): an FVD image over it served with prefetching
# on (bulk reads: the decode workers), every file reads back right, the template unchanged.

scenario() {
    local i raw=$D/base.raw tmpl=$D/tmpl.qcow2 img=$D/img.fvd
    mkdir -p src/big src/small m
    random_file src/big/4m.bin 4
    for ((i = 0; i < 20; i++)); do head -c $((RANDOM * 3 % 70000)) "$E2E_STATE/random.pool" > "src/small/f$i"; done
    # Compressible data too, so some clusters are stored compressed.
    for ((i = 0; i < 20; i++)); do awk -v n=$((i * 90 + 3)) -v i=$i 'BEGIN { for (j = 0; j < n; j++) print "line " j " of text file " i " in the template" }' > "src/small/t$i.txt"; done
    random_file new.bin 2
    # (qemu-img compressing under emulation is slow: the tree is kept small.)
    ensure "mkfs.ext4 -d (a 64 MiB ext4 image holding the tree)" \
        bash -c "truncate -s 64M '$raw' && mkfs.ext4 -q -F -d src '$raw'" || exit 1
    ensure "qemu-img convert -c -O qcow2 base.raw tmpl.qcow2 (compressed template)" \
        qemu-img convert -c -f raw -O qcow2 "$raw" "$tmpl" || exit 1
    ensure "qemu-img convert -c -o compression_type=zstd (the same disk, zstd template)" \
        qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$raw" "$D/tmplz.qcow2" || exit 1
    rm -f "$raw"
    local tmpl_sum
    tmpl_sum=$(sha256sum < "$tmpl")
    (cd src && find . -type f -print0 | sort -z | xargs -0 sha256sum) > src.sha256
    cp src.sha256 template.sha256
    must "fvd create -b tmpl.qcow2 -F qcow2 img.fvd" fvd create -b "$tmpl" -F qcow2 "$img"
    local info
    info=$(fvd info --backing-chain "$img" 2>&1)
    if grep -q 'compression type: zlib' <<< "$info"; then ok "fvd info --backing-chain shows the zlib qcow2 level"
    else not_ok "fvd info --backing-chain does not show the qcow2 level" "$info"; fi

    serve_must "$img" --no-prefetch
    expect "device size = the template's virtual size (64 MiB)" "$(t blockdev --getsize64 "$SERVE_DEV" 2>&1)" $((64 << 20))
    ensure "mount the template's ext4 through the FVD image" t mount -t ext4 "$SERVE_DEV" m || exit 1
    check "every template file reads back with the right sha256 ($(wc -l < src.sha256) files)" \
        t bash -c "cd m && sha256sum -c --quiet ../src.sha256"
    check "write a new file on the device" t bash -c "mkdir m/new && cp '$D/new.bin' m/new/new.bin && sync"
    (cd "$D" && sha256sum new.bin | sed 's| new.bin| ./new/new.bin|') >> src.sha256
    check "umount" t umount m
    serve_stop "over the template"
    expect "tmpl.qcow2 unchanged after serving and writing" "$(sha256sum < "$tmpl")" "$tmpl_sum"

    local zsum
    zsum=$(sha256sum < "$D/tmplz.qcow2")
    must "fvd create -b tmplz.qcow2 -F qcow2 imgz.fvd (zstd template)" fvd create -b "$D/tmplz.qcow2" -F qcow2 "$D/imgz.fvd"
    info=$(fvd info --backing-chain "$D/imgz.fvd" 2>&1)
    if grep -q 'compression type: zstd' <<< "$info"; then ok "fvd info --backing-chain shows the zstd qcow2 level"
    else not_ok "fvd info --backing-chain does not show the zstd level" "$info"; fi
    serve_must "$D/imgz.fvd"
    ensure "mount the zstd template's ext4 read-only" t mount -t ext4 -o ro "$SERVE_DEV" m || exit 1
    check "every template file reads back from the zstd template ($(wc -l < template.sha256) files)" \
        t bash -c "cd m && sha256sum -c --quiet ../template.sha256"
    check "umount" t umount m
    serve_stop "over the zstd template"
    check "fvd check of the image over the zstd template exits 0" fvd check "$D/imgz.fvd"
    expect "tmplz.qcow2 unchanged after serving" "$(sha256sum < "$D/tmplz.qcow2")" "$zsum"

    must "fvd prefetch img.fvd (copies the template in)" fvd prefetch -q "$img"
    info=$(fvd info "$img" 2>&1)
    if grep -q 'fully local: yes' <<< "$info"; then ok "fvd info says fully local"
    else not_ok "not fully local after fvd prefetch" "$info"; fi
    expect "tmpl.qcow2 unchanged after prefetching" "$(sha256sum < "$tmpl")" "$tmpl_sum"
    rm -f "$tmpl"

    serve_must "$img"
    ensure "mount without the template" t mount -t ext4 "$SERVE_DEV" m || exit 1
    check "every file, old and new, reads back with the right sha256 ($(wc -l < src.sha256) files)" \
        t bash -c "cd m && sha256sum -c --quiet ../src.sha256"
    check "umount" t umount m
    check "e2fsck -f -n clean" t e2fsck -f -n "$SERVE_DEV"
    serve_stop "without the template"
    check "fvd check of the image exits 0" fvd check "$img"
}
