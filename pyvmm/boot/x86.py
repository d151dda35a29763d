"""x86-64 vCPU state at entry: GDT, identity page tables, segment and control
registers, general registers, FPU, MSRs and CPUID.

A vCPU leaves reset in real mode.  Instead of running firmware, pyvmm puts
the boot vCPU straight into the state the kernel's entry point expects:

* **64-bit Linux boot protocol** (``Documentation/arch/x86/boot.rst``, "64-bit
  BOOT PROTOCOL"): long mode with paging on and an identity map covering the
  kernel, boot_params and command line; a GDT with 4 GiB flat ``__BOOT_CS``
  (selector 0x10) and ``__BOOT_DS`` (0x18); RSI = the zero page; interrupts
  off.
* **PVH** (Xen ``docs/misc/pvh.pandoc``): 32-bit protected mode, paging off,
  CR0 = PE|ET, CR4 = EFER = 0, flat 32-bit CS, DS/ES/SS flat data, TR a
  32-bit TSS, EBX = the ``hvm_start_info`` address.

The other vCPUs are left as KVM creates them: with the in-kernel LAPIC they
wait for the INIT/SIPI the guest's boot CPU sends.
"""

from __future__ import annotations

from .. import layout
from ..kvm import abi
from ..memory import GuestMemory

# --- GDT -------------------------------------------------------------------------
# Descriptor flags, packed as Firecracker's gdt_entry() takes them:
# bits 0-7 the access byte (P, DPL, S, type), bits 12-15 the G/DB/L/AVL nibble.
GDT_CODE64 = 0xA09B     # present, DPL0, code exec/read accessed, L=1, G=1
GDT_DATA = 0xC093       # present, DPL0, data read/write accessed, DB=1, G=1
GDT_TSS = 0x808B        # present, DPL0, busy 32/64-bit TSS, G=1
GDT_CODE32 = 0xC09B     # present, DPL0, code exec/read accessed, DB=1, G=1

#: (index, flags) of the boot GDT; index * 8 is the selector.
BOOT_GDT = ((0, 0), (1, 0), (2, GDT_CODE64), (3, GDT_DATA), (4, GDT_TSS), (5, GDT_CODE32))
BOOT_CS, BOOT_DS, BOOT_TSS, BOOT_CS32 = 2, 3, 4, 5


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Pack a segment descriptor (Intel SDM vol. 3A, 3.4.5)."""
    return (((base & 0xFF000000) << 32) | ((flags & 0x0000F0FF) << 40)
            | ((limit & 0x000F0000) << 32) | ((base & 0x00FFFFFF) << 16)
            | (limit & 0x0000FFFF))


def segment_from_gdt(entry: int, index: int) -> abi.kvm_segment:
    """The ``kvm_segment`` (the hidden part of a segment register) a descriptor loads."""
    g = (entry >> 55) & 1
    limit = ((entry >> 32) & 0xF0000) | (entry & 0xFFFF)
    if g:
        limit = (limit << 12) | 0xFFF
    present = (entry >> 47) & 1
    return abi.kvm_segment(
        base=((entry >> 16) & 0xFFFFFF) | ((entry >> 32) & 0xFF000000),
        limit=limit, selector=index * 8, type=(entry >> 40) & 0xF, present=present,
        dpl=(entry >> 45) & 3, db=(entry >> 54) & 1, s=(entry >> 44) & 1,
        l=(entry >> 53) & 1, g=g, avl=(entry >> 52) & 1, unusable=0 if present else 1)


def write_gdt(memory: GuestMemory) -> list[int]:
    entries = [gdt_entry(flags, 0, 0xFFFFF) if flags else 0 for _, flags in BOOT_GDT]
    for i, entry in enumerate(entries):
        memory.write_u64(layout.BOOT_GDT_START + 8 * i, entry)
    memory.write_u64(layout.BOOT_IDT_START, 0)
    return entries


# --- page tables -----------------------------------------------------------------
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_PS = 1 << 7          # in a PD entry: this maps a 2 MiB page


def write_identity_page_tables(memory: GuestMemory) -> None:
    """Identity-map the first IDENTITY_MAP_GIB GiB with 2 MiB pages (4-level paging)."""
    memory.write_u64(layout.PML4_START, layout.PDPTE_START | PTE_PRESENT | PTE_WRITE)
    for gib in range(layout.IDENTITY_MAP_GIB):
        pd = layout.PDE_START + gib * layout.PAGE_SIZE
        memory.write_u64(layout.PDPTE_START + 8 * gib, pd | PTE_PRESENT | PTE_WRITE)
        for i in range(512):
            memory.write_u64(pd + 8 * i, ((gib << 30) + (i << 21)) | PTE_PRESENT | PTE_WRITE | PTE_PS)


# --- control registers -----------------------------------------------------------
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


def boot_sregs(sregs: abi.kvm_sregs, gdt: list[int], long_mode: bool) -> abi.kvm_sregs:
    """Fill ``sregs`` (as read from the vCPU) for the chosen entry mode."""
    code = BOOT_CS if long_mode else BOOT_CS32
    sregs.cs = segment_from_gdt(gdt[code], code)
    data = segment_from_gdt(gdt[BOOT_DS], BOOT_DS)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = segment_from_gdt(gdt[BOOT_TSS], BOOT_TSS)
    sregs.gdt.base = layout.BOOT_GDT_START
    sregs.gdt.limit = 8 * len(gdt) - 1
    sregs.idt.base = layout.BOOT_IDT_START
    sregs.idt.limit = 7
    # Reset CR0 has CD|NW set (0x60000010): state every bit explicitly.
    if long_mode:
        sregs.cr0 = X86_CR0_PG | X86_CR0_ET | X86_CR0_PE
        sregs.cr3 = layout.PML4_START
        sregs.cr4 = X86_CR4_PAE
        sregs.efer = EFER_LME | EFER_LMA
    else:
        sregs.cr0 = X86_CR0_ET | X86_CR0_PE
        sregs.cr3 = sregs.cr4 = sregs.efer = 0
    return sregs


def boot_regs(entry: int, long_mode: bool) -> abi.kvm_regs:
    regs = abi.kvm_regs(rflags=0x2, rip=entry)   # bit 1 of RFLAGS is reserved, always 1
    if long_mode:
        regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
        regs.rsi = layout.ZERO_PAGE_START
    else:
        regs.rbx = layout.PVH_INFO_START
    return regs


def boot_fpu() -> abi.kvm_fpu:
    """FNINIT state: FCW 0x37f, MXCSR 0x1f80 (all exceptions masked)."""
    return abi.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)


# --- local APIC ----------------------------------------------------------------
APIC_LVT0 = 0x350        # register offsets in the LAPIC page (arch/x86/include/asm/apicdef.h)
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def set_lint(vcpu) -> None:
    """LAPIC LINT0 = ExtINT (the 8259 PIC passes through), LINT1 = NMI, as a BIOS leaves them."""
    state = vcpu.get_lapic()
    regs = bytearray(state.regs)
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = int.from_bytes(regs[reg:reg + 4], "little")
        regs[reg:reg + 4] = ((value & ~0x700) | (mode << 8)).to_bytes(4, "little")
    state.regs[:] = regs
    vcpu.set_lapic(state)


# --- MSRs --------------------------------------------------------------------------
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRRdefType = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 6


def boot_msrs() -> dict[int, int]:
    """The MSR values a vCPU starts with (as Firecracker's create_boot_msr_entries)."""
    return {
        MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
        MSR_MTRRdefType: MTRR_ENABLE | MTRR_MEM_TYPE_WB,
    }


# --- CPUID -------------------------------------------------------------------------
CPUID_HYPERVISOR_BIT = 1 << 31       # leaf 1 ECX bit 31: "running under a hypervisor"
CPUID_HTT_BIT = 1 << 28              # leaf 1 EDX: more than one logical processor
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"


def guest_cpuid(supported: list[abi.kvm_cpuid_entry2], vcpu_index: int,
                vcpu_count: int) -> list[abi.kvm_cpuid_entry2]:
    """Adapt KVM_GET_SUPPORTED_CPUID for one vCPU.

    Sets the hypervisor-present bit and the KVM signature leaves: without
    them Linux finds no kvm-clock and, on real or nested KVM, hangs
    calibrating the TSC.  Gives each vCPU its APIC ID (leaf 1 EBX[31:24],
    leaf 0xB EDX) and the logical processor count.
    """
    out = []
    seen = set()
    for src in supported:
        e = abi.kvm_cpuid_entry2.from_buffer_copy(src)
        seen.add(e.function)
        if e.function == 1:
            e.ecx |= CPUID_HYPERVISOR_BIT
            e.ebx = (e.ebx & 0x0000FFFF) | (vcpu_index << 24) | ((vcpu_count & 0xFF) << 16)
            e.edx = (e.edx | CPUID_HTT_BIT) if vcpu_count > 1 else (e.edx & ~CPUID_HTT_BIT)
        elif e.function == 0xB:
            e.edx = vcpu_index
        elif e.function == KVM_CPUID_SIGNATURE:
            e.eax = max(e.eax, KVM_CPUID_FEATURES)
            e.ebx, e.ecx, e.edx = (int.from_bytes(KVM_SIGNATURE[i:i + 4], "little")
                                   for i in (0, 4, 8))
        out.append(e)
    if KVM_CPUID_SIGNATURE not in seen:
        sig = [int.from_bytes(KVM_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8)]
        out.append(abi.kvm_cpuid_entry2(function=KVM_CPUID_SIGNATURE, eax=KVM_CPUID_FEATURES,
                                        ebx=sig[0], ecx=sig[1], edx=sig[2]))
    if KVM_CPUID_FEATURES not in seen:
        out.append(abi.kvm_cpuid_entry2(function=KVM_CPUID_FEATURES))
    return out
