/*
 * pvh.S - the boot processor's way in: the PVH ELF note that names the entry
 * point, the 32-bit entry itself, the switch to 64-bit mode, and the call
 * into C (cpu_init_bsp in cpu.c, which drops to CPL3 and never returns).
 *
 * Boot ABI (Xen docs/misc/pvh.pandoc; Linux arch/x86/platform/pvh/head.S is
 * the reference consumer): the loader places the PT_LOAD segments at their
 * physical addresses and jumps to the address in the note with
 *   - 32-bit protected mode, paging off, CR0.PE = 1 (other CR0 bits: see
 *     longmode.h), CR4 = 0, EFLAGS.IF = 0;
 *   - CS a flat 32-bit code segment, DS/ES flat data; selectors unspecified
 *     and SS/ESP unspecified - so this code loads its own GDT and stack
 *     before touching the stack;
 *   - EBX = physical address of struct hvm_start_info (pvh.h).
 */
#include "layout.h"
#include "longmode.h"
#include "pvh.h"
#include "x86.h"

/*
 * The note (ELF spec, "Note Section"): namesz, descsz, type, then the
 * name and the descriptor, each padded to 4 bytes.  desc is the 32-bit
 * physical entry address (Xen's own notes use .long; Linux's x86-64 build
 * uses an 8-byte _ASM_PTR - loaders accept both).  link.ld puts this in a
 * PT_NOTE segment and inside the first PT_LOAD.
 */
	.section .note.Xen, "a", @note
	.balign 4
	.long	2f - 1f                         /* namesz = 4 ("Xen\0") */
	.long	4f - 3f                         /* descsz = 4 */
	.long	XEN_ELFNOTE_PHYS32_ENTRY        /* type = 18 */
1:	.asciz	"Xen"
2:	.balign 4
3:	.long	pvh_start32
4:	.balign 4

	.section .text.entry, "ax"
	.code32
	.globl	pvh_start32
	.type	pvh_start32, @function
pvh_start32:
	/* Boot timer phase 1: first guest instruction (port > 0xff: via DX). */
	movb	$BOOT_PHASE_ENTRY, %al
	movw	$BOOT_TIMER_PORT, %dx
	outb	%al, %dx

	/* TSC at entry, for the bootinfo scenario: the cost of CPL0 boot. */
	rdtsc
	movl	%eax, boot_tsc_entry
	movl	%edx, boot_tsc_entry + 4

	movl	%ebx, %esi              /* keep &hvm_start_info until C */

	/* Our own GDT, then reload every segment register from it. */
	lgdt	gdt_descriptor
	ljmp	$SEL_KCODE32, $1f
1:	movl	$SEL_KDATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs

	ENTER_LONG_MODE bsp_start64

	.code64
bsp_start64:
	/* Data segments are not used for addressing in 64-bit mode; SS keeps
	 * SEL_KDATA.  The upper halves of the GPRs are undefined after the mode
	 * switch (SDM Vol. 1, "Register Operands in 64-Bit Mode"): movl
	 * zero-extends. */
	leaq	bsp_kernel_stack_top(%rip), %rsp
	movl	%esi, %edi              /* arg 1: start_info (phys == virt) */
	call	cpu_init_bsp            /* cpu.c: IDT, TSS, iretq to CPL3 */
	ud2                             /* not reached */
	.size	pvh_start32, . - pvh_start32

	.data
	.balign	8
	.globl	boot_tsc_entry
boot_tsc_entry:
	.quad	0

	.section .bss.stacks, "aw", @nobits
	.balign 4096
	/* The BSP's CPL0 stack: used from here to the drop to CPL3, and after
	 * it as TSS.RSP0, the stack for every trap from CPL3 (cpu.c). */
	.globl	bsp_kernel_stack_top
bsp_kernel_stack:
	.skip	KERNEL_STACK_SIZE
bsp_kernel_stack_top:
