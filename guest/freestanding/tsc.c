/*
 * tsc.c - the TSC frequency from CPUID, without measuring it (there is no
 * second clock this guest trusts), tried in this order:
 *
 *   0x40000010  the hypervisor "timing information" leaf (VMware's
 *               convention, also used by KVM-based VMMs): EAX = TSC kHz.
 *               Valid only if CPUID.1:ECX[31] (hypervisor present) is set
 *               and leaf 0x40000000 reports a maximum >= 0x40000010.
 *   0x15        Intel "Time Stamp Counter and Nominal Core Crystal Clock"
 *               (SDM Vol. 2A, CPUID): TSC = ECX * EBX / EAX Hz, if all three
 *               are non-zero.
 *   0x16        Intel "Processor Frequency Information": EAX = base MHz,
 *               which on Intel parts with an invariant TSC is the TSC rate.
 * AMD parts have neither 0x15 nor 0x16, so on an AMD host without the
 * hypervisor leaf the answer is "unknown".  CPUID works at CPL3.
 */
#include <stdint.h>

#include "console.h"
#include "tsc.h"

struct cpuid_regs {
	uint32_t eax, ebx, ecx, edx;
};

static struct cpuid_regs cpuid(uint32_t leaf)
{
	struct cpuid_regs r;

	__asm__ volatile("cpuid"
			 : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
			 : "a"(leaf), "c"(0));
	return r;
}

#define CPUID_1_ECX_HYPERVISOR  (1u << 31)

uint64_t tsc_khz(const char **source)
{
	uint32_t max_std = cpuid(0).eax;

	if (cpuid(1).ecx & CPUID_1_ECX_HYPERVISOR &&
	    cpuid(0x40000000).eax >= 0x40000010) {
		uint32_t khz = cpuid(0x40000010).eax;

		if (khz) {
			*source = "cpuid 0x40000010";
			return khz;
		}
	}
	if (max_std >= 0x15) {
		struct cpuid_regs r = cpuid(0x15);

		if (r.eax && r.ebx && r.ecx) {
			*source = "cpuid 0x15";
			return (uint64_t)r.ecx * r.ebx / r.eax / 1000;
		}
	}
	if (max_std >= 0x16) {
		uint32_t mhz = cpuid(0x16).eax & 0xffff;

		if (mhz) {
			*source = "cpuid 0x16";
			return (uint64_t)mhz * 1000;
		}
	}
	*source = "none";
	return 0;
}

void say_tsc_frequency(void)
{
	const char *source;
	uint64_t khz = tsc_khz(&source);

	if (khz)
		say("tsc %lu kHz from %s", (unsigned long)khz, source);
	else
		say("tsc frequency unknown");
}
