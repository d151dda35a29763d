/*
 * traps.S - every crossing between CPL3 and CPL0: the interrupt/exception
 * entry stubs the IDT points at, the common save/restore path around the C
 * dispatcher (trap_dispatch in cpu.c), and enter_user, the IRETQ that drops
 * the boot processor to CPL3.
 *
 * On a trap in 64-bit mode the CPU aligns RSP to 16, switches to TSS.RSP0 if
 * the CPL changes, and pushes SS, RSP, RFLAGS, CS, RIP and, for some vectors,
 * an error code (SDM Vol. 3A, "64-Bit Mode Stack Frame").  The stubs make
 * the frame uniform - an error code (0 if the CPU pushed none) and the
 * vector - then trap_common pushes the 15 GPRs, giving struct trap_frame
 * (cpu.h) at RSP: 22 quadwords, so RSP stays 16-byte aligned for the call.
 */
#include "layout.h"
#include "x86.h"

	.text
	.code64

.macro TRAP_STUB vector, has_error_code
	.balign 16
trap_stub_\vector:
	.if \has_error_code == 0
	pushq	$0
	.endif
	pushq	$\vector
	jmp	trap_common
.endm

/* Vectors 0-31 are the architecture's exceptions; the second argument says
 * whether the CPU pushes an error code (SDM Vol. 3A, "Exception and Interrupt
 * Reference"). */
	TRAP_STUB 0, 0		/* #DE */
	TRAP_STUB 1, 0		/* #DB */
	TRAP_STUB 2, 0		/* NMI */
	TRAP_STUB 3, 0		/* #BP; from CPL3: a system call */
	TRAP_STUB 4, 0		/* #OF */
	TRAP_STUB 5, 0		/* #BR */
	TRAP_STUB 6, 0		/* #UD */
	TRAP_STUB 7, 0		/* #NM */
	TRAP_STUB 8, 1		/* #DF */
	TRAP_STUB 9, 0
	TRAP_STUB 10, 1		/* #TS */
	TRAP_STUB 11, 1		/* #NP */
	TRAP_STUB 12, 1		/* #SS */
	TRAP_STUB 13, 1		/* #GP */
	TRAP_STUB 14, 1		/* #PF */
	TRAP_STUB 15, 0
	TRAP_STUB 16, 0		/* #MF */
	TRAP_STUB 17, 1		/* #AC */
	TRAP_STUB 18, 0		/* #MC */
	TRAP_STUB 19, 0		/* #XM */
	TRAP_STUB 20, 0		/* #VE */
	TRAP_STUB 21, 1		/* #CP */
	TRAP_STUB 22, 0
	TRAP_STUB 23, 0
	TRAP_STUB 24, 0
	TRAP_STUB 25, 0
	TRAP_STUB 26, 0
	TRAP_STUB 27, 0
	TRAP_STUB 28, 0		/* #HV */
	TRAP_STUB 29, 1		/* #VC */
	TRAP_STUB 30, 1		/* #SX */
	TRAP_STUB 31, 0

trap_common:
	pushq	%rax
	pushq	%rbx
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%rbp
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	cld                             /* the SysV ABI expects DF = 0 */
	movq	%rsp, %rdi              /* struct trap_frame * */
	call	trap_dispatch
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rbp
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rbx
	popq	%rax
	addq	$16, %rsp               /* vector, error code */
	iretq

/* The stub addresses, for cpu.c to put in the IDT. */
	.section .rodata
	.balign 8
	.globl	trap_stub_table
trap_stub_table:
	.quad	trap_stub_0, trap_stub_1, trap_stub_2, trap_stub_3
	.quad	trap_stub_4, trap_stub_5, trap_stub_6, trap_stub_7
	.quad	trap_stub_8, trap_stub_9, trap_stub_10, trap_stub_11
	.quad	trap_stub_12, trap_stub_13, trap_stub_14, trap_stub_15
	.quad	trap_stub_16, trap_stub_17, trap_stub_18, trap_stub_19
	.quad	trap_stub_20, trap_stub_21, trap_stub_22, trap_stub_23
	.quad	trap_stub_24, trap_stub_25, trap_stub_26, trap_stub_27
	.quad	trap_stub_28, trap_stub_29, trap_stub_30, trap_stub_31

/*
 * void enter_user(void (*fn)(uintptr_t), uintptr_t arg, uintptr_t stack_top)
 *
 * Drop to CPL3 and call fn(arg) there, never to return.  IRETQ pops RIP, CS,
 * RFLAGS, RSP, SS; with CS.RPL = 3 it changes privilege (SDM Vol. 2A,
 * "IRET/IRETD/IRETQ").  RFLAGS: IOPL = 3 so CPL3 may do port I/O, IF = 0
 * (this guest takes no interrupts).  RSP = stack_top - 8: fn sees the stack
 * as if called (SysV ABI: RSP + 8 is 16-byte aligned at function entry).
 */
	.text
	.globl	enter_user
	.type	enter_user, @function
enter_user:
	leaq	-8(%rdx), %rax
	pushq	$(SEL_UDATA | 3)                /* SS */
	pushq	%rax                            /* RSP */
	pushq	$(RFLAGS_IOPL3 | RFLAGS_FIXED1) /* RFLAGS */
	pushq	$(SEL_UCODE64 | 3)              /* CS */
	pushq	%rdi                            /* RIP */
	movq	%rsi, %rdi
	movl	$(SEL_UDATA | 3), %eax
	movl	%eax, %ds
	movl	%eax, %es
	xorl	%eax, %eax
	xorl	%esi, %esi
	xorl	%edx, %edx
	iretq
	.size	enter_user, . - enter_user
