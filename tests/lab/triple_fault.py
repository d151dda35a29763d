"""Hunt the guest's rare triple fault in the lab: boot a guest N times, with the outer
kernel's KVM trace events recording, and report every boot that did not end well.

Run inside the lab (it needs the lab's /dev/kvm and root for tracefs)::

    nice tests/lab/run --cpus 2 --timeout 3000 -- \
        .venv/bin/python tests/lab/triple_fault.py --boots 10 --cpus 2 [--kernel bzimage]

Each boot runs the script the 2-vCPU default guest ran when the failure was first seen
(tests/lab/README.md, "The 2-vCPU triple fault").  Before each boot the trace buffer of the outer kernel (``kvm:*`` events:
every exit of the nested guest with its RIP and exit code, injected interrupts, ...) is
cleared; when a boot ends in anything but the guest's own reset, the script prints pyvmm's
reason (which, for KVM_EXIT_SHUTDOWN, holds the vCPU state and last exits), the tail of the
guest console and the tail of the trace: the last things KVM saw before the shutdown.
Last line: ``triple-fault hunt: <boots> boots, <crashes> crashes, <others> other failures``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: harness

from harness import run_guest  # noqa: E402
from pyvmm import images  # noqa: E402
from pyvmm.machine import ExitStatus  # noqa: E402

TRACING = Path("/sys/kernel/tracing")
SCRIPT = ("pyvmm-hello e2e 'two words'; "
          "grep -m1 -o -w hypervisor /proc/cpuinfo; "
          "cat /sys/devices/system/clocksource/clocksource0/available_clocksource; "
          "exit 3")


def start_tracing(kb_per_cpu: int) -> bool:
    """Record the kvm:* events into a ring of ``kb_per_cpu`` per CPU; False if impossible."""
    if not (TRACING / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], check=False)
    try:
        (TRACING / "buffer_size_kb").write_text(str(kb_per_cpu))
        (TRACING / "events/kvm/enable").write_text("1")
        (TRACING / "tracing_on").write_text("1")
        return True
    except OSError as e:
        print(f"triple-fault hunt: no KVM tracing ({e})", flush=True)
        return False


def trace_tail(lines: int) -> str:
    (TRACING / "tracing_on").write_text("0")
    text = (TRACING / "trace").read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=10)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--kernel", choices=("vmlinux", "bzimage"), default="vmlinux")
    ap.add_argument("--trace-kb", type=int, default=4096, help="trace ring per CPU, 0 = none")
    ap.add_argument("--trace-lines", type=int, default=400)
    args = ap.parse_args()
    tracing = args.trace_kb > 0 and os.geteuid() == 0 and start_tracing(args.trace_kb)
    crashes = others = 0
    for i in range(1, args.boots + 1):
        if tracing:
            (TRACING / "trace").write_text("")
            (TRACING / "tracing_on").write_text("1")
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
            print(f"--- boot {i}: outer kernel's kvm trace, last {args.trace_lines} lines ---\n"
                  + trace_tail(args.trace_lines), flush=True)
    print(f"triple-fault hunt: {args.boots} boots, {crashes} crashes, {others} other failures "
          f"({args.kernel}, cpus={args.cpus}, tracing {'on' if tracing else 'off'})", flush=True)
    return 1 if crashes or others else 0


if __name__ == "__main__":
    sys.exit(main())
