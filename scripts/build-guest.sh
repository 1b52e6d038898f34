#!/usr/bin/env bash
# Builds the measurement guest from Debian packages only:
#   OUTDIR/vmlinuz          the kernel of the package linux-image-amd64 depends on
#   OUTDIR/initramfs.cpio   busybox, fio + its shared libraries, util-linux blkdiscard,
#                           the virtio modules the kernel does not build in, and /init
#                           (scripts/guest-init.sh)
# The kernel package is fetched with `apt-get download` (nothing is installed on the host for
# it); fio, busybox-static and util-linux come from the host and are apt-installed when missing
# and we are root. A stamp over this script, the guest init and the package versions makes a
# rerun with nothing changed a no-op.
#
# Usage: scripts/build-guest.sh [OUTDIR]      (default: <repo>/build/guest)
# Env:   GUEST_KERNEL_PACKAGE=linux-image-...  pick a kernel package instead of the default one
#        GUEST_FORCE_REBUILD=1                 ignore the stamp
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)
outdir=${1:-$repo_root/build/guest}
init_script=$script_dir/guest-init.sh

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: ERROR: $*" >&2; exit 1; }

# Modules the guest needs for a virtio-blk disk on PCI; their dependencies are added from the
# modules' own `depends=` field.
wanted_modules=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

# The host tools the guest carries, and the Debian packages that provide them.
ensure_host_tools() {
    local missing=()
    command -v fio >/dev/null || missing+=(fio)
    [[ -x /bin/busybox ]] && /bin/busybox --list >/dev/null 2>&1 || missing+=(busybox-static)
    [[ -x /usr/sbin/blkdiscard || -x /sbin/blkdiscard ]] || missing+=(util-linux)
    command -v apt-get >/dev/null || die "apt-get not found: the guest is built from Debian packages"
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; install them: apt-get install ${missing[*]}"
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
            die "apt-get install ${missing[*]} failed"
    fi
    # A dynamically linked busybox would need its libraries too; the static one is self-contained.
    if ldd /bin/busybox >/dev/null 2>&1; then
        die "/bin/busybox is dynamically linked; install busybox-static"
    fi
}

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo none; }

# The concrete kernel image package (e.g. linux-image-6.1.0-56-amd64) and its version.
resolve_kernel_package() {
    if [[ -n ${GUEST_KERNEL_PACKAGE:-} ]]; then
        kernel_pkg=$GUEST_KERNEL_PACKAGE
    else
        if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
            [[ $(id -u) == 0 ]] || die "apt has no package lists; run apt-get update"
            log "apt has no package lists; running apt-get update"
            apt-get update >&2 || die "apt-get update failed"
        fi
        kernel_pkg=$(apt-cache depends linux-image-amd64 |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
        [[ -n $kernel_pkg ]] || die "cannot tell which kernel package linux-image-amd64 depends on"
    fi
    kernel_ver=$(apt-cache policy "$kernel_pkg" | awk '$1 == "Candidate:" { print $2 }')
    [[ -n $kernel_ver && $kernel_ver != "(none)" ]] || die "no candidate version of $kernel_pkg"
}

# Adds a module and, first, everything it depends on (so the list is in load order).
declare -A module_seen=()
module_order=()
add_module() {
    local name=$1 file deps dep
    [[ -n ${module_seen[$name]:-} ]] && return 0
    module_seen[$name]=1
    if grep -Eq "/${name//_/[-_]}\.ko(\.[a-z]+)?$" "$moddir/modules.builtin"; then
        return 0 # built into the kernel: nothing to load
    fi
    file=$(find "$moddir/kernel" -regextype posix-extended \
        -regex ".*/${name//_/[-_]}\.ko(\.(xz|zst|gz))?" -print -quit)
    [[ -n $file ]] || die "module $name is neither built in nor shipped by $kernel_pkg"
    case $file in
    *.xz) xz -dc "$file" >"$work/$name.ko" ;;
    *.zst) zstd -qdc "$file" >"$work/$name.ko" ;;
    *.gz) gzip -dc "$file" >"$work/$name.ko" ;;
    *) cp "$file" "$work/$name.ko" ;;
    esac
    # The .modinfo section holds NUL-separated key=value strings, "depends=a,b" among them.
    deps=$(tr '\0' '\n' <"$work/$name.ko" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    mv "$work/$name.ko" "$root/lib/modules/$name.ko"
    module_order+=("$name")
}

# Copies a binary's shared libraries (as ldd resolves them on this host) into the guest root.
copy_libs() {
    local bin=$1 lib
    while read -r lib; do
        [[ -e $lib ]] || continue
        case $lib in
        */ld-linux*) mkdir -p "$root/lib64" && cp -L "$lib" "$root/lib64/$(basename "$lib")" ;;
        *) cp -L "$lib" "$root/lib/x86_64-linux-gnu/$(basename "$lib")" ;;
        esac
    done < <(ldd "$bin" | awk '/=>/ { print $3 } !/=>/ && $1 ~ /^\// { print $1 }')
}

main() {
    [[ -f $init_script ]] || die "missing $init_script"
    mkdir -p "$outdir"
    # Test processes may build at the same time: one builds, the others then find the stamp.
    exec 9>"$outdir/.lock"
    flock 9 || die "cannot lock $outdir/.lock"
    ensure_host_tools
    resolve_kernel_package
    local fio_bin blkdiscard_bin stamp_now
    fio_bin=$(command -v fio)
    blkdiscard_bin=$(command -v blkdiscard || echo /usr/sbin/blkdiscard)

    stamp_now=$(
        {
            sha256sum "$0" "$init_script" | awk '{ print $1 }'
            echo "$kernel_pkg=$kernel_ver"
            for p in fio busybox-static util-linux libc6; do echo "$p=$(pkg_version "$p")"; done
        } | sha256sum | awk '{ print $1 }'
    )
    if [[ -z ${GUEST_FORCE_REBUILD:-} && -f $outdir/stamp && -f $outdir/vmlinuz &&
        -f $outdir/initramfs.cpio && $(cat "$outdir/stamp") == "$stamp_now" ]]; then
        log "guest in $outdir is up to date ($kernel_pkg $kernel_ver)"
        return 0
    fi

    mkdir -p "$outdir/debs"
    work=$(mktemp -d "$outdir/.work.XXXXXX")
    trap 'rm -rf "$work"' EXIT

    local deb
    deb=$(find "$outdir/debs" -name "${kernel_pkg}_${kernel_ver//:/%3a}_*.deb" -print -quit)
    if [[ -z $deb ]]; then
        log "downloading $kernel_pkg $kernel_ver"
        # apt-get download writes to the current directory.
        (cd "$work" && apt-get download "$kernel_pkg=$kernel_ver" >&2) ||
            die "apt-get download $kernel_pkg failed"
        rm -f "$outdir/debs/${kernel_pkg}_"*.deb
        mv "$work/${kernel_pkg}_"*.deb "$outdir/debs/"
        deb=$(find "$outdir/debs" -name "${kernel_pkg}_*.deb" -print -quit)
    fi
    log "extracting $(basename "$deb")"
    dpkg-deb -x "$deb" "$work/kernel"
    local vmlinuz
    vmlinuz=$(find "$work/kernel/boot" -name 'vmlinuz-*' -print -quit || true)
    [[ -n $vmlinuz ]] || die "$deb holds no /boot/vmlinuz-*"
    local d
    moddir=
    for d in "$work"/kernel/lib/modules/* "$work"/kernel/usr/lib/modules/*; do
        [[ -d $d/kernel ]] && moddir=$d && break
    done
    [[ -n $moddir ]] || die "$deb holds no modules"

    root=$work/root
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/modules,lib/x86_64-linux-gnu,dev,proc,sys,tmp,job}
    for m in "${wanted_modules[@]}"; do add_module "$m"; done
    printf '%s\n' "${module_order[@]}" >"$root/lib/modules/load-order"
    log "modules to load: ${module_order[*]:-(all built in)}"

    cp /bin/busybox "$root/bin/busybox"
    local applet
    for applet in $(/bin/busybox --list); do
        # util-linux's blkdiscard (it has -z) stays the only blkdiscard in the guest.
        [[ $applet == busybox || $applet == blkdiscard ]] && continue
        ln -sf busybox "$root/bin/$applet"
    done
    cp "$fio_bin" "$root/usr/bin/fio"
    cp "$blkdiscard_bin" "$root/usr/sbin/blkdiscard"
    # busybox sh runs its own applet for a name before searching PATH (SH_STANDALONE), so the
    # real tools that share an applet's name are reached through shell functions.
    {
        echo "# Sourced by /init before each command of a run (scripts/guest-init.sh)."
        for tool in /usr/bin/fio /usr/sbin/blkdiscard; do
            if /bin/busybox --list | grep -qx "$(basename "$tool")"; then
                echo "$(basename "$tool")() { $tool \"\$@\"; }"
            fi
        done
    } >"$root/lib/guest-env.sh"
    copy_libs "$fio_bin"
    copy_libs "$blkdiscard_bin"
    install -m 0755 "$init_script" "$root/init"
    echo "$kernel_pkg $kernel_ver" >"$root/guest-version"

    # Uncompressed: under TCG the kernel unpacks a plain cpio faster than it inflates one.
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
        /bin/busybox cpio -o -H newc -R 0:0 >"$work/initramfs.cpio") 2>/dev/null ||
        die "cpio failed"
    cp "$vmlinuz" "$work/vmlinuz"
    mv "$work/vmlinuz" "$outdir/vmlinuz"
    mv "$work/initramfs.cpio" "$outdir/initramfs.cpio"
    echo "$kernel_pkg $kernel_ver" >"$outdir/kernel-version"
    echo "$stamp_now" >"$outdir/stamp"
    log "built $outdir (vmlinuz, initramfs.cpio $(du -h "$outdir/initramfs.cpio" | cut -f1)) from $kernel_pkg $kernel_ver"
}

main "$@"
