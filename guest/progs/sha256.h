/*
 * sha256.h -- a small self-contained SHA-256 (FIPS 180-4) for the guest programs.
 *
 * glibc has no SHA-256 and the initramfs has no libcrypto, so vsock-bulk brings its own. Usage:
 *
 *     struct sha256 h;  char hex[65];
 *     sha256_init(&h);
 *     sha256_update(&h, buf, len);          (any number of times, any lengths)
 *     sha256_hex(&h, hex);                  (finishes h; hex = 64 lower-case digits + NUL)
 *
 * The digest is the one `sha256sum` prints, so a host test can compare it with a hash it
 * computed itself. Known vectors (checked against sha256sum when this file was written):
 *     ""    -> e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
 *     "abc" -> ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
 * Header-only; every name is `static` (rule of guest/initramfs/multicall.c).
 */
#ifndef PYVMM_SHA256_H
#define PYVMM_SHA256_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

struct sha256 {
	uint32_t state[8];	/* H0..H7 */
	uint64_t length;	/* bytes hashed so far */
	uint8_t block[64];	/* the partial 64-byte block ... */
	size_t used;		/* ... and how many of its bytes are filled */
};

/* FIPS 180-4 §4.2.2: first 32 bits of the fractional parts of the cube roots of the first 64 primes */
static const uint32_t sha256_k[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static inline uint32_t sha256_ror(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

/* Process one 64-byte block (FIPS 180-4 §6.2.2). */
static inline void sha256_block(struct sha256 *h, const uint8_t *p)
{
	uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
	int i;

	for (i = 0; i < 16; i++)	/* the message schedule: big-endian words, then expanded */
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (i = 16; i < 64; i++)
		w[i] = (sha256_ror(w[i - 2], 17) ^ sha256_ror(w[i - 2], 19) ^ (w[i - 2] >> 10)) + w[i - 7] +
		       (sha256_ror(w[i - 15], 7) ^ sha256_ror(w[i - 15], 18) ^ (w[i - 15] >> 3)) + w[i - 16];

	a = h->state[0]; b = h->state[1]; c = h->state[2]; d = h->state[3];
	e = h->state[4]; f = h->state[5]; g = h->state[6]; k = h->state[7];
	for (i = 0; i < 64; i++) {
		t1 = k + (sha256_ror(e, 6) ^ sha256_ror(e, 11) ^ sha256_ror(e, 25)) + ((e & f) ^ (~e & g)) +
		     sha256_k[i] + w[i];
		t2 = (sha256_ror(a, 2) ^ sha256_ror(a, 13) ^ sha256_ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
		k = g; g = f; f = e; e = d + t1;
		d = c; c = b; b = a; a = t1 + t2;
	}
	h->state[0] += a; h->state[1] += b; h->state[2] += c; h->state[3] += d;
	h->state[4] += e; h->state[5] += f; h->state[6] += g; h->state[7] += k;
}

static inline void sha256_init(struct sha256 *h)
{
	static const uint32_t h0[8] = {	/* §5.3.3: fractional parts of the square roots of the first 8 primes */
		0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
	};
	memcpy(h->state, h0, sizeof(h0));
	h->length = 0;
	h->used = 0;
}

static inline void sha256_update(struct sha256 *h, const void *data, size_t len)
{
	const uint8_t *p = data;

	h->length += len;
	if (h->used) {			/* top up the partial block first */
		size_t n = 64 - h->used < len ? 64 - h->used : len;
		memcpy(h->block + h->used, p, n);
		h->used += n; p += n; len -= n;
		if (h->used < 64)
			return;
		sha256_block(h, h->block);
		h->used = 0;
	}
	for (; len >= 64; p += 64, len -= 64)	/* whole blocks straight from the caller's buffer */
		sha256_block(h, p);
	memcpy(h->block, p, len);
	h->used = len;
}

/* Pad (§5.1.1: 0x80, zeros, the bit length as 64-bit big-endian) and write the digest as hex. */
static inline void sha256_hex(struct sha256 *h, char hex[65])
{
	uint64_t bits = h->length * 8;
	uint8_t pad[72] = { 0x80 };
	size_t npad = (h->used < 56 ? 56 : 120) - h->used;

	for (int i = 0; i < 8; i++)
		pad[npad + i] = (uint8_t)(bits >> (56 - 8 * i));
	sha256_update(h, pad, npad + 8);	/* ends exactly on a block boundary */
	for (int i = 0; i < 8; i++)
		snprintf(hex + 8 * i, 9, "%08x", (unsigned)h->state[i]);
}

#endif
