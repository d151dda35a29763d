/*
 * cpu.h - the CPL0 side of the guest: descriptor-table setup for the boot
 * processor, the trap frame and dispatcher, and the few system calls CPL3
 * code may make (with INT3, see below).
 */
#ifndef PYVMM_GUEST_CPU_H
#define PYVMM_GUEST_CPU_H

#include <stdint.h>

#include "pvh.h"

/* What trap_common (traps.S) leaves on the stack, lowest address first. */
struct trap_frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error_code;            /* pushed by the stub */
	uint64_t rip, cs, rflags, rsp, ss;      /* pushed by the CPU */
};
_Static_assert(sizeof(struct trap_frame) == 22 * 8, "matches traps.S");

/* The IDTR value, also loaded by the application processors (ap_trampoline.S). */
struct __attribute__((packed)) descriptor_register {
	uint16_t limit;
	uint64_t base;
};
extern struct descriptor_register idt_descriptor;

/* Boot-processor setup at CPL0, then the drop to user_main at CPL3. */
void cpu_init_bsp(const struct hvm_start_info *start_info)
	__attribute__((noreturn));

/* Called from traps.S for every exception and system call. */
void trap_dispatch(struct trap_frame *frame);

/* At CPL0 only: end the machine by a triple fault.  The IDT is replaced by
 * an empty one and an exception raised: the #UD cannot be delivered (#GP),
 * nor can that (#DF), which makes the CPU shut down (SDM Vol. 3A, "Interrupt
 * 8 - Double Fault Exception"); KVM reports KVM_EXIT_SHUTDOWN, QEMU
 * -no-reboot exits. */
void cpu_triple_fault(void) __attribute__((noreturn));

/*
 * System calls: INT3 at CPL3 with the number in RAX and arguments in RDI,
 * RSI; the result comes back in RAX.  Only for what CPL3 cannot do itself.
 *
 * Why INT3 (vector 3, gate DPL 3): it is the one way from CPL3 to the
 * guest's CPL0 that works on PVM as on hardware.  Seen on PVM (QEMU -accel
 * kvm on this project's hosts): "int $0x80" (any INT n with a DPL3 gate)
 * raises #UD; SYSCALL jumps to IA32_LSTAR but stays at CPL3; INT3 is
 * delivered through the guest's IDT as a #BP with RIP after the INT3, as on
 * hardware.  A trap is a trap: the return is the same IRETQ either way.
 *
 * Port I/O is one of those things on PVM hosts.  The guest runs CPL3 code
 * with RFLAGS.IOPL = 3, which on hardware KVM (and QEMU TCG) lets CPL3
 * execute IN/OUT (SDM Vol. 1, "I/O Privilege Level").  PVM runs guest CPL3
 * code natively in host ring 3, where the host's IOPL (0) applies: IN/OUT
 * raise #GP(0), reflected into the guest (seen: "exception 13 err=0x0" on
 * the OUT to the boot-timer port).  So CPL3 code does port I/O through
 * sys_outb and sys_console_write, which do it at CPL0.  MMIO (the virtio
 * window, the local APIC) needs no privilege and works at CPL3 everywhere.
 */
enum syscall_number {
	SYS_SHUTDOWN = 1,       /* triple fault: the fallback when reset is ignored */
	SYS_FETCH_UNBACKED = 2, /* jump at CPL0 to UNBACKED_ADDR (internal-error) */
	SYS_INT3 = 3,           /* execute INT3 at CPL0 (internal-error how=int3) */
	SYS_OUTB = 4,           /* outb(port = RDI, value = RSI) */
	SYS_CONSOLE_WRITE = 5,  /* serial_write(buf = RDI, len = RSI) */
	SYS_INB = 6,            /* inb(port = RDI): the byte read */
};

static inline uint64_t syscall2(uint64_t number, uint64_t arg0, uint64_t arg1)
{
	__asm__ volatile("int3" : "+a"(number) : "D"(arg0), "S"(arg1) : "memory");
	return number;
}

/* The current privilege level: CS.RPL (SDM Vol. 3A, "Privilege Levels"). */
static inline unsigned cpu_cpl(void)
{
	uint16_t cs;

	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return cs & 3;
}

/* Port output from any CPL: directly at CPL0, by system call at CPL3. */
void sys_outb(uint16_t port, uint8_t value);
/* Port input from any CPL, the same way. */
uint8_t sys_inb(uint16_t port);

#endif
