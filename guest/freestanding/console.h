/*
 * console.h - the serial console: a polled 16550A on COM1, and say(), which
 * prints one "pyvmm-test-guest: ..." line - the only form of output tests
 * parse.  say() works at CPL0 and CPL3; serial_* only at CPL0 (cpu.h).
 */
#ifndef PYVMM_GUEST_CONSOLE_H
#define PYVMM_GUEST_CONSOLE_H

#include <stddef.h>

#define SAY_PREFIX "pyvmm-test-guest: "

void serial_init(void);
void serial_write(const char *s, size_t n);     /* '\n' becomes "\r\n" */
int serial_getc(void);                          /* a received byte, or -1; any CPL */
void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
