/*
 * fmt.h - the freestanding C library this guest needs: the mem* and str*
 * functions GCC may call even with -ffreestanding (GCC manual, "C Language
 * Options": memcpy, memmove, memset and memcmp must be provided), a bounded
 * printf-style formatter and number parsing.
 */
#ifndef PYVMM_GUEST_FMT_H
#define PYVMM_GUEST_FMT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

/*
 * Format into buf (always NUL-terminated if size > 0); returns the length
 * written, truncating silently.  Conversions: %s %c %d %u %x, the length
 * modifiers l and z, and %%.  No widths or flags: the output lines of this
 * guest are a test contract, so they are spelled out in the format strings.
 */
size_t vformat(char *buf, size_t size, const char *fmt, va_list ap);
size_t format(char *buf, size_t size, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Parse a whole string as an unsigned number: decimal, or hex with 0x.
 * Returns 0 and stores the value, or -1 (empty, bad digit, overflow). */
int parse_u64(const char *s, uint64_t *out);

#endif
