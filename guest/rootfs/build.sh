#!/usr/bin/env bash
# guest/rootfs/build.sh -- build pyvmm's guest root file system image into the artefact cache.
#
# Owns: turning the current initramfs ($PYVMM_CACHE/initramfs/current/initramfs.cpio, from
# guest/initramfs/build.sh) into an ext4 image holding the same files, for
# `pyvmm run --disk rootfs.img --cmdline root=/dev/vda` (mkrootfs.py says how: mkfs.ext4 -d,
# then debugfs for owners and device nodes, then e2fsck -fn):
#
#     $PYVMM_CACHE/rootfs/<key>/rootfs.img    (sparse, ROOTFS_MIB MiB)
#     $PYVMM_CACHE/rootfs/current -> <key>     (replaced atomically)
#
# <key> = first 16 hex digits of the sha256 of the initramfs's own key, the e2fsprogs version,
# the size and every file in guest/rootfs/. A complete <key> is never rebuilt.
#
# The cached image is the pristine base: boot a copy (cp --sparse=always) or a qcow2 overlay
# on it (qemu-img create -f qcow2 -b .../rootfs.img -F raw overlay.qcow2), not the file itself.
#
# Exit codes: 0 ok, 1 build failure, 2 missing apt packages. Usage: guest/rootfs/build.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${PYVMM_CACHE:-$HOME/.cache/pyvmm}
cache=$cache_root/rootfs
initramfs=$cache_root/initramfs/current
ROOTFS_MIB=64     # room for the ~3 MiB userland and what a test writes; sparse on the host

say() { printf 'rootfs: %s\n' "$*"; }
die() { printf 'rootfs: ERROR: %s\n' "$*" >&2; exit 1; }

"$here/../../scripts/check-packages" rootfs e2fsprogs python3
[[ -f $initramfs/initramfs.cpio ]] || die "no $initramfs/initramfs.cpio: run guest/initramfs/build.sh (make initramfs) first"

key=$(
    {
        printf 'initramfs %s\n' "$(readlink "$initramfs")"
        dpkg-query -W -f='${Package} ${Version}\n' e2fsprogs
        printf 'size %s MiB\n' "$ROOTFS_MIB"
        for f in $(find "$here" -maxdepth 1 -type f | LC_ALL=C sort); do
            printf -- '--- %s\n' "${f##*/}"; cat "$f"
        done
    } | sha256sum | cut -c1-16
)
out=$cache/$key

mkdir -p "$cache"
exec 9>"$cache/.lock"   # one builder at a time; a second caller then finds the cache hit
flock 9

point_current() {   # ln -s to a temp name, then rename(2) over `current`
    ln -sfn "$key" "$cache/.current.tmp"
    mv -T "$cache/.current.tmp" "$cache/current"
}

if [[ -f $out/rootfs.img ]]; then
    point_current
    say "cache hit $out/rootfs.img"
    exit 0
fi

tmp=$cache/.tmp-$key
rm -rf "$tmp"
mkdir -p "$tmp"
python3 "$here/mkrootfs.py" "$initramfs/initramfs.cpio" "$tmp/rootfs.img" "$ROOTFS_MIB"
rm -rf "$out"
mv -T "$tmp" "$out"
point_current
say "built $out/rootfs.img ($ROOTFS_MIB MiB ext4, $(du -k "$out/rootfs.img" | cut -f1) KiB used on the host)"
