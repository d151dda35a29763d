/*
 * ap_trampoline.S - how an application processor (AP) gets from its
 * start-up IPI to 64-bit code and into ap_main (smp.c).
 *
 * INIT-SIPI-SIPI (SDM Vol. 3A, "MP Initialization Protocol Algorithm" and
 * "Typical AP Initialization Sequence"): after INIT an AP waits for a
 * start-up IPI; a SIPI with vector VV starts it in real mode at CS = VV00,
 * IP = 0, i.e. physical address VV000.  The BSP copies the 16-bit part below
 * (ap_trampoline_start .. ap_trampoline_end) to AP_TRAMPOLINE_ADDR, a page
 * under 1 MiB; it is position-independent within its segment.  It loads the
 * shared GDT, sets CR0.PE and far-jumps into this image, to ap_start32.  From
 * there the AP takes the same road to 64-bit mode as the BSP (longmode.h),
 * draws a ticket that picks its stack, loads the shared IDT and calls
 * ap_main at CPL0.  APs stay at CPL0 and need no TSS: a trap without a
 * privilege change does not switch stacks.
 */
#include "layout.h"
#include "longmode.h"
#include "x86.h"

	.section .rodata.ap_trampoline, "a"
	.code16
	.globl	ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
	cli
	movw	%cs, %ax                /* CS = AP_TRAMPOLINE_ADDR >> 4 */
	movw	%ax, %ds
	/* lgdtl: operand-size prefix, so all 32 bits of the base are loaded. */
	lgdtl	ap_gdt_descriptor - ap_trampoline_start
	movl	$(CR0_PE | CR0_ET), %eax        /* written whole: reset CR0 has CD|NW */
	movl	%eax, %cr0
	ljmpl	$SEL_KCODE32, $ap_start32       /* flat: an absolute address */

	.balign	4
ap_gdt_descriptor:                      /* 6-byte form: 16-bit limit, 32-bit base */
	.word	GDT_ENTRIES * 8 - 1
	.long	gdt
ap_trampoline_end:

	.text
	.code32
ap_start32:
	movl	$SEL_KDATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	ENTER_LONG_MODE ap_start64

	.code64
ap_start64:
	/* Ticket i = 0, 1, ... in arrival order; AP i gets stack i. */
	movl	$1, %eax
	lock xaddl %eax, ap_next_ticket(%rip)
	cmpl	$(SMP_MAX_CPUS - 1), %eax
	jae	ap_park                 /* no stack for it: stays uncounted */
	leal	1(%eax), %ecx
	shlq	$AP_STACK_SHIFT, %rcx
	leaq	ap_stacks(%rip), %rsp
	addq	%rcx, %rsp              /* top of stack i */
	lidt	idt_descriptor(%rip)    /* cpu.c; faults get reported */
	movl	%eax, %edi
	call	ap_main                 /* smp.c; does not return */
ap_park:
	cli
	hlt
	jmp	ap_park

	.data
	.balign 4
ap_next_ticket:
	.long	0

	.section .bss.stacks, "aw", @nobits
	.balign	4096
ap_stacks:
	.skip	(SMP_MAX_CPUS - 1) * AP_STACK_SIZE
