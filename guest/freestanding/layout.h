/*
 * layout.h - where this guest puts things, and the fixed addresses and ports
 * it talks to.  Included by C and assembly alike.
 *
 * Guest physical memory as this guest sees it (identity-mapped, so every
 * address below is also the virtual address):
 *
 *   0x0000_0000  real-mode IVT/BDA: untouched
 *   0x0000_6000  struct hvm_start_info + memmap, written by the VMM   (read only)
 *   0x0001_0000  AP trampoline page (SIPI vector 0x10), copied by the BSP
 *   0x0002_0000  kernel command line, written by the VMM              (read only)
 *   0x0010_0000  this ELF: PVH note, text, data (GDT, page tables), bss
 *                (IDT, TSS, stacks).  GUEST_LOAD_ADDR, see link.ld.
 *   0xd000_0000  virtio-mmio window (pyvmm devices)        - MMIO, not RAM
 *   0xe000_0000  UNBACKED_ADDR: nothing there, on pyvmm nor QEMU
 *   0xfee0_0000  local APIC (xAPIC MMIO)
 *
 * The VMM's contract (README.md, "Boot ABI") lets the guest use every byte of
 * RAM below its load address except the two read-only ranges above; this
 * guest only writes the trampoline page.
 */
#ifndef PYVMM_GUEST_LAYOUT_H
#define PYVMM_GUEST_LAYOUT_H

/* --- memory ------------------------------------------------------------- */
#define GUEST_LOAD_ADDR         0x100000        /* 1 MiB; link.ld links here */
#define PVH_INFO_RESERVED_START 0x6000          /* start_info + memmap (VMM) */
#define PVH_INFO_RESERVED_END   0x7000
#define CMDLINE_RESERVED_START  0x20000         /* command line (VMM) */
#define CMDLINE_RESERVED_END    0x30000
/* A SIPI carries an 8-bit vector VV; the AP starts in real mode at
 * CS:IP = VV00:0000, i.e. physical VV000 (Intel SDM Vol. 3A, "MP
 * Initialization Protocol Algorithm").  0x10000 is clear of both reserved
 * ranges above and of pyvmm's Linux-boot structures (pyvmm/layout.py). */
#define AP_TRAMPOLINE_ADDR      0x10000
#define AP_TRAMPOLINE_VECTOR    (AP_TRAMPOLINE_ADDR >> 12)
/* Physical address with no RAM or device behind it on pyvmm (RAM ends below
 * MMIO_START = 0xd0000000; devices sit at 0xd0000000 + 4 KiB * n) and on
 * QEMU.  Fetching an instruction there is the internal-error scenario. */
#define UNBACKED_ADDR           0xe0000000
#define LAPIC_BASE              0xfee00000

/* --- stacks ------------------------------------------------------------- */
#define KERNEL_STACK_SIZE       16384   /* BSP CPL0 stack = TSS.RSP0 */
#define USER_STACK_SIZE         65536   /* BSP CPL3 stack */
#define AP_STACK_SHIFT          12      /* 4 KiB per AP */
#define AP_STACK_SIZE           (1 << AP_STACK_SHIFT)
#define SMP_MAX_CPUS            16      /* BSP + 15 APs */

/* --- GDT selectors (tables.S builds the GDT in this order) -------------- */
#define SEL_KCODE32     0x08    /* flat 32-bit code, DPL0: entry, AP bring-up */
#define SEL_KDATA       0x10    /* flat data, DPL0 */
#define SEL_KCODE64     0x18    /* 64-bit code, DPL0 */
#define SEL_UDATA       0x20    /* flat data, DPL3 (selector | RPL 3 = 0x23) */
#define SEL_UCODE64     0x28    /* 64-bit code, DPL3 (selector | RPL 3 = 0x2b) */
#define SEL_TSS         0x30    /* 64-bit TSS, a 16-byte descriptor */
#define GDT_ENTRIES     8       /* 6 eight-byte descriptors + the TSS's two */

/* --- I/O ports ---------------------------------------------------------- */
#define COM1_BASE               0x3f8   /* 16550A UART */
#define I8042_COMMAND_PORT      0x64
#define I8042_CMD_PULSE_RESET   0xfe    /* pulse output port bit 0: CPU reset */
#define BOOT_TIMER_PORT         0x440   /* pyvmm device: one-byte phase codes */
#define BOOT_PHASE_ENTRY        0x01    /* first instruction of pvh_start32 */
#define BOOT_PHASE_CPL3_MAIN    0x02    /* first line of user_main at CPL3 */

/* --- the system call gate ----------------------------------------------- */
/* CPL3 enters CPL0 with INT3: vector 3 (#BP) has a DPL3 gate, and a #BP
 * from CPL3 is a system call (cpu.h explains why not INT 0x80 or SYSCALL). */
#define SYSCALL_VECTOR          3

#endif
