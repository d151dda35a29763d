/*
 * hostile.c - the `hostile` scenario: a driver that breaks the virtio and
 * vsock rules on purpose, one way per run, to test how the device answers.
 *
 *   hostile what=<case> port=P [n=N] [fport=F] [qport=Q] [count=K] [idle=TICKS]
 *
 * Each case does ONE bad thing (n times where that makes sense), checks what
 * the guest can see of the device's answer (used.len, RSTs, status bits),
 * prints `P: hostile <case> done key=value ...`, then (unless the case
 * says otherwise) runs a well-behaved echo over a new connection to the
 * host's port P (`P: hostile echo ok <bytes>`), and exits 0.  The cases and
 * what pyvmm is expected to do are listed in README.md ("Hostile mode").
 *
 * The draft-* cases need the draft device (ID 13, vsock.h), the others the
 * standard one (ID 19): each refuses the other mode with a FAILED line.
 * The draft cases make their packets with the driver's encoder
 * (vsock_encode), the standard ones write struct virtio_vsock_hdr by hand;
 * the probe (below) is encoded, so it serves both.
 *
 * Hand-made packets use guest ports RAW_PORT_BASE + i, which the rx hook
 * (vsock.h) takes out of the driver's way and records: the driver's own
 * connections never use them.  A hand-made tx chain is added with
 * virtq_add (so the free list stays right) and then its descriptors are
 * patched; they are restored before the driver walks the chain again
 * (virtq_get_used), so a loop never reaches the guest's own code.
 *
 * Ordering is what makes the negative checks sound without sleeping: the
 * device handles tx chains in ring order and queues its replies in that
 * order, so once the RST answering a later "probe" packet has arrived, a
 * reply to an earlier packet would have arrived before it.  In draft mode
 * that holds per queue pair, so there is a probe on every pair.
 */
#include <stdint.h>

#include "console.h"
#include "fmt.h"
#include "guest.h"
#include "io.h"
#include "virtio_mmio.h"
#include "virtqueue.h"
#include "vsock.h"

#define VIRTQ_DESC_F_INDIRECT 4         /* §2.7.5.3; this driver never negotiates it */
#define RAW_PORT_BASE   0x40000000u
#define RAW_MAX         2048
#define PROBE           (RAW_MAX - 1)           /* raw port of the probe */
#define OUTSIDE_RAM     0x80000000ull           /* above any RAM the tests give (< 2 GiB) */
#define MMIO_HOLE       0xd0000000ull           /* pyvmm's first virtio-mmio window */
#define WRAP_ADDR       0xfffffffffffff000ull   /* addr + len wraps past 2^64 */
#define ECHO_SIZE       3000
#define DGRAM_SIZE      100             /* draft-dgram-credit */
#define OVERSIZE_DGRAM  8192            /* draft-dgram-oversize: > VSOCK_DGRAM_MAX */
#define RX_BUF_BYTES    (sizeof(struct virtio_vsock_hdr) + VSOCK_RX_PAYLOAD)

static uint64_t idle = IDLE_TSC_DEFAULT;
static uint32_t port, nrounds = 1;
static const char *what = "";

/* --- what came back to the raw ports ------------------------------------- */

/* Per raw port, the last packet that came to it (canonical op and type,
 * vsock.h); for datagrams also whether they carried pattern() bytes and
 * nonzero credit fields. */
static uint32_t raw_op[RAW_MAX], raw_type[RAW_MAX];
static uint8_t raw_dgram_good[RAW_MAX], raw_dgram_credit[RAW_MAX];
static uint64_t raw_rst, raw_response, raw_other;
/* RSTs for this (driver's) port: which pair the last one came on. */
static uint32_t watch_port;
static int watch_rst_pair = -1;

static uint8_t pattern(uint32_t i);

static int rx_hook(const struct vsock_pkt *h, const uint8_t *payload)
{
	if (watch_port && h->dst_port == watch_port && h->op == VSOCK_OP_RST)
		watch_rst_pair = (int)h->pair;          /* and let the driver have it */
	if (h->dst_port < RAW_PORT_BASE || h->dst_port >= RAW_PORT_BASE + RAW_MAX)
		return 0;
	unsigned i = h->dst_port - RAW_PORT_BASE;

	raw_op[i] = h->op;
	raw_type[i] = h->type;
	if (h->op == VSOCK_OP_RST)
		raw_rst++;
	else if (h->op == VSOCK_OP_RESPONSE || h->op == VSOCK_OP_NEGOTIATE)
		raw_response++;                 /* a listener's answer to a REQUEST */
	else
		raw_other++;
	if (h->type == VSOCK_TYPE_DGRAM) {
		raw_dgram_good[i] = h->len == DGRAM_SIZE;
		for (uint32_t k = 0; k < h->len && raw_dgram_good[i]; k++)
			raw_dgram_good[i] = payload[k] == pattern(k);
		raw_dgram_credit[i] = h->buf_alloc || h->fwd_cnt;
	}
	return 1;
}

static void fail(const char *why) __attribute__((noreturn));
static void fail(const char *why)
{
	say("hostile %s: FAILED: %s", what, why);
	vsock_say_stats();
	guest_exit(1);
}

/* Poll the driver until cond holds; fail after `idle` ticks of nothing. */
#define WAIT_UNTIL(cond, why) do {                                      \
	uint64_t last_ = rdtsc();                                       \
	while (!(cond)) {                                               \
		if (vsock_poll())                                       \
			last_ = rdtsc();                                \
		else if (rdtsc() - last_ > idle)                        \
			fail("timeout: " why);                          \
		else                                                    \
			cpu_relax();                                    \
	}                                                               \
} while (0)

/* --- hand-made chains ------------------------------------------------------ */

static struct virtio_vsock_hdr raw_hdrs[VIRTQ_MAX_SIZE] __attribute__((aligned(8)));
static uint8_t raw_payload[65536 + 4096] __attribute__((aligned(4096)));
static uint8_t tokens[VIRTQ_MAX_SIZE];
static struct { uint16_t idx; struct virtq_desc saved; } patches[VIRTQ_MAX_SIZE];
static unsigned npatches, outstanding, nhdrs;
static uint32_t used_lens[VIRTQ_MAX_SIZE];

static uint16_t used_idx(const struct virtq *q)
{
	return *(volatile const uint16_t *)&q->used->idx;
}

/* Wait until every tx slot of the driver is back: afterwards the only
 * chains outstanding on tx are ours. */
static void raw_begin(void)
{
	vsock_flush();
	WAIT_UNTIL(vsock_tx_idle(), "driver tx slots not returned");
	npatches = outstanding = nhdrs = 0;
}

static struct virtio_vsock_hdr *raw_hdr(uint32_t src_port, uint32_t dst_port,
					uint16_t type, uint16_t op, uint32_t len)
{
	struct virtio_vsock_hdr *h = &raw_hdrs[nhdrs++ % VIRTQ_MAX_SIZE];

	memset(h, 0, sizeof(*h));
	h->src_cid = vsock_guest_cid();
	h->dst_cid = VSOCK_HOST_CID;
	h->src_port = src_port;
	h->dst_port = dst_port;
	h->type = type;
	h->op = op;
	h->len = len;
	h->buf_alloc = 65536;
	return h;
}

/* A header on connection c (its ports and our credit). */
static struct virtio_vsock_hdr *conn_hdr(struct vsock_conn *c, uint16_t op, uint32_t len)
{
	struct virtio_vsock_hdr *h = raw_hdr(c->local_port, c->peer_port, c->type, op, len);

	h->buf_alloc = c->buf_alloc;
	h->fwd_cnt = c->fwd_cnt;
	return h;
}

/* Add a chain (n_out readable then n_in writable buffers); its head. */
static uint16_t raw_add(struct virtq *q, const struct virtq_buf *b, unsigned n_out, unsigned n_in)
{
	uint16_t head = q->free_head;

	if (virtq_add(q, b, n_out, n_in, &tokens[head]))
		fail("no free descriptors for a hand-made chain");
	outstanding++;
	return head;
}

/* Descriptor k of the chain at head, saved for raw_commit to restore. */
static struct virtq_desc *raw_patch(struct virtq *q, uint16_t head, unsigned k)
{
	uint16_t i = head;

	while (k--)
		i = q->desc[i].next;
	patches[npatches].idx = i;
	patches[npatches].saved = q->desc[i];
	npatches++;
	return &q->desc[i];
}

/* Publish, wait for every hand-made chain to come back, restore patched
 * descriptors, take the chains off the used ring (used_lens[]). */
static void raw_commit(struct virtq *q)
{
	virtq_kick(q);
	uint64_t start = rdtsc();

	while ((uint16_t)(used_idx(q) - q->last_used) < outstanding) {
		if (rdtsc() - start > idle)
			fail("timeout: the device did not return a hand-made chain");
		cpu_relax();
	}
	while (npatches) {
		npatches--;
		q->desc[patches[npatches].idx] = patches[npatches].saved;
	}
	for (unsigned k = 0; k < outstanding; k++) {
		uint32_t len;
		uint8_t *t = virtq_get_used(q, &len);

		if (t < tokens || t >= tokens + VIRTQ_MAX_SIZE)
			fail("a driver chain came back among the hand-made ones");
		used_lens[k] = len;
	}
	outstanding = 0;
}

/* One well-formed packet: header, and payload if len. */
static void raw_send(struct virtio_vsock_hdr *h, uint32_t len)
{
	struct virtio_vsock_hdr *copy;
	struct virtq_buf b[2];

	raw_begin();
	copy = &raw_hdrs[nhdrs++ % VIRTQ_MAX_SIZE];
	*copy = *h;
	b[0].addr = copy;
	b[0].len = sizeof(*copy);
	b[1].addr = raw_payload;
	b[1].len = len;
	raw_add(vsock_queue(VSOCK_TX_QUEUE), b, len ? 2 : 1, 0);
	raw_commit(vsock_queue(VSOCK_TX_QUEUE));
}

/* A hand-made packet in the device's mode (the driver's encoder): from
 * src_port to the host's dst_port, our guest CID, buf_alloc 65536. */
static struct vsock_pkt raw_pkt(uint32_t src_port, uint32_t dst_port, uint32_t type,
				uint32_t op, uint32_t len)
{
	struct vsock_pkt p = {
		.src_cid = vsock_guest_cid(),
		.dst_cid = VSOCK_HOST_CID,
		.src_port = src_port,
		.dst_port = dst_port,
		.len = len,
		.type = type,
		.op = op,
		.buf_alloc = 65536,
	};

	return p;
}

/* p, encoded, with `len` bytes of raw_payload, on queue q. */
static void raw_send_pkt(const struct vsock_pkt *p, uint32_t len, struct virtq *q)
{
	raw_begin();
	void *wire = &raw_hdrs[nhdrs++ % VIRTQ_MAX_SIZE];
	struct virtq_buf b[2] = { { wire, vsock_hdr_size() }, { raw_payload, len } };

	vsock_encode(wire, p);
	raw_add(q, b, len ? 2 : 1, 0);
	raw_commit(q);
}

/* p on the tx queue of the pair its ports give it. */
static void raw_send_own_pair(const struct vsock_pkt *p, uint32_t len)
{
	raw_send_pkt(p, len, vsock_txq(vsock_pair_of(p->src_port, p->dst_port)));
}

/* On every queue pair, a packet for no connection from a probe port, then
 * wait for their RSTs: all replies to earlier tx packets (on that pair)
 * have arrived by then.  The probe ports are the last raw ports, the
 * highest one that maps to the pair (one pair in standard mode: PROBE). */
static void probe(void)
{
	unsigned idx[VSOCK_DRAFT_MAX_PAIRS];

	for (unsigned k = 0; k < vsock_pairs(); k++) {
		unsigned i = PROBE;

		/* 16 consecutive aligned ports XOR port are 16 consecutive
		 * numbers: every pair (P <= 16) has one. */
		while (vsock_pair_of(RAW_PORT_BASE + i, port) != k && i > RAW_MAX - 16)
			i--;
		idx[k] = i;
		raw_op[i] = 0;
		struct vsock_pkt p = raw_pkt(RAW_PORT_BASE + i, port, VSOCK_TYPE_STREAM,
					     VSOCK_OP_RW, 1);

		raw_send_pkt(&p, 1, vsock_txq(k));
	}
	vsock_flush();
	for (unsigned k = 0; k < vsock_pairs(); k++)
		WAIT_UNTIL(raw_op[idx[k]] == VSOCK_OP_RST, "no RST for the probe");
}

/* How many of raw ports [0, n) got any reply. */
static unsigned replies(unsigned n)
{
	unsigned k = 0;

	for (unsigned i = 0; i < n; i++)
		k += raw_op[i] != 0;
	return k;
}

/* --- a well-behaved connection ------------------------------------------- */

static uint8_t got[ECHO_SIZE + 256];
static uint32_t got_n;

static void collect(struct vsock_conn *c, const uint8_t *data, uint32_t len, uint32_t flags)
{
	(void)c;
	(void)flags;
	for (uint32_t i = 0; i < len; i++, got_n++)
		if (got_n < sizeof(got))
			got[got_n] = data[i];
}

static int collect_init(struct vsock_conn *c)
{
	c->on_data = collect;
	return 0;
}

static struct vsock_conn *open_conn(void)
{
	got_n = 0;
	struct vsock_conn *c = vsock_connect(VSOCK_HOST_CID, port, VIRTIO_VSOCK_TYPE_STREAM,
					     collect_init);
	if (!c)
		fail("connect failed");
	return c;
}

static uint8_t pattern(uint32_t i)
{
	return (uint8_t)(i * 131 + 7);
}

/* Wait for c to end; its reason ("reset by peer (RST)"), or "clean". */
static const char *wait_closed(struct vsock_conn *c)
{
	vsock_flush();
	WAIT_UNTIL(c->state == VSOCK_CLOSED, "connection did not end");
	const char *why = c->reset ? c->why : "clean";

	vsock_release(c);
	return why;
}

static void close_conn(struct vsock_conn *c)
{
	vsock_close(c);
	const char *why = wait_closed(c);

	if (strcmp(why, "clean"))
		fail(why);
}

/* Send ECHO_SIZE bytes on a new connection, check they come back. */
static void echo_check(void)
{
	static uint8_t data[ECHO_SIZE];
	struct vsock_conn *c = open_conn();
	uint32_t sent = 0;

	for (uint32_t i = 0; i < ECHO_SIZE; i++)
		data[i] = pattern(i);
	while (sent < ECHO_SIZE) {
		uint32_t queued;

		if (c->state != VSOCK_ESTABLISHED)
			fail("echo connection ended early");
		vsock_send(c, data + sent, ECHO_SIZE - sent, 0, &queued);
		sent += queued;
		vsock_flush();
		vsock_poll();
	}
	WAIT_UNTIL(got_n >= ECHO_SIZE || c->state != VSOCK_ESTABLISHED, "echo incomplete");
	if (got_n != ECHO_SIZE || memcmp(got, data, ECHO_SIZE))
		fail("echo returned different bytes");
	close_conn(c);
	say("hostile echo ok %u", ECHO_SIZE);
}

/* --- the cases -------------------------------------------------------------- */

static struct virtq *txq(void)
{
	return vsock_queue(VSOCK_TX_QUEUE);
}

/* A 2-descriptor RW chain (header, 100 bytes) for no connection from raw
 * port i; returns its head, not yet committed. */
static uint16_t add_rw_chain(unsigned i)
{
	struct virtq_buf b[2] = {
		{ raw_hdr(RAW_PORT_BASE + i, port, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW, 100),
		  sizeof(struct virtio_vsock_hdr) },
		{ raw_payload, 100 },
	};

	return raw_add(txq(), b, 2, 0);
}

/* tx-addr-*, tx-loop, tx-long, tx-next-range: a broken chain per round;
 * the device must return each with used.len 0 and never answer it. */
static void case_bad_tx_chain(uint64_t addr, int shape)
{
	uint32_t bad_len = 0;

	for (unsigned r = 0; r < nrounds; r++) {
		raw_begin();
		struct virtq *q = txq();
		uint16_t head;

		if (shape == 'L') {             /* every descriptor, the last back to the first */
			static struct virtq_buf b[VIRTQ_MAX_SIZE];
			struct virtio_vsock_hdr *h = raw_hdr(RAW_PORT_BASE + r, port,
							      VIRTIO_VSOCK_TYPE_STREAM,
							      VIRTIO_VSOCK_OP_RW, 0);

			for (unsigned k = 0; k < q->size; k++) {
				b[k].addr = h;
				b[k].len = sizeof(*h);
			}
			head = raw_add(q, b, q->size, 0);
			struct virtq_desc *d = raw_patch(q, head, q->size - 1u);

			d->flags |= VIRTQ_DESC_F_NEXT;
			d->next = head;
		} else {
			head = add_rw_chain(r);
			struct virtq_desc *d = raw_patch(q, head, shape == 'A' || shape == 'I' ? 0 : 1);

			if (shape == 'A') {
				d->addr = addr;
				d->len = addr == WRAP_ADDR ? 0x2000 : sizeof(struct virtio_vsock_hdr);
			} else if (shape == 'I') {      /* INDIRECT, not negotiated */
				d->flags = VIRTQ_DESC_F_INDIRECT;
				d->addr = (uintptr_t)&raw_hdrs[VIRTQ_MAX_SIZE - 2];
				d->len = 2 * sizeof(struct virtq_desc);
			} else if (shape == 'O') {      /* loop: next points back */
				d->flags |= VIRTQ_DESC_F_NEXT;
				d->next = head;
			} else {                        /* 'R': next out of range */
				d->flags |= VIRTQ_DESC_F_NEXT;
				d->next = q->size;
			}
		}
		raw_commit(q);
		bad_len += used_lens[0];
	}
	probe();
	say("hostile %s done n=%u used_len=%u replies=%u", what, nrounds, bad_len,
	    replies(nrounds));
}

/* rx-addr-*, rx-small: bad rx buffers posted ahead of the driver's (from
 * vsock_open's hook); the echo afterwards makes the device use them. */
static uint8_t spare_rx[8][RX_BUF_BYTES] __attribute__((aligned(8)));
static uint64_t rx_bad_addr;

static void post_bad_rx(void)
{
	struct virtq *q = vsock_queue(VSOCK_RX_QUEUE);

	if (!q || vsock_draft())
		fail("a standard-mode case; the device is the draft (ID 13)");

	for (unsigned r = 0; r < nrounds; r++) {
		struct virtq_buf b = { spare_rx[r], RX_BUF_BYTES };
		uint16_t head = q->free_head;

		/* The spare buffer is the token: when the device returns the
		 * chain (used.len 0) the driver drops it and re-posts the spare
		 * as a normal buffer. */
		if (virtq_add(q, &b, 0, 1, spare_rx[r]))
			fail("rx queue full");
		if (rx_bad_addr) {
			q->desc[head].addr = rx_bad_addr;
			q->desc[head].len = rx_bad_addr == WRAP_ADDR ? 0x2000 : RX_BUF_BYTES;
		} else {
			q->desc[head].len = 20;         /* shorter than the header */
		}
	}
}

static void case_bad_rx(void)
{
	uint64_t dropped = vsock_stats.dropped;

	echo_check();
	say("hostile %s done n=%u rx_dropped=%lu", what, nrounds,
	    (unsigned long)(vsock_stats.dropped - dropped));
}

/* tx-short-hdr: a 20-byte header descriptor and nothing else. */
static void case_short_hdr(void)
{
	for (unsigned r = 0; r < nrounds; r++) {
		raw_begin();
		struct virtq_buf b = { raw_hdr(RAW_PORT_BASE + r, port, VIRTIO_VSOCK_TYPE_STREAM,
					       VIRTIO_VSOCK_OP_REQUEST, 0), 20 };

		raw_add(txq(), &b, 1, 0);
		raw_commit(txq());
	}
	probe();
	say("hostile %s done n=%u replies=%u", what, nrounds, replies(nrounds));
}

/* Bad packets on an established connection: the device must reset it. */
enum conn_bad { LEN_OVER, LEN_HUGE, WRITABLE, UNKNOWN_OP, CREDIT, RW_AFTER_SHUTDOWN };

static void case_on_conn(enum conn_bad kind)
{
	unsigned resets = 0;

	for (unsigned r = 0; r < nrounds; r++) {
		struct vsock_conn *c = open_conn();
		struct virtq_buf b[4];
		unsigned nb = 0, nw = 0;

		raw_begin();
		switch (kind) {
		case LEN_OVER:                  /* len 1000, 100 bytes supplied */
		case LEN_HUGE:                  /* len > 64 KiB */
		case WRITABLE:                  /* payload descriptor device-writable */
			b[0].addr = conn_hdr(c, VIRTIO_VSOCK_OP_RW,
					     kind == LEN_OVER ? 1000 : kind == LEN_HUGE ? 70000 : 100);
			b[0].len = sizeof(struct virtio_vsock_hdr);
			b[1].addr = raw_payload;
			b[1].len = 100;
			nb = 2;
			nw = kind == WRITABLE;
			raw_add(txq(), b, nb - nw, nw);
			break;
		case UNKNOWN_OP:
			b[0].addr = conn_hdr(c, 99, 0);
			b[0].len = sizeof(struct virtio_vsock_hdr);
			raw_add(txq(), b, 1, 0);
			break;
		case RW_AFTER_SHUTDOWN: {       /* SHUTDOWN(SEND), then RW, one batch */
			struct virtio_vsock_hdr *h = conn_hdr(c, VIRTIO_VSOCK_OP_SHUTDOWN, 0);

			h->flags = VIRTIO_VSOCK_SHUTDOWN_F_SEND;
			b[0].addr = h;
			b[0].len = sizeof(*h);
			raw_add(txq(), b, 1, 0);
			b[0].addr = conn_hdr(c, VIRTIO_VSOCK_OP_RW, 10);
			b[1].addr = raw_payload;
			b[1].len = 10;
			raw_add(txq(), b, 2, 0);
			break;
		}
		case CREDIT: {                  /* peer_buf_alloc + 1000 bytes in one batch */
			uint32_t total = c->peer_buf_alloc + 1000, off = 0;

			while (off < total) {
				uint32_t n = total - off > 65536 ? 65536 : total - off;
				struct virtq_buf pb[2] = {
					{ conn_hdr(c, VIRTIO_VSOCK_OP_RW, n), sizeof(struct virtio_vsock_hdr) },
					{ raw_payload, n },
				};

				raw_add(txq(), pb, 2, 0);
				off += n;
			}
			say("hostile %s: sent %u bytes against buf_alloc %lu", what, total,
			    (unsigned long)c->peer_buf_alloc);
			break;
		}
		}
		raw_commit(txq());
		const char *why = wait_closed(c);

		if (strcmp(why, "reset by peer (RST)"))
			fail(why);
		resets++;
	}
	say("hostile %s done n=%u conn_resets=%u", what, nrounds, resets);
}

/* tx-len-under: len 10, 100 bytes supplied: only 10 reach the host. */
static void case_len_under(void)
{
	for (unsigned r = 0; r < nrounds; r++) {
		struct vsock_conn *c = open_conn();

		for (unsigned i = 0; i < 100; i++)
			raw_payload[i] = pattern(i);
		struct virtio_vsock_hdr *h = conn_hdr(c, VIRTIO_VSOCK_OP_RW, 10);

		raw_send(h, 100);
		c->tx_cnt += 10;
		WAIT_UNTIL(got_n >= 10 || c->state != VSOCK_ESTABLISHED, "no echo");
		close_conn(c);
		for (unsigned i = 0; i < 10; i++)
			if (got[i] != pattern(i))
				fail("echoed bytes differ");
		say("hostile %s done round=%u echoed=%u", what, r, got_n);
	}
}

/* no-conn: RW, SHUTDOWN, CREDIT_UPDATE, CREDIT_REQUEST, RST from raw
 * ports 0..4 (no connection), then the probe. */
static void case_no_conn(void)
{
	static const uint16_t ops[] = {
		VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_OP_CREDIT_UPDATE,
		VIRTIO_VSOCK_OP_CREDIT_REQUEST, VIRTIO_VSOCK_OP_RST,
	};
	unsigned answered = 0;

	for (unsigned r = 0; r < nrounds; r++) {
		for (unsigned i = 0; i < 5; i++) {
			unsigned k = r * 5 + i;
			struct virtio_vsock_hdr *h = raw_hdr(RAW_PORT_BASE + k, port,
							     VIRTIO_VSOCK_TYPE_STREAM, ops[i],
							     ops[i] == VIRTIO_VSOCK_OP_RW ? 10 : 0);

			if (ops[i] == VIRTIO_VSOCK_OP_SHUTDOWN)
				h->flags = VIRTIO_VSOCK_SHUTDOWN_BOTH;
			raw_send(h, h->len);
		}
	}
	probe();
	for (unsigned r = 0; r < nrounds; r++)
		for (unsigned i = 0; i < 5; i++)
			if (raw_op[r * 5 + i] == VIRTIO_VSOCK_OP_RST)
				answered |= 1u << i;
	say("hostile %s done n=%u rst_mask=0x%x rst_for_rst=%u replies=%u", what, nrounds,
	    answered, !!(answered & 0x10), replies(5 * nrounds));
}

/* unknown-type, seqpacket-unneg, bad-src-cid, bad-dst-cid: a REQUEST to
 * port P from raw port r with one field wrong. */
static void case_bad_request(uint16_t type, uint64_t src_cid, uint64_t dst_cid)
{
	for (unsigned r = 0; r < nrounds; r++) {
		struct virtio_vsock_hdr *h = raw_hdr(RAW_PORT_BASE + r, port, type,
						     VIRTIO_VSOCK_OP_REQUEST, 0);

		if (src_cid)
			h->src_cid = src_cid;
		if (dst_cid)
			h->dst_cid = dst_cid;
		raw_send(h, 0);
	}
	probe();
	unsigned rsts = 0, type_echoed = 0;

	for (unsigned r = 0; r < nrounds; r++) {
		rsts += raw_op[r] == VIRTIO_VSOCK_OP_RST;
		type_echoed += raw_op[r] && raw_type[r] == type;
	}
	say("hostile %s done n=%u rsts=%u responses=%u type_echoed=%u features=0x%lx", what,
	    nrounds, rsts, replies(nrounds) - rsts, type_echoed,
	    (unsigned long)vsock_device()->features);
}

/* request-flood: `count` REQUESTs to port F from raw ports, in batches;
 * then an RST from each accepted one. */
static void case_flood(uint32_t fport, unsigned count)
{
	const unsigned batch = 32;

	for (unsigned i = 0; i < count; i += batch) {
		raw_begin();
		for (unsigned k = i; k < count && k < i + batch; k++) {
			struct virtq_buf b = { raw_hdr(RAW_PORT_BASE + k, fport,
						       VIRTIO_VSOCK_TYPE_STREAM,
						       VIRTIO_VSOCK_OP_REQUEST, 0),
					       sizeof(struct virtio_vsock_hdr) };

			raw_add(txq(), &b, 1, 0);
		}
		raw_commit(txq());
		vsock_poll();
	}
	WAIT_UNTIL(raw_rst + raw_response + raw_other >= count, "replies to the REQUESTs");
	say("hostile %s: requests=%u responses=%lu rsts=%lu other=%lu", what, count,
	    (unsigned long)raw_response, (unsigned long)raw_rst, (unsigned long)raw_other);
	/* Close every accepted one with an RST (which gets no answer). */
	unsigned closed = 0;

	for (unsigned i = 0; i < count; i += batch) {
		raw_begin();
		for (unsigned k = i; k < count && k < i + batch; k++) {
			if (raw_op[k] != VIRTIO_VSOCK_OP_RESPONSE)
				continue;
			struct virtq_buf b = { raw_hdr(RAW_PORT_BASE + k, fport,
						       VIRTIO_VSOCK_TYPE_STREAM,
						       VIRTIO_VSOCK_OP_RST, 0),
					       sizeof(struct virtio_vsock_hdr) };

			raw_add(txq(), &b, 1, 0);
			closed++;
		}
		raw_commit(txq());
		vsock_poll();
	}
	probe();
	say("hostile %s done requests=%u responses=%lu rsts=%lu reset=%u", what, count,
	    (unsigned long)raw_response, (unsigned long)raw_rst - 1, closed);
}

/* avail-jump, head-range: the tx available ring made unusable; the device
 * must set DEVICE_NEEDS_RESET (with a configuration-change interrupt). */
static void case_broken_ring(int jump)
{
	struct virtq *q = txq();
	struct virtio_mmio_dev *d = vsock_device();

	raw_begin();
	if (jump) {
		*(volatile uint16_t *)&q->avail->idx = (uint16_t)(q->avail_idx + q->size + 5);
	} else {
		add_rw_chain(0);
		q->avail->ring[(uint16_t)(q->avail_idx - 1) & (q->size - 1)] = (uint16_t)(q->size + 100);
		*(volatile uint16_t *)&q->avail->idx = q->avail_idx;
	}
	__asm__ volatile("mfence" : : : "memory");
	virtio_mmio_notify(d, VSOCK_TX_QUEUE);
	uint64_t start = rdtsc();
	uint32_t status;

	while (!((status = virtio_mmio_read(d, VIRTIO_MMIO_STATUS)) &
		 VIRTIO_STATUS_DEVICE_NEEDS_RESET)) {
		if (rdtsc() - start > idle)
			fail("timeout: no DEVICE_NEEDS_RESET");
		cpu_relax();
	}
	uint32_t isr = virtio_mmio_read(d, VIRTIO_MMIO_INTERRUPT_STATUS);

	say("hostile %s done status=0x%x isr=0x%x used_idx=%u", what, status, isr, used_idx(q));
}

/* The start of §3.1.1 by hand, up to FEATURES_OK (no queues). */
static struct virtio_mmio_dev *begin_by_hand(const struct args *a)
{
	struct virtio_mmio_dev *d = virtio_mmio_find(a, VIRTIO_ID_VSOCK);

	if (!d)
		guest_exit(1);
	if (virtio_mmio_begin(d, VIRTIO_BIT(VIRTIO_F_EVENT_IDX)))
		fail("feature negotiation");
	return d;
}

/* notify-early: after FEATURES_OK, a tx queue holding a REQUEST to port Q,
 * then QueueNotify 0, 1 and 2 - all before DRIVER_OK.  Then a reset (by
 * vsock_open): the REQUEST must never have been processed. */
static struct virtq early_q;

static void case_notify_early(const struct args *a, uint32_t qport)
{
	struct virtio_mmio_dev *d = begin_by_hand(a);
	struct virtio_vsock_hdr *h = raw_hdr(RAW_PORT_BASE, qport, VIRTIO_VSOCK_TYPE_STREAM,
					     VIRTIO_VSOCK_OP_REQUEST, 0);

	h->src_cid = virtio_mmio_config_read64(d, 0);
	if (virtio_mmio_setup_queue(d, &early_q, VSOCK_TX_QUEUE, 64))
		fail("queue set-up");
	struct virtq_buf b = { h, sizeof(*h) };

	virtq_add(&early_q, &b, 1, 0, &tokens[0]);
	*(volatile uint16_t *)&early_q.avail->idx = early_q.avail_idx;
	__asm__ volatile("mfence" : : : "memory");
	for (unsigned q = 0; q < 3; q++)
		virtio_mmio_notify(d, q);
	uint32_t status = virtio_mmio_read(d, VIRTIO_MMIO_STATUS);

	say("hostile %s done status=0x%x used_idx=%u", what, status, used_idx(&early_q));
}

/* qsize-npot, ring-*: queue 0 set up with one bad value, QueueReady = 1;
 * the device must refuse it (QueueReady reads 0, DEVICE_NEEDS_RESET). */
static void case_bad_queue(const struct args *a, unsigned size, uint64_t desc,
			   uint64_t avail, uint64_t used)
{
	struct virtio_mmio_dev *d = begin_by_hand(a);

	desc = desc ? desc : (uintptr_t)early_q.desc;
	avail = avail ? avail : (uintptr_t)early_q.avail_mem;
	used = used ? used : (uintptr_t)early_q.used_mem;
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_SEL, VSOCK_RX_QUEUE);
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_NUM, size);
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
	uint32_t ready = virtio_mmio_read(d, VIRTIO_MMIO_QUEUE_READY);
	uint32_t status = virtio_mmio_read(d, VIRTIO_MMIO_STATUS);

	say("hostile %s done queue_ready=%u status=0x%x", what, ready, status);
}

/* rst-bad-len, rst-bad-type, rst-wrong-type: an RST on an established
 * connection with one field wrong.  The connection is over either way; the
 * device must not answer an RST with an RST (answered=1 if it did). */
static void case_rst_on_conn(int kind)
{
	unsigned answered = 0;

	for (unsigned r = 0; r < nrounds; r++) {
		struct vsock_conn *c = open_conn();
		struct virtio_vsock_hdr *h = conn_hdr(c, VIRTIO_VSOCK_OP_RST, 0);

		if (kind == 'L')
			h->len = 1000;          /* no payload supplied */
		else if (kind == 'T')
			h->type = 7;            /* unknown type */
		else
			h->type = c->type == VIRTIO_VSOCK_TYPE_STREAM ?
				VIRTIO_VSOCK_TYPE_SEQPACKET : VIRTIO_VSOCK_TYPE_STREAM;
		raw_send(h, 0);
		probe();
		if (c->state == VSOCK_CLOSED)
			answered++;             /* the device sent an RST for it */
		vsock_release(c);               /* we reset it: gone here either way */
	}
	say("hostile %s done n=%u answered=%u", what, nrounds, answered);
}

/* rst-flood: `count` packets for no connection, in batches, without
 * reposting rx buffers; the device can deliver RSTs into the 64 posted rx
 * buffers and hold a bounded number more.  Then drain: `expect` RSTs. */
static void case_rst_flood(unsigned count, unsigned expect)
{
	const unsigned batch = 32;

	for (unsigned i = 0; i < count; i += batch) {
		raw_begin();
		for (unsigned k = i; k < count && k < i + batch; k++) {
			struct virtq_buf b = { raw_hdr(RAW_PORT_BASE + k, port,
						       VIRTIO_VSOCK_TYPE_STREAM,
						       VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0),
					       sizeof(struct virtio_vsock_hdr) };

			raw_add(txq(), &b, 1, 0);
		}
		raw_commit(txq());              /* no vsock_poll: rx is not reposted */
	}
	WAIT_UNTIL(raw_rst >= expect, "fewer RSTs than expected");
	probe();
	say("hostile %s done sent=%u rsts=%lu", what, count, (unsigned long)raw_rst - 1);
}

/* mmio-width: register accesses of the wrong width, misaligned, to
 * read-only / write-only / undefined registers, a config write. */
static void case_mmio(void)
{
	uintptr_t base = vsock_device()->base;
	uint64_t cid = vsock_guest_cid();

	*(volatile uint64_t *)(base + VIRTIO_MMIO_QUEUE_NOTIFY) = VSOCK_TX_QUEUE;   /* 8 bytes */
	uint16_t st16 = *(volatile uint16_t *)(base + VIRTIO_MMIO_STATUS);          /* 2 bytes */
	uint32_t mis = *(volatile uint32_t *)(base + VIRTIO_MMIO_STATUS + 2);       /* misaligned */
	virtio_mmio_write(vsock_device(), VIRTIO_MMIO_MAGIC_VALUE, 0);              /* read-only */
	uint32_t wo = virtio_mmio_read(vsock_device(), VIRTIO_MMIO_QUEUE_NOTIFY);   /* write-only */
	virtio_mmio_write(vsock_device(), 0x0f0, 1);                                /* undefined */
	*(volatile uint32_t *)(base + VIRTIO_MMIO_CONFIG) = 1234;                   /* config is RO */
	uint64_t cid_after = virtio_mmio_config_read64(vsock_device(), 0);
	uint32_t status = virtio_mmio_read(vsock_device(), VIRTIO_MMIO_STATUS);

	say("hostile %s done st16=0x%x misaligned=0x%x wo=0x%x cid=%lu cid_after=%lu status=0x%x",
	    what, st16, mis, wo, (unsigned long)cid, (unsigned long)cid_after, status);
}

/* --- draft mode (device ID 13) ------------------------------------------------ */
/*
 * Packets are made with the driver's encoder (raw_pkt, conn_pkt) and go on
 * the tx queue of the pair their ports give them, unless the case is about
 * the queue.  The probe runs on every pair, so "no reply" is decided by
 * ordering on each.
 */

/* A packet on connection c (its ports, type and our credit). */
static struct vsock_pkt conn_pkt(struct vsock_conn *c, uint32_t op, uint32_t len)
{
	struct vsock_pkt p = raw_pkt(c->local_port, c->peer_port, c->type, op, len);

	p.dst_cid = c->peer_cid;
	p.buf_alloc = c->buf_alloc;
	p.fwd_cnt = c->fwd_cnt;
	return p;
}

/* draft-attach-first, draft-offer-first: the handshake's ATTACH or OFFER
 * as the first packet from raw port r (no REQUEST before it). */
static void case_draft_out_of_order(uint32_t op)
{
	unsigned rsts = 0;

	for (unsigned r = 0; r < nrounds; r++) {
		struct vsock_pkt p = raw_pkt(RAW_PORT_BASE + r, port, VSOCK_TYPE_STREAM, op, 0);

		raw_send_own_pair(&p, 0);
	}
	probe();
	for (unsigned r = 0; r < nrounds; r++)
		rsts += raw_op[r] == VSOCK_OP_RST;
	say("hostile %s done n=%u rsts=%u replies=%u", what, nrounds, rsts, replies(nrounds));
}

/* draft-offer-again: an OFFER on an established connection. */
static void case_draft_offer_again(void)
{
	unsigned resets = 0;

	for (unsigned r = 0; r < nrounds; r++) {
		struct vsock_conn *c = open_conn();
		struct vsock_pkt p = conn_pkt(c, VSOCK_OP_OFFER, 0);

		raw_send_pkt(&p, 0, vsock_txq(c->pair));
		const char *why = wait_closed(c);

		if (strcmp(why, "reset by peer (RST)"))
			fail(why);
		resets++;
	}
	say("hostile %s done n=%u conn_resets=%u", what, nrounds, resets);
}

/* draft-dgram-oversize: a DGRAM of OVERSIZE_DGRAM bytes (all supplied)
 * from raw port r to the host's port P. */
static void case_draft_dgram_oversize(void)
{
	uint32_t used_len = 0;

	for (unsigned r = 0; r < nrounds; r++) {
		struct vsock_pkt p = raw_pkt(RAW_PORT_BASE + r, port, VSOCK_TYPE_DGRAM,
					     VSOCK_OP_RW, OVERSIZE_DGRAM);

		p.buf_alloc = 0;        /* a datagram's credit fields are 0 */
		raw_send_own_pair(&p, OVERSIZE_DGRAM);
		used_len += used_lens[0];
	}
	probe();
	say("hostile %s done n=%u used_len=%u replies=%u", what, nrounds, used_len,
	    replies(nrounds));
}

/* draft-request-on-controlq: a REQUEST from raw port r to port P posted on
 * queue 0, the controlq, which vsock_open leaves alone: this case sets it
 * up (from vsock_queues_hook, before DRIVER_OK). */
static struct virtq ctl_q;

static void setup_controlq(void)
{
	/* On failure the device is FAILED, and DRIVER_OK ends the run. */
	virtio_mmio_setup_queue(vsock_device(), &ctl_q, 0, 8);
}

static void case_draft_controlq(void)
{
	uint32_t used_len = 0;

	for (unsigned r = 0; r < nrounds; r++) {
		struct vsock_pkt p = raw_pkt(RAW_PORT_BASE + r, port, VSOCK_TYPE_STREAM,
					     VSOCK_OP_REQUEST, 0);

		raw_send_pkt(&p, 0, &ctl_q);
		used_len += used_lens[0];
	}
	probe();
	say("hostile %s done n=%u used_len=%u replies=%u", what, nrounds, used_len,
	    replies(nrounds));
}

/* draft-pair-hop: on an established connection, an RW (100 bytes) on the
 * tx queue of the next pair instead of its own.  rst_on_pair counts the
 * RSTs that came on the connection's own pair. */
static void case_draft_pair_hop(void)
{
	unsigned resets = 0, on_pair = 0, pairs = vsock_pairs();

	if (pairs < 2)
		fail("needs 2 queue pairs or more (max_virtqueue_pairs, vsock-pairs=)");
	for (unsigned i = 0; i < 100; i++)
		raw_payload[i] = pattern(i);
	for (unsigned r = 0; r < nrounds; r++) {
		struct vsock_conn *c = open_conn();
		unsigned own = c->pair;
		struct vsock_pkt p = conn_pkt(c, VSOCK_OP_RW, 100);

		watch_port = c->local_port;
		watch_rst_pair = -1;
		raw_send_pkt(&p, 100, vsock_txq((own + 1) % pairs));
		const char *why = wait_closed(c);

		if (strcmp(why, "reset by peer (RST)"))
			fail(why);
		resets++;
		on_pair += watch_rst_pair == (int)own;
	}
	watch_port = 0;
	say("hostile %s done n=%u conn_resets=%u rst_on_pair=%u", what, nrounds, resets, on_pair);
}

/* draft-dgram-credit (not hostile): DGRAMs of DGRAM_SIZE pattern() bytes
 * with nonzero fwd_cnt and buf_alloc, from raw port r to the host's port P;
 * the host must echo them (a datagram echo at <uds>_<P>.dgram).  echoed =
 * how many came back, content_ok = with the same bytes, echo_credit = with
 * nonzero credit fields (the device's are 0). */
static void case_draft_dgram_credit(void)
{
	unsigned ok = 0, credit = 0;

	for (unsigned i = 0; i < DGRAM_SIZE; i++)
		raw_payload[i] = pattern(i);
	for (unsigned r = 0; r < nrounds; r++) {
		struct vsock_pkt p = raw_pkt(RAW_PORT_BASE + r, port, VSOCK_TYPE_DGRAM,
					     VSOCK_OP_RW, DGRAM_SIZE);

		p.fwd_cnt = 0x1234 + r;
		p.buf_alloc = 0x10000 + r;
		raw_send_own_pair(&p, DGRAM_SIZE);
	}
	vsock_flush();
	WAIT_UNTIL(replies(nrounds) == nrounds, "not every datagram came back (is there a "
		   "datagram echo at <uds>_<P>.dgram?)");
	for (unsigned r = 0; r < nrounds; r++) {
		ok += raw_type[r] == VSOCK_TYPE_DGRAM && raw_op[r] == VSOCK_OP_RW &&
			raw_dgram_good[r];
		credit += raw_dgram_credit[r];
	}
	say("hostile %s done n=%u echoed=%u content_ok=%u echo_credit=%u", what, nrounds,
	    replies(nrounds), ok, credit);
}

/* --- with VIRTIO_F_INDIRECT_DESC negotiated --------------------------------- */

/* ind-*: the driver asks for VIRTIO_F_INDIRECT_DESC (vsock_extra_features)
 * and sends, per round, a tx chain whose one descriptor is an indirect
 * table (§2.7.5.3) of two entries: a header and a 100-byte payload, an RW
 * for no connection.  ind-good keeps every rule and must be answered (an
 * RST); each other shape breaks one rule of §2.7.5.3.1 and must be dropped
 * with used.len 0 and never answered:
 *   ind-outside  the table beyond RAM        ind-len-zero  table len 0
 *   ind-len-odd  table len 24 (not 16k)      ind-huge      more entries than the queue
 *   ind-nested   an entry is INDIRECT        ind-next      INDIRECT | NEXT on the head
 *   ind-loop     entry 1 NEXT -> entry 0     ind-range     entry 1 NEXT -> 2 (of 2)
 *   ind-buf      entry 1's buffer beyond RAM */
static const struct { const char *name; char shape; } ind_cases[] = {
	{ "ind-good", 'G' }, { "ind-outside", 'O' }, { "ind-len-zero", 'Z' },
	{ "ind-len-odd", 'U' }, { "ind-huge", 'H' }, { "ind-nested", 'N' },
	{ "ind-next", 'X' }, { "ind-loop", 'L' }, { "ind-range", 'R' }, { "ind-buf", 'B' },
};

static char ind_shape(const char *w)
{
	for (unsigned i = 0; i < sizeof(ind_cases) / sizeof(ind_cases[0]); i++)
		if (!strcmp(w, ind_cases[i].name))
			return ind_cases[i].shape;
	return 0;
}

static struct virtq_desc ind_table[VIRTQ_MAX_SIZE + 1] __attribute__((aligned(16)));

static void case_indirect(int shape)
{
	struct virtq *q = txq();
	uint32_t bad_len = 0;

	for (unsigned r = 0; r < nrounds; r++) {
		raw_begin();
		struct virtio_vsock_hdr *h = raw_hdr(RAW_PORT_BASE + r, port, VIRTIO_VSOCK_TYPE_STREAM,
						     VIRTIO_VSOCK_OP_RW, 100);
		uint64_t table = (uintptr_t)ind_table;
		uint32_t table_len = 2 * sizeof(struct virtq_desc);
		uint16_t head_flags = VIRTQ_DESC_F_INDIRECT;

		memset(ind_table, 0, sizeof(ind_table));
		ind_table[0] = (struct virtq_desc){ (uintptr_t)h, sizeof(*h), VIRTQ_DESC_F_NEXT, 1 };
		ind_table[1] = (struct virtq_desc){ (uintptr_t)raw_payload, 100, 0, 0 };
		switch (shape) {
		case 'O': table = OUTSIDE_RAM; break;
		case 'Z': table_len = 0; break;
		case 'U': table_len = 24; break;
		case 'H': table_len = (q->size + 1u) * sizeof(struct virtq_desc); break;
		case 'N': ind_table[0].flags = VIRTQ_DESC_F_INDIRECT; break;
		case 'X': head_flags |= VIRTQ_DESC_F_NEXT; break;
		case 'L': ind_table[1].flags = VIRTQ_DESC_F_NEXT; ind_table[1].next = 0; break;
		case 'R': ind_table[1].flags = VIRTQ_DESC_F_NEXT; ind_table[1].next = 2; break;
		case 'B': ind_table[1].addr = OUTSIDE_RAM; break;
		}
		struct virtq_buf b = { h, sizeof(*h) };
		uint16_t head = raw_add(q, &b, 1, 0);
		struct virtq_desc *d = raw_patch(q, head, 0);

		d->addr = table;
		d->len = table_len;
		d->flags = head_flags;
		d->next = head;                 /* ind-next: back to itself, never followed */
		raw_commit(q);
		bad_len += used_lens[0];
	}
	probe();
	say("hostile %s done n=%u used_len=%u replies=%u", what, nrounds, bad_len, replies(nrounds));
}

/* --- the host drives: a byte on the serial port says "go on" ------------------ */

/* Wait for any byte from the host (the test's "go"), touching no device:
 * no timeout here, the run's own timeout bounds it. */
static void wait_for_host(void)
{
	while (serial_getc() < 0)
		cpu_relax();
}

/* ev-short, ev-readonly, ev-outside: one bad buffer posted on the event
 * queue ahead of the driver's (a 2-byte buffer, a device-readable one, one
 * beyond RAM), then "ready": the test makes the host post
 * VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.  The device must return the bad
 * buffer with used.len 0, write nothing into it, and deliver the event in
 * the next buffer.  The bad buffer's token is a spare 4-byte buffer the
 * driver re-posts, well-formed, when it comes back. */
static uint8_t ev_spare[8] __attribute__((aligned(8)));
static int ev_shape;

static void post_bad_event(void)
{
	struct virtq *q = vsock_queue(VSOCK_EVENT_QUEUE);
	struct virtq_buf b = { ev_spare, 4 };
	uint16_t head = q->free_head;

	memset(ev_spare, 0xaa, sizeof(ev_spare));
	if (virtq_add(q, &b, 0, 1, ev_spare))
		fail("no free descriptor on the event queue");
	struct virtq_desc *d = &q->desc[head];

	if (ev_shape == 'S')
		d->len = 2;
	else if (ev_shape == 'R')
		d->flags &= (uint16_t)~VIRTQ_DESC_F_WRITE;
	else
		d->addr = OUTSIDE_RAM;
}

static void case_event_bad(void)
{
	say("hostile %s ready", what);
	WAIT_UNTIL(vsock_stats.transport_resets == 1, "no TRANSPORT_RESET event");
	unsigned untouched = 1;

	for (unsigned i = 0; i < sizeof(ev_spare); i++)
		untouched &= ev_spare[i] == 0xaa;
	say("hostile %s done untouched=%u resets=%lu", what, untouched,
	    (unsigned long)vsock_stats.transport_resets);
}

/* reset-mid: a device reset (§2.4: status 0) in the middle of traffic.  Two
 * connections to the host's echo port stream 4 KiB packets; once RESET_AFTER
 * bytes have come back on each and more are in flight both ways, the driver
 * resets the device and sets it up again (vsock_open), says "was-reset" and
 * waits for the host's go (the test checks its peers saw their connections
 * end meanwhile); the echo afterwards needs a new connection. */
#define RESET_AFTER     (256u << 10)
#define RESET_CHUNK     4096u

static void count_data(struct vsock_conn *c, const uint8_t *data, uint32_t len, uint32_t flags)
{
	(void)data;
	(void)flags;
	c->user[0] += len;
}

static int count_init(struct vsock_conn *c)
{
	c->on_data = count_data;
	return 0;
}

static void case_reset_mid(const struct args *a)
{
	struct vsock_conn *c[2];

	for (unsigned k = 0; k < 2; k++)
		if (!(c[k] = vsock_connect(VSOCK_HOST_CID, port, VIRTIO_VSOCK_TYPE_STREAM, count_init)))
			fail("connect failed");
	for (uint32_t i = 0; i < RESET_CHUNK; i++)
		raw_payload[i] = pattern(i);
	for (int more = 2; more > 0;) {
		uint32_t queued;

		for (unsigned k = 0; k < 2; k++) {
			if (c[k]->state != VSOCK_ESTABLISHED)
				fail("a streaming connection ended before the reset");
			vsock_send(c[k], raw_payload, RESET_CHUNK, 0, &queued);
		}
		vsock_flush();
		vsock_poll();
		if (c[0]->user[0] >= RESET_AFTER && c[1]->user[0] >= RESET_AFTER)
			more--;                 /* one more round in flight, then reset */
	}
	say("hostile %s resetting echoed=%lu,%lu", what, (unsigned long)c[0]->user[0],
	    (unsigned long)c[1]->user[0]);
	vsock_open(a, idle);
	unsigned ended = 0;

	for (unsigned k = 0; k < 2; k++) {
		ended += c[k]->state == VSOCK_CLOSED && !strcmp(c[k]->why, "device reset");
		vsock_release(c[k]);
	}
	say("hostile %s was-reset", what);
	wait_for_host();
	say("hostile %s done conns=2 ended=%u", what, ended);
}

/* stop-rx: the guest stops consuming rx while host peers keep sending.  It
 * opens STALL_CONNS connections to the host's port fport (each host peer
 * sends pattern() bytes until it closes), and once data flows on all of
 * them says "stalled" and neither polls nor gives rx buffers back until the
 * host's go; then it takes everything, checking every byte. */
#define STALL_CONNS     4

static void stall_data(struct vsock_conn *c, const uint8_t *data, uint32_t len, uint32_t flags)
{
	(void)flags;
	for (uint32_t i = 0; i < len; i++)
		c->user[1] += data[i] != pattern((uint32_t)(c->user[0] + i));
	c->user[0] += len;
}

static int stall_init(struct vsock_conn *c)
{
	c->on_data = stall_data;
	return 0;
}

static int all_have_data(struct vsock_conn **c)
{
	for (unsigned k = 0; k < STALL_CONNS; k++)
		if (!c[k]->user[0])
			return 0;
	return 1;
}

static int all_ended_by_peer(struct vsock_conn **c)
{
	for (unsigned k = 0; k < STALL_CONNS; k++)
		if (c[k]->state == VSOCK_ESTABLISHED &&
		    !(c[k]->peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND))
			return 0;
	return 1;
}

static void case_rx_stall(uint32_t fport)
{
	struct vsock_conn *c[STALL_CONNS];
	uint64_t bytes = 0, bad = 0;

	for (unsigned k = 0; k < STALL_CONNS; k++)
		if (!(c[k] = vsock_connect(VSOCK_HOST_CID, fport, VIRTIO_VSOCK_TYPE_STREAM, stall_init)))
			fail("connect failed");
	WAIT_UNTIL(all_have_data(c), "no data from the host peers");
	say("hostile %s stalled", what);
	wait_for_host();
	WAIT_UNTIL(all_ended_by_peer(c), "the host peers did not finish");
	for (unsigned k = 0; k < STALL_CONNS; k++) {
		bytes += c[k]->user[0];
		bad += c[k]->user[1];
		if (c[k]->state == VSOCK_ESTABLISHED)
			close_conn(c[k]);
		else if (strcmp(wait_closed(c[k]), "clean"))
			fail("a stalled connection was reset");
	}
	say("hostile %s done conns=%u bytes=%lu bad=%lu", what, STALL_CONNS,
	    (unsigned long)bytes, (unsigned long)bad);
}

/* --- dispatch ------------------------------------------------------------------ */

void scenario_hostile(const struct args *a)
{
	uint64_t v;
	const char *w = arg_value(a, "what");

	if (!w || !arg_value(a, "port")) {
		say("hostile: needs what=<case> port=P (README.md, \"Hostile mode\")");
		guest_exit(1);
	}
	what = w;
	v = 0;
	arg_u64(a, "port", &v, 0, 0xffffffffull);
	port = (uint32_t)v;
	v = 1;
	arg_u64(a, "n", &v, 1, 8);
	nrounds = (uint32_t)v;
	arg_u64(a, "idle", &idle, 1, UINT64_MAX);
	uint64_t fport = port + 1, qport = port + 2, count = 1100, expect = 0;

	arg_u64(a, "fport", &fport, 0, 0xffffffffull);
	arg_u64(a, "qport", &qport, 0, 0xffffffffull);
	arg_u64(a, "count", &count, 1, RAW_MAX - 1);
	arg_u64(a, "expect", &expect, 0, RAW_MAX - 1);
	vsock_rx_hook = rx_hook;

	/* Cases that misbehave before the driver is up; vsock_open resets. */
	if (!strcmp(w, "notify-early"))
		case_notify_early(a, (uint32_t)qport);
	else if (!strcmp(w, "qsize-npot"))
		case_bad_queue(a, 100, 0, 0, 0);
	else if (!strcmp(w, "ring-misaligned"))
		case_bad_queue(a, 64, (uintptr_t)early_q.desc + 8, 0, 0);
	else if (!strcmp(w, "ring-outside"))
		case_bad_queue(a, 64, OUTSIDE_RAM, 0, 0);
	else if (!strcmp(w, "ring-hole"))
		case_bad_queue(a, 64, 0, 0, MMIO_HOLE);
	else if (!strcmp(w, "ring-wrap"))
		case_bad_queue(a, 64, 0, WRAP_ADDR, 0);
	else if (!strcmp(w, "rx-addr-outside"))
		rx_bad_addr = OUTSIDE_RAM, vsock_open_hook = post_bad_rx;
	else if (!strcmp(w, "rx-addr-hole"))
		rx_bad_addr = MMIO_HOLE, vsock_open_hook = post_bad_rx;
	else if (!strcmp(w, "rx-addr-wrap"))
		rx_bad_addr = WRAP_ADDR, vsock_open_hook = post_bad_rx;
	else if (!strcmp(w, "rx-small"))
		vsock_open_hook = post_bad_rx;
	else if (!strcmp(w, "seqpacket-unneg"))
		vsock_feature_mask = ~VIRTIO_BIT(VIRTIO_VSOCK_F_SEQPACKET);
	else if (!strcmp(w, "draft-request-on-controlq"))
		vsock_queues_hook = setup_controlq;
	else if (ind_shape(w))
		vsock_extra_features = VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC);
	else if (!strncmp(w, "ev-", 3)) {
		ev_shape = !strcmp(w, "ev-short") ? 'S' : !strcmp(w, "ev-readonly") ? 'R' :
			   !strcmp(w, "ev-outside") ? 'O' : 0;
		if (ev_shape)
			vsock_open_hook = post_bad_event;
	}

	vsock_open(a, idle);
	vsock_open_hook = NULL;
	vsock_queues_hook = NULL;

	/* The draft-* cases need the draft device; the others speak the
	 * standard's header by hand. */
	int draft_case = !strncmp(w, "draft-", 6);

	if (draft_case && !vsock_draft())
		fail("a draft-mode case; the device is the standard's (ID 19)");
	if (!draft_case && vsock_draft())
		fail("a standard-mode case; the device is the draft (ID 13)");

	if (!strcmp(w, "tx-addr-outside"))
		case_bad_tx_chain(OUTSIDE_RAM, 'A');
	else if (!strcmp(w, "tx-addr-hole"))
		case_bad_tx_chain(MMIO_HOLE, 'A');
	else if (!strcmp(w, "tx-addr-wrap"))
		case_bad_tx_chain(WRAP_ADDR, 'A');
	else if (!strcmp(w, "tx-loop"))
		case_bad_tx_chain(0, 'O');
	else if (!strcmp(w, "tx-long"))
		case_bad_tx_chain(0, 'L');
	else if (!strcmp(w, "tx-indirect"))
		case_bad_tx_chain(0, 'I');
	else if (!strcmp(w, "rw-after-shutdown"))
		case_on_conn(RW_AFTER_SHUTDOWN);
	else if (!strcmp(w, "tx-next-range"))
		case_bad_tx_chain(0, 'R');
	else if (!strncmp(w, "rx-", 3))
		case_bad_rx();
	else if (!strcmp(w, "tx-short-hdr"))
		case_short_hdr();
	else if (!strcmp(w, "tx-len-over"))
		case_on_conn(LEN_OVER);
	else if (!strcmp(w, "tx-len-huge"))
		case_on_conn(LEN_HUGE);
	else if (!strcmp(w, "tx-writable"))
		case_on_conn(WRITABLE);
	else if (!strcmp(w, "unknown-op"))
		case_on_conn(UNKNOWN_OP);
	else if (!strcmp(w, "credit-overrun"))
		case_on_conn(CREDIT);
	else if (!strcmp(w, "tx-len-under"))
		case_len_under();
	else if (!strcmp(w, "no-conn"))
		case_no_conn();
	else if (!strcmp(w, "unknown-type"))
		case_bad_request(7, 0, 0);
	else if (!strcmp(w, "seqpacket-unneg"))
		case_bad_request(VIRTIO_VSOCK_TYPE_SEQPACKET, 0, 0);
	else if (!strcmp(w, "bad-src-cid"))
		case_bad_request(VIRTIO_VSOCK_TYPE_STREAM, vsock_guest_cid() + 100, 0);
	else if (!strcmp(w, "bad-dst-cid"))
		case_bad_request(VIRTIO_VSOCK_TYPE_STREAM, 0, 5);
	else if (!strcmp(w, "request-flood"))
		case_flood((uint32_t)fport, (unsigned)count);
	else if (!strcmp(w, "rst-flood"))
		case_rst_flood((unsigned)count, (unsigned)expect);
	else if (!strcmp(w, "rst-bad-len"))
		case_rst_on_conn('L');
	else if (!strcmp(w, "rst-bad-type"))
		case_rst_on_conn('T');
	else if (!strcmp(w, "rst-wrong-type"))
		case_rst_on_conn('W');
	else if (!strcmp(w, "mmio-width"))
		case_mmio();
	else if (ev_shape)
		case_event_bad();
	else if (!strcmp(w, "reset-mid"))
		case_reset_mid(a);
	else if (!strcmp(w, "stop-rx"))
		case_rx_stall((uint32_t)fport);
	else if (ind_shape(w))
		case_indirect(ind_shape(w));
	else if (!strcmp(w, "draft-attach-first"))
		case_draft_out_of_order(VSOCK_OP_ATTACH);
	else if (!strcmp(w, "draft-offer-first"))
		case_draft_out_of_order(VSOCK_OP_OFFER);
	else if (!strcmp(w, "draft-offer-again"))
		case_draft_offer_again();
	else if (!strcmp(w, "draft-dgram-oversize"))
		case_draft_dgram_oversize();
	else if (!strcmp(w, "draft-request-on-controlq"))
		case_draft_controlq();
	else if (!strcmp(w, "draft-pair-hop"))
		case_draft_pair_hop();
	else if (!strcmp(w, "draft-dgram-credit"))
		case_draft_dgram_credit();
	else if (!strcmp(w, "avail-jump") || !strcmp(w, "head-range")) {
		case_broken_ring(!strcmp(w, "avail-jump"));
		vsock_open(a, idle);            /* reset and start again */
	} else if (strcmp(w, "notify-early") && strcmp(w, "qsize-npot") && strncmp(w, "ring-", 5)) {
		say("hostile: unknown case '%s'", w);
		guest_exit(1);
	}
	if (strncmp(w, "rx-", 3))
		echo_check();
	vsock_say_stats();
	guest_exit(0);
}
