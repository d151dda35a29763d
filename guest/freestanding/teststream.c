/*
 * teststream.c - the xorshift64 test stream (teststream.h).
 */
#include "teststream.h"

void teststream_init(struct teststream *s)
{
	s->x = TESTSTREAM_SEED;
	s->word = 0;
	s->used = 8;
}

static uint8_t next_byte(struct teststream *s)
{
	if (s->used == 8) {
		uint64_t x = s->x;

		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		s->x = s->word = x;
		s->used = 0;
	}
	return (uint8_t)(s->word >> (8 * s->used++));
}

void teststream_fill(struct teststream *s, uint8_t *buf, size_t n)
{
	size_t i = 0;

	/* Byte-wise to the next word boundary, then whole words. */
	while (i < n && s->used != 8)
		buf[i++] = next_byte(s);
	while (n - i >= 8) {
		uint64_t x = s->x;

		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		s->x = s->word = x;
		for (unsigned k = 0; k < 8; k++)
			buf[i + k] = (uint8_t)(x >> (8 * k));
		i += 8;
	}
	while (i < n)
		buf[i++] = next_byte(s);
}

size_t teststream_check(struct teststream *s, const uint8_t *buf, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (buf[i] != next_byte(s))
			return i;
	return n;
}
