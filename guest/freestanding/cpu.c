/*
 * cpu.c - what the boot processor does at CPL0, and nothing more: fill the
 * IDT and the TSS (whose descriptors hold addresses split into fields, so
 * they are built at run time), load IDTR and TR, and IRETQ to CPL3.  Plus
 * the C half of every trap: report an exception and reset, or serve a system
 * call.
 *
 * Why so little at CPL0: on PVM hosts (/dev/kvm backed by software nested
 * virtualisation) CPL0 guest code is emulated, ~4000x slower than CPL3 code,
 * which runs natively.  Everything the guest can do at CPL3 it does there.
 */
#include <stddef.h>
#include <stdint.h>

#include "console.h"
#include "cpu.h"
#include "guest.h"
#include "io.h"
#include "layout.h"
#include "x86.h"

extern uint64_t gdt[GDT_ENTRIES];                       /* tables.S */
extern const uint64_t trap_stub_table[32];              /* traps.S */
extern char bsp_kernel_stack_top[];                     /* pvh.S */
void enter_user(void (*fn)(uintptr_t), uintptr_t arg, uintptr_t stack_top)
	__attribute__((noreturn));                      /* traps.S */

/* 64-bit interrupt gate (SDM Vol. 3A, "64-Bit Mode IDT"). */
struct idt_gate {
	uint16_t offset_0_15;
	uint16_t selector;
	uint8_t ist;                    /* 0: no IST stack switch */
	uint8_t type_attr;              /* P | DPL << 5 | type */
	uint16_t offset_16_31;
	uint32_t offset_32_63;
	uint32_t reserved;
};
_Static_assert(sizeof(struct idt_gate) == 16, "SDM 64-bit IDT gate");

/* 64-bit TSS (SDM Vol. 3A, "Task Management in 64-bit Mode").  Only RSP0
 * is used: the stack the CPU switches to on a trap from CPL3. */
struct __attribute__((packed)) tss64 {
	uint32_t reserved0;
	uint64_t rsp[3];
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;            /* >= limit: no I/O bitmap (IOPL is 3) */
};
_Static_assert(sizeof(struct tss64) == 104, "SDM 64-bit TSS");

static struct idt_gate idt[256] __attribute__((aligned(16)));
static struct tss64 tss __attribute__((aligned(16)));
static char bsp_user_stack[USER_STACK_SIZE] __attribute__((aligned(16)));
struct descriptor_register idt_descriptor;

static void idt_set_gate(unsigned vector, uint64_t handler, unsigned dpl)
{
	struct idt_gate *g = &idt[vector];

	g->offset_0_15 = (uint16_t)handler;
	g->selector = SEL_KCODE64;
	g->ist = 0;
	g->type_attr = (uint8_t)(0x80 | dpl << 5 | DESC_TYPE_INTERRUPT_GATE64);
	g->offset_16_31 = (uint16_t)(handler >> 16);
	g->offset_32_63 = (uint32_t)(handler >> 32);
	g->reserved = 0;
}

/* A 16-byte system-segment descriptor in 64-bit mode (SDM Vol. 3A, "TSS
 * Descriptor in 64-bit mode"): the usual 8 bytes, then base 63:32. */
static void gdt_set_tss(uint64_t base, uint32_t limit)
{
	gdt[SEL_TSS / 8] = (limit & 0xffff)
		| (base & 0xffffff) << 16
		| (uint64_t)(0x80 | DESC_TYPE_TSS64_AVAILABLE) << 40
		| (uint64_t)((limit >> 16) & 0xf) << 48
		| ((base >> 24) & 0xff) << 56;
	gdt[SEL_TSS / 8 + 1] = base >> 32;
}

void cpu_init_bsp(const struct hvm_start_info *start_info)
{
	/* Gate DPL 0: exceptions still reach the handler from any CPL, but
	 * "INT n" from CPL3 raises #GP instead.  The system call vector (#BP,
	 * entered by INT3) has DPL 3.  All are interrupt gates: IF stays 0.
	 * Vectors 32-255 stay not-present: delivering one raises #NP. */
	for (unsigned v = 0; v < 32; v++)
		idt_set_gate(v, trap_stub_table[v], v == SYSCALL_VECTOR ? 3 : 0);
	idt_descriptor.limit = sizeof(idt) - 1;
	idt_descriptor.base = (uintptr_t)idt;
	__asm__ volatile("lidt %0" : : "m"(idt_descriptor));

	serial_init();          /* two OUTs: cheaper here than by system call */

	tss.rsp[0] = (uintptr_t)bsp_kernel_stack_top;
	tss.iomap_base = sizeof(tss);
	gdt_set_tss((uintptr_t)&tss, sizeof(tss) - 1);
	__asm__ volatile("ltr %w0" : : "r"(SEL_TSS));

	enter_user(user_main, (uintptr_t)start_info,
		   (uintptr_t)bsp_user_stack + sizeof(bsp_user_stack));
}

void cpu_triple_fault(void)
{
	static const struct descriptor_register empty_idt = { 0, 0 };

	__asm__ volatile("lidt %0\n\tud2" : : "m"(empty_idt));
	__builtin_unreachable();
}

/* SYS_FETCH_UNBACKED: a jump at CPL0 to a physical address with no memory
 * behind it.  KVM cannot fetch the instruction: hardware KVM takes an EPT/NPT
 * violation on an address with no memslot, treats it as MMIO, and its
 * instruction emulator fails to fetch -> KVM_EXIT_INTERNAL_ERROR, suberror 1
 * (KVM_INTERNAL_ERROR_EMULATION).  On PVM the CPL0 emulator fails the same
 * way (verified under QEMU -accel kvm, README.md). */
static void __attribute__((noreturn)) fetch_unbacked(void)
{
	__asm__ volatile("jmp *%0" : : "r"((uintptr_t)UNBACKED_ADDR));
	__builtin_unreachable();
}

static void syscall_dispatch(struct trap_frame *f)
{
	switch (f->rax) {
	case SYS_SHUTDOWN:
		cpu_triple_fault();
	case SYS_FETCH_UNBACKED:
		fetch_unbacked();
	case SYS_OUTB:
		outb((uint16_t)f->rdi, (uint8_t)f->rsi);
		f->rax = 0;
		return;
	case SYS_INB:
		f->rax = inb((uint16_t)f->rdi);
		return;
	case SYS_CONSOLE_WRITE:
		serial_write((const char *)f->rdi, (size_t)f->rsi);
		f->rax = 0;
		return;
	case SYS_INT3:
		/* PVM's CPL0 emulator lacks INT3: KVM_EXIT_INTERNAL_ERROR.  On
		 * hardware KVM it is an ordinary #BP (vector 3), reported by
		 * trap_dispatch like any exception. */
		__asm__ volatile("int3");       /* a #BP at CPL0: an exception */
		f->rax = 0;
		return;
	default:
		f->rax = (uint64_t)-1;
		return;
	}
}

void sys_outb(uint16_t port, uint8_t value)
{
	if (cpu_cpl() == 0)
		outb(port, value);
	else
		syscall2(SYS_OUTB, port, value);
}

uint8_t sys_inb(uint16_t port)
{
	if (cpu_cpl() == 0)
		return inb(port);
	return (uint8_t)syscall2(SYS_INB, port, 0);
}

/* Is the instruction at rip an IN or OUT (opcodes E4-E7, EC-EF, with at most
 * a 66h operand-size prefix)?  Only for the diagnostic below. */
static int is_port_io(uint64_t rip)
{
	const uint8_t *p = (const uint8_t *)(uintptr_t)rip;

	if (*p == 0x66)
		p++;
	return (*p & 0xf4) == 0xe4;
}

void trap_dispatch(struct trap_frame *f)
{
	/* INT3 from CPL3 is a system call; from CPL0 it is a breakpoint. */
	if (f->vector == SYSCALL_VECTOR && (f->cs & 3) == 3) {
		syscall_dispatch(f);
		return;
	}
	/* Any exception is the end of the run.  The line format is part of the
	 * test contract (README.md, "Output"). */
	say("exception %lu err=0x%lx rip=0x%lx", f->vector, f->error_code, f->rip);
	if (f->vector == 13 && (f->cs & 3) == 3 && is_port_io(f->rip))
		say("note: IN/OUT at CPL3 faulted: IOPL=3 is not honoured here "
		    "(PVM); use sys_outb");
	outb(I8042_COMMAND_PORT, I8042_CMD_PULSE_RESET);
	cpu_triple_fault();
}
