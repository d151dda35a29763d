#!/usr/bin/env bash
# guest/vsockify/build.sh -- build libvsockify.so and a cpio of unmodified, dynamically linked
# Debian programs (dropbear, dbclient, dropbearkey, wget) with every library they load, to run
# TCP programs over vsock in a guest without a network device (guest/vsockify/README.md).
#
# Owns: turning guest/vsockify/libvsockify.c, guest/vsockify/vsockify and the host's installed
# Debian packages (dropbear-bin, wget and the libraries they need) into
#
#     $PYVMM_CACHE/vsockify/<key>/vsockify.cpio   a newc archive to CONCATENATE after the default
#                                  initramfs (the kernel unpacks one archive after another):
#                                  /opt/vsockify/lib/libvsockify.so, /opt/vsockify/bin/{dropbear,
#                                  dbclient,dropbearkey,wget}, /usr/bin/vsockify (the wrapper),
#                                  their libraries at the paths ldd gives (/lib/x86_64-linux-gnu/,
#                                  the loader /lib64/ld-linux-x86-64.so.2), /etc/passwd, /etc/group,
#                                  /etc/nsswitch.conf, /etc/hosts and a dropbear host key
#     $PYVMM_CACHE/vsockify/<key>/libvsockify.so, files.list (what the cpio holds, mkcpio syntax),
#                                  host_key.pub (the host key's public half, an OpenSSH
#                                  "ssh-ed25519 AAAA..." line: a client's known_hosts entry)
#     $PYVMM_CACHE/vsockify/current -> <key>      (replaced atomically)
#
# Why the programs are not in the default initramfs: they are ~10 MB with their libraries (the
# default image is ~2.7 MB) and only what needs dynamically linked programs uses them.
#
# The host key is made here (dropbearkey -t ed25519), once per <key>: a guest then starts dropbear
# at once instead of generating a key under emulation, and a client can check the key it is shown
# against host_key.pub. Every guest booted with the same archive has the same host key: this is a
# test image, not a machine to trust. The clients' keys are not in the archive: a test (or a user)
# writes /root/.ssh/authorized_keys in the running guest, with a key made for that run.
#
# Collisions: the default initramfs's /usr/bin/wget is a symlink to busybox; the kernel's cpio
# unpacker would open such a symlink and write through it (into /bin/busybox). So nothing here
# may have the path of a default initramfs entry other than a directory: checked against
# $PYVMM_CACHE/initramfs/current/files.list (make vsockify builds the initramfs first), and the
# Debian programs live under /opt/vsockify/bin.
#
# PYVMM_CACHE defaults to $HOME/.cache/pyvmm. <key> = first 16 hex digits of the sha256 of the
# gcc and libc6-dev versions, the version of every package a file of the archive comes from,
# this script, libvsockify.c, the wrapper, guest/initramfs/mkcpio.py (it writes the archive) and
# the default initramfs's files.list (the collision check). A complete <key> is never rebuilt.
# One builder at a time (flock); work happens in <cache>/build-<key> (deleted on success, kept on
# failure) and the result is published by one rename.
#
# Exit codes: 0 ok, 1 build failure, 2 missing apt packages. Usage: guest/vsockify/build.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
guest_dir=$(cd "$here/.." && pwd)
mkcpio=$guest_dir/initramfs/mkcpio.py
cache_root=${PYVMM_CACHE:-$HOME/.cache/pyvmm}
cache=$cache_root/vsockify
base_list=$cache_root/initramfs/current/files.list
# The Debian programs in the archive: the path on this host, installed as /opt/vsockify/bin/NAME
programs=(/usr/sbin/dropbear /usr/bin/dbclient /usr/bin/dropbearkey /usr/bin/wget)
loader=/lib64/ld-linux-x86-64.so.2      # PT_INTERP of every x86-64 glibc program
cflags=(-O2 -Wall -Wextra -Werror -fPIC -shared -fvisibility=hidden)

say() { printf 'vsockify: %s\n' "$*"; }
die() { printf 'vsockify: ERROR: %s\n' "$*" >&2; exit 1; }

"$guest_dir/../scripts/check-packages" vsockify dropbear-bin wget gcc libc6-dev python3
[[ -f $base_list ]] || die "no $base_list: build the default initramfs first (make initramfs)"

# closure FILE...: every shared library FILE... load (ldd resolves DT_NEEDED the way ld.so does,
# recursively), one absolute path a line, as ld.so names it (the SONAME path, often a symlink)
closure() {
    local f
    for f in "$@"; do
        ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
    done | LC_ALL=C sort -u
}

found=$(closure "${programs[@]}")      # (not mapfile < <(...): a failure there would go unseen)
mapfile -t libs <<<"$found"
[[ -n $found ]] || die "ldd found no library for ${programs[*]}"
# the package of each file, through its real path (usrmerge: /lib/... is /usr/lib/...)
owners() {
    local f p
    for f in "$@"; do
        p=$(dpkg -S "$(readlink -f "$f")" 2>/dev/null || dpkg -S "$f" 2>/dev/null) ||
            die "no Debian package owns $f"
        printf '%s\n' "${p%%:*}"
    done | LC_ALL=C sort -u
}
found=$(owners "${programs[@]}" "${libs[@]}")
mapfile -t packages <<<"$found"

key=$(
    {
        dpkg-query -W -f='${Package} ${Version}\n' gcc libc6-dev "${packages[@]}"
        for f in "${BASH_SOURCE[0]}" "$here/libvsockify.c" "$here/vsockify" "$mkcpio" "$base_list"; do
            printf -- '--- %s\n' "${f##*/}"
            cat "$f"
        done
    } | sha256sum | cut -c1-16
)
out=$cache/$key
build=$cache/build-$key

mkdir -p "$cache"
exec 9>"$cache/.lock"   # one builder at a time; a second caller then finds the cache hit
flock 9

point_current() {   # ln -s to a temp name, then rename(2) over `current`
    ln -sfn "$key" "$cache/.current.tmp"
    mv -T "$cache/.current.tmp" "$cache/current"
}

if [[ -f $out/vsockify.cpio ]]; then
    point_current
    say "cache hit $out"
    exit 0
fi

trap 'rc=$?; ((rc)) && printf "vsockify: FAILED (exit %d); build dir kept: %s\n" "$rc" "$build" >&2' EXIT
t0=$SECONDS
rm -rf "$build"
mkdir -p "$build/etc"

say "compiling libvsockify.so"
gcc "${cflags[@]}" -o "$build/libvsockify.so" "$here/libvsockify.c"
found=$(closure "$build/libvsockify.so")
mapfile -t own <<<"$found"
for f in "${own[@]}"; do
    printf '%s\n' "${libs[@]}" | grep -qx -- "$f" || die "libvsockify.so needs $f, which no program brings"
done

say "host key (dropbearkey -t ed25519)"
dropbearkey -t ed25519 -f "$build/dropbear_ed25519_host_key" >/dev/null
dropbearkey -y -f "$build/dropbear_ed25519_host_key" | grep '^ssh-ed25519 ' | cut -d' ' -f1,2 \
    >"$build/host_key.pub"
[[ -s $build/host_key.pub ]] || die "dropbearkey -y printed no ssh-ed25519 line"

printf 'root:x:0:0:root:/root:/bin/sh\n' >"$build/etc/passwd"
printf 'root:x:0:\n' >"$build/etc/group"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files\n' >"$build/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n' >"$build/etc/hosts"

say "[$((SECONDS - t0))s] packing vsockify.cpio: ${programs[*]##*/} and ${#libs[@]} libraries"
{
    dirs=(/etc /etc/dropbear /lib /lib/x86_64-linux-gnu /lib64 /opt /opt/vsockify
        /opt/vsockify/bin /opt/vsockify/lib /usr /usr/bin)
    for d in "${dirs[@]}"; do echo "dir $d 0755 0 0"; done
    for f in passwd group nsswitch.conf hosts; do echo "file /etc/$f $build/etc/$f 0644 0 0"; done
    echo "file /etc/dropbear/dropbear_ed25519_host_key $build/dropbear_ed25519_host_key 0600 0 0"
    echo "file /usr/bin/vsockify $here/vsockify 0755 0 0"
    echo "file /opt/vsockify/lib/libvsockify.so $build/libvsockify.so 0755 0 0"
    for p in "${programs[@]}"; do echo "file /opt/vsockify/bin/${p##*/} $p 0755 0 0"; done
    for f in "${libs[@]}"; do
        case $f in
        "$loader" | /lib/x86_64-linux-gnu/*) echo "file $f $(readlink -f "$f") 0755 0 0" ;;
        *) die "library $f is outside the directories the archive has (/lib/x86_64-linux-gnu, /lib64)" ;;
        esac
    done
} >"$build/files.list"

# no entry may replace one of the default initramfs (see "Collisions" above)
clash=$(awk '$1 != "dir" && $1 !~ /^#/ && NF { print $2 }' "$base_list" "$build/files.list" |
    LC_ALL=C sort | uniq -d)
[[ -z $clash ]] || die "paths of the default initramfs would be overwritten: $clash"

tmp=$cache/.tmp-$key
rm -rf "$tmp"
mkdir -p "$tmp"
python3 "$mkcpio" "$build/files.list" "$tmp/vsockify.cpio"
cp "$build/libvsockify.so" "$build/host_key.pub" "$build/files.list" "$tmp/"
rm -rf "$out"
mv -T "$tmp" "$out"
point_current
rm -rf "$build"
say "[$((SECONDS - t0))s] built $out ($(stat -c %s "$out/vsockify.cpio") bytes of cpio)"
