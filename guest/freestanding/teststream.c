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
	if (n - i >= 8) {
		/* x in a local and one 64-bit store per word: through buf
		 * (a uint8_t *, which may alias *s) GCC would otherwise
		 * store x back and write eight single bytes every step. */
		uint64_t x = s->x;

		for (; n - i >= 8; i += 8) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			__builtin_memcpy(buf + i, &x, sizeof(x));     /* little-endian */
		}
		s->x = s->word = x;
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

static uint64_t xorshift64(uint64_t x)
{
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

size_t teststream_check_words(struct teststream *s, const uint8_t *buf, size_t n)
{
	size_t i = 0, bad = n;

	/* Byte-wise to the next word boundary of the stream ... */
	while (i < n && s->used != 8) {
		if (buf[i] != (uint8_t)(s->word >> (8 * s->used)) && bad == n)
			bad = i;
		s->used++;
		i++;
	}
	/* ... then whole words (s->used == 8 here, or i == n) ... */
	if (n - i >= 8) {
		uint64_t x = s->x;

		for (; n - i >= 8; i += 8) {
			uint64_t diff;

			x = xorshift64(x);
			diff = load64(buf + i) ^ x;
			if (diff && bad == n)
				bad = i + (size_t)__builtin_ctzll(diff) / 8;
		}
		s->x = s->word = x;
	}
	/* ... and the bytes of a last partial word. */
	for (; i < n; i++) {
		if (s->used == 8) {
			s->x = s->word = xorshift64(s->x);
			s->used = 0;
		}
		if (buf[i] != (uint8_t)(s->word >> (8 * s->used)) && bad == n)
			bad = i;
		s->used++;
	}
	return bad;
}

void whash_init(struct whash *w)
{
	w->h = FNV1A64_OFFSET;
	w->acc = 0;
	w->used = 0;
}

void whash_update(struct whash *w, const uint8_t *p, size_t n)
{
	uint64_t h = w->h;

	while (n && w->used) {
		w->acc |= (uint64_t)*p++ << (8 * w->used);
		n--;
		if (++w->used == 8) {
			h = (h + w->acc) * FNV1A64_PRIME;
			w->acc = 0;
			w->used = 0;
		}
	}
	for (; n >= 8; n -= 8, p += 8)
		h = (h + load64(p)) * FNV1A64_PRIME;
	for (; n; n--)
		w->acc |= (uint64_t)*p++ << (8 * w->used++);
	w->h = h;
}

uint64_t whash_value(const struct whash *w)
{
	return w->used ? (w->h + w->acc) * FNV1A64_PRIME : w->h;
}

void stream_end_init(struct stream_end *e, enum verify_mode mode)
{
	e->mode = mode;
	teststream_init(&e->s);
	e->fnv = FNV1A64_OFFSET;
	whash_init(&e->wh);
}

/* The word mode's one pass over whole words: the xorshift chain and the
 * hash chain are independent, so the CPU overlaps them.  At a word boundary
 * of the stream (s->used == 8) whash is at one too (w->used == 0): both
 * have seen the same bytes from the start. */
static void fill_whash(struct teststream *s, struct whash *w, uint8_t *buf, size_t n)
{
	size_t lead = s->used == 8 ? 0 : 8 - s->used, i;

	if (lead > n)
		lead = n;
	teststream_fill(s, buf, lead);
	whash_update(w, buf, lead);
	i = lead;
	if (n - i >= 8) {
		uint64_t x = s->x, h = w->h;

		for (; n - i >= 8; i += 8) {
			x = xorshift64(x);
			__builtin_memcpy(buf + i, &x, sizeof(x));
			h = (h + x) * FNV1A64_PRIME;
		}
		s->x = s->word = x;
		w->h = h;
	}
	teststream_fill(s, buf + i, n - i);
	whash_update(w, buf + i, n - i);
}

static size_t check_whash(struct teststream *s, struct whash *w, const uint8_t *buf, size_t n)
{
	size_t lead = s->used == 8 ? 0 : 8 - s->used, bad = n, i, r;

	if (lead > n)
		lead = n;
	r = teststream_check_words(s, buf, lead);
	whash_update(w, buf, lead);
	if (r != lead)
		bad = r;
	i = lead;
	if (n - i >= 8) {
		uint64_t x = s->x, h = w->h;

		for (; n - i >= 8; i += 8) {
			uint64_t v = load64(buf + i), diff;

			x = xorshift64(x);
			diff = v ^ x;
			if (diff && bad == n)
				bad = i + (size_t)__builtin_ctzll(diff) / 8;
			h = (h + v) * FNV1A64_PRIME;
		}
		s->x = s->word = x;
		w->h = h;
	}
	r = teststream_check_words(s, buf + i, n - i);
	whash_update(w, buf + i, n - i);
	if (r != n - i && bad == n)
		bad = i + r;
	return bad;
}

void stream_end_fill(struct stream_end *e, uint8_t *buf, size_t n)
{
	if (e->mode == VERIFY_WORD) {
		fill_whash(&e->s, &e->wh, buf, n);
		return;
	}
	teststream_fill(&e->s, buf, n);
	e->fnv = fnv1a64(e->fnv, buf, n);
}

size_t stream_end_check(struct stream_end *e, const uint8_t *buf, size_t n)
{
	if (e->mode == VERIFY_WORD)
		return check_whash(&e->s, &e->wh, buf, n);
	e->fnv = fnv1a64(e->fnv, buf, n);
	return teststream_check(&e->s, buf, n);
}

uint64_t stream_end_hash(const struct stream_end *e)
{
	return e->mode == VERIFY_WORD ? whash_value(&e->wh) : e->fnv;
}

const char *stream_end_hash_name(const struct stream_end *e)
{
	return e->mode == VERIFY_WORD ? "whash" : "fnv";
}
