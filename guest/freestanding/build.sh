#!/usr/bin/env bash
# build.sh - build the freestanding test guest into the artefact cache and
# print the path of the ELF on stdout (the only thing printed there).
#
#   guest/freestanding/build.sh            -> .../freestanding/<key>/pyvmm-test-guest.elf
#
# Cache layout (shared by every pyvmm artefact kind):
#   ${PYVMM_CACHE:-$HOME/.cache/pyvmm}/freestanding/<key>/pyvmm-test-guest.elf
#                                                  /<key>/pyvmm-test-guest.{map,sym}, build-info.txt
#                                                  /current -> <key>
# <key> is a hash of every source here (*.c *.h *.S link.ld), this script and
# the compiler and linker versions.  A key directory appears only complete
# (built in a temporary directory, checked, then renamed into place), so its
# existence is the cache hit: nothing is rebuilt.  'current' is re-pointed
# (atomically: a new symlink renamed over the old) at the key of the build
# just asked for, hit or miss.
#
# Environment: PYVMM_CACHE, CC (default gcc).  Warnings are errors.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cc=${CC:-gcc}
cache=${PYVMM_CACHE:-$HOME/.cache/pyvmm}/freestanding
name=pyvmm-test-guest

cd "$here"
sources=$(LC_ALL=C ls -1 ./*.c ./*.h ./*.S link.ld build.sh)
c_files=$(LC_ALL=C ls -1 ./*.c ./*.S)

# Freestanding x86-64 code for a kernel-like guest:
#   -ffreestanding -nostdinc  no hosted headers; only GCC's own (stdint.h,
#                             stdarg.h, stddef.h) via -isystem
#   -mno-red-zone             traps at CPL0 push onto the interrupted stack
#   -mgeneral-regs-only       no SSE/x87: CR4.OSFXSR is never set
#   -fno-pic -fno-pie, -static -no-pie, -mcmodel=small
#                             absolute addresses, all below 2 GiB
#   -fcf-protection=none -fno-stack-protector
#                             no endbr64, no canary (no TLS here)
#   -fno-tree-loop-distribute-patterns
#                             keep memcpy/memset loops from becoming calls
cflags=(
	-std=gnu11 -O2 -g
	-Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes
	-ffreestanding -nostdinc -isystem "$("$cc" -print-file-name=include)"
	-fno-pic -fno-pie -mcmodel=small -mno-red-zone -mgeneral-regs-only
	-fno-stack-protector -fcf-protection=none -fno-asynchronous-unwind-tables
	-fno-common -fno-tree-loop-distribute-patterns
)
ldflags=(
	-nostdlib -static -no-pie -Wl,-T,link.ld -Wl,--build-id=none
	-Wl,-z,noexecstack -Wl,-z,max-page-size=4096 -Wl,--fatal-warnings
)

key=$( {
	for f in $sources; do printf '%s\n' "$f"; sha256sum <"$f"; done
	"$cc" --version | head -n1
	ld --version | head -n1
	printf '%s\n' "${cflags[*]}" "${ldflags[*]}"
} | sha256sum | cut -c1-16)
dest=$cache/$key

point_current() {
	local tmp_link="$cache/.current.$$"
	ln -sfn "$key" "$tmp_link"
	mv -Tf "$tmp_link" "$cache/current"
}

if [[ -f $dest/$name.elf ]]; then
	point_current
	echo "$dest/$name.elf"
	exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

objs=()
for src in $c_files; do
	obj=$work/$(basename "${src%.*}").o
	"$cc" "${cflags[@]}" -c "$src" -o "$obj"
	objs+=("$obj")
done
"$cc" "${cflags[@]}" "${ldflags[@]}" -Wl,-Map,"$work/$name.map" \
	-o "$work/$name.elf" "${objs[@]}"
rm -f "${objs[@]}"

# The loader contract, checked on the product: ELF64 executable with a
# PT_NOTE holding the Xen PHYS32_ENTRY note (type 0x12) = e_entry.
readelf -hW "$work/$name.elf" | grep -q 'Type:.*EXEC' ||
	{ echo "build.sh: not ET_EXEC" >&2; exit 1; }
readelf -lW "$work/$name.elf" | grep -q '^ *NOTE ' ||
	{ echo "build.sh: no PT_NOTE" >&2; exit 1; }
readelf -nW "$work/$name.elf" | grep -q '^ *Xen .*0x00000012' ||
	{ echo "build.sh: no Xen note type 18" >&2; exit 1; }
nm -n "$work/$name.elf" >"$work/$name.sym"
{
	echo "key $key"
	"$cc" --version | head -n1
	ld --version | head -n1
	echo "cflags ${cflags[*]}"
	echo "ldflags ${ldflags[*]}"
	echo "sources $(echo $sources)"
} >"$work/build-info.txt"

# Publish: rename is atomic; if a concurrent build won the race, keep its copy.
chmod 755 "$work"
if ! mv -T "$work" "$dest" 2>/dev/null; then
	[[ -f $dest/$name.elf ]] || { echo "build.sh: cannot create $dest" >&2; exit 1; }
fi
trap - EXIT
rm -rf "$work"
point_current
echo "$dest/$name.elf"
