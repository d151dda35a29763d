#!/usr/bin/env bash
# kernels/build.sh -- build pyvmm's guest kernel (vmlinux + bzImage) into the artefact cache.
#
# Owns: turning Debian's /usr/src/linux-source-6.1.tar.xz + kernels/guest.config (config
# fragment) + kernels/patches/*.patch into
#
#     $PYVMM_CACHE/kernel/<key>/{vmlinux,bzImage,config,System.map}
#     $PYVMM_CACHE/kernel/current -> <key>          (replaced atomically)
#
# PYVMM_CACHE defaults to $HOME/.cache/pyvmm. <key> is the first 16 hex digits of the sha256 of
# every input that changes the result: the linux-source-6.1 package version, the fragment, each
# patch (name and content) and this script. A complete <key> directory is never rebuilt
# ("kernel: cache hit"), so a second run costs a hash and a stat.
#
# Phases: check tools -> extract -> patch -> configure (tinyconfig + fragment + olddefconfig,
# then verify every fragment line stuck) -> build (make -j2, make's own lines are the progress)
# -> copy. Work happens in $PYVMM_CACHE/kernel/build-<key>, deleted on success and kept on
# failure for inspection. Exit codes: 0 ok, 1 build/config failure, 2 missing apt packages.
#
# Usage: kernels/build.sh            (env: PYVMM_CACHE, PYVMM_KERNEL_JOBS default 2)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment=$here/guest.config
tarball=/usr/src/linux-source-6.1.tar.xz
cache=${PYVMM_CACHE:-$HOME/.cache/pyvmm}/kernel
jobs=${PYVMM_KERNEL_JOBS:-2}   # the shared 2-core machines: never more than -j2 by default

say() { printf 'kernel: %s\n' "$*"; }
die() { printf 'kernel: ERROR: %s\n' "$*" >&2; exit 1; }

# --- 0. tools: name every missing Debian package at once; the Makefile installs them.
"$here/../scripts/check-packages" kernel linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev xz-utils patch
[[ -r $tarball ]] || die "$tarball not found although linux-source-6.1 is installed"

# --- cache key: the source version, not the 138 MB tarball, stands for the kernel source.
mapfile -t patches < <(find "$here/patches" -maxdepth 1 -name '*.patch' | LC_ALL=C sort)
key=$(
    {
        printf 'linux-source-6.1 %s\n' "$(dpkg-query -W -f='${Version}' linux-source-6.1)"
        printf -- '--- fragment\n'; cat "$fragment"
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
trap 'rc=$?; ((rc)) && printf "kernel: FAILED in phase \"%s\" (exit %d); build dir kept: %s\n" \
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

# --- 3. configure: tinyconfig, the fragment, olddefconfig, then verify.
step configure "tinyconfig + ${fragment##*/} + olddefconfig"
mk() { make -C "$build" ARCH=x86_64 "$@"; }
mk -s tinyconfig
# The fragment's non-comment lines are scripts/config arguments ("--enable X" ...).
mapfile -t opts < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$fragment")
# shellcheck disable=SC2068  # each line deliberately splits into option + name [+ value]
"$build/scripts/config" --file "$build/.config" ${opts[@]}
mk -s olddefconfig

# Kconfig drops options whose dependencies are unmet without a word: check every line.
bad=()
for line in "${opts[@]}"; do
    read -r op name val _ <<<"$line"
    name=${name#CONFIG_}
    got=$(grep -E "^CONFIG_${name}=" "$build/.config" | cut -d= -f2- || true)
    case $op in
        --enable|-e)  want=y ;;
        --module|-m)  want=m ;;
        --disable|-d) want= ;;      # "is not set" or absent
        --set-val)    want=$val ;;
        --set-str)    want="\"$val\"" ;;
        *) die "unsupported line in ${fragment##*/}: $line" ;;
    esac
    [[ $got == "$want" ]] || bad+=("CONFIG_$name: asked ${want:-unset}, got ${got:-unset}")
done
if ((${#bad[@]})); then
    printf 'kernel: ERROR: %d fragment option(s) did not survive olddefconfig:\n' "${#bad[@]}" >&2
    printf 'kernel:   %s\n' "${bad[@]}" >&2
    die "fix the dependencies in $fragment (see $build/.config)"
fi
say "  all ${#opts[@]} fragment options verified in .config"

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
