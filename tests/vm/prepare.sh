#!/usr/bin/env bash
# tests/vm/prepare.sh — build everything the QEMU guest harness needs (idempotent).
#
#   * apt-installs qemu, virtiofsd, busybox-static and the userspace tools the
#     end-to-end suite runs *inside* the guest (the guest uses the host's root
#     file system over virtiofs, so host packages == guest packages);
#   * downloads the guest kernel's .debs into the cache ($FVD_VM_CACHE, default
#     /var/cache/fvd-vm — never inside git): FVD_VM_KERNEL=6.12 (default,
#     bookworm-security) or 7.3 (trixie-backports, through a private apt
#     configuration; see step 2);
#   * extracts vmlinuz and the needed modules (+ dependencies from modules.dep),
#     decompressing .ko.xz;
#   * builds a busybox-static initramfs whose /init is tests/vm/guest/init.
#
# Re-running is cheap: each step is skipped when its output is already present
# and newer than its inputs.  FVD_VM_REBUILD=1 forces the initramfs rebuild.
# Each kernel gets its own $FVD_VM_CACHE/LABEL/{vmlinuz,initramfs.cpio.gz,kver}.
#
# Knobs (environment):
#   FVD_VM_CACHE       cache dir (default /var/cache/fvd-vm)
#   FVD_VM_KERNEL      6.12 (default) or 7.3
#   FVD_VM_KPKG        exact linux-image package to use (default: the newest
#                      linux-image-6.12.*+deb12-cloud-amd64, resp.
#                      linux-image-7.3.*+deb13-cloud-amd64, that apt knows)
#   FVD_VM_MODULES     modules to put in the initramfs (dependencies are added)
#   FVD_VM_NO_APT=1    no apt-get install/update (offline re-runs: the
#                      kernel packages used last time are reused)
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
      e2fsprogs xfsprogs fio util-linux kmod xz-utils cpio gzip systemd lvm2 dmsetup
      nginx-light postmark)
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
# 2. Kernel packages.  FVD_VM_KERNEL picks the guest kernel:
#      6.12  linux-image-6.12.*+deb12-cloud-amd64 from bookworm-security, which the
#            machine's own apt sources carry: one package, vmlinuz in /boot and
#            the modules in /lib/modules.
#      7.3   linux-image-7.3.*+deb13-cloud-amd64 from trixie-backports, which the
#            machine's sources do not list.  It is read through a private apt
#            configuration under $cache/apt/ (its own sources.list naming only
#            that suite on the mirror the machine's sources use, its own lists
#            and archive dirs): the system's apt state is not touched, so nothing
#            on the host can upgrade from it.  That image package is empty; it
#            depends on linux-binary-KVER (usr/lib/modules/KVER/vmlinuz),
#            linux-modules-KVER (the .ko.xz) and linux-base-KVER (config,
#            modules.builtin, modules.order), which are what is downloaded.
# ---------------------------------------------------------------------------
label=${FVD_VM_KERNEL:-6.12}
case $label in
    6.12) suite='' image_re='linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64' ;;
    7.3)  suite=trixie-backports image_re='linux-image-7\.3\.[0-9]+\+deb13-cloud-amd64' ;;
    *) die "FVD_VM_KERNEL=$label: the known guest kernels are 6.12 and 7.3" ;;
esac
mkdir -p "$cache/debs" "$cache/$label"
apt_opts=()
if [[ -n $suite ]]; then
    adir=$cache/apt/$suite
    mkdir -p "$adir/lists/partial" "$adir/cache/archives/partial"
    apt_opts=(-o "Dir::Etc::SourceList=$adir/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$adir/lists" -o "Dir::Cache=$adir/cache"
              -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null)
    if [[ ! -s $adir/sources.list ]]; then
        # The mirror of the machine's own release (e.g. bookworm) in its apt sources.
        codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
        mirror=$(apt-get indextargets --format '$(REPO_URI)' "Release: $codename" 2>/dev/null | sort -u | head -n1)
        [[ -n $mirror ]] || die "no Debian mirror for '$codename' in the apt sources (needed to find $suite)"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" > "$adir/sources.list"
    fi
fi
kapt_update() {
    [[ ${FVD_VM_NO_APT:-0} == 1 ]] && return 1
    log "apt-get update${suite:+ ($suite, private lists in $cache/apt)}"
    apt-get "${apt_opts[@]}" update -q >&2
}
newest_image_pkg() {
    apt-cache "${apt_opts[@]}" pkgnames linux-image- 2>/dev/null | grep -E "^${image_re}\$" | sort -V | tail -n1 || true
}
# The packages holding the kernel and its modules: the image package itself (6.12) or, where it
# is only a dependency hub (7.x), its linux-binary/modules/base dependencies.
payload_pkgs() {
    local deps
    deps=$(apt-cache "${apt_opts[@]}" depends "$1" 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-\(binary\|modules\|base\)-[^ ]*\)$/\1/p' | sort -u)
    if [[ -n $deps ]]; then echo "$deps"; else echo "$1"; fi
}

kpkg=${FVD_VM_KPKG:-}
pkglist=$cache/$label/packages
if [[ -z $kpkg ]]; then
    [[ -n $suite && -z $(ls "$adir"/lists/*_Packages* 2>/dev/null) ]] && { kapt_update || true; }
    kpkg=$(newest_image_pkg)
    [[ -n $kpkg ]] || { kapt_update && kpkg=$(newest_image_pkg); } || true
fi
if [[ -n $kpkg ]]; then
    mapfile -t pkgs < <(payload_pkgs "$kpkg")
    debs=()
    for p in "${pkgs[@]}"; do
        deb=$(ls -1 "$cache/debs/${p}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)
        if [[ -z $deb ]]; then
            log "downloading $p"
            # apt-get download writes into the cwd; _apt cannot write to root-owned
            # dirs, which only produces a harmless warning (download runs as root).
            # A pool file replaced since the lists were fetched: update once, retry.
            (cd "$cache/debs" && { apt-get "${apt_opts[@]}" -o APT::Sandbox::User=root download -q "$p" >&2 \
                || { kapt_update && apt-get "${apt_opts[@]}" -o APT::Sandbox::User=root download -q "$p" >&2; }; }) \
                || die "cannot download $p"
            deb=$(ls -1 "$cache/debs/${p}"_*.deb | sort -V | tail -n1)
        fi
        debs+=("$deb")
    done
    printf '%s\n' "$kpkg" "${debs[@]}" > "$pkglist"
elif [[ -s $pkglist ]]; then
    # No package lists to resolve the name (offline, FVD_VM_NO_APT=1): what was used last time.
    mapfile -t debs < <(tail -n +2 "$pkglist")
    kpkg=$(head -n1 "$pkglist")
else
    die "no package matching $image_re in apt${suite:+ ($suite)}"
fi
for deb in "${debs[@]}"; do [[ -f $deb ]] || die "kernel deb $deb missing"; done
kver=${kpkg#linux-image-}
log "kernel $label: $kver ($(for d in "${debs[@]}"; do basename "$d"; done | tr '\n' ' '))"

# ---------------------------------------------------------------------------
# 3. Extract the debs (whole tree, kept compressed) and run depmod on it: Debian
#    generates modules.dep in postinst, so the .debs do not ship one.  6.12 keeps
#    its modules in /lib/modules and vmlinuz in /boot; the 7.x packages put both
#    under /usr/lib/modules/KVER (merged /usr), where depmod needs -b ROOT/usr.
# ---------------------------------------------------------------------------
kdir=$cache/kernel/$kver
stale=0
[[ -f $kdir/.extracted ]] || stale=1
for deb in "${debs[@]}"; do [[ $deb -nt $kdir/.extracted ]] && stale=1; done
[[ $(cat "$kdir/.debs" 2>/dev/null) == "${debs[*]}" ]] || stale=1
if [[ $stale == 1 ]]; then
    log "extracting to $kdir"
    rm -rf "$kdir"
    mkdir -p "$kdir"
    for deb in "${debs[@]}"; do dpkg-deb -x "$deb" "$kdir/root"; done
    if [[ -d $kdir/root/usr/lib/modules/$kver ]]; then mbase=$kdir/root/usr; else mbase=$kdir/root; fi
    depmod -b "$mbase" "$kver"
    for f in "$kdir/root/boot/vmlinuz-$kver" "$mbase/lib/modules/$kver/vmlinuz"; do
        [[ -f $f ]] && cp "$f" "$kdir/vmlinuz"
    done
    for f in "$kdir/root/boot/config-$kver" "$mbase/lib/modules/$kver/config"; do
        [[ -f $f ]] && cp "$f" "$kdir/config"
    done
    [[ -f $kdir/vmlinuz ]] || die "no vmlinuz in ${debs[*]}"
    ln -sfn "${mbase#"$kdir/"}/lib/modules/$kver" "$kdir/modules"
    echo "${debs[*]}" > "$kdir/.debs"
    touch "$kdir/.extracted"
fi
mroot=$kdir/modules

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

# Stable names for run.sh, one directory per label: FVD_VM_KERNEL=7.3 never
# changes what a 6.12 run boots.
ln -sfn "$kdir/vmlinuz" "$cache/$label/vmlinuz"
ln -sfn "$initrd" "$cache/$label/initramfs.cpio.gz"
echo "$kver" > "$cache/$label/kver"
log "ready: $cache/$label/vmlinuz ($kver), $cache/$label/initramfs.cpio.gz ($(du -h "$initrd" | cut -f1))"
