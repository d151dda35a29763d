/*
 * tsc.h - the TSC frequency, so that tick counts printed by the scenarios
 * can be turned into seconds by whoever reads them.
 */
#ifndef PYVMM_GUEST_TSC_H
#define PYVMM_GUEST_TSC_H

#include <stdint.h>

/* The TSC frequency in kHz and where it came from, or 0 if no CPUID leaf
 * states it. */
uint64_t tsc_khz(const char **source);

/* Print "tsc <kHz> kHz from <source>" or "tsc frequency unknown". */
void say_tsc_frequency(void);

#endif
