#!/usr/bin/env bash
# tests/vm/prepare.sh — build everything the QEMU guest harness needs (idempotent).
#
#   * apt-installs qemu, virtiofsd, busybox-static and the userspace tools the
#     end-to-end suite runs *inside* the guest (the guest uses the host's root
#     file system over virtiofs, so host packages == guest packages);
#   * downloads Debian's linux-image-6.12*-cloud-amd64 .deb into the cache
#     ($FVD_VM_CACHE, default /var/cache/fvd-vm — never inside git);
#   * extracts vmlinuz and the needed modules (+ dependencies from modules.dep),
#     decompressing .ko.xz;
#   * builds a busybox-static initramfs whose /init is tests/vm/guest/init.
#
# Re-running is cheap: each step is skipped when its output is already present
# and newer than its inputs.  FVD_VM_REBUILD=1 forces the initramfs rebuild.
#
# Knobs (environment):
#   FVD_VM_CACHE       cache dir (default /var/cache/fvd-vm)
#   FVD_VM_KPKG        exact kernel package to use (default: newest
#                      linux-image-6.12.*+deb12-cloud-amd64 that apt knows)
#   FVD_VM_MODULES     modules to put in the initramfs (dependencies are added)
#   FVD_VM_NO_APT=1    skip the apt-get install step (offline re-runs)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${FVD_VM_CACHE:-/var/cache/fvd-vm}
# Modules the guest needs.  virtiofs and fuse are built into the 6.12 cloud
# kernel (CONFIG_VIRTIO_FS=y, CONFIG_FUSE_FS=y); they are listed anyway so that
# a kernel that has them as modules also works (built-ins are skipped).
# autofs4 and binfmt_misc are what systemd wants at start (else it logs errors
# and a failed unit makes `systemctl is-system-running` say "degraded").
modules_wanted=${FVD_VM_MODULES:-"fuse virtiofs overlay autofs4 binfmt_misc ublk_drv loop nbd xfs dm-mod dm-flakey"}

log() { printf '[prepare] %s\n' "$*" >&2; }
die() { printf '[prepare] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, cache in /var/cache)"

# Serialise concurrent runs (two run.sh may both decide to rebuild).
mkdir -p "$cache"
exec 9>"$cache/.prepare.lock"
flock 9

# ---------------------------------------------------------------------------
# 1. Host packages.  qemu-system-x86 pulls qemu-system-common (which ships
#    /usr/lib/qemu/virtiofsd on bookworm).  The rest are used in the guest.
# ---------------------------------------------------------------------------
pkgs=(qemu-system-x86 qemu-utils busybox-static
      e2fsprogs xfsprogs fio util-linux kmod xz-utils cpio gzip systemd dmsetup)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' \
        || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 && ${FVD_VM_NO_APT:-0} != 1 ]]; then
    log "installing: ${missing[*]}"
    # apt-get update only if the package lists look empty/stale for our needs.
    if ! apt-cache show "${missing[0]}" >/dev/null 2>&1; then
        apt-get update -q >&2
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >&2
fi
for bin in qemu-system-x86_64 /usr/lib/qemu/virtiofsd /bin/busybox depmod cpio xz; do
    command -v "$bin" >/dev/null || die "missing $bin after install"
done

# ---------------------------------------------------------------------------
# 2. Kernel package.  The meta package linux-image-6.12-cloud-amd64 lives in
#    bookworm-security and depends on one versioned package; use that one.
# ---------------------------------------------------------------------------
mkdir -p "$cache/debs"
kpkg=${FVD_VM_KPKG:-}
if [[ -z $kpkg ]]; then
    kpkg=$(apt-cache depends linux-image-6.12-cloud-amd64 2>/dev/null \
           | sed -n 's/^ *Depends: \(linux-image-6\.12[^ ]*-cloud-amd64\)$/\1/p' | head -n1)
fi
if [[ -z $kpkg ]]; then
    # Fallback: no (fresh) package lists.  Reuse whatever deb is cached, else update.
    deb=$(ls -1 "$cache"/debs/linux-image-6.12*-cloud-amd64_*.deb 2>/dev/null | sort -V | tail -n1 || true)
    if [[ -z $deb ]]; then
        apt-get update -q >&2
        kpkg=$(apt-cache depends linux-image-6.12-cloud-amd64 \
               | sed -n 's/^ *Depends: \(linux-image-6\.12[^ ]*-cloud-amd64\)$/\1/p' | head -n1)
        [[ -n $kpkg ]] || die "no linux-image-6.12*-cloud-amd64 in apt (bookworm-security missing?)"
    fi
fi
if [[ -n $kpkg ]]; then
    deb=$(ls -1 "$cache/debs/${kpkg}"_*.deb 2>/dev/null | tail -n1 || true)
    if [[ -z $deb ]]; then
        log "downloading $kpkg"
        # apt-get download writes into the cwd; _apt cannot write to root-owned
        # dirs, which only produces a harmless warning (download runs as root).
        (cd "$cache/debs" && apt-get download -q "$kpkg" >&2)
        deb=$(ls -1 "$cache/debs/${kpkg}"_*.deb | tail -n1)
    fi
fi
[[ -f $deb ]] || die "kernel deb not found"
kver=$(dpkg-deb -f "$deb" Package | sed 's/^linux-image-//')
log "kernel $kver ($(basename "$deb"))"

# ---------------------------------------------------------------------------
# 3. Extract the deb (whole tree, kept compressed) and run depmod on it: Debian
#    generates modules.dep in postinst, so the .deb does not ship one.
# ---------------------------------------------------------------------------
kdir=$cache/kernel/$kver
if [[ ! -f $kdir/.extracted || $deb -nt $kdir/.extracted ]]; then
    log "extracting to $kdir"
    rm -rf "$kdir"
    mkdir -p "$kdir"
    dpkg-deb -x "$deb" "$kdir/root"
    depmod -b "$kdir/root" "$kver"
    cp "$kdir/root/boot/vmlinuz-$kver" "$kdir/vmlinuz"
    cp "$kdir/root/boot/config-$kver" "$kdir/config"
    touch "$kdir/.extracted"
fi
mroot=$kdir/root/lib/modules/$kver

# ---------------------------------------------------------------------------
# 4. Resolve the wanted modules + their dependencies from modules.dep, in load
#    order (dependencies first), and decompress them into a staging tree.
# ---------------------------------------------------------------------------
declare -A seen=()
order=()
# modules.dep line: "kernel/fs/xfs/xfs.ko.xz: kernel/lib/libcrc32c.ko.xz"
path_of() { sed -n "s#^\([^:]*/$1\.ko\(\.xz\|\.zst\|\.gz\)\?\):.*#\1#p" "$mroot/modules.dep"; }
add_module_path() {   # $1 = path relative to $mroot, recursively adds deps first
    local p=$1 d
    [[ -n ${seen[$p]:-} ]] && return 0
    seen[$p]=1
    for d in $(sed -n "s#^${p//./\\.}:\(.*\)#\1#p" "$mroot/modules.dep"); do
        add_module_path "$d"
    done
    order+=("$p")
}
for m in $modules_wanted; do
    # module names use '_' and '-' interchangeably; files keep their own spelling
    p=$(path_of "$m"); [[ -n $p ]] || p=$(path_of "${m//_/-}"); [[ -n $p ]] || p=$(path_of "${m//-/_}")
    if [[ -z $p ]]; then
        if grep -qE "/(${m}|${m//-/_}|${m//_/-})\.ko$" "$mroot/modules.builtin"; then
            log "module $m is built in"
            continue
        fi
        die "module $m not found in $kver"
    fi
    add_module_path "$p"
done

stage=$cache/initramfs-$kver
initrd=$cache/initramfs-$kver.cpio.gz
stamp_inputs=("$here/prepare.sh" "$here/guest/init" "$here/guest/run-command.sh" /bin/busybox "$kdir/.extracted")
need_build=${FVD_VM_REBUILD:-0}
[[ -f $initrd ]] || need_build=1
for f in "${stamp_inputs[@]}"; do [[ $f -nt $initrd ]] && need_build=1; done
[[ -f $initrd && "$(cat "$stage.modules" 2>/dev/null)" == "${order[*]}" ]] || need_build=1

if [[ $need_build == 1 ]]; then
    log "building initramfs with modules: $(for p in "${order[@]}"; do basename "$p" | sed 's/\.ko.*//'; done | tr '\n' ' ')"
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,run,lower,upper,newroot,etc,lib/modules/"$kver"}
    cp /bin/busybox "$stage/bin/busybox"
    # Only the applets /init uses; the guest itself runs the host's userspace.
    for a in sh mount umount mkdir insmod switch_root cat cp ln sleep stty poweroff \
             ip hostname echo rm grep sed tr date printf sync chmod mknod test; do
        ln -s busybox "$stage/bin/$a"
    done
    for p in "${order[@]}"; do
        ko=${p%.xz}; ko=${ko%.zst}; ko=${ko%.gz}      # decompressed name
        mkdir -p "$stage/lib/modules/$kver/$(dirname "$p")"
        case $p in
            *.xz)  xz -dc "$mroot/$p" ;;
            *.zst) zstd -dc "$mroot/$p" ;;
            *.gz)  gzip -dc "$mroot/$p" ;;
            *)     cat "$mroot/$p" ;;
        esac > "$stage/lib/modules/$kver/$ko"
        # /init insmods in this order (dependencies first)
        echo "$ko" >> "$stage/etc/modules.load"
    done
    # A self-consistent modules.dep for the decompressed subset, so that the
    # host's kmod `modprobe` works in the guest (init copies this tree to
    # /lib/modules/$kver of the overlay root).
    cp "$mroot"/modules.builtin "$mroot"/modules.builtin.modinfo "$mroot"/modules.order \
       "$stage/lib/modules/$kver/"
    depmod -b "$stage" "$kver"
    echo "$kver" > "$stage/etc/kver"
    cp "$here/guest/init" "$stage/init"
    cp "$here/guest/run-command.sh" "$stage/etc/run-command.sh"
    chmod 755 "$stage/init" "$stage/etc/run-command.sh"
    (cd "$stage" && find . -print0 | LC_ALL=C sort -z \
        | cpio --null -o -H newc --quiet -R 0:0 | gzip -1 > "$initrd.tmp")
    mv "$initrd.tmp" "$initrd"
    printf '%s' "${order[*]}" > "$stage.modules"
fi

# Stable names for run.sh.
ln -sfn "$kdir/vmlinuz" "$cache/vmlinuz"
ln -sfn "$initrd" "$cache/initramfs.cpio.gz"
echo "$kver" > "$cache/kver"
log "ready: $cache/vmlinuz ($kver), $cache/initramfs.cpio.gz ($(du -h "$initrd" | cut -f1))"
