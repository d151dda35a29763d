/*
 * io.h - single-instruction helpers: port I/O, MMIO, PAUSE, RDTSC.
 *
 * MMIO, PAUSE and RDTSC work at any CPL (every page is mapped U/S = 1;
 * CR4.TSD = 0).  inb/outb are for CPL0: at CPL3 they work only where
 * RFLAGS.IOPL = 3 is honoured (hardware KVM, TCG) and fault on PVM; CPL3
 * code uses sys_outb / say (cpu.h, console.h).
 */
#ifndef PYVMM_GUEST_IO_H
#define PYVMM_GUEST_IO_H

#include <stdint.h>

static inline void outb(uint16_t port, uint8_t value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t value;
	__asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port) : "memory");
	return value;
}

/* MMIO: volatile so each access is exactly one load or store of that width. */
static inline void mmio_write32(uintptr_t addr, uint32_t value)
{
	*(volatile uint32_t *)addr = value;
}

static inline uint32_t mmio_read32(uintptr_t addr)
{
	return *(volatile uint32_t *)addr;
}

/* PAUSE: the spin-wait hint (SDM Vol. 2B, "PAUSE"). */
static inline void cpu_relax(void)
{
	__asm__ volatile("pause" : : : "memory");
}

/* RDTSC is allowed at CPL3 while CR4.TSD = 0, which this guest never sets. */
static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

#endif
