#!/usr/bin/env bash
# run-qemu.sh - boot the test guest under QEMU, as pyvmm would boot it
# (PVH entry from the ELF note), with the serial port on stdout.
#
#   guest/freestanding/run-qemu.sh [-a kvm|tcg] [-M microvm|pc] [-s CPUS]
#                                  [-t SECONDS] [--] SCENARIO [ARGS...]
#   e.g.  run-qemu.sh hello;  run-qemu.sh -a tcg -s 2 smp cpus=2
#
# Defaults: -a kvm, -M microvm, -s 1, -t 30 (a 'timeout' bound: 'loop' and a
# KVM internal error - where QEMU pauses the VM and waits - end only by it;
# exit status 124 then).  Always -nic none and no vsock device: the guest
# gets no path out of the machine.  Builds the guest first (build.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
accel=kvm machine=microvm cpus=1 seconds=30
while getopts a:M:s:t: opt; do
	case $opt in
	a) accel=$OPTARG ;;
	M) machine=$OPTARG ;;
	s) cpus=$OPTARG ;;
	t) seconds=$OPTARG ;;
	*) sed -n '2,12p' "$0" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[[ $# -gt 0 ]] || { sed -n '2,12p' "$0" >&2; exit 2; }

elf=$("$here/build.sh")
exec timeout --foreground "$seconds" qemu-system-x86_64 \
	-M "$machine" -accel "$accel" -smp "$cpus" -m 64M \
	-nodefaults -no-reboot -nographic -nic none -serial stdio \
	-kernel "$elf" -append "$*"
