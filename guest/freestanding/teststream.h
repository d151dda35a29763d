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
 *
 * The cheap verification mode (verify=word, VERIFY_WORD) checks the same
 * stream a 64-bit word at a time and hashes it with the word hash:
 *   whash:   the bytes in little-endian 64-bit words from the start of the
 *            stream (the last word zero-padded), h = FNV1A64_OFFSET, then
 *            for each word w: h = (h + w) * FNV1A64_PRIME (mod 2^64).
 *            Printed like fnv.  Horner's rule, so the host can compute it
 *            with numpy: h = offset*P^n + sum(w[i] * P^(n-i)), i = 0..n-1.
 *   def whash(data):
 *       h = 0xcbf29ce484222325
 *       data += bytes(-len(data) % 8)
 *       for i in range(0, len(data), 8):
 *           h = (h + int.from_bytes(data[i:i + 8], "little")) * 0x100000001b3 & M
 *       return h
 * Both modes see every byte; word mode does in one 64-bit step what full
 * mode does in eight byte steps (guest/freestanding/README.md, "Measured").
 */
#ifndef PYVMM_GUEST_TESTSTREAM_H
#define PYVMM_GUEST_TESTSTREAM_H

#include <stddef.h>
#include <stdint.h>

#define TESTSTREAM_SEED         0x9e3779b97f4a7c15ull
#define FNV1A64_OFFSET          0xcbf29ce484222325ull
#define FNV1A64_PRIME           0x100000001b3ull

/* What a scenario's verify=full|word asks for (main.c: arg_verify). */
enum verify_mode {
	VERIFY_FULL,            /* byte-wise check, FNV-1a: the default, the tests' mode */
	VERIFY_WORD,            /* 64-bit word check, whash */
};

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

/* The same comparison, a 64-bit word at a time where the stream is at a
 * word boundary; unlike teststream_check it always consumes all n bytes of
 * the stream.  Returns the index of the first difference, or n. */
size_t teststream_check_words(struct teststream *s, const uint8_t *buf, size_t n);

/* The word hash (whash above), fed in pieces of any length. */
struct whash {
	uint64_t h;
	uint64_t acc;           /* bytes of the current word so far */
	unsigned used;          /* how many (0..7) */
};

void whash_init(struct whash *w);
void whash_update(struct whash *w, const uint8_t *p, size_t n);
/* The hash of everything fed so far (the last word zero-padded). */
uint64_t whash_value(const struct whash *w);

/* One unaligned little-endian 64-bit load (a single MOV on x86-64). */
static inline uint64_t load64(const uint8_t *p)
{
	uint64_t v;

	__builtin_memcpy(&v, p, sizeof(v));
	return v;
}

/* A stream end as the scenarios use it: the stream plus the hash of the
 * bytes seen, each per the verify mode (FNV-1a and teststream_check, or
 * whash and teststream_check_words). */
struct stream_end {
	enum verify_mode mode;
	struct teststream s;
	uint64_t fnv;
	struct whash wh;
};

void stream_end_init(struct stream_end *e, enum verify_mode mode);
/* Sender: the next n bytes of the stream into buf, hashed. */
void stream_end_fill(struct stream_end *e, uint8_t *buf, size_t n);
/* Receiver: check buf against the next n bytes and hash it; the index of
 * the first difference, or n. */
size_t stream_end_check(struct stream_end *e, const uint8_t *buf, size_t n);
uint64_t stream_end_hash(const struct stream_end *e);
/* What the hash is called in the result lines: "fnv" or "whash". */
const char *stream_end_hash_name(const struct stream_end *e);

static inline uint64_t fnv1a64(uint64_t h, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= FNV1A64_PRIME;
	}
	return h;
}

#endif
