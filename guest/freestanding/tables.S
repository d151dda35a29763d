/*
 * tables.S - the CPU tables that can be written down at build time: the GDT
 * and the page tables.  The assembler computes every entry, so the CPL0 boot
 * path (emulated, ~4000x slower than CPL3 on PVM hosts) runs no loop to build
 * them.  The IDT and the TSS descriptor hold split-up addresses and are filled
 * in at run time by cpu.c.
 */
#include "layout.h"
#include "x86.h"

	.section .data.tables, "aw"

/*
 * Global Descriptor Table (SDM Vol. 3A, "Segment Descriptors", and
 * "Code-Segment Descriptor in 64-bit Mode").  In 64-bit mode base and limit
 * are ignored for CS/DS/ES/SS; what matters is P, DPL, S, type and, for
 * code, L (64-bit) vs D (32-bit).
 *
 *   bits 0-15 limit 15:0     40-43 type    44 S   45-46 DPL   47 P
 *   bits 16-39 base 23:0     48-51 limit 19:16    53 L  54 D/B  55 G
 *   bits 56-63 base 31:24
 */
	.balign 16
	.globl gdt
gdt:
	.quad 0                         /* 0x00 null */
	.quad 0x00cf9a000000ffff        /* 0x08 SEL_KCODE32: G D P DPL0 exec/read */
	.quad 0x00cf92000000ffff        /* 0x10 SEL_KDATA:   G D P DPL0 read/write */
	.quad 0x00af9a000000ffff        /* 0x18 SEL_KCODE64: G L P DPL0 exec/read */
	.quad 0x00cff2000000ffff        /* 0x20 SEL_UDATA:   G D P DPL3 read/write */
	.quad 0x00affa000000ffff        /* 0x28 SEL_UCODE64: G L P DPL3 exec/read */
	.quad 0, 0                      /* 0x30 SEL_TSS: 16 bytes, see cpu.c */
gdt_end:
	.if (gdt_end - gdt) != GDT_ENTRIES * 8
	.error "GDT_ENTRIES does not match the table"
	.endif

/* Pseudo-descriptor for LGDT: 2-byte limit, then the base.  32-bit code reads
 * a 4-byte base, 64-bit code an 8-byte one (SDM Vol. 2A, "LGDT/LIDT"). */
	.balign 8
	.globl gdt_descriptor
gdt_descriptor:
	.word gdt_end - gdt - 1
	.quad gdt

/*
 * Page tables: identity map of 0 .. 4 GiB with 2 MiB pages (SDM Vol. 3A,
 * "4-Level Paging").  One PML4 entry -> one PDPT -> four page directories
 * of 512 PDEs each.  Every level has U/S = 1 so CPL3 code can reach RAM,
 * the virtio-mmio window and the local APIC; the last GiB (3..4 GiB, where
 * pyvmm and QEMU put MMIO and no RAM) is mapped uncached (PCD|PWT).
 */
#define TABLE_FLAGS     (PTE_P | PTE_W | PTE_U)
	.balign 4096
	.globl boot_pml4
boot_pml4:
	.quad boot_pdpt + TABLE_FLAGS
	.fill 511, 8, 0

	.balign 4096
boot_pdpt:
	.quad boot_pd + 0 * 4096 + TABLE_FLAGS
	.quad boot_pd + 1 * 4096 + TABLE_FLAGS
	.quad boot_pd + 2 * 4096 + TABLE_FLAGS
	.quad boot_pd + 3 * 4096 + TABLE_FLAGS
	.fill 508, 8, 0

	.balign 4096
boot_pd:
	.set pde_index, 0
	.rept 4 * 512
	.if pde_index < 3 * 512
	.quad (pde_index << 21) | TABLE_FLAGS | PTE_PS
	.else
	.quad (pde_index << 21) | TABLE_FLAGS | PTE_PS | PTE_PCD | PTE_PWT
	.endif
	.set pde_index, pde_index + 1
	.endr
