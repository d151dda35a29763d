/*
 * smp.c - the smp scenario: the BSP, at CPL3, starts every application
 * processor with INIT-SIPI-SIPI through its local APIC and counts them in.
 *
 * Everything the BSP does here is an ordinary memory access, so it needs no
 * privilege: the trampoline copy is a store to low RAM, the APIC is xAPIC
 * MMIO at LAPIC_BASE, mapped user-accessible like the rest of 0..4 GiB.
 *
 * The protocol (SDM Vol. 3A, "MP Initialization Protocol Algorithm",
 * "Typical BSP Initialization Sequence"): INIT IPI to all APs, then two
 * start-up IPIs carrying the trampoline's page number.  On hardware the SDM
 * asks for a 10 ms delay after INIT and 200 us after each SIPI; a virtual
 * local APIC (KVM's, QEMU's) acts on each IPI as it is written, so this
 * guest waits for nothing but the ICR's delivery-status bit.  An AP that
 * already left wait-for-SIPI ignores the second SIPI.
 *
 * Each AP (ap_trampoline.S) increments smp_cpus_online with a locked add and
 * halts.  The BSP waits for the count it was told to expect (cpus=N) with a
 * bounded spin on the TSC, so a VMM that never starts an AP gives a clear
 * failure line instead of a hang.
 */
#include <stdint.h>

#include "console.h"
#include "fmt.h"
#include "guest.h"
#include "io.h"
#include "layout.h"
#include "x86.h"

extern const char ap_trampoline_start[], ap_trampoline_end[];  /* ap_trampoline.S */
void ap_main(unsigned ticket) __attribute__((noreturn));

/* 2^34 TSC ticks: ~6 s at 3 GHz, ~17 s at 1 GHz.  Generous: starting an AP
 * takes a few thousand CPL0 instructions, milliseconds even when emulated. */
#define SMP_TIMEOUT_TSC         (1ull << 34)
#define ICR_IDLE_SPINS          1000000

static volatile uint32_t smp_cpus_online;

/* Runs on each AP at CPL0 with its own stack; ticket = arrival order. */
void ap_main(unsigned ticket)
{
	(void)ticket;
	__atomic_fetch_add(&smp_cpus_online, 1, __ATOMIC_SEQ_CST);
	/* Park: HLT with IF = 0 sleeps until INIT/NMI/SMI.  Unlike a PAUSE
	 * loop it leaves the host CPU free; with an in-kernel irqchip KVM
	 * blocks the vCPU thread and no exit reaches the VMM. */
	for (;;)
		__asm__ volatile("cli; hlt");
}

static uint32_t lapic_read(uint32_t reg)
{
	return mmio_read32(LAPIC_BASE + reg);
}

static void lapic_write(uint32_t reg, uint32_t value)
{
	mmio_write32(LAPIC_BASE + reg, value);
}

/* Send one IPI with a destination shorthand and wait until the APIC has
 * accepted it (ICR delivery status back to idle).  Returns 0 or -1. */
static int lapic_send_ipi(uint32_t icr_low)
{
	lapic_write(LAPIC_REG_ICR_HIGH, 0);     /* destination unused: shorthand */
	lapic_write(LAPIC_REG_ICR_LOW, icr_low);
	for (int i = 0; i < ICR_IDLE_SPINS; i++) {
		if (!(lapic_read(LAPIC_REG_ICR_LOW) & ICR_DELIVERY_PENDING))
			return 0;
		cpu_relax();
	}
	return -1;
}

void scenario_smp(const struct args *a)
{
	const char *value = arg_value(a, "cpus");
	uint64_t expected;

	if (!value || parse_u64(value, &expected) || expected < 1 ||
	    expected > SMP_MAX_CPUS) {
		say("smp: needs cpus=N with 1 <= N <= %u", SMP_MAX_CPUS);
		guest_exit(1);
	}

	smp_cpus_online = 1;                    /* the BSP */
	if (expected > 1) {
		memcpy((void *)AP_TRAMPOLINE_ADDR, ap_trampoline_start,
		       (size_t)(ap_trampoline_end - ap_trampoline_start));
		/* Software-enable the APIC (SVR bit 8); spurious vector 0xff. */
		lapic_write(LAPIC_REG_SVR, LAPIC_SVR_ENABLE | 0xff);
		if (lapic_send_ipi(ICR_DEST_ALL_BUT_SELF | ICR_LEVEL_ASSERT |
				   ICR_DELIVERY_INIT) ||
		    lapic_send_ipi(ICR_DEST_ALL_BUT_SELF | ICR_DELIVERY_STARTUP |
				   AP_TRAMPOLINE_VECTOR) ||
		    lapic_send_ipi(ICR_DEST_ALL_BUT_SELF | ICR_DELIVERY_STARTUP |
				   AP_TRAMPOLINE_VECTOR)) {
			say("smp: IPI not delivered (ICR delivery status stuck)");
			guest_exit(1);
		}
	}

	uint64_t start = rdtsc();
	uint32_t online;

	while ((online = __atomic_load_n(&smp_cpus_online, __ATOMIC_SEQ_CST)) <
	       expected) {
		if (rdtsc() - start > SMP_TIMEOUT_TSC) {
			say("smp: timeout: %u of %lu cpus online after %lu TSC ticks",
			    online, (unsigned long)expected,
			    (unsigned long)SMP_TIMEOUT_TSC);
			guest_exit(1);
		}
		cpu_relax();
	}
	say("cpus %u", online);
	guest_exit(0);
}
