"""The KVM userspace ABI: structs, constants and ioctl numbers of ``<linux/kvm.h>``.

Names are the kernel's, verbatim, so that this file can be read side by side
with ``include/uapi/linux/kvm.h`` and ``Documentation/virt/kvm/api.rst``.
Only what pyvmm uses is declared.  Struct sizes are pinned by
``tests/unit/test_kvm_abi.py``, which also compiles a C program against the
machine's ``<linux/kvm.h>`` (where a compiler and headers exist) and compares
every size, offset and ioctl number.
"""

from __future__ import annotations

import ctypes
import enum

from .ioctl import _IO, _IOR, _IOW, _IOWR

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
s32 = ctypes.c_int32

KVMIO = 0xAE
KVM_API_VERSION = 12


class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_
                           if not name.startswith("pad"))
        return f"{type(self).__name__}({fields})"


# --- memory ----------------------------------------------------------------
class kvm_userspace_memory_region(_Struct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


# --- vCPU registers (x86) --------------------------------------------------
class kvm_regs(_Struct):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(_Struct):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_Struct):
    _fields_ = [("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment),
                ("fs", kvm_segment), ("gs", kvm_segment), ("ss", kvm_segment),
                ("tr", kvm_segment), ("ldt", kvm_segment),
                ("gdt", kvm_dtable), ("idt", kvm_dtable),
                ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
                ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]


class kvm_fpu(_Struct):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
                ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    """Header only; the entries follow (a C flexible array member)."""
    _fields_ = [("nmsrs", u32), ("pad", u32)]


def kvm_msrs_with(n: int):
    """A ``kvm_msrs`` with room for ``n`` entries, as one ctypes type."""
    class _kvm_msrs(_Struct):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]
    return _kvm_msrs


class kvm_cpuid_entry2(_Struct):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1   # (sic: the kernel's spelling)


class kvm_cpuid2(_Struct):
    """Header only; the entries follow (a C flexible array member)."""
    _fields_ = [("nent", u32), ("padding", u32)]


def kvm_cpuid2_with(n: int):
    class _kvm_cpuid2(_Struct):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]
    return _kvm_cpuid2


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", u32)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(_Struct):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]


class kvm_translation(_Struct):
    _fields_ = [("linear_address", u64), ("physical_address", u64), ("valid", u8),
                ("writeable", u8), ("usermode", u8), ("pad", u8 * 5)]


# --- interrupts, timers, eventfds -----------------------------------------
class kvm_pit_config(_Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_irq_level(_Struct):
    _fields_ = [("irq", u32), ("level", u32)]   # irq is a union with 'status'


class kvm_irqfd(_Struct):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32),
                ("pad", u8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0


class kvm_ioeventfd(_Struct):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32),
                ("flags", u32), ("pad", u8 * 36)]


class kvm_ioeventfd_flag_nr(enum.IntEnum):
    datamatch = 0
    pio = 1
    deassign = 2


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << kvm_ioeventfd_flag_nr.datamatch
KVM_IOEVENTFD_FLAG_PIO = 1 << kvm_ioeventfd_flag_nr.pio
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << kvm_ioeventfd_flag_nr.deassign


# --- struct kvm_run (the shared page a vCPU's exits are reported in) ------
class _kvm_run_io(_Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class _kvm_run_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _kvm_run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _kvm_run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_emulation_failure(_Struct):
    """Overlay of ``internal`` for KVM_INTERNAL_ERROR_EMULATION (kvm.h)."""
    _fields_ = [("suberror", u32), ("ndata", u32), ("flags", u64),
                ("insn_size", u8), ("insn_bytes", u8 * 15)]


KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0


class _kvm_run_system_event(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_hw(_Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [("hw", _kvm_run_hw), ("fail_entry", _kvm_run_fail_entry),
                ("io", _kvm_run_io), ("mmio", _kvm_run_mmio),
                ("internal", _kvm_run_internal),
                ("emulation_failure", _kvm_run_emulation_failure),
                ("system_event", _kvm_run_system_event), ("padding", ctypes.c_char * 256)]


class kvm_run(_Struct):
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8),
                ("if_flag", u8), ("flags", u16), ("cr8", u64), ("apic_base", u64),
                ("exit", _kvm_run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64),
                ("s", ctypes.c_char * 2048)]


class KvmExitReason(enum.IntEnum):
    """``KVM_EXIT_*``: why KVM_RUN returned."""
    KVM_EXIT_UNKNOWN = 0
    KVM_EXIT_EXCEPTION = 1
    KVM_EXIT_IO = 2
    KVM_EXIT_HYPERCALL = 3
    KVM_EXIT_DEBUG = 4
    KVM_EXIT_HLT = 5
    KVM_EXIT_MMIO = 6
    KVM_EXIT_IRQ_WINDOW_OPEN = 7
    KVM_EXIT_SHUTDOWN = 8
    KVM_EXIT_FAIL_ENTRY = 9
    KVM_EXIT_INTR = 10
    KVM_EXIT_SET_TPR = 11
    KVM_EXIT_TPR_ACCESS = 12
    KVM_EXIT_NMI = 16
    KVM_EXIT_INTERNAL_ERROR = 17
    KVM_EXIT_SYSTEM_EVENT = 24
    KVM_EXIT_IOAPIC_EOI = 26
    KVM_EXIT_X86_RDMSR = 29
    KVM_EXIT_X86_WRMSR = 30
    KVM_EXIT_X86_BUS_LOCK = 33
    KVM_EXIT_NOTIFY = 37


class KvmInternalError(enum.IntEnum):
    """``KVM_INTERNAL_ERROR_*``: the suberror of KVM_EXIT_INTERNAL_ERROR."""
    KVM_INTERNAL_ERROR_EMULATION = 1
    KVM_INTERNAL_ERROR_SIMUL_EX = 2
    KVM_INTERNAL_ERROR_DELIVERY_EV = 3
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4


class KvmSystemEvent(enum.IntEnum):
    KVM_SYSTEM_EVENT_SHUTDOWN = 1
    KVM_SYSTEM_EVENT_RESET = 2
    KVM_SYSTEM_EVENT_CRASH = 3


class KvmMpState(enum.IntEnum):
    KVM_MP_STATE_RUNNABLE = 0
    KVM_MP_STATE_UNINITIALIZED = 1
    KVM_MP_STATE_INIT_RECEIVED = 2
    KVM_MP_STATE_HALTED = 3
    KVM_MP_STATE_SIPI_RECEIVED = 4


class KvmCap(enum.IntEnum):
    """``KVM_CAP_*`` values pyvmm asks about with KVM_CHECK_EXTENSION."""
    KVM_CAP_IRQCHIP = 0
    KVM_CAP_HLT = 1
    KVM_CAP_USER_MEMORY = 3
    KVM_CAP_SET_TSS_ADDR = 4
    KVM_CAP_EXT_CPUID = 7
    KVM_CAP_NR_VCPUS = 9
    KVM_CAP_NR_MEMSLOTS = 10
    KVM_CAP_PIT = 11
    KVM_CAP_MP_STATE = 14
    KVM_CAP_IRQ_ROUTING = 25
    KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
    KVM_CAP_IRQFD = 32
    KVM_CAP_PIT2 = 33
    KVM_CAP_IOEVENTFD = 36
    KVM_CAP_MAX_VCPUS = 66
    KVM_CAP_IMMEDIATE_EXIT = 136


# --- ioctl numbers ---------------------------------------------------------
# /dev/kvm (system) ioctls
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
# VM ioctls
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
# vCPU ioctls
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, kvm_translation)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)

#: ioctl number -> name, for error messages (every KVM_* int whose type byte is KVMIO)
IOCTL_NAMES = {value: name for name, value in list(globals().items())
               if name.startswith("KVM_") and isinstance(value, int)
               and (value >> 8) & 0xFF == KVMIO}
