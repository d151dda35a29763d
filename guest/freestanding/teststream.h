/*
 * teststream.h - the deterministic byte stream the bulk and echo scenarios
 * send and check, and the checksum they print.  Both are simple enough to
 * re-implement in a few lines of Python on the host side:
 *
 *   stream:  xorshift64 (Marsaglia, "Xorshift RNGs", 2003, shifts 13/7/17),
 *            state seeded with TESTSTREAM_SEED (never 0).  Each step
 *            x ^= x << 13; x ^= x >> 7; x ^= x << 17 (mod 2^64) gives 8
 *            bytes, x in little-endian order; the stream is the
 *            concatenation, cut at any length.
 *   checksum: 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime
 *            0x100000001b3): for each byte, h ^= byte; h *= prime (mod
 *            2^64).  Printed as lowercase hex without leading zeros.
 *
 *   def stream(n, x=0x9E3779B97F4A7C15):
 *       out = bytearray()
 *       while len(out) < n:
 *           x ^= (x << 13) & M; x ^= x >> 7; x ^= (x << 17) & M
 *           out += x.to_bytes(8, "little")
 *       return bytes(out[:n])              # M = 2**64 - 1
 */
#ifndef PYVMM_GUEST_TESTSTREAM_H
#define PYVMM_GUEST_TESTSTREAM_H

#include <stddef.h>
#include <stdint.h>

#define TESTSTREAM_SEED         0x9e3779b97f4a7c15ull
#define FNV1A64_OFFSET          0xcbf29ce484222325ull
#define FNV1A64_PRIME           0x100000001b3ull

struct teststream {
	uint64_t x;             /* xorshift state */
	uint64_t word;          /* the current 8 output bytes */
	unsigned used;          /* bytes of word already handed out (0..8) */
};

void teststream_init(struct teststream *s);
/* The next n bytes of the stream into buf. */
void teststream_fill(struct teststream *s, uint8_t *buf, size_t n);
/* Compare buf with the next n bytes of the stream; returns the index of
 * the first difference, or n if all match. */
size_t teststream_check(struct teststream *s, const uint8_t *buf, size_t n);

static inline uint64_t fnv1a64(uint64_t h, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= FNV1A64_PRIME;
	}
	return h;
}

#endif
