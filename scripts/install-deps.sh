#!/usr/bin/env bash
# Installs the system packages uringblk's tests and benchmarks need (Debian/Ubuntu, as root or
# with sudo): QEMU for the guest tests, fio and busybox for the guest image, qemu-storage-daemon
# as the comparison peer, qemu-io/qemu-img and losetup for the image-lock tests, promtool
# (prometheus) for the metrics test; Ceph's ceph-mon, ceph-osd and ceph-common for the
# single-node cluster of the RBD tests (scripts/ceph-cluster.sh), librbd-dev and librados-dev
# to build the rbd crate, qemu-block-extra for qemu-storage-daemon's rbd driver (the qsd-rbd
# bench target). Already-present tools are not reinstalled. Fails loudly otherwise.
set -euo pipefail

log() { echo "install-deps: $*" >&2; }
die() { echo "install-deps: ERROR: $*" >&2; exit 1; }

as_root() {
    if [[ $(id -u) == 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null || missing+=(qemu-system-common)
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || missing+=(qemu-utils)
command -v fio >/dev/null || missing+=(fio)
[[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 || missing+=(busybox-static)
command -v blkdiscard >/dev/null || missing+=(util-linux)
command -v losetup >/dev/null || missing+=(mount)
command -v valgrind >/dev/null || missing+=(valgrind)
command -v promtool >/dev/null || missing+=(prometheus)
command -v ceph-mon >/dev/null || missing+=(ceph-mon)
command -v ceph-osd >/dev/null || missing+=(ceph-osd)
command -v rbd >/dev/null && command -v ceph >/dev/null || missing+=(ceph-common)
[[ -e /usr/include/rbd/librbd.h && -e /usr/include/rados/librados.h ]] || missing+=(librbd-dev librados-dev)
dpkg -s qemu-block-extra >/dev/null 2>&1 || missing+=(qemu-block-extra)
# The benchmark charts need a TrueType font.
[[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || missing+=(fonts-dejavu-core)

if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${missing[*]}"
    log "installing ${missing[*]}"
    as_root apt-get update -q >&2 || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
fi

# Installing Debian's qemu-system-x86 can remove a newer qemu-utils (from backports) that was
# there before: look again once the first install is done.
if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then
    log "installing qemu-utils (removed or missing after the first install)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        qemu-utils >&2 || die "apt-get install qemu-utils failed"
fi

for tool in qemu-system-x86_64 qemu-storage-daemon qemu-img qemu-io fio blkdiscard losetup promtool \
    ceph-mon ceph-osd ceph rbd; do
    command -v "$tool" >/dev/null || die "$tool is still missing after the install"
done
command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
log "ok: $(qemu-system-x86_64 --version | head -n1); $(fio --version)"
