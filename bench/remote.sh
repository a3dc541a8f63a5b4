#!/usr/bin/env bash
# `make bench-remote`: a template on a server made local — fvd (create + prefetch to FULLY_LOCAL)
# against `qemu-img convert` from the same URL (qemu's curl and nbd drivers, Debian
# qemu-block-extra), over HTTP (nginx-light) and NBD (nbdkit's file plugin, which answers block
# status, behind its stats filter), all on loopback. One run each, the figures side by side; over
# NBD also qemu-img with `-t writeback`, which flushes its output at the end as fvd must.
#
# The template: BENCH_SIZE (default 1 GiB) raw, 3/4 random data and 1/4 holes. Bytes
# transferred are counted by the servers — nginx's access log ($body_bytes_sent summed) and
# nbdkit's stats filter — and, for fvd, also by fvd itself (`fvd prefetch` prints them).
# Over NBD both fvd and qemu skip the holes (block status); HTTP carries no hole information, so
# over HTTP every byte of the file is a byte to fetch. "Each byte once" means fetched = allocated
# (NBD) and fetched = size (HTTP).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
FVD=(node "$root/build/daemon/cli.js")
SIZE=${BENCH_SIZE:-1G}
die() { echo "bench-remote: $*" >&2; exit 1; }
bash "$root/tests/install-test-deps.sh"
for p in nginx nbdkit qemu-img; do command -v "$p" >/dev/null || [[ -x /usr/sbin/$p ]] || die "$p is not installed"; done
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

dir=$(mktemp -d /tmp/fvd-bench-remote.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
cd "$dir"

# --- the template ----------------------------------------------------------------------------
bytes=$(numfmt --from=iec "$SIZE")
mkdir www
truncate -s "$bytes" www/t.raw
quarter=$((bytes / 4 / 1048576))
# data, hole, data, data (MiB granularity): 3/4 allocated
for q in 0 2 3; do
    head -c $((quarter * 1048576)) /dev/urandom | dd of=www/t.raw bs=1M seek=$((q * quarter)) conv=notrunc status=none
done
# The data written; st_blocks would also count the file system's extent-tree blocks (4 KiB more
# on ext4, which made a correct fetch look one block short).
allocated=$((3 * quarter * 1048576))
echo "template: $(numfmt --to=iec "$bytes") raw, $(numfmt --to=iec "$allocated") allocated ($allocated bytes)"

# --- servers ---------------------------------------------------------------------------------
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > nginx.conf <<CONF
$( [[ $(id -u) == 0 ]] && echo 'user root;' )
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log;
events { worker_connections 256; }
http {
  log_format bytes '\$body_bytes_sent';
  access_log $dir/access.log bytes;
  client_body_temp_path $dir/tmp; proxy_temp_path $dir/tmp; fastcgi_temp_path $dir/tmp; uwsgi_temp_path $dir/tmp; scgi_temp_path $dir/tmp;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$port; root $dir/www; location / { } }
}
CONF
"$nginx_bin" -c "$dir/nginx.conf" -p "$dir" -e "$dir/nginx-error.log" & pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
url="http://127.0.0.1:$port/t.raw"

# Body bytes nginx sent, minus the 1-byte probes each open of the URL makes (bytes=0-0).
http_bytes() { awk '{ s += $1; if ($1 == 1) p++ } END { printf "%d (+%d probe bytes)", s - p, p }' access.log; }
reset_http() { : > access.log; kill -USR1 "${pids[0]}" 2>/dev/null || true; sleep 0.2; : > access.log; }

# nbdkit: one server per measurement (its stats file is written when it exits)
nbd_start() {
    rm -f nbd.sock stats.txt
    nbdkit -f -r -U "$dir/nbd.sock" --filter=stats file file="$dir/www/t.raw" statsfile="$dir/stats.txt" & nbd_pid=$!
    for _ in $(seq 200); do [[ -S nbd.sock ]] && break; sleep 0.05; done
}
nbd_stop() {
    kill -TERM "$nbd_pid"; wait "$nbd_pid" 2>/dev/null || true
    # "read: N ops, T s, SIZE, RATE": the SIZE with its unit, converted to bytes
    awk '/^read:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+$/ && $(i+1) ~ /^(B|KiB|MiB|GiB|TiB),?$/) { u = $(i+1); sub(/,/, "", u); printf "%s %s\n", $i, u; exit } }' stats.txt
}
nbd_url="nbd+unix:///?socket=$dir/nbd.sock"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
cat www/t.raw > /dev/null   # the server's page cache warm for everyone alike

echo
echo "== HTTP (nginx on loopback) =="
reset_http
t0=$(now)
"${FVD[@]}" create -b "$url" -F raw http.fvd > /dev/null
out=$("${FVD[@]}" prefetch -q http.fvd)
t1=$(now)
fvd_http=$(elapsed "$t0" "$t1")
fvd_http_bytes=$(http_bytes)
fvd_self=$(sed -n 's/.*, \([0-9]*\) bytes fetched from.*/\1/p' <<< "$out")
echo "fvd create + prefetch:   ${fvd_http} s, server sent $fvd_http_bytes bytes, fvd counted $fvd_self"
reset_http
t0=$(now)
# qemu 7.2's curl driver has been seen to stop making progress (no CPU, no request) part way:
# give it QEMU_TIMEOUT seconds (default 600) and say so rather than hang the benchmark.
if timeout "${QEMU_TIMEOUT:-600}" qemu-img convert -f raw -O raw "$url" qemu-http.raw; then
    t1=$(now)
    qemu_http=$(elapsed "$t0" "$t1")
    echo "qemu-img convert (curl): ${qemu_http} s, server sent $(http_bytes) bytes"
else
    t1=$(now)
    qemu_http=$(elapsed "$t0" "$t1")
    echo "qemu-img convert (curl): DID NOT FINISH within ${QEMU_TIMEOUT:-600} s: stalled after the server sent $(http_bytes) bytes"
fi
cmp <("${FVD[@]}" convert -O raw http.fvd /dev/stdout 2>/dev/null || "${FVD[@]}" convert -O raw http.fvd flat.raw && cat flat.raw) www/t.raw >/dev/null && echo "fvd image equals the template"
if [[ -s qemu-http.raw ]] && cmp -s qemu-http.raw www/t.raw; then
    echo "ratio qemu-img / fvd: $(awk -v a="$qemu_http" -v b="$fvd_http" 'BEGIN { printf "%.2f", a / b }')   (> 1: fvd is faster)"
else
    echo "ratio: none (qemu-img's copy is incomplete)"
fi
# The like-for-like figure (qemu-img flushes its output at the end, as fvd must before it records
# FULLY_LOCAL; see the NBD part below).
reset_http
rm -f qemu-http.raw
t0=$(now)
if timeout "${QEMU_TIMEOUT:-600}" qemu-img convert -t writeback -f raw -O raw "$url" qemu-http.raw; then
    t1=$(now)
    qemu_http_wb=$(elapsed "$t0" "$t1")
    echo "qemu-img convert -t writeback (curl, flushed): ${qemu_http_wb} s, server sent $(http_bytes) bytes"
    echo "ratio qemu-img -t writeback / fvd: $(awk -v a="$qemu_http_wb" -v b="$fvd_http" 'BEGIN { printf "%.2f", a / b }')"
else
    echo "qemu-img convert -t writeback (curl): DID NOT FINISH within ${QEMU_TIMEOUT:-600} s: stalled after the server sent $(http_bytes) bytes"
fi
[[ ${fvd_http_bytes%% *} == "$bytes" ]] && echo "each byte once: fetched = template size ($bytes)" || echo "NOTE: fetched $fvd_http_bytes, template size $bytes"

echo
echo "== NBD (nbdkit file plugin, unix socket) =="
nbd_start
t0=$(now)
"${FVD[@]}" create -b "$nbd_url" -F raw nbd.fvd > /dev/null
out=$("${FVD[@]}" prefetch -q nbd.fvd)
t1=$(now)
fvd_nbd=$(elapsed "$t0" "$t1")
fvd_nbd_stats=$(nbd_stop)
fvd_self=$(sed -n 's/.*, \([0-9]*\) bytes fetched from.*/\1/p' <<< "$out")
echo "fvd create + prefetch:   ${fvd_nbd} s, nbdkit read ${fvd_nbd_stats:-?}, fvd counted $fvd_self bytes"
nbd_start
t0=$(now)
qemu-img convert -f raw -O raw "$nbd_url" qemu-nbd.raw
t1=$(now)
qemu_nbd=$(elapsed "$t0" "$t1")
echo "qemu-img convert (nbd):  ${qemu_nbd} s, nbdkit read $(nbd_stop)"
echo "ratio qemu-img / fvd: $(awk -v a="$qemu_nbd" -v b="$fvd_nbd" 'BEGIN { printf "%.2f", a / b }')   (> 1: fvd is faster)"
# qemu-img convert's default cache mode for its output is "unsafe": it never flushes, so its time
# ends with the data still in the page cache. fvd's FULLY_LOCAL is recorded only once the copied
# data is durable (fdatasync). `-t writeback` makes qemu-img flush when it closes the output:
# the like-for-like figure.
nbd_start
rm -f qemu-nbd.raw
t0=$(now)
qemu-img convert -t writeback -f raw -O raw "$nbd_url" qemu-nbd.raw
t1=$(now)
qemu_nbd_wb=$(elapsed "$t0" "$t1")
echo "qemu-img convert -t writeback (nbd, flushed): ${qemu_nbd_wb} s, nbdkit read $(nbd_stop)"
echo "ratio qemu-img -t writeback / fvd: $(awk -v a="$qemu_nbd_wb" -v b="$fvd_nbd" 'BEGIN { printf "%.2f", a / b }')"
[[ $fvd_self == "$allocated" ]] && echo "each byte once: fetched = allocated size ($allocated)" || echo "NOTE: fvd fetched $fvd_self, allocated $allocated"
