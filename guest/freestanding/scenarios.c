/*
 * scenarios.c - the single-CPU test scenarios (smp lives in smp.c).  Each
 * runs at CPL3 and prints "pyvmm-test-guest: ..." lines whose exact form is
 * the contract with pyvmm's tests (README.md, "Scenarios").
 */
#include <stdint.h>

#include "console.h"
#include "cpu.h"
#include "fmt.h"
#include "guest.h"
#include "io.h"
#include "layout.h"

/* hello: prove where we run.  CS's low two bits are its RPL, which for the
 * code segment is the CPL (SDM Vol. 3A, "Privilege Levels"). */
void scenario_hello(const struct args *a)
{
	uint16_t cs;

	(void)a;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	say("hello from CPL%u (cs=0x%x)", cs & 3u, cs);
	guest_exit(0);
}

/* count N: N numbered lines, 1..N - serial throughput and exit counting. */
void scenario_count(const struct args *a)
{
	uint64_t n;

	if (a->argc < 2 || parse_u64(a->argv[1], &n)) {
		say("count: needs a number, 'count N'");
		guest_exit(1);
	}
	for (uint64_t i = 1; i <= n; i++)
		say("line %lu", (unsigned long)i);
	guest_exit(0);
}

/* loop: never ends by itself; the VMM's watchdog has to. */
void scenario_loop(const struct args *a)
{
	(void)a;
	say("loop: spinning at CPL3");
	for (;;)
		cpu_relax();
}

/* fault: #UD at CPL3.  The CPU switches to TSS.RSP0 and enters the vector 6
 * gate; trap_dispatch (cpu.c) prints "exception 6 err=0x0 rip=<fault_ud2>"
 * and resets.  fault_ud2 is a global symbol so tests can check the rip. */
void scenario_fault(const struct args *a)
{
	(void)a;
	say("fault: executing ud2 at CPL3");
	__asm__ volatile(".globl fault_ud2\nfault_ud2:\n\tud2");
	__builtin_unreachable();
}

/*
 * internal-error: make KVM give up on the guest with KVM_EXIT_INTERNAL_ERROR
 * (suberror 1, KVM_INTERNAL_ERROR_EMULATION) - for the VMM's reporting of it.
 *   how=fetch (default): jump at CPL0 to UNBACKED_ADDR; no memory there, so
 *       KVM's instruction emulator cannot fetch.  Hardware KVM and PVM.
 *   how=int3: INT3 at CPL0; PVM's CPL0 emulator lacks it.  On hardware KVM
 *       (and TCG) it is a plain #BP: "exception 3".
 */
void scenario_internal_error(const struct args *a)
{
	const char *how = arg_value(a, "how");

	if (!how || !strcmp(how, "fetch")) {
		say("internal-error: jumping to 0x%x at CPL0", UNBACKED_ADDR);
		syscall2(SYS_FETCH_UNBACKED, 0, 0);
	} else if (!strcmp(how, "int3")) {
		say("internal-error: int3 at CPL0");
		syscall2(SYS_INT3, 0, 0);
	} else {
		say("internal-error: unknown how=%s (fetch, int3)", how);
		guest_exit(1);
	}
	say("internal-error: still running");
	guest_exit(1);
}

/* bootinfo: echo hvm_start_info and its memory map, for loader tests, and
 * how many TSC ticks the CPL0 boot path took (entry to CPL3 main). */
void scenario_bootinfo(const struct args *a)
{
	const struct hvm_start_info *si = a->start_info;

	say("boot tsc entry->cpl3=%lu", (unsigned long)(a->tsc_cpl3 - a->tsc_entry));
	say("start_info at 0x%lx magic=0x%x version=%u flags=0x%x",
	    (unsigned long)(uintptr_t)si, si->magic, si->version, si->flags);
	say("start_info nr_modules=%u modlist=0x%lx cmdline=0x%lx rsdp=0x%lx",
	    si->nr_modules, (unsigned long)si->modlist_paddr,
	    (unsigned long)si->cmdline_paddr, (unsigned long)si->rsdp_paddr);
	if (si->version >= 1) {
		const struct hvm_memmap_table_entry *e =
			(const void *)(uintptr_t)si->memmap_paddr;

		say("memmap at 0x%lx entries=%u",
		    (unsigned long)si->memmap_paddr, si->memmap_entries);
		for (uint32_t i = 0; i < si->memmap_entries && si->memmap_paddr; i++)
			say("memmap %u addr=0x%lx size=0x%lx type=%u", i,
			    (unsigned long)e[i].addr, (unsigned long)e[i].size,
			    e[i].type);
	}
	guest_exit(0);
}
