"""``Kvm``, ``VmFd`` and ``VcpuFd``: one wrapper per kind of KVM file descriptor.

How a VM is made, in the order the calls happen (``Documentation/virt/kvm/api.rst``)::

    kvm  = Kvm()                         # open("/dev/kvm"), check KVM_GET_API_VERSION == 12
    vm   = kvm.create_vm()               # KVM_CREATE_VM -> a VM fd
    vm.set_user_memory_region(0, 0, mem.size, mem.host_address)   # guest RAM
    vm.create_irqchip(); vm.create_pit2()                          # PIC/IOAPIC/LAPIC, PIT
    vcpu = vm.create_vcpu(0)             # KVM_CREATE_VCPU, mmap its kvm_run page
    vcpu.set_sregs(...); vcpu.set_regs(...)                        # CPU state at entry
    while True:
        exit = vcpu.run()                # KVM_RUN -> a typed exit (pyvmm.kvm.exits)

Every ioctl goes through :func:`_ioctl`, a ctypes call to libc's ``ioctl``
made with ``use_errno``: ctypes releases the GIL around foreign calls, so a
vCPU thread sitting in ``KVM_RUN`` does not stop the rest of pyvmm, and a
failure raises :class:`~pyvmm.errors.KvmError` naming the ioctl and errno.
``KVM_RUN`` is the one call that may be interrupted on purpose: a signal
sent to the vCPU thread (or ``immediate_exit``) makes it return EINTR, which
``run()`` reports as :class:`~pyvmm.kvm.exits.Interrupted`.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import mmap
import os

from ..errors import KvmError
from . import abi, exits

_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc_ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg=None) -> int:
    """ioctl(fd, request, arg); ``arg`` is None, an int, or a ctypes object (passed by reference)."""
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    ret = _libc_ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise KvmError(abi.IOCTL_NAMES.get(request, f"ioctl {request:#x}"), err)
    return ret


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Kvm(_Fd):
    """The system fd, ``/dev/kvm``."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"open {path}", e.errno) from None
        super().__init__(fd)
        version = _ioctl(fd, abi.KVM_GET_API_VERSION)
        if version != abi.KVM_API_VERSION:
            self.close()
            raise KvmError("KVM_GET_API_VERSION", errno_mod.EINVAL,
                           f"API version {version}, pyvmm speaks {abi.KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, int(cap))

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def max_vcpus(self) -> int:
        """KVM_CAP_MAX_VCPUS, falling back to KVM_CAP_NR_VCPUS, then 4 (api.rst)."""
        return (self.check_extension(abi.KvmCap.KVM_CAP_MAX_VCPUS)
                or self.check_extension(abi.KvmCap.KVM_CAP_NR_VCPUS) or 4)

    def supported_cpuid(self, max_entries: int = 256) -> list[abi.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can give a guest."""
        buf = abi.kvm_cpuid2_with(max_entries)()
        buf.nent = max_entries
        _ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf)
        return [abi.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def create_vm(self) -> "VmFd":
        return VmFd(_ioctl(self.fd, abi.KVM_CREATE_VM, 0), self.vcpu_mmap_size())


class VmFd(_Fd):
    """A VM: memory slots, the in-kernel irqchip, eventfd wiring, vCPUs."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self._vcpu_mmap_size = vcpu_mmap_size

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        region = abi.kvm_userspace_memory_region(slot, flags, guest_phys_addr,
                                                 memory_size, userspace_addr)
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, abi.u64(addr))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = abi.KVM_PIT_SPEAKER_DUMMY) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_PIT2, abi.kvm_pit_config(flags=flags))

    def set_irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, abi.KVM_IRQ_LINE, abi.kvm_irq_level(irq, level))

    def register_irqfd(self, eventfd: int, gsi: int) -> None:
        """Writing to ``eventfd`` now injects an edge on ``gsi`` inside KVM."""
        _ioctl(self.fd, abi.KVM_IRQFD, abi.kvm_irqfd(fd=eventfd, gsi=gsi))

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        _ioctl(self.fd, abi.KVM_IRQFD,
               abi.kvm_irqfd(fd=eventfd, gsi=gsi, flags=abi.KVM_IRQFD_FLAG_DEASSIGN))

    def register_ioeventfd(self, eventfd: int, addr: int, length: int,
                           datamatch: int | None = None, pio: bool = False,
                           deassign: bool = False) -> None:
        """A guest write of ``length`` bytes at ``addr`` (matching ``datamatch``,
        if given) now signals ``eventfd`` inside KVM, with no exit to pyvmm."""
        flags = 0
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= abi.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
        _ioctl(self.fd, abi.KVM_IOEVENTFD,
               abi.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length,
                                 fd=eventfd, flags=flags))

    def create_vcpu(self, index: int) -> "VcpuFd":
        return VcpuFd(_ioctl(self.fd, abi.KVM_CREATE_VCPU, index), index, self._vcpu_mmap_size)


class VcpuFd(_Fd):
    """One virtual CPU and its shared ``kvm_run`` page."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.index = index
        self._mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._page = memoryview(self._mmap)
        self.run_struct = abi.kvm_run.from_buffer(self._mmap)

    # -- running --------------------------------------------------------------
    def run(self) -> exits.VcpuExit:
        """KVM_RUN until the next exit that needs userspace; returns it typed."""
        ret = _libc_ioctl(self.fd, abi.KVM_RUN, None)
        if ret < 0:
            err = ctypes.get_errno()
            if err in (errno_mod.EINTR, errno_mod.EAGAIN):
                self.run_struct.immediate_exit = 0
                return exits.Interrupted()
            raise KvmError("KVM_RUN", err, f"vCPU {self.index}")
        return exits.decode(self.run_struct, self._page)

    def set_immediate_exit(self, value: bool = True) -> None:
        """Make the next (or current, with a signal) KVM_RUN return at once."""
        self.run_struct.immediate_exit = 1 if value else 0

    # -- state ------------------------------------------------------------------
    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        _ioctl(self.fd, abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        _ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        sregs = abi.kvm_sregs()
        _ioctl(self.fd, abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        _ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        fpu = abi.kvm_fpu()
        _ioctl(self.fd, abi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        _ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def set_cpuid2(self, entries: list[abi.kvm_cpuid_entry2]) -> None:
        buf = abi.kvm_cpuid2_with(len(entries))()
        buf.nent = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        _ioctl(self.fd, abi.KVM_SET_CPUID2, buf)

    def set_msrs(self, msrs: dict[int, int]) -> None:
        buf = abi.kvm_msrs_with(len(msrs))()
        buf.nmsrs = len(msrs)
        for i, (index, data) in enumerate(msrs.items()):
            buf.entries[i] = abi.kvm_msr_entry(index=index, data=data)
        written = _ioctl(self.fd, abi.KVM_SET_MSRS, buf)
        if written != len(msrs):
            failed = list(msrs)[written]
            raise KvmError("KVM_SET_MSRS", errno_mod.EINVAL,
                           f"KVM accepted {written} of {len(msrs)} MSRs; MSR {failed:#x} refused")

    def get_lapic(self) -> abi.kvm_lapic_state:
        state = abi.kvm_lapic_state()
        _ioctl(self.fd, abi.KVM_GET_LAPIC, state)
        return state

    def set_lapic(self, state: abi.kvm_lapic_state) -> None:
        _ioctl(self.fd, abi.KVM_SET_LAPIC, state)

    def get_mp_state(self) -> int:
        state = abi.kvm_mp_state()
        _ioctl(self.fd, abi.KVM_GET_MP_STATE, state)
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        _ioctl(self.fd, abi.KVM_SET_MP_STATE, abi.kvm_mp_state(mp_state))

    def translate(self, linear_address: int) -> int | None:
        """KVM_TRANSLATE: guest virtual -> guest physical, or None if unmapped."""
        tr = abi.kvm_translation(linear_address=linear_address)
        _ioctl(self.fd, abi.KVM_TRANSLATE, tr)
        return tr.physical_address if tr.valid else None

    def close(self) -> None:
        if self.fd >= 0:
            self.run_struct = None
            self._page.release()
            self._mmap.close()
        super().close()
