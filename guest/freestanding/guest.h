/*
 * guest.h - what the CPL3 half of the guest shares: the parsed command line,
 * the way out (guest_exit), and the scenarios main.c dispatches to.
 */
#ifndef PYVMM_GUEST_GUEST_H
#define PYVMM_GUEST_GUEST_H

#include <stdint.h>

#include "pvh.h"
#include "teststream.h"

#define CMDLINE_MAX     1024    /* longer command lines are cut here */
#define ARGS_MAX        32

/* The command line split at spaces: argv[0] is the scenario, the rest are
 * its arguments, positional or key=value. */
struct args {
	int argc;
	char *argv[ARGS_MAX];
	/* "virtio_mmio.device=" words (their values), taken out of argv
	 * wherever they stand: pyvmm puts them before the scenario, QEMU
	 * microvm after it. */
	int ndevices;
	char *devices[ARGS_MAX];
	const struct hvm_start_info *start_info;
	uint64_t tsc_entry;     /* TSC at pvh_start32 (pvh.S) */
	uint64_t tsc_cpl3;      /* TSC at the top of user_main */
};

/* The value of "key=value" in args, or NULL. */
const char *arg_value(const struct args *a, const char *key);

/* A numeric key=value: stores it in *out, or leaves *out alone if the key
 * is absent; prints "<scenario>: bad <key>=<value>"
 * and ends the run (exit 1) if it is not a number or not in [min, max]. */
void arg_u64(const struct args *a, const char *key, uint64_t *out,
	     uint64_t min, uint64_t max);

/* verify=full|word (teststream.h, enum verify_mode): VERIFY_FULL if absent;
 * anything else prints "<scenario>: bad verify=<value> (full, word)" and
 * ends the run (exit 1). */
enum verify_mode arg_verify(const struct args *a);

/* How long the virtio scenarios wait with nothing happening before they
 * give up, in TSC ticks: 2^35, about 13 s at 2.6 GHz.  "idle=TICKS"
 * overrides it. */
#define IDLE_TSC_DEFAULT        (1ull << 35)

/* The CPL3 entry point (main.c), called by enter_user with the start_info
 * physical address. */
void user_main(uintptr_t start_info_paddr) __attribute__((noreturn));

/* Print "exit <code>", reset through the i8042; never returns. */
void guest_exit(int code) __attribute__((noreturn));

/* Scenarios (scenarios.c, smp.c): each ends with guest_exit or a reset. */
void scenario_hello(const struct args *a) __attribute__((noreturn));
void scenario_count(const struct args *a) __attribute__((noreturn));
void scenario_loop(const struct args *a) __attribute__((noreturn));
void scenario_fault(const struct args *a) __attribute__((noreturn));
void scenario_internal_error(const struct args *a) __attribute__((noreturn));
void scenario_bootinfo(const struct args *a) __attribute__((noreturn));
void scenario_stream_cost(const struct args *a) __attribute__((noreturn));
void scenario_smp(const struct args *a) __attribute__((noreturn));
/* virtio scenarios (virtio_probe.c, virtio_console.c, vsock_scenarios.c) */
void scenario_virtio_probe(const struct args *a) __attribute__((noreturn));
void scenario_console_echo(const struct args *a) __attribute__((noreturn));
void scenario_console_bulk_send(const struct args *a) __attribute__((noreturn));
void scenario_console_bulk_recv(const struct args *a) __attribute__((noreturn));
void scenario_vsock_echo_server(const struct args *a) __attribute__((noreturn));
void scenario_vsock_echo_client(const struct args *a) __attribute__((noreturn));
void scenario_vsock_echo_many(const struct args *a) __attribute__((noreturn));
void scenario_vsock_bulk_send(const struct args *a) __attribute__((noreturn));
void scenario_vsock_bulk_recv(const struct args *a) __attribute__((noreturn));
void scenario_vsock_connect_loop(const struct args *a) __attribute__((noreturn));
void scenario_vsock_dgram_echo(const struct args *a) __attribute__((noreturn));
void scenario_vsock_dgram_client(const struct args *a) __attribute__((noreturn));
void scenario_vsock_dgram_flood(const struct args *a) __attribute__((noreturn));
void scenario_vsock_dgram_sink(const struct args *a) __attribute__((noreturn));
/* hostile.c: a driver that breaks the rules on purpose, one case per run */
void scenario_hostile(const struct args *a) __attribute__((noreturn));

#endif
