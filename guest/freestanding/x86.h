/*
 * x86.h - architectural constants of x86-64, named as in the Intel SDM
 * (Intel 64 and IA-32 Architectures Software Developer's Manual, Vol. 3A).
 * Included by C and assembly alike; nothing here is specific to this guest.
 */
#ifndef PYVMM_GUEST_X86_H
#define PYVMM_GUEST_X86_H

/* Control registers (SDM Vol. 3A, "Control Registers"). */
#define CR0_PE          (1 << 0)        /* protection enable */
#define CR0_ET          (1 << 4)        /* extension type, hard-wired 1 */
#define CR0_PG          (1 << 31)       /* paging */
/* Reset CR0 is 0x60000010 (CD|NW|ET); PVM's vCPUs read that too.  Long mode
 * is entered with CR0 written whole, CD and NW cleared (caches on). */
#define CR0_LONG_MODE   (CR0_PG | CR0_ET | CR0_PE)      /* 0x80000011 */
#define CR4_PAE         (1 << 5)

/* IA32_EFER (SDM Vol. 3A, "Extended Feature Enable Register"). */
#define MSR_EFER        0xc0000080
#define EFER_LME        (1 << 8)        /* long mode enable */

/* Paging-structure entry bits (SDM Vol. 3A, "4-Level Paging",
 * tables "Format of a PML4 Entry" .. "Format of a Page-Directory Entry that
 * Maps a 2-MByte Page"). */
#define PTE_P           0x001   /* present */
#define PTE_W           0x002   /* writable */
#define PTE_U           0x004   /* user (CPL3) accessible */
#define PTE_PWT         0x008   /* write-through */
#define PTE_PCD         0x010   /* cache disable */
#define PTE_PS          0x080   /* in a PDE: maps a 2 MiB page */

/* RFLAGS (SDM Vol. 1, "EFLAGS Register"). */
#define RFLAGS_FIXED1   0x0002  /* bit 1 always reads 1 */
#define RFLAGS_IF       0x0200
#define RFLAGS_IOPL3    0x3000  /* IOPL = 3: IN/OUT/CLI/STI allowed at CPL3 */

/* System descriptor types (SDM Vol. 3A, "System Descriptor Types"). */
#define DESC_TYPE_TSS64_AVAILABLE       0x9
#define DESC_TYPE_INTERRUPT_GATE64      0xe

/* Local APIC, xAPIC mode (SDM Vol. 3A, "Advanced Programmable Interrupt
 * Controller (APIC)"): register offsets from LAPIC_BASE, and ICR fields
 * ("Interrupt Command Register (ICR)"). */
#define LAPIC_REG_ID            0x020
#define LAPIC_REG_SVR           0x0f0   /* spurious-interrupt vector register */
#define LAPIC_REG_ICR_LOW       0x300   /* writing it sends the IPI */
#define LAPIC_REG_ICR_HIGH      0x310   /* destination in bits 56..63 */
#define LAPIC_SVR_ENABLE        0x100   /* APIC software enable */
#define ICR_DELIVERY_INIT       0x00500
#define ICR_DELIVERY_STARTUP    0x00600
#define ICR_DELIVERY_PENDING    0x01000 /* delivery status: send pending */
#define ICR_LEVEL_ASSERT        0x04000
#define ICR_DEST_ALL_BUT_SELF   0xc0000 /* destination shorthand 11b */

/* Exception vectors with an error code (SDM Vol. 3A, "Exception and
 * Interrupt Reference"): #DF 8, #TS 10, #NP 11, #SS 12, #GP 13, #PF 14,
 * #AC 17, #CP 21, #VC 29, #SX 30. */
#define X86_EXC_UD      6
#define X86_EXC_BP      3

#endif
