#!/usr/bin/env bash
# guest/vsock_test/build.sh -- build the kernel's own AF_VSOCK test suite, tools/testing/vsock,
# from two kernel generations into the artefact cache, as static x86-64 programs.
#
# Owns: turning Debian's /usr/src/linux-source-{6.1,6.12}.tar.xz (+ guest/vsock_test/patches/
# <version>/*.patch, each saying why) into
#
#     $PYVMM_CACHE/vsock-test/<key>/vsock_test-6.1, vsock_diag_test-6.1,
#                                  vsock_test-6.12, vsock_diag_test-6.12, vsock_perf-6.12
#     $PYVMM_CACHE/vsock-test/<key>/vsock-test.cpio  the same programs as /usr/bin/NAME-VERSION,
#                                  a newc archive to CONCATENATE after the default initramfs
#                                  (the kernel unpacks one archive after another)
#     $PYVMM_CACHE/vsock-test/<key>/list-<program>-<version>.txt   `--list` output (test ids)
#     $PYVMM_CACHE/vsock-test/current -> <key>          (replaced atomically)
#
# PYVMM_CACHE defaults to $HOME/.cache/pyvmm. <key> = first 16 hex digits of the sha256 of the
# linux-source-6.1, linux-source-6.12, gcc and libc6-dev package versions, this script,
# guest/initramfs/mkcpio.py (it writes the archive) and every patch (name and content). A
# complete <key> is never rebuilt. One builder at a time (flock); work happens in
# <cache>/build-<key> (deleted on success, kept on failure) and the result is published by one
# rename.
#
# Per version, in three steps (guest/vsock_test/README.md says why this way):
#   1. extract only what is needed from the tarball (one xz pass, ~20 s: the decompression is
#      the cost, not the few MB written): tools/testing/vsock (the sources and their Makefile),
#      tools/include (vsock_test.c's <linux/kernel.h>, vsock_diag_test.c's <linux/list.h> are
#      the tools/ versions, as the upstream Makefile's -I../../include says), and what
#      `make headers_install` reads: include/uapi, arch/x86/include/uapi,
#      scripts/headers_install.sh, scripts/unifdef.c, scripts/syscallhdr.sh and the x86
#      syscall tables.
#   2. that version's userspace headers, made the way headers_install makes them but without
#      kbuild (which needs most of the tree and a configured build): every header of
#      include/uapi/ and arch/x86/include/uapi/asm/ through scripts/headers_install.sh (it strips
#      __KERNEL__ parts with scripts/unifdef, built here from unifdef.c), plus the generated
#      asm/ files: a one-line <asm-generic/X.h> wrapper for each mandatory-y header x86 does not
#      have (include/uapi/asm-generic/Kbuild) and asm/unistd_{32,64,x32}.h from the syscall
#      tables (scripts/syscallhdr.sh, as arch/x86/entry/syscalls/Makefile runs it). The result
#      is what `make headers_install` would put in usr/include; the programs are compiled with
#      -I on it ahead of the system's, as upstream's -I../../../usr/include does. Each
#      version thus gets its own uapi headers, whatever linux-libc-dev is installed.
#   3. gcc with upstream's CFLAGS (-Werror included) and `-static`; the object files of each
#      program are read from upstream's Makefile (`vsock_test: vsock_test.o timeout.o ...`), so
#      a new helper file in a later version is picked up. vsock_uring_test (6.12) needs
#      liburing and is not built.
#
# Exit codes: 0 ok, 1 build failure, 2 missing apt packages. Usage: guest/vsock_test/build.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
guest_dir=$(cd "$here/.." && pwd)
mkcpio=$guest_dir/initramfs/mkcpio.py
cache=${PYVMM_CACHE:-$HOME/.cache/pyvmm}/vsock-test
versions=(6.1 6.12)
# The programs wanted, in this order; a version builds those its Makefile has a rule for.
wanted=(vsock_test vsock_diag_test vsock_perf)
# upstream's CFLAGS (tools/testing/vsock/Makefile, the same in both versions) minus -g and -MMD
cflags=(-O2 -Werror -Wall -Wno-pointer-sign -fno-strict-overflow -fno-strict-aliasing -fno-common
    -U_FORTIFY_SOURCE -D_GNU_SOURCE)

say() { printf 'vsock-test: %s\n' "$*"; }
die() { printf 'vsock-test: ERROR: %s\n' "$*" >&2; exit 1; }

"$guest_dir/../scripts/check-packages" vsock-test linux-source-6.1 linux-source-6.12 gcc \
    libc6-dev xz-utils patch python3
for v in "${versions[@]}"; do
    [[ -r /usr/src/linux-source-$v.tar.xz ]] ||
        die "/usr/src/linux-source-$v.tar.xz not found although linux-source-$v is installed"
done

mapfile -t patches < <(find "$here/patches" -name '*.patch' 2>/dev/null | LC_ALL=C sort)
key=$(
    {
        dpkg-query -W -f='${Package} ${Version}\n' linux-source-6.1 linux-source-6.12 gcc libc6-dev
        printf -- '--- build.sh\n'; cat "${BASH_SOURCE[0]}"
        printf -- '--- mkcpio.py\n'; cat "$mkcpio"
        for p in "${patches[@]}"; do printf -- '--- patch %s\n' "${p#"$here/"}"; cat "$p"; done
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

if [[ -f $out/vsock-test.cpio ]]; then
    point_current
    say "cache hit $out"
    exit 0
fi

trap 'rc=$?; ((rc)) && printf "vsock-test: FAILED (exit %d); build dir kept: %s\n" "$rc" "$build" >&2' EXIT
t0=$SECONDS
rm -rf "$build"
mkdir -p "$build/bin"

# headers VERSION_SRC DEST: step 2 above, run inside the extracted tree
headers() {
    local src=$1 dest=$2 f h
    gcc -O2 -o "$src/scripts/unifdef" "$src/scripts/unifdef.c"
    (
        cd "$src"
        find include/uapi -name '*.h' | LC_ALL=C sort | while read -r f; do
            mkdir -p "$dest/$(dirname "${f#include/uapi/}")"
            sh scripts/headers_install.sh "$f" "$dest/${f#include/uapi/}"
        done
        mkdir -p "$dest/asm"
        for f in arch/x86/include/uapi/asm/*.h; do
            sh scripts/headers_install.sh "$f" "$dest/asm/${f##*/}"
        done
        sed -n 's/^mandatory-y += //p' include/uapi/asm-generic/Kbuild | while read -r h; do
            [[ -e $dest/asm/$h ]] || echo "#include <asm-generic/$h>" >"$dest/asm/$h"
        done
        local tables=arch/x86/entry/syscalls
        sh scripts/syscallhdr.sh --abis i386 --emit-nr $tables/syscall_32.tbl "$dest/asm/unistd_32.h"
        sh scripts/syscallhdr.sh --abis common,64 --emit-nr $tables/syscall_64.tbl "$dest/asm/unistd_64.h"
        sh scripts/syscallhdr.sh --abis common,x32 --emit-nr --offset __X32_SYSCALL_BIT \
            $tables/syscall_64.tbl "$dest/asm/unistd_x32.h"
    )
}

built=()
for v in "${versions[@]}"; do
    src=$build/linux-$v
    mkdir -p "$src"
    say "[$((SECONDS - t0))s] $v: extracting from /usr/src/linux-source-$v.tar.xz"
    tar -xJf "/usr/src/linux-source-$v.tar.xz" -C "$src" --strip-components=1 --wildcards \
        "linux-source-$v/tools/testing/vsock/*" "linux-source-$v/tools/include/*" \
        "linux-source-$v/include/uapi/*" "linux-source-$v/arch/x86/include/uapi/*" \
        "linux-source-$v/arch/x86/entry/syscalls/*.tbl" \
        "linux-source-$v/scripts/headers_install.sh" "linux-source-$v/scripts/unifdef.c" \
        "linux-source-$v/scripts/syscallhdr.sh"
    for p in "${patches[@]}"; do
        [[ $p == "$here/patches/$v/"* ]] || continue
        say "  applying ${p#"$here/"}"
        patch -d "$src" -p1 --quiet <"$p"
    done

    say "[$((SECONDS - t0))s] $v: uapi headers (headers_install.sh, unifdef, syscallhdr.sh)"
    headers "$src" "$build/usr-$v/include"

    tests=$src/tools/testing/vsock
    for prog in "${wanted[@]}"; do
        objs=$(sed -n "s/^$prog: *//p" "$tests/Makefile")
        [[ -n $objs ]] || continue
        say "[$((SECONDS - t0))s] $v: $prog ($objs)"
        srcs=()
        for o in $objs; do srcs+=("$tests/${o%.o}.c"); done
        (cd "$tests" && gcc "${cflags[@]}" -I. -I../../include -I"$build/usr-$v/include" \
            -static -s -o "$build/bin/$prog-$v" "${srcs[@]}")
        built+=("$prog-$v")
    done
done

# `--list` of each vsock_test/vsock_diag_test: the test ids, for the README and the tests. It
# exits 1 after printing, before any socket is opened (list_tests() in util.c calls exit).
for prog in "${built[@]}"; do
    [[ $prog == vsock_perf-* ]] && continue
    "$build/bin/$prog" --list >"$build/bin/list-$prog.txt" || true
    grep -q '^0	' "$build/bin/list-$prog.txt" || die "$prog --list printed no test"
done

say "[$((SECONDS - t0))s] packing vsock-test.cpio: ${built[*]}"
{
    echo "dir /usr 0755 0 0"        # as in the default initramfs: re-creating them is harmless
    echo "dir /usr/bin 0755 0 0"
    for prog in "${built[@]}"; do echo "file /usr/bin/$prog $build/bin/$prog 0755 0 0"; done
} >"$build/files.list"
tmp=$cache/.tmp-$key
rm -rf "$tmp"
mkdir -p "$tmp"
python3 "$mkcpio" "$build/files.list" "$tmp/vsock-test.cpio"
cp "$build/bin"/* "$tmp/"
cp "$build/files.list" "$tmp/files.list"
rm -rf "$out"
mv -T "$tmp" "$out"
point_current
rm -rf "$build"
say "[$((SECONDS - t0))s] built $out ($(stat -c %s "$out/vsock-test.cpio") bytes of cpio)"
