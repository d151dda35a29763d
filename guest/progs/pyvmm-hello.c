/*
 * pyvmm-hello -- the smallest proof that guest userspace runs.
 *
 * End-to-end tests boot the guest with `pyvmm.run=pyvmm-hello` on the kernel
 * cmdline (see guest/README.md, "/init contract") and look on the serial console for
 *
 *     hello from pyvmm guest userspace
 *     pyvmm-hello: pid=<pid> release=<uname -r> online_cpus=<n>
 *     pyvmm-hello: argv[1]=<arg>            (one line per argument, if any)
 *
 * online_cpus is sysconf(_SC_NPROCESSORS_ONLN) (glibc reads /sys/devices/system/cpu/online),
 * so a test can check that the VMM's vCPU count reached the guest (MP table, SMP bring-up);
 * echoing the arguments lets a test check the quoting of pyvmm.run="pyvmm-hello a b".
 * Exits 0; /init then prints "pyvmm-guest: exit 0".
 */
#include <stdio.h>
#include <sys/utsname.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	struct utsname u;

	if (uname(&u) != 0) {
		perror("pyvmm-hello: uname");
		return 1;
	}
	printf("hello from pyvmm guest userspace\n");
	printf("pyvmm-hello: pid=%d release=%s online_cpus=%ld\n",
	       (int)getpid(), u.release, sysconf(_SC_NPROCESSORS_ONLN));
	for (int i = 1; i < argc; i++)
		printf("pyvmm-hello: argv[%d]=%s\n", i, argv[i]);
	return fflush(stdout) == 0 ? 0 : 1;
}
