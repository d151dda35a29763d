"""The x86-64 guest physical memory map, I/O ports and IRQ numbers.

Every fixed address pyvmm puts something at lives here and nowhere else
(compare Firecracker ``arch/x86_64/layout.rs``).  Loaders, the boot code and
the machine import these names; nobody else writes a magic address.

Guest physical address space (not to scale)::

    0x0000_0000 +---------------------------------+
                | real-mode IVT / BIOS data (zero)|
    0x0000_0500 | boot GDT                        |  BOOT_GDT_START
    0x0000_0540 | boot IDT (empty)                |  BOOT_IDT_START
    0x0000_6000 | PVH hvm_start_info + memmap     |  PVH_INFO_START
    0x0000_7000 | zero page: struct boot_params   |  ZERO_PAGE_START
    0x0000_8ff0 | boot stack (grows down)         |  BOOT_STACK_POINTER
    0x0000_9000 | PML4                            |  PML4_START
    0x0000_a000 | PDPT                            |  PDPTE_START
    0x0000_b000 | 4 x PD, 2 MiB pages: 0..4 GiB   |  PDE_START
    0x0002_0000 | kernel command line             |  CMDLINE_START
    0x0009_fc00 | MP floating pointer + table     |  MPTABLE_START (EBDA)
    0x000a_0000 +---------------------------------+
                | legacy VGA/BIOS hole (e820 rsv) |
    0x0010_0000 +---------------------------------+  HIMEM_START
                | kernel (vmlinux PT_LOADs by     |
                | p_paddr, usually 0x100_0000;    |
                | bzImage protected-mode code)    |
                |            ...                  |
                | initrd, placed as high as fits  |
                +---------------------------------+  end of RAM (--mem)
                |            (unused)             |
    0xd000_0000 +---------------------------------+  MMIO_START
                | virtio-mmio devices, 4 KiB each |  IRQ 5, 6, ...
    0xfec0_0000 | IOAPIC                          |  IOAPIC_START
    0xfee0_0000 | local APIC                      |  APIC_START
    0xffff_ffff +---------------------------------+

RAM is one region starting at 0, so ``--mem`` may not exceed MMIO_START.

I/O ports: COM1 16550A at 0x3f8-0x3ff (IRQ 4); i8042 at 0x60/0x64 (0xFE to
0x64 resets the machine); the boot timer at BOOT_TIMER_PORT.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PAGE_SIZE = 4096

# --- low memory: structures pyvmm writes before the first KVM_RUN ----------
BOOT_GDT_START = 0x500
BOOT_GDT_MAX_ENTRIES = 8
BOOT_IDT_START = 0x540
PVH_INFO_START = 0x6000
PVH_MEMMAP_START = PVH_INFO_START + 0x100
PVH_MEMMAP_MAX_ENTRIES = 16
ZERO_PAGE_START = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000
IDENTITY_MAP_GIB = 4            # PD pages at PDE_START .. PDE_START + 4 pages
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000      # the boot protocol's cmdline_size caps it further
MPTABLE_START = 0x9FC00

# --- the legacy hole and high memory ---------------------------------------
EBDA_START = 0x9FC00
LEGACY_HOLE_START = 0xA0000
HIMEM_START = 0x100000          # 1 MiB
INITRD_ALIGN = 2 * MiB

# --- the top of the 32-bit space -------------------------------------------
MMIO_START = 0xD000_0000        # virtio-mmio window (Firecracker uses the same base)
MMIO_DEVICE_SIZE = 0x1000       # one 4 KiB register page per virtio-mmio device
MMIO_MAX_DEVICES = 16
#: two pages KVM needs below 4 GiB on Intel hosts: the identity-mapped page
#: table for real mode without unrestricted guest (KVM_SET_IDENTITY_MAP_ADDR),
#: then the three-page real-mode TSS (KVM_SET_TSS_ADDR); both are just below the
#: BIOS area, where QEMU and Firecracker put them too
KVM_IDENTITY_MAP_START = 0xFFFB_C000
KVM_TSS_START = 0xFFFB_D000
IOAPIC_START = 0xFEC0_0000
APIC_START = 0xFEE0_0000

# --- guest RAM bounds accepted for --mem ------------------------------------
MEM_MIN = 16 * MiB
MEM_MAX = MMIO_START
DEFAULT_MEM = 64 * MiB

# --- I/O ports and IRQ lines ------------------------------------------------
COM1_PORT = 0x3F8
COM1_PORT_COUNT = 8
COM1_IRQ = 4
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
#: a write-only port the guest writes a one-byte phase code to; pyvmm logs the
#: time since the VMM started.  0x440 is unused by PC hardware.
BOOT_TIMER_PORT = 0x440
VIRTIO_IRQ_BASE = 5             # first IRQ for virtio-mmio devices (5, 6, ...)


def mmio_device_base(index: int) -> int:
    """Guest physical base of the ``index``-th virtio-mmio device."""
    if not 0 <= index < MMIO_MAX_DEVICES:
        raise ValueError(f"virtio-mmio device index {index} out of range")
    return MMIO_START + index * MMIO_DEVICE_SIZE


def mmio_device_irq(index: int) -> int:
    """The IRQ line of the ``index``-th virtio-mmio device."""
    if not 0 <= index < MMIO_MAX_DEVICES:
        raise ValueError(f"virtio-mmio device index {index} out of range")
    return VIRTIO_IRQ_BASE + index
