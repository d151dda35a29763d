/*
 * pyvmm-progs -- one static binary holding every guest program, guest/progs/NAME.c.
 *
 * Why one binary: a static glibc program costs ~670 KB however small it is (libc start-up,
 * stdio, locale), so separate binaries would push the initramfs past its 3 MB budget after two
 * programs. Linked together they share one libc; each further program costs a few KB.
 *
 * How (guest/initramfs/build.sh): each guest/progs/NAME.c is compiled on its own with
 * `gcc -O2`, and `objcopy --redefine-sym main=pyvmm_main_<NAME, '-' -> '_'>` renames its main;
 * the build writes progs.inc with one PROG("NAME", pyvmm_main_NAME) line per program and links
 * everything with `gcc -static`. /usr/bin/NAME is a symlink to /usr/bin/pyvmm-progs, and this
 * dispatcher picks the program from basename(argv[0]), as busybox does. `pyvmm-progs NAME ARGS`
 * works too. Rules for a program: `int main(int argc, char **argv)`, and every other
 * file-scope name `static` (a clash between two programs is a link error, not a silent bug).
 */
#include <stdio.h>
#include <string.h>

#define PROG(name, fn) int fn(int argc, char **argv);
#include "progs.inc"
#undef PROG

static const struct {
	const char *name;
	int (*main)(int argc, char **argv);
} progs[] = {
#define PROG(name, fn) { name, fn },
#include "progs.inc"
#undef PROG
};

int main(int argc, char **argv)
{
	const char *self = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];

	if (strcmp(self, "pyvmm-progs") == 0 && argc > 1) {	/* pyvmm-progs NAME ARGS... */
		argc--;
		argv++;
		self = argv[0];
	}
	for (size_t i = 0; i < sizeof(progs) / sizeof(progs[0]); i++)
		if (strcmp(self, progs[i].name) == 0)
			return progs[i].main(argc, argv);

	fprintf(stderr, "pyvmm-progs: no program '%s'; built in:", self);
	for (size_t i = 0; i < sizeof(progs) / sizeof(progs[0]); i++)
		fprintf(stderr, " %s", progs[i].name);
	fprintf(stderr, "\n");
	return 127;
}
