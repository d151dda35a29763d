#!/usr/bin/env bash
# qemu-check.sh - run every scenario of the test guest under QEMU and check
# its output lines against the contract in README.md.  Under -accel kvm when
# /dev/kvm is usable, and always under -accel tcg; QEMU -M microvm.
#
#   guest/freestanding/qemu-check.sh        # prints one PASS/FAIL line per case
#
# Exit status 0 when every case passed.  Each case is bounded by a timeout;
# 'loop' and the KVM internal error (QEMU pauses the VM) are ended by it.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
elf=$("$here/build.sh") || exit 1
sym=${elf%.elf}.sym
fault_rip=$(awk '$3 == "fault_ud2" { sub(/^0+/, "", $1); print "0x" $1 }' "$sym")
failures=0
out=$(mktemp)
pipe=$(mktemp)
trap 'rm -f "$out" "$pipe"' EXIT
extra=()        # further QEMU arguments for the next check (virtio devices)

# check ACCEL CPUS SECONDS CMDLINE -- PATTERN... : every extended regex
# PATTERN must match a line of QEMU's combined stdout+stderr.
check() {
	local accel=$1 cpus=$2 seconds=$3 cmdline=$4
	shift 5
	local start end status pattern ok=1
	start=$(date +%s%N)
	timeout "$seconds" qemu-system-x86_64 -M microvm -accel "$accel" \
		-smp "$cpus" -m 64M -nodefaults -no-reboot -nographic -nic none \
		-serial stdio "${extra[@]}" -kernel "$elf" -append "$cmdline" 2>&1 </dev/null |
		tr -d '\r' >"$out"
	status=${PIPESTATUS[0]}
	end=$(date +%s%N)
	for pattern in "$@"; do
		grep -Eq -- "$pattern" "$out" || { ok=0; echo "    missing: $pattern"; }
	done
	if ((ok)); then
		printf 'PASS %-4s smp=%s %-26s %5d ms (qemu status %d)\n' \
			"$accel" "$cpus" "'$cmdline'" $(((end - start) / 1000000)) "$status"
	else
		printf 'FAIL %-4s smp=%s %-26s (qemu status %d); output:\n' \
			"$accel" "$cpus" "'$cmdline'" "$status"
		sed 's/^/    | /' "$out"
		failures=$((failures + 1))
	fi
}

P='^pyvmm-test-guest: '
accels=(tcg)
if [[ -r /dev/kvm && -w /dev/kvm ]]; then accels=(kvm tcg); fi
for accel in "${accels[@]}"; do
	check "$accel" 1 20 'hello' -- "${P}hello from CPL3 \(cs=0x[0-9a-f]+\)" "${P}exit 0"
	check "$accel" 1 20 'count 5' -- "${P}line 1$" "${P}line 5$" "${P}exit 0"
	check "$accel" 1 20 'count 0' -- "${P}exit 0"
	check "$accel" 1 20 'fault' -- "${P}exception 6 err=0x0 rip=${fault_rip}$"
	check "$accel" 1 20 'nosuch a=b' -- "${P}unknown scenario 'nosuch'" "${P}exit 1"
	check "$accel" 1 20 '' -- "${P}unknown scenario ''" "${P}exit 1"
	check "$accel" 1 20 'bootinfo' -- "${P}start_info at 0x[0-9a-f]+ magic=0x336ec578" "${P}exit 0"
	check "$accel" 2 30 'smp cpus=2' -- "${P}cpus 2$" "${P}exit 0"
	check "$accel" 1 30 'smp cpus=1' -- "${P}cpus 1$" "${P}exit 0"
	check "$accel" 1 3 'loop' -- "${P}loop: spinning at CPL3"
	# virtio: QEMU's virtio-mmio is legacy (version 1) unless told otherwise.
	serial=(-global virtio-mmio.force-legacy=false -device virtio-serial-device)
	extra=("${serial[@]}")
	check "$accel" 1 20 'virtio-probe' -- "${P}virtio device 0 at 0x[0-9a-f]+ irq [0-9]+ id 3 vendor 0x554d4551" \
		"${P}virtio device 0 driver ok features 0x1[0-9a-f]{8}" "${P}virtio probe done 1 devices" "${P}exit 0"
	# A generic port (nr=1, MULTIPORT) into a file: QEMU throttles it, so
	# nothing is lost; the file must hold the test stream (teststream.h).
	: >"$pipe"
	extra=("${serial[@]}" -chardev "file,id=c0,path=$pipe" -device virtserialport,chardev=c0,nr=1)
	check "$accel" 1 20 'console-bulk-send bytes=100000 port=1' -- \
		"${P}console bulk sent 100000 bytes fnv 8491bb7cad8f049b in [0-9]+ ticks" "${P}exit 0"
	if [[ $(python3 -c 'import sys
M = 2**64 - 1; x = 0x9E3779B97F4A7C15; out = bytearray()
while len(out) < 100000:
    x ^= (x << 13) & M; x ^= x >> 7; x ^= (x << 17) & M; out += x.to_bytes(8, "little")
print(open(sys.argv[1], "rb").read() == bytes(out[:100000]))' "$pipe") != True ]]; then
		echo "FAIL $accel console-bulk-send: the chardev file is not the test stream"
		failures=$((failures + 1))
	fi
	extra=()
done
if [[ ${accels[0]} == kvm ]]; then
	# QEMU prints KVM_EXIT_INTERNAL_ERROR as below, then pauses the VM.
	check kvm 1 3 'internal-error' -- "${P}internal-error: jumping to 0xe0000000 at CPL0" \
		'KVM internal error\. Suberror: 1' 'emulation failure'
fi
# Not checked here: 'internal-error' under TCG (no KVM, no internal error:
# the CPU runs off into unassigned memory until the timeout), and
# 'internal-error how=int3' (an internal error on PVM, exception 3 on
# hardware KVM and TCG).
if ((failures)); then echo "$failures case(s) failed"; exit 1; fi
echo "all passed"
