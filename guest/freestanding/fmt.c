/*
 * fmt.c - string, memory and formatting helpers (see fmt.h).  Plain C with
 * no CPU-mode assumptions: used at CPL3 by the scenarios and at CPL0 by the
 * exception reporter.  Built with -fno-tree-loop-distribute-patterns so GCC
 * does not turn these loops back into calls to themselves.
 */
#include "fmt.h"

/* Eight bytes per step (unaligned 64-bit moves are fine on x86-64), the
 * rest byte-wise.  Forward only, so memmove may use it when dst < src. */
void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	for (; n >= 8; n -= 8, d += 8, s += 8) {
		uint64_t v;

		__builtin_memcpy(&v, s, sizeof(v));
		__builtin_memcpy(d, &v, sizeof(v));
	}
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	while (n--)
		d[n] = s[n];
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;

	while (n--)
		*d++ = (unsigned char)c;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

size_t strnlen(const char *s, size_t max)
{
	size_t n = 0;

	while (n < max && s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (unsigned char)*a - (unsigned char)*b;
		if (!*a)
			return 0;
	}
	return 0;
}

/* A bounded output cursor: writes past the end are counted but dropped. */
struct sink {
	char *buf;
	size_t size, len;
};

static void put(struct sink *s, char c)
{
	if (s->len + 1 < s->size)
		s->buf[s->len] = c;
	s->len++;
}

static void put_unsigned(struct sink *s, uint64_t v, unsigned base)
{
	char digits[20];        /* 2^64 - 1 has 20 decimal digits */
	int n = 0;

	do {
		digits[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (n)
		put(s, digits[--n]);
}

size_t vformat(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct sink s = { buf, size, 0 };

	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(&s, *fmt);
			continue;
		}
		int longarg = 0;

		fmt++;
		if (*fmt == 'l' || *fmt == 'z') {
			longarg = 1;
			fmt++;
		}
		switch (*fmt) {
		case 'd': {
			int64_t v = longarg ? va_arg(ap, long) : va_arg(ap, int);

			if (v < 0) {
				put(&s, '-');
				put_unsigned(&s, -(uint64_t)v, 10);
			} else {
				put_unsigned(&s, (uint64_t)v, 10);
			}
			break;
		}
		case 'u':
		case 'x': {
			uint64_t v = longarg ? va_arg(ap, unsigned long)
					     : va_arg(ap, unsigned int);

			put_unsigned(&s, v, *fmt == 'x' ? 16 : 10);
			break;
		}
		case 's': {
			const char *str = va_arg(ap, const char *);

			while (*str)
				put(&s, *str++);
			break;
		}
		case 'c':
			put(&s, (char)va_arg(ap, int));
			break;
		case '%':
			put(&s, '%');
			break;
		default:                /* unknown conversion: show it verbatim */
			put(&s, '%');
			if (!*fmt)
				goto out;
			put(&s, *fmt);
			break;
		}
	}
out:
	if (size)
		buf[s.len < size ? s.len : size - 1] = '\0';
	return s.len < size ? s.len : (size ? size - 1 : 0);
}

size_t format(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	size_t n;

	va_start(ap, fmt);
	n = vformat(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

int parse_u64(const char *s, uint64_t *out)
{
	unsigned base = 10;
	uint64_t v = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		return -1;
	for (; *s; s++) {
		unsigned d;

		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			return -1;
		if (v > (UINT64_MAX - d) / base)
			return -1;
		v = v * base + d;
	}
	*out = v;
	return 0;
}
