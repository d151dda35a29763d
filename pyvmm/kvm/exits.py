"""Typed vCPU exits: what ``VcpuFd.run()`` returns.

KVM reports why ``KVM_RUN`` returned in the ``kvm_run`` page, a C union keyed
by ``exit_reason``.  Callers never touch that union: :func:`decode` turns it
into one of the small classes below (compare rust-vmm ``kvm-ioctls``
``VcpuExit``).  For exits that need an answer (a port read, an MMIO read),
``data`` is a writable ``memoryview`` into the ``kvm_run`` page itself: the
handler fills it in and the next ``KVM_RUN`` hands it to the guest.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import abi
from .abi import KvmExitReason


@dataclass(frozen=True, slots=True)
class IoIn:
    """The guest read ``len(data)`` bytes from I/O port ``port``: fill ``data``.

    For string instructions (``rep insb``) ``count`` > 1 and ``data`` holds
    ``count`` consecutive ``size``-byte items.
    """
    port: int
    size: int
    count: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class IoOut:
    """The guest wrote ``data`` (``count`` items of ``size`` bytes) to ``port``."""
    port: int
    size: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MmioRead:
    """The guest read ``len(data)`` bytes at guest physical ``addr``: fill ``data``."""
    addr: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class MmioWrite:
    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Hlt:
    """HLT with no in-kernel irqchip (with one, HLT is handled inside KVM)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The vCPU shut down: on x86, a triple fault."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    """VM entry failed; the reason is the hardware's (VMX/SVM) code."""
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM could not go on, e.g. it failed to emulate an instruction.

    ``insn_bytes`` holds the faulting instruction when KVM supplied it
    (``KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES``), else ``b""``.
    """
    suberror: int
    data: tuple[int, ...]
    insn_bytes: bytes

    @property
    def suberror_name(self) -> str:
        try:
            return abi.KvmInternalError(self.suberror).name
        except ValueError:
            return f"suberror {self.suberror}"


@dataclass(frozen=True, slots=True)
class SystemEvent:
    type: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned EINTR (a signal) or ``immediate_exit`` was set."""


@dataclass(frozen=True, slots=True)
class Other:
    """An exit reason pyvmm does not model; ``reason`` is the raw number."""
    reason: int

    @property
    def name(self) -> str:
        try:
            return KvmExitReason(self.reason).name
        except ValueError:
            return f"KVM_EXIT_{self.reason}"


VcpuExit = (IoIn | IoOut | MmioRead | MmioWrite | Hlt | Shutdown | FailEntry
            | InternalError | SystemEvent | Interrupted | Other)


def decode(run: abi.kvm_run, page: memoryview) -> VcpuExit:
    """Decode the exit described by ``run`` (which lives in ``page``)."""
    reason = run.exit_reason
    if reason == KvmExitReason.KVM_EXIT_IO:
        io = run.exit.io
        length = io.size * io.count
        if io.data_offset + length > len(page):
            return Other(reason)       # KVM never does this; do not trust it blindly
        if io.direction == abi.KVM_EXIT_IO_OUT:
            return IoOut(io.port, io.size, io.count,
                         bytes(page[io.data_offset:io.data_offset + length]))
        return IoIn(io.port, io.size, io.count, page[io.data_offset:io.data_offset + length])
    if reason == KvmExitReason.KVM_EXIT_MMIO:
        mmio = run.exit.mmio
        length = min(mmio.len, 8)
        if mmio.is_write:
            return MmioWrite(mmio.phys_addr, bytes(mmio.data)[:length])
        offset = abi.kvm_run.exit.offset + abi._kvm_run_mmio.data.offset
        return MmioRead(mmio.phys_addr, page[offset:offset + length])
    if reason == KvmExitReason.KVM_EXIT_HLT:
        return Hlt()
    if reason == KvmExitReason.KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == KvmExitReason.KVM_EXIT_FAIL_ENTRY:
        fe = run.exit.fail_entry
        return FailEntry(fe.hardware_entry_failure_reason, fe.cpu)
    if reason == KvmExitReason.KVM_EXIT_INTERNAL_ERROR:
        internal = run.exit.internal
        ndata = min(internal.ndata, 16)
        insn = b""
        if internal.suberror == abi.KvmInternalError.KVM_INTERNAL_ERROR_EMULATION:
            ef = run.exit.emulation_failure
            if (ndata >= 3 and ef.flags & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
                insn = bytes(ef.insn_bytes)[:min(ef.insn_size, 15)]
        return InternalError(internal.suberror, tuple(internal.data[:ndata]), insn)
    if reason == KvmExitReason.KVM_EXIT_SYSTEM_EVENT:
        ev = run.exit.system_event
        return SystemEvent(ev.type, tuple(ev.data[:min(ev.ndata, 16)]))
    if reason == KvmExitReason.KVM_EXIT_INTR:
        return Interrupted()
    return Other(reason)
