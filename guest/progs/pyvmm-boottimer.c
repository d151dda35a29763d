/*
 * pyvmm-boottimer CODE -- report a boot phase to pyvmm's boot-timer port.
 *
 * Writes the one-byte phase code CODE (0..255; decimal, or 0x.. hex) to I/O port
 * 0x440 with a single OUT instruction. pyvmm timestamps every write to that port,
 * which gives boot-phase timings measured by the VMM rather than by the guest's
 * own clock (the same idea as Firecracker's boot-timer device). Codes used by the
 * guest userland are listed in guest/README.md (0x10 = userspace start, from /init).
 *
 * Needs root (CAP_SYS_RAWIO) and a kernel with CONFIG_X86_IOPL_IOPERM: ioperm(2)
 * opens just this one port in the task's I/O bitmap. Exit status: 0 written,
 * 1 ioperm failed, 2 usage error.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>

#define PYVMM_BOOT_TIMER_PORT 0x440

int main(int argc, char **argv)
{
	char *end;
	long code;

	if (argc != 2) {
		fprintf(stderr, "usage: pyvmm-boottimer CODE   (CODE = 0..255)\n");
		return 2;
	}
	errno = 0;
	code = strtol(argv[1], &end, 0);
	if (errno || end == argv[1] || *end != '\0' || code < 0 || code > 255) {
		fprintf(stderr, "pyvmm-boottimer: bad CODE '%s' (want 0..255)\n", argv[1]);
		return 2;
	}
	if (ioperm(PYVMM_BOOT_TIMER_PORT, 1, 1) != 0) {
		fprintf(stderr, "pyvmm-boottimer: ioperm(0x%x): %s\n",
			PYVMM_BOOT_TIMER_PORT, strerror(errno));
		return 1;
	}
	outb((unsigned char)code, PYVMM_BOOT_TIMER_PORT);
	return 0;
}
