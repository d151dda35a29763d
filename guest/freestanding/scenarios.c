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
#include "teststream.h"

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

/*
 * stream-cost [bytes=N] [chunk=S] [verify=full|word] [corrupt=K]: what the
 * test stream costs the guest alone, no device involved.  Per chunk of S
 * bytes (default 4096, at most 64 KiB): the sender's work (fill + hash) into
 * one buffer, a copy into a second, the receiver's work (check + hash) on
 * that; the TSC ticks of each part, summed over N bytes (default 64 MiB).
 * corrupt=K flips byte K of the stream in the copy, so the check must
 * report it.  Prints
 *   stream cost verify=<mode> bytes=N chunk=S send T1 copy T2 recv T3 ticks
 *   stream cost ok <fnv|whash> H          (both ends agree), or
 *   stream cost: FAILED: first bad byte K, ...
 */
#define STREAM_COST_CHUNK_MAX   65536

static uint8_t cost_a[STREAM_COST_CHUNK_MAX], cost_b[STREAM_COST_CHUNK_MAX];

void scenario_stream_cost(const struct args *a)
{
	uint64_t total = 64ull << 20, chunk = 4096, corrupt = UINT64_MAX;
	uint64_t t_send = 0, t_copy = 0, t_recv = 0, done = 0, bad = UINT64_MAX;
	enum verify_mode mode = arg_verify(a);
	struct stream_end tx, rx;

	arg_u64(a, "bytes", &total, 1, UINT64_MAX);
	arg_u64(a, "chunk", &chunk, 1, STREAM_COST_CHUNK_MAX);
	arg_u64(a, "corrupt", &corrupt, 0, UINT64_MAX);
	stream_end_init(&tx, mode);
	stream_end_init(&rx, mode);
	while (done < total) {
		size_t n = (size_t)(total - done < chunk ? total - done : chunk);
		uint64_t t0 = rdtsc();

		stream_end_fill(&tx, cost_a, n);
		uint64_t t1 = rdtsc();

		memcpy(cost_b, cost_a, n);
		uint64_t t2 = rdtsc();

		if (corrupt - done < n)
			cost_b[corrupt - done] ^= 0x40;
		size_t good = stream_end_check(&rx, cost_b, n);
		uint64_t t3 = rdtsc();

		if (good != n && bad == UINT64_MAX)
			bad = done + good;
		t_send += t1 - t0;
		t_copy += t2 - t1;
		t_recv += t3 - t2;
		done += n;
	}
	say("stream cost verify=%s bytes=%lu chunk=%lu send %lu copy %lu recv %lu ticks",
	    mode == VERIFY_WORD ? "word" : "full", (unsigned long)total, (unsigned long)chunk,
	    (unsigned long)t_send, (unsigned long)t_copy, (unsigned long)t_recv);
	if (bad != UINT64_MAX || stream_end_hash(&tx) != stream_end_hash(&rx)) {
		say("stream cost: FAILED: first bad byte %ld, %s sent %lx received %lx",
		    bad == UINT64_MAX ? -1L : (long)bad, stream_end_hash_name(&tx),
		    (unsigned long)stream_end_hash(&tx), (unsigned long)stream_end_hash(&rx));
		guest_exit(1);
	}
	say("stream cost ok %s %lx", stream_end_hash_name(&tx), (unsigned long)stream_end_hash(&tx));
	guest_exit(0);
}
