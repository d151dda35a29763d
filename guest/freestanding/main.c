/*
 * main.c - user_main, the first C function at CPL3: boot-timer phase 2,
 * the command line from hvm_start_info, and dispatch to the
 * scenario its first word names.  Also guest_exit, the one way a scenario
 * ends the run on purpose.
 */
#include <stddef.h>
#include <stdint.h>

#include "console.h"
#include "cpu.h"
#include "fmt.h"
#include "guest.h"
#include "io.h"
#include "layout.h"
#include "pvh.h"
#include "virtio_blk.h"

static const struct scenario {
	const char *name;
	void (*run)(const struct args *a);
} scenarios[] = {
	{ "hello", scenario_hello },
	{ "count", scenario_count },
	{ "loop", scenario_loop },
	{ "fault", scenario_fault },
	{ "internal-error", scenario_internal_error },
	{ "smp", scenario_smp },
	{ "bootinfo", scenario_bootinfo },
	{ "stream-cost", scenario_stream_cost },
	{ "virtio-probe", scenario_virtio_probe },
	{ "console-echo", scenario_console_echo },
	{ "console-bulk-send", scenario_console_bulk_send },
	{ "console-bulk-recv", scenario_console_bulk_recv },
	{ "vsock-echo-server", scenario_vsock_echo_server },
	{ "vsock-echo-client", scenario_vsock_echo_client },
	{ "vsock-echo-many", scenario_vsock_echo_many },
	{ "vsock-bulk-send", scenario_vsock_bulk_send },
	{ "vsock-bulk-recv", scenario_vsock_bulk_recv },
	{ "vsock-connect-loop", scenario_vsock_connect_loop },
	{ "vsock-dgram-echo", scenario_vsock_dgram_echo },
	{ "vsock-dgram-client", scenario_vsock_dgram_client },
	{ "vsock-dgram-flood", scenario_vsock_dgram_flood },
	{ "vsock-dgram-sink", scenario_vsock_dgram_sink },
	{ "hostile", scenario_hostile },
	{ "blk-check", scenario_blk_check },
	{ "blk-load", scenario_blk_load },
};

#define DEVICE_WORD "virtio_mmio.device="

extern const uint64_t boot_tsc_entry;                  /* pvh.S */

static char cmdline[CMDLINE_MAX];
static struct args args;

const char *arg_value(const struct args *a, const char *key)
{
	size_t n = strlen(key);

	for (int i = 1; i < a->argc; i++)
		if (!strncmp(a->argv[i], key, n) && a->argv[i][n] == '=')
			return a->argv[i] + n + 1;
	return NULL;
}

void arg_u64(const struct args *a, const char *key, uint64_t *out,
	     uint64_t min, uint64_t max)
{
	const char *v = arg_value(a, key);
	uint64_t n;

	if (!v)
		return;
	if (parse_u64(v, &n) || n < min || n > max) {
		say("%s: bad %s=%s (want %lu..%lu)", a->argv[0], key, v,
		    (unsigned long)min, (unsigned long)max);
		guest_exit(1);
	}
	*out = n;
}

enum verify_mode arg_verify(const struct args *a)
{
	const char *v = arg_value(a, "verify");

	if (!v || !strcmp(v, "full"))
		return VERIFY_FULL;
	if (!strcmp(v, "word"))
		return VERIFY_WORD;
	say("%s: bad verify=%s (full, word)", a->argv[0], v);
	guest_exit(1);
}

void guest_exit(int code)
{
	say("exit %d", code);
	/* i8042 "pulse output line" 0xfe: bit 0 of the output port is the
	 * CPU reset line (IBM PC/AT Technical Reference, 8042 commands).
	 * pyvmm and QEMU -M pc end the run here.  Machines without an i8042
	 * (QEMU -M microvm) ignore it; then a triple fault ends the run. */
	sys_outb(I8042_COMMAND_PORT, I8042_CMD_PULSE_RESET);
	syscall2(SYS_SHUTDOWN, 0, 0);
	for (;;)
		cpu_relax();
}

/* Split cmdline in place at spaces into args.argv (excess words dropped);
 * "virtio_mmio.device=" words go to args.devices instead, so the scenario
 * is the first other word wherever the VMM put its device words. */
static void split_cmdline(char *s, struct args *a)
{
	a->argc = 0;
	a->ndevices = 0;
	while (*s) {
		while (*s == ' ' || *s == '\t' || *s == '\n')
			*s++ = '\0';
		if (!*s)
			break;
		if (!strncmp(s, DEVICE_WORD, sizeof(DEVICE_WORD) - 1)) {
			if (a->ndevices < ARGS_MAX)
				a->devices[a->ndevices++] = s + sizeof(DEVICE_WORD) - 1;
		} else if (a->argc < ARGS_MAX) {
			a->argv[a->argc++] = s;
		}
		while (*s && *s != ' ' && *s != '\t' && *s != '\n')
			s++;
	}
}

void user_main(uintptr_t start_info_paddr)
{
	const struct hvm_start_info *si = (const void *)start_info_paddr;

	args.tsc_cpl3 = rdtsc();
	args.tsc_entry = boot_tsc_entry;
	sys_outb(BOOT_TIMER_PORT, BOOT_PHASE_CPL3_MAIN);

	if (si->magic != XEN_HVM_START_MAGIC_VALUE) {
		say("bad hvm_start_info magic 0x%x at 0x%lx (want 0x%x)",
		    si->magic, (unsigned long)start_info_paddr,
		    XEN_HVM_START_MAGIC_VALUE);
		guest_exit(2);
	}
	/* Copy first: the VMM's copy is not ours to cut up (and QEMU's PVH
	 * loader puts it where the guest may want RAM). */
	if (si->cmdline_paddr) {
		const char *src = (const char *)(uintptr_t)si->cmdline_paddr;

		memcpy(cmdline, src, strnlen(src, sizeof(cmdline) - 1));
	}
	split_cmdline(cmdline, &args);
	args.start_info = si;

	const char *name = args.argc ? args.argv[0] : "";

	for (size_t i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++)
		if (!strcmp(name, scenarios[i].name))
			scenarios[i].run(&args);
	say("unknown scenario '%s'", name);
	guest_exit(1);
}
