"""Hunt the guest's rare triple fault in the lab: boot a guest N times, with the outer
kernel's KVM trace events recording, and report every boot that did not end well.

Run inside the lab (it needs the lab's /dev/kvm and root for tracefs)::

    nice tests/lab/run --cpus 2 --timeout 3000 -- \
        .venv/bin/python tests/lab/triple_fault.py --boots 10 --cpus 2 [--kernel bzimage]

Each boot runs the script the 2-vCPU default guest ran when the failure was first seen
(tests/lab/README.md, "The 2-vCPU triple fault").  Before each boot the outer kernel's KVM
trace (kvm_trace.py: every exit of the nested guest with its RIP and exit code, injected
interrupts, ...; frozen at a SHUTDOWN exit) is cleared; when a boot ends in anything but the guest's own reset, the script prints pyvmm's
reason (which, for KVM_EXIT_SHUTDOWN, holds the vCPU state and last exits), the tail of the
guest console and the tail of the trace: the last things KVM saw before the shutdown.
Last line: ``triple-fault hunt: <boots> boots, <crashes> crashes, <others> other failures``.

``--control`` checks the trace instead: a minimal guest triple-faults on purpose (real mode,
an IDT limit of 0, ``ud2`` at :data:`CONTROL_RIP`), and the script prints the frozen trace
and exits 0 only if the ring stopped at that SHUTDOWN exit with that RIP
(tests/lab/test_lab.py runs it).
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: harness

sys.path.insert(0, str(Path(__file__).resolve().parent))        # tests/lab: kvm_trace

import kvm_trace  # noqa: E402
from harness import run_guest  # noqa: E402
from pyvmm.kvm import exits  # noqa: E402
from pyvmm.kvm.fd import Kvm  # noqa: E402
from pyvmm import images  # noqa: E402
from pyvmm.machine import ExitStatus  # noqa: E402

SCRIPT = ("pyvmm-hello e2e 'two words'; "
          "grep -m1 -o -w hypervisor /proc/cpuinfo; "
          "cat /sys/devices/system/clocksource/clocksource0/available_clocksource; "
          "exit 3")

#: where the control guest's ``ud2`` is (real mode, CS base 0)
CONTROL_RIP = 0x1000


def control() -> int:
    """A deliberate triple fault: the frozen trace must end at its SHUTDOWN exit."""
    why_not = kvm_trace.start()
    if why_not:
        print(f"trace control: {why_not}", flush=True)
        return 2
    memory = mmap.mmap(-1, 0x10000)
    memory[CONTROL_RIP:CONTROL_RIP + 2] = b"\x0f\x0b"                    # ud2
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0, len(memory), address)
        with vm.create_vcpu(0) as vcpu:
            sregs = vcpu.get_sregs()
            sregs.cs.base, sregs.cs.selector = 0, 0
            sregs.idt.base, sregs.idt.limit = 0, 0     # every vector is out of bounds
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = CONTROL_RIP, 0x2
            vcpu.set_regs(regs)
            exit_ = vcpu.run()
    ok_exit = isinstance(exit_, exits.Shutdown)
    text = kvm_trace.excerpt(40)
    shutdown = [l for l in text.splitlines() if "kvm_exit:" in l and "reason shutdown" in l]
    print(f"trace control: pyvmm saw {exit_}; trace frozen: {kvm_trace.caught()}; "
          f"last lines:\n{text}", flush=True)
    ok = (ok_exit and kvm_trace.caught() and len(shutdown) == 1
          and f"rip {CONTROL_RIP:#x} " in shutdown[0] and text.splitlines()[-1] == shutdown[0])
    print(f"trace control: {'ok' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=10)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--kernel", choices=("vmlinux", "bzimage"), default="vmlinux")
    ap.add_argument("--trace-kb", type=int, default=kvm_trace.DEFAULT_KB_PER_CPU,
                    help="trace ring per CPU, 0 = none")
    ap.add_argument("--trace-lines", type=int, default=400)
    ap.add_argument("--control", action="store_true", help="check the trace, boot nothing")
    args = ap.parse_args()
    if args.control:
        return control()
    why_not = kvm_trace.start(args.trace_kb) if args.trace_kb > 0 else "no trace asked for"
    tracing = why_not is None
    if why_not:
        print(f"triple-fault hunt: {why_not}", flush=True)
    crashes = others = 0
    for i in range(1, args.boots + 1):
        if tracing:
            kvm_trace.restart()
        t0 = time.monotonic()
        kernel = images.default_kernel() if args.kernel == "vmlinux" else images.default_bzimage()
        run = run_guest(kernel, initrd=images.default_initramfs(), cpus=args.cpus,
                        cmdline=f'pyvmm.run="{SCRIPT}"', timeout=300)
        ok = run.result.status == ExitStatus.GUEST_RESET and "pyvmm-guest: exit 3" in run.console
        print(f"boot {i}/{args.boots} {args.kernel} cpus={args.cpus}: {'ok' if ok else 'FAILED'} status "
              f"{run.result.status} in {time.monotonic() - t0:.1f} s: {run.result.reason}",
              flush=True)
        if ok:
            continue
        crashed = run.result.status == ExitStatus.GUEST_CRASH
        crashes += crashed
        others += not crashed
        print(f"--- boot {i}: exit counts {dict(run.result.exit_counts)}", flush=True)
        print(f"--- boot {i}: console tail ---\n" + "\n".join(run.lines[-40:]), flush=True)
        if tracing:
            print(f"--- boot {i}: outer kernel's kvm trace, last {args.trace_lines} lines "
                  f"({'frozen at the SHUTDOWN exit' if kvm_trace.caught() else 'no SHUTDOWN exit'})"
                  " ---\n" + kvm_trace.excerpt(args.trace_lines, kernel), flush=True)
    print(f"triple-fault hunt: {args.boots} boots, {crashes} crashes, {others} other failures "
          f"({args.kernel}, cpus={args.cpus}, tracing {'on' if tracing else 'off'})", flush=True)
    return 1 if crashes or others else 0


if __name__ == "__main__":
    sys.exit(main())
