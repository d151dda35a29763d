/*
 * longmode.h - ENTER_LONG_MODE, the one sequence that takes a CPU from flat
 * 32-bit protected mode with paging off to 64-bit mode.  Shared by the BSP
 * (pvh.S) and the application processors (ap_trampoline.S).  Assembly only.
 *
 * Intel SDM Vol. 3A, "Initializing IA-32e Mode":
 *   1. with paging off, set CR4.PAE;
 *   2. load CR3 with the physical address of the PML4;
 *   3. set IA32_EFER.LME;
 *   4. set CR0.PG - the CPU sets EFER.LMA and is now in compatibility mode.
 *      This code and the next instruction must be identity-mapped (they are:
 *      tables.S maps 0..4 GiB 1:1);
 *   5. far-jump to a code segment with L = 1 to run 64-bit code.
 * CR0 is written whole (CR0_LONG_MODE), not read-modify-written: reset CR0 is
 * 0x60000010 (cache disable + not-write-through), on PVM too.
 *
 * Needs: the GDT loaded, running on SEL_KCODE32.  Clobbers eax, ecx, edx.
 */
#ifndef PYVMM_GUEST_LONGMODE_H
#define PYVMM_GUEST_LONGMODE_H
#ifdef __ASSEMBLER__

#include "layout.h"
#include "x86.h"

.macro ENTER_LONG_MODE target64
	movl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$boot_pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	$CR0_LONG_MODE, %eax
	movl	%eax, %cr0
	ljmp	$SEL_KCODE64, $\target64
.endm

#endif
#endif
