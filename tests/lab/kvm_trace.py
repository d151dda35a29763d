"""The lab's outer kernel's KVM trace: record what KVM saw, and freeze it at a guest's shutdown.

Inside the lab, pyvmm's guest runs on the outer kernel's kvm_amd (nested SVM under QEMU
TCG).  When that guest triple-faults, kvm_amd resets the vCPU before pyvmm sees
``KVM_EXIT_SHUTDOWN`` (tests/lab/README.md, "The 2-vCPU triple fault"), so only the outer
kernel's own trace still holds where the guest was: the ``kvm:kvm_exit`` event of the
SHUTDOWN intercept carries the guest RIP.  :func:`start` records a few ``kvm:*`` events into
a ring per CPU and installs an event trigger that turns tracing off at the first SHUTDOWN
exit, so the ring ends exactly there however long the session runs on.  :func:`caught` says
whether that happened, :func:`excerpt` returns the end of the ring with the guest RIPs of
the last exits named by the guest kernel's symbols.

Needs root and tracefs (Documentation/trace/events.rst, "Event triggers"); stdlib only.
Used by tests/conftest.py (every e2e session in the lab) and tests/lab/triple_fault.py.
"""

from __future__ import annotations

import bisect
import re
import subprocess
from pathlib import Path

TRACING = Path("/sys/kernel/tracing")
#: AMD's exit code for a shutdown (triple fault) intercept: arch/x86/include/uapi/asm/svm.h
SVM_EXIT_SHUTDOWN = 0x07F
#: what is recorded: every exit with its reason and guest RIP, every entry, and what KVM
#: injects (interrupts, exceptions) or hands to userspace (port I/O, MSRs, exits)
EVENTS = ("kvm_exit", "kvm_entry", "kvm_inj_virq", "kvm_inj_exception", "kvm_pio", "kvm_msr",
          "kvm_userspace_exit", "kvm_apic_accept_irq", "kvm_page_fault")
#: ring size per CPU: tens of thousands of events, the last seconds of a busy guest
DEFAULT_KB_PER_CPU = 8192
_TRIGGER = f"traceoff if exit_reason == {SVM_EXIT_SHUTDOWN}"
_RIP = re.compile(r"\brip (?:0x)?([0-9a-f]{6,16})\b")


def start(kb_per_cpu: int = DEFAULT_KB_PER_CPU) -> str | None:
    """Start recording; None if it runs, else why it cannot (not root, no tracefs, ...)."""
    try:
        if not (TRACING / "trace").exists():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)],
                           check=False, capture_output=True)
        (TRACING / "tracing_on").write_text("0")
        (TRACING / "buffer_size_kb").write_text(str(kb_per_cpu))
        for event in EVENTS:
            (TRACING / "events/kvm" / event / "enable").write_text("1")
        (TRACING / "events/kvm/kvm_exit/trigger").write_text(_TRIGGER)
        (TRACING / "trace").write_text("")
        (TRACING / "tracing_on").write_text("1")
    except OSError as e:
        return f"no outer KVM trace: {e}"
    return None


def restart() -> None:
    """Empty the ring and record again (after a caught shutdown, for the next boot)."""
    (TRACING / "trace").write_text("")
    (TRACING / "tracing_on").write_text("1")


def caught() -> bool:
    """True if a SHUTDOWN exit has frozen the ring (nothing else turns tracing off)."""
    try:
        return (TRACING / "tracing_on").read_text().strip() == "0"
    except OSError:
        return False


def excerpt(lines: int = 200, vmlinux: Path | None = None) -> str:
    """The last ``lines`` events, each guest RIP followed by ``<symbol+0xoff>`` if known.

    A RIP in the outer kernel's own VM-entry code is named ``<outer kvm_amd:symbol+0xoff>``
    (from ``/proc/kallsyms``): a nested guest has no business there (our guest kernels are
    built without modules, so nothing of theirs lives in the module area), and seeing it
    means the emulated VMRUN handed the outer kernel's RIP to the guest."""
    text = (TRACING / "trace").read_text(errors="replace").splitlines()[-lines:]
    guest = symbolizer(vmlinux) if vmlinux else (lambda rip: "")
    outer = _outer_symbolizer()

    def name(rip: int) -> str:
        return guest(rip) or outer(rip)
    return "\n".join(_RIP.sub(lambda m: f"{m.group(0)} {name(int(m.group(1), 16))}".rstrip(), line)
                     for line in text)


#: the outer kernel's module whose text a nested guest's RIP is checked against
OUTER_MODULE = "kvm_amd"


def _outer_symbolizer(kallsyms: Path = Path("/proc/kallsyms")):
    """rip -> "<outer kvm_amd:symbol+0xoff>" for a RIP in kvm_amd's text, else ""."""
    try:
        lines = kallsyms.read_text().splitlines()
    except OSError:
        return lambda rip: ""
    syms = sorted((int(f[0], 16), f[2]) for f in (l.split() for l in lines)
                  if len(f) >= 4 and f[1] in "tT" and f[3] == f"[{OUTER_MODULE}]" and int(f[0], 16))
    # past kvm_amd's last text symbol a RIP is not known to be its
    return _namer(syms, 0x10000, f"outer {OUTER_MODULE}:", past_last=False)


def symbolizer(vmlinux: Path):
    """rip -> "<symbol+0xoff>" from ``nm`` of the guest kernel, or "" (no nm, not a text RIP)."""
    try:
        out = subprocess.run(["nm", "-n", str(vmlinux)], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return lambda rip: ""
    syms = [(int(a, 16), s) for a, t, s in (l.split()[:3] for l in out.splitlines()
                                             if len(l.split()) >= 3) if t in "tTwW"]
    return _namer(syms, 0x100000)


def _namer(syms: list[tuple[int, str]], max_offset: int, prefix: str = "", past_last: bool = True):
    """rip -> "<{prefix}symbol+0xoff>" from ``syms`` ((address, name), sorted), or "" if no
    symbol starts at most ``max_offset`` below it (or, ``past_last`` False, the nearest one
    below is the last: where it ends is not known)."""
    addrs = [a for a, _ in syms]

    def name(rip: int) -> str:
        i = bisect.bisect_right(addrs, rip) - 1
        if i < 0 or rip - addrs[i] > max_offset or (not past_last and i == len(syms) - 1):
            return ""
        return f"<{prefix}{syms[i][1]}+{rip - addrs[i]:#x}>"
    return name
