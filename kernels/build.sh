#!/usr/bin/env bash
# kernels/build.sh -- build one of pyvmm's guest kernels (vmlinux + bzImage) into the artefact cache.
#
# Owns: turning Debian's /usr/src/linux-source-<V>.tar.xz + kernels/guest.config (the config
# fragment every version shares) + kernels/guest-<V>.config (what differs for version <V>) +
# kernels/patches/<V>/*.patch into
#
#     $PYVMM_CACHE/<kind>/<key>/{vmlinux,bzImage,config,System.map}
#     $PYVMM_CACHE/<kind>/current -> <key>          (replaced atomically)
#
# for <V> = 6.1 (the default kernel, <kind> = kernel) or 6.12 (<kind> = kernel-6.12): the
# table below. PYVMM_CACHE defaults to $HOME/.cache/pyvmm. <key> is the first 16 hex digits of
# the sha256 of every input that changes the result: the linux-source-<V> package version, both
# fragments, each patch (name and content) and this script. A complete <key> directory is
# never rebuilt ("kernel: cache hit"), so a second run costs a hash and a stat. Each <kind>
# has its own lock, so the two versions can be built at the same time.
#
# Phases: check tools -> extract -> patch -> configure (tinyconfig + fragments + olddefconfig,
# then verify every fragment line stuck) -> build (make -j2, make's own lines are the progress)
# -> copy. Work happens in $PYVMM_CACHE/<kind>/build-<key>, deleted on success and kept on
# failure for inspection. Exit codes: 0 ok, 1 build/config failure, 2 missing apt packages,
# 64 bad arguments.
#
# Usage: kernels/build.sh [6.1|6.12]   (no argument: 6.1; env: PYVMM_CACHE, PYVMM_KERNEL_JOBS default 2)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage='usage: kernels/build.sh [6.1|6.12]   (no argument: 6.1, the default guest kernel)'
bad_usage() { printf '%s\n' "$usage" >&2; exit 64; }
case ${1-} in -h|--help) printf '%s\n' "$usage"; exit 0 ;; esac
(($# <= 1)) || bad_usage
version=${1-6.1}               # no argument: 6.1; an empty one is refused below

# --- 0. the versions, and the tools: name every missing Debian package at once (the Makefile
#     installs them). Package names stay literal here: tests/unit/test_install_list.py reads
#     these calls to check that the Makefile's APT_PACKAGES has each of them.
case $version in
    6.1)    # the default guest kernel (pyvmm.images.default_kernel)
        kind=kernel
        "$here/../scripts/check-packages" kernel linux-source-6.1 \
            build-essential bc bison flex libelf-dev libssl-dev xz-utils patch ;;
    6.12)   # for the 6.12 guest driver (pyvmm.images.kernel_6_12), e.g. the kernel's vsock_test
        kind=kernel-6.12
        "$here/../scripts/check-packages" kernel-6.12 linux-source-6.12 \
            build-essential bc bison flex libelf-dev libssl-dev xz-utils patch ;;
    *) bad_usage ;;
esac
source_pkg=linux-source-$version
tarball=/usr/src/$source_pkg.tar.xz
# The shared fragment first, then the version's own lines (a later line wins for a symbol).
fragments=("$here/guest.config" "$here/guest-$version.config")
patch_dir=$here/patches/$version
cache=${PYVMM_CACHE:-$HOME/.cache/pyvmm}/$kind
jobs=${PYVMM_KERNEL_JOBS:-2}   # the shared 2-core machines: never more than -j2 by default

say() { printf '%s: %s\n' "$kind" "$*"; }
die() { printf '%s: ERROR: %s\n' "$kind" "$*" >&2; exit 1; }

[[ -r $tarball ]] || die "$tarball not found although $source_pkg is installed"
for f in "${fragments[@]}"; do [[ -r $f ]] || die "$f not found"; done
[[ -d $patch_dir ]] || die "$patch_dir not found (an empty directory means no patches)"

# --- cache key: the source version, not the 138 MB tarball, stands for the kernel source.
mapfile -t patches < <(find "$patch_dir" -maxdepth 1 -name '*.patch' | LC_ALL=C sort)
key=$(
    {
        printf '%s %s\n' "$source_pkg" "$(dpkg-query -W -f='${Version}' "$source_pkg")"
        for f in "${fragments[@]}"; do printf -- '--- fragment %s\n' "${f##*/}"; cat "$f"; done
        for p in "${patches[@]}"; do printf -- '--- patch %s\n' "${p##*/}"; cat "$p"; done
        printf -- '--- build.sh\n'; cat "${BASH_SOURCE[0]}"
    } | sha256sum | cut -c1-16
)
out=$cache/$key
build=$cache/build-$key

mkdir -p "$cache"
# One builder at a time per cache (a second caller waits, then finds the cache hit).
exec 9>"$cache/.lock"
flock 9

point_current() {   # ln -s to a temp name, then rename(2) over `current`: readers never see it missing
    ln -sfn "$key" "$cache/.current.tmp"
    mv -T "$cache/.current.tmp" "$cache/current"
}

if [[ -f $out/vmlinux && -f $out/bzImage ]]; then
    point_current
    say "cache hit $out"
    exit 0
fi

phase=
trap 'rc=$?; ((rc)) && printf "%s: FAILED in phase \"%s\" (exit %d); build dir kept: %s\n" "$kind" \
        "$phase" "$rc" "$build" >&2' EXIT
t0=$SECONDS
step() { phase=$1; say "[$((SECONDS - t0))s] $*"; }

# --- 1. extract (a leftover build dir from a failed run is discarded: start clean)
step extract "$tarball -> $build"
rm -rf "$build"
mkdir -p "$build"
tar -xJf "$tarball" -C "$build" --strip-components=1

# --- 2. patch
step patch "${#patches[@]} patch(es)"
for p in "${patches[@]}"; do
    say "  applying ${p##*/}"
    patch -p1 -s -d "$build" < "$p"
done

# --- 3. configure: tinyconfig, the fragments, olddefconfig, then verify.
step configure "tinyconfig + ${fragments[*]##*/} + olddefconfig"
mk() { make -C "$build" ARCH=x86_64 "$@"; }
mk -s tinyconfig
# The fragments' non-comment lines are scripts/config arguments ("--enable X" ...), in order.
mapfile -t opts < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "${fragments[@]}")
# shellcheck disable=SC2068  # each line deliberately splits into option + name [+ value]
"$build/scripts/config" --file "$build/.config" ${opts[@]}
mk -s olddefconfig

# Kconfig drops options whose dependencies are unmet without a word: check every line. What a
# symbol must be is what the last line naming it asked (the version's fragment overrides).
declare -A want_of=()
names=()
for line in "${opts[@]}"; do
    read -r op name val _ <<<"$line"
    name=${name#CONFIG_}
    case $op in
        --enable|-e)  want=y ;;
        --module|-m)  want=m ;;
        --disable|-d) want= ;;      # "is not set" or absent
        --set-val)    want=$val ;;
        --set-str)    want="\"$val\"" ;;
        *) die "unsupported line in ${fragments[*]##*/}: $line" ;;
    esac
    [[ -v "want_of[$name]" ]] || names+=("$name")
    want_of[$name]=$want
done
bad=()
for name in "${names[@]}"; do
    want=${want_of[$name]}
    got=$(grep -E "^CONFIG_${name}=" "$build/.config" | cut -d= -f2- || true)
    [[ $got == "$want" ]] || bad+=("CONFIG_$name: asked ${want:-unset}, got ${got:-unset}")
done
if ((${#bad[@]})); then
    printf '%s: ERROR: %d fragment option(s) did not survive olddefconfig:\n' "$kind" "${#bad[@]}" >&2
    for b in "${bad[@]}"; do printf '%s:   %s\n' "$kind" "$b" >&2; done
    die "fix the dependencies in ${fragments[*]} (see $build/.config)"
fi
say "  all ${#opts[@]} fragment lines (${#names[@]} symbols) verified in .config"

# --- 4. build: make's "CC ..." lines are the progress display.
step build "make ARCH=x86_64 -j$jobs vmlinux bzImage (several minutes)"
mk -j"$jobs" vmlinux bzImage

# --- 5. copy into a temp dir, then rename it to <key>: <key> appears complete or not at all.
step copy "-> $out"
tmp=$cache/.tmp-$key
rm -rf "$tmp"
mkdir -p "$tmp"
cp "$build/vmlinux" "$build/arch/x86/boot/bzImage" "$build/System.map" "$tmp/"
cp "$build/.config" "$tmp/config"
rm -rf "$out"
mv -T "$tmp" "$out"
point_current
rm -rf "$build"
phase=done
say "[$((SECONDS - t0))s] built $out ($(stat -c %s "$out/bzImage") B bzImage, $(stat -c %s "$out/vmlinux") B vmlinux)"
