/*
 * vsock.c - a polled driver for virtio socket devices and the connection
 * protocol they carry, in two modes (vsock.h): the standard Socket Device
 * (virtio 1.2 §5.10, device ID 19; quoted by section below) and the 2013
 * RFC draft (device ID 13).  This file is the one connection layer for
 * both; it sees packets as struct vsock_pkt, and everything that differs
 * between the modes is a field of the mode's table (vsock_wire.h).
 *
 * Buffers.  rx: per queue pair RX_BUFS buffers (fewer per pair when the
 * draft's pairs share RX_POOL) of one descriptor each, header plus
 * VSOCK_RX_PAYLOAD bytes (the layout Linux uses since 6.2; §5.10.6 lets the
 * driver provide more space than len needs).  tx: TX_SLOTS slots of header
 * plus VSOCK_TX_PAYLOAD bytes, shared by all pairs, sent as a chain of two
 * descriptors (header, payload) when there is payload, one descriptor
 * otherwise - the layout of Linux's driver.  event (standard only):
 * EVENT_BUFS buffers of 4 bytes (§5.10.6.7).
 *
 * Queue pairs.  The standard has one (rx 0, tx 1); the draft has P (rx
 * 2i+1, tx 2i+2), and every packet of a connection or datagram goes, both
 * ways, on pair (local_port ^ peer_port) % P: so a connection keeps the
 * pair its ports give it, and a packet that arrives on another pair is
 * answered as the device answers one of ours (RST on the right pair for a
 * stream packet, resetting its connection; a datagram is dropped).
 *
 * Credit (§5.10.6.3 "Buffer Space Management").  Every packet we send
 * carries our buf_alloc and fwd_cnt (u64 here; the standard's wire has
 * their low 32 bits, and credit arithmetic wraps at the wire's width).  RW
 * goes out only within peer_buf_alloc - (tx_cnt - peer_fwd_cnt).  We send
 * CREDIT_UPDATE unasked when the mode's credit_due says so; the standard
 * answers every CREDIT_REQUEST and, if we have been unable to send for
 * lack of credit for CREDIT_REQUEST_TSC, asks with one (the draft has no
 * such op: a sender with zero credit waits).  An RW beyond the credit we
 * gave is counted and reported once; the draft also resets the connection.
 *
 * Flow control (§5.10.6.1): a control reply needs a tx buffer; if none is
 * free the driver waits (bounded) for the device to return one.  That wait
 * cannot deadlock with a correct device: "The tx virtqueue MUST be
 * processed even when the rx virtqueue is full".
 */
#include <stdint.h>

#include "console.h"
#include "fmt.h"
#include "guest.h"
#include "io.h"
#include "virtio_mmio.h"
#include "virtqueue.h"
#include "vsock.h"
#include "vsock_wire.h"

#define RX_QUEUE_SIZE           128
#define TX_QUEUE_SIZE           64
#define EVENT_QUEUE_SIZE        8
#define RX_BUFS                 64      /* per pair, at most */
#define RX_POOL                 128     /* shared by the pairs: >= RX_BUFS */
#define TX_SLOTS                16      /* 2 descriptors each: <= TX_QUEUE_SIZE */
#define EVENT_BUFS              8       /* as Linux */
#define MAX_PAIRS               VSOCK_DRAFT_MAX_PAIRS

/* Unable to send for lack of credit this long: CREDIT_REQUEST (~0.4 s). */
#define CREDIT_REQUEST_TSC      (1ull << 30)
#define FIRST_LOCAL_PORT        49152

/* Header (the mode's hdr_size bytes) then payload, in one descriptor. */
struct __attribute__((aligned(8))) rx_buf {
	uint8_t bytes[VSOCK_HDR_MAX + VSOCK_RX_PAYLOAD];
};

struct __attribute__((aligned(8))) tx_slot {
	uint8_t hdr[VSOCK_HDR_MAX];     /* the first hdr_size bytes are sent */
	uint8_t payload[VSOCK_TX_PAYLOAD];
};

static const struct vsock_proto *proto = &vsock_proto_standard;
static struct virtio_mmio_dev *dev;
static struct virtq rxqs[MAX_PAIRS], txqs[MAX_PAIRS], evq;
static unsigned npairs = 1, device_pairs = 1, rx_per_pair;
static int evq_on;
static struct rx_buf rx_bufs[RX_POOL];
static struct tx_slot tx_slots[TX_SLOTS];
static struct tx_slot *tx_free[TX_SLOTS];
static unsigned tx_nfree;
static uint32_t event_bufs[EVENT_BUFS];
static uint64_t guest_cid;
static uint64_t idle_ticks;
static unsigned caps;                   /* VSOCK_CAP_* */
static uint32_t listen_port;
static vsock_accept_fn listen_accept;
static uint32_t next_local_port = FIRST_LOCAL_PORT;
static int said_bad_rx, said_violation, said_wrong_pair;
static struct {
	uint32_t port;
	vsock_dgram_fn fn;              /* NULL: a free entry */
} dgram_ports[VSOCK_MAX_DGRAM_PORTS];

struct vsock_conn vsock_conns[VSOCK_MAX_CONNS];
struct vsock_stats vsock_stats;

int (*vsock_rx_hook)(const struct vsock_pkt *h, const uint8_t *payload);
void (*vsock_queues_hook)(void);
void (*vsock_open_hook)(void);
uint64_t vsock_feature_mask = ~0ull;
uint64_t vsock_extra_features;

struct virtio_mmio_dev *vsock_device(void)
{
	return dev;
}

struct virtq *vsock_queue(unsigned index)
{
	for (unsigned i = 0; i < npairs; i++) {
		if (index == proto->rx_base + 2 * i)
			return &rxqs[i];
		if (index == proto->tx_base + 2 * i)
			return &txqs[i];
	}
	return evq_on && index == (unsigned)proto->event_queue ? &evq : NULL;
}

struct virtq *vsock_rxq(unsigned pair)
{
	return pair < npairs ? &rxqs[pair] : NULL;
}

struct virtq *vsock_txq(unsigned pair)
{
	return pair < npairs ? &txqs[pair] : NULL;
}

unsigned vsock_hdr_size(void)
{
	return proto->hdr_size;
}

void vsock_encode(void *wire, const struct vsock_pkt *p)
{
	proto->encode(wire, p);
}

uint64_t vsock_guest_cid(void)
{
	return guest_cid;
}

int vsock_draft(void)
{
	return proto == &vsock_proto_draft;
}

int vsock_seqpacket(void)
{
	return !!(caps & VSOCK_CAP_SEQPACKET);
}

const char *vsock_no_seqpacket_why(void)
{
	return proto->no_seqpacket_why;
}

int vsock_datagrams(void)
{
	return !!(caps & VSOCK_CAP_DGRAM);
}

unsigned vsock_pairs(void)
{
	return npairs;
}

unsigned vsock_pair_of(uint32_t port_a, uint32_t port_b)
{
	return (port_a ^ port_b) % npairs;
}

/* Connections of this type can exist in this mode. */
static int type_ok(uint32_t type)
{
	return (type == VSOCK_TYPE_STREAM && caps & VSOCK_CAP_STREAM) ||
		(type == VSOCK_TYPE_SEQPACKET && caps & VSOCK_CAP_SEQPACKET);
}

/* --- buffers --------------------------------------------------------------- */

static void post_rx(unsigned pair, struct rx_buf *b)
{
	struct virtq_buf vb = { b, sizeof(*b) };

	virtq_add(&rxqs[pair], &vb, 0, 1, b);   /* rx_per_pair <= queue size */
}

static void post_event(uint32_t *e)
{
	struct virtq_buf vb = { e, sizeof(*e) };

	virtq_add(&evq, &vb, 0, 1, e);
}

static unsigned reap_tx(void)
{
	unsigned n = 0;
	uint32_t len;
	void *t;

	for (unsigned i = 0; i < npairs; i++) {
		while ((t = virtq_get_used(&txqs[i], &len))) {
			tx_free[tx_nfree++] = t;
			n++;
		}
	}
	return n;
}

int vsock_tx_idle(void)
{
	reap_tx();
	return tx_nfree == TX_SLOTS;
}

void vsock_flush(void)
{
	for (unsigned i = 0; i < npairs; i++)
		virtq_kick(&txqs[i]);
}

static int tx_any_used(void)
{
	for (unsigned i = 0; i < npairs; i++)
		if (virtq_has_used(&txqs[i]))
			return 1;
	return 0;
}

void vsock_tx_wait(void)
{
	reap_tx();
	if (tx_nfree)
		return;
	vsock_flush();
	uint64_t start = rdtsc();

	while (!tx_any_used()) {
		if (rdtsc() - start > idle_ticks) {
			say("vsock: timeout: the device returned no tx buffer in %lu ticks",
			    (unsigned long)idle_ticks);
			guest_exit(1);
		}
		cpu_relax();
	}
	reap_tx();
}

/* A free tx slot; if `wait`, wait (bounded) for the device to return one. */
static struct tx_slot *tx_get(int wait)
{
	reap_tx();
	if (!tx_nfree && wait)
		vsock_tx_wait();
	return tx_nfree ? tx_free[--tx_nfree] : NULL;
}

/* Queue slot s with `len` payload bytes on pair's tx queue: header
 * descriptor, then payload. */
static void tx_submit(struct tx_slot *s, uint32_t len, unsigned pair)
{
	struct virtq_buf b[2] = { { s->hdr, proto->hdr_size }, { s->payload, len } };

	virtq_add(&txqs[pair], b, len ? 2 : 1, 0, s);  /* 2 * TX_SLOTS <= queue size */
	vsock_stats.tx_packets++;
}

/* The header of a packet on connection c; it carries our credit. */
static void fill_hdr(struct tx_slot *s, struct vsock_conn *c, uint32_t op,
		     uint32_t flags, uint32_t len)
{
	struct vsock_pkt p = {
		.src_cid = guest_cid,   /* §5.10.6.4.1: MUST be guest_cid */
		.dst_cid = c->peer_cid,
		.src_port = c->local_port,
		.dst_port = c->peer_port,
		.len = len,
		.type = c->type,
		.op = op,
		.flags = flags,
		.buf_alloc = c->buf_alloc,
		.fwd_cnt = c->fwd_cnt,
	};

	proto->encode(s->hdr, &p);
	c->fwd_cnt_sent = c->fwd_cnt;
}

static void send_ctrl(struct vsock_conn *c, uint32_t op, uint32_t flags)
{
	struct tx_slot *s = tx_get(1);

	fill_hdr(s, c, op, flags, 0);
	tx_submit(s, 0, c->pair);
	if (op == VSOCK_OP_RST)
		vsock_stats.rst_sent++;
	else if (op == VSOCK_OP_CREDIT_UPDATE)
		vsock_stats.credit_updates_sent++;
	else if (op == VSOCK_OP_CREDIT_REQUEST)
		vsock_stats.credit_requests_sent++;
}

/* RST in answer to a packet that belongs to no connection (§5.10.6.5: no
 * listener; §5.10.6.4.1: unknown type), on the packet's own pair.  Never
 * an RST for an RST. */
static void send_rst_reply(const struct vsock_pkt *in)
{
	if (in->op == VSOCK_OP_RST)
		return;
	struct tx_slot *s = tx_get(1);
	struct vsock_pkt p = {
		.src_cid = guest_cid,
		.dst_cid = in->src_cid,
		.src_port = in->dst_port,
		.dst_port = in->src_port,
		.type = in->type,
		.op = VSOCK_OP_RST,
	};

	proto->encode(s->hdr, &p);
	tx_submit(s, 0, vsock_pair_of(in->dst_port, in->src_port));
	vsock_stats.rst_sent++;
}

/* --- connections ---------------------------------------------------------- */

static struct vsock_conn *find_conn(const struct vsock_pkt *h)
{
	for (unsigned i = 0; i < VSOCK_MAX_CONNS; i++) {
		struct vsock_conn *c = &vsock_conns[i];

		if (c->state != VSOCK_FREE && c->local_port == h->dst_port &&
		    c->peer_port == h->src_port && c->peer_cid == h->src_cid)
			return c;
	}
	return NULL;
}

static struct vsock_conn *alloc_conn(void)
{
	for (unsigned i = 0; i < VSOCK_MAX_CONNS; i++) {
		struct vsock_conn *c = &vsock_conns[i];

		if (c->state == VSOCK_FREE) {
			memset(c, 0, sizeof(*c));
			c->buf_alloc = VSOCK_DEFAULT_BUF_ALLOC;
			return c;
		}
	}
	return NULL;
}

void vsock_release(struct vsock_conn *c)
{
	c->state = VSOCK_FREE;
}

/* End c abnormally: an RST to the peer (unless it just sent one) and
 * CLOSED with the reason kept for the scenario's failure line. */
static void conn_abort(struct vsock_conn *c, const char *why, int send_rst)
{
	if (send_rst)
		send_ctrl(c, VSOCK_OP_RST, 0);
	c->state = VSOCK_CLOSED;
	c->reset = 1;
	c->why = why;
}

/* We send handshake op k: connected if it is the last, else the peer's
 * k+1 comes next. */
static void hs_send(struct vsock_conn *c, unsigned k)
{
	send_ctrl(c, proto->handshake[k], 0);
	if (k + 1 == proto->handshake_len)
		c->state = VSOCK_ESTABLISHED;
	else
		c->hs_next = k + 1;
}

/* A packet for c while the handshake runs (CONNECTING or ACCEPTING). */
static void handshake_step(struct vsock_conn *c, const struct vsock_pkt *h)
{
	if (h->op == proto->handshake[c->hs_next]) {
		if (c->hs_next + 1 == proto->handshake_len)
			c->state = VSOCK_ESTABLISHED;   /* the peer sent the last */
		else
			hs_send(c, c->hs_next + 1);
	} else if (h->op == VSOCK_OP_RST) {
		conn_abort(c, c->state == VSOCK_CONNECTING ? "connection refused (RST)" :
			   "reset by peer (RST)", 0);
	} else {
		conn_abort(c, "unexpected packet while connecting", 1);
	}
}

void vsock_close(struct vsock_conn *c)
{
	if (c->state == VSOCK_CONNECTING || c->state == VSOCK_ACCEPTING) {
		conn_abort(c, "closed while connecting", 1);
	} else if (c->state == VSOCK_ESTABLISHED) {
		if (c->peer_shutdown == VIRTIO_VSOCK_SHUTDOWN_BOTH) {
			/* The peer already said it will neither send nor
			 * receive: we are the side that answers with RST. */
			send_ctrl(c, VSOCK_OP_RST, 0);
			c->state = VSOCK_CLOSED;
		} else {
			send_ctrl(c, VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_BOTH);
			c->shutdown_sent = VIRTIO_VSOCK_SHUTDOWN_BOTH;
			c->state = VSOCK_CLOSING;
			c->close_deadline = rdtsc() + proto->close_tsc;
		}
	}
}

void vsock_consume(struct vsock_conn *c, uint32_t n)
{
	c->ring_head = (c->ring_head + n) % c->ring_size;
	c->ring_len -= n;
	c->fwd_cnt += n;                /* §5.10.6.3: bytes consumed */
}

/* What the peer lets us send now: peer_buf_alloc - (tx_cnt - peer_fwd_cnt),
 * the difference taken at the wire's width (wrapping u32 in the standard,
 * §5.10.6.3); 0 if the peer shrank its buffer below what is in flight. */
static uint64_t peer_free(const struct vsock_conn *c)
{
	uint64_t in_flight = (c->tx_cnt - c->peer_fwd_cnt) & proto->cnt_mask;

	return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

int vsock_send(struct vsock_conn *c, const void *data, uint32_t len,
	       uint32_t end_flags, uint32_t *queued)
{
	*queued = 0;
	if (c->state != VSOCK_ESTABLISHED || c->shutdown_sent & VIRTIO_VSOCK_SHUTDOWN_F_SEND ||
	    c->peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE)
		return 0;
	for (;;) {
		uint32_t remaining = len - *queued;

		if (remaining == 0 && (*queued || !end_flags))
			return 1;
		uint32_t n = remaining;
		uint64_t credit = peer_free(c);

		if (n > credit)
			n = (uint32_t)credit;
		if (n > VSOCK_TX_PAYLOAD)
			n = VSOCK_TX_PAYLOAD;
		if (remaining && !n) {
			/* §5.10.6.3.1: "RW data packets MUST only be transmitted
			 * when the peer has sufficient free buffer space". */
			if (!c->stalled_since)
				c->stalled_since = rdtsc();
			return 0;
		}
		struct tx_slot *s = tx_get(0);

		if (!s)
			return 0;
		c->stalled_since = 0;
		memcpy(s->payload, (const uint8_t *)data + *queued, n);
		fill_hdr(s, c, VSOCK_OP_RW, n == remaining ? end_flags : 0, n);
		tx_submit(s, n, c->pair);
		c->tx_cnt += n;
		c->tx_bytes += n;
		*queued += n;
		if (n == remaining)
			return 1;
	}
}

/* --- receiving ------------------------------------------------------------- */

/* An RW payload for c (ESTABLISHED or CLOSING). */
static void receive(struct vsock_conn *c, const struct vsock_pkt *h,
		    const uint8_t *data)
{
	uint32_t len = h->len;

	/* The peer may have at most buf_alloc bytes beyond the fwd_cnt it
	 * was last told; it can only have seen an older (smaller) one, so
	 * this never blames an honest peer. */
	if (c->rx_cnt + len - c->fwd_cnt_sent > c->buf_alloc) {
		vsock_stats.credit_violations++;
		if (!said_violation++)
			say("vsock: credit violation: port %u sent %u bytes with %lu "
			    "outstanding against buf_alloc %lu", c->peer_port, len,
			    (unsigned long)(c->rx_cnt - c->fwd_cnt_sent),
			    (unsigned long)c->buf_alloc);
		if (proto->credit_violation_rst) {
			conn_abort(c, "peer exceeded its credit", 1);
			return;
		}
	}
	c->rx_cnt += len;
	c->rx_bytes += len;
	if (c->state == VSOCK_CLOSING || c->shutdown_sent & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE) {
		c->fwd_cnt += len;      /* we said we would receive no more */
		vsock_stats.dropped++;
		return;
	}
	if (c->on_data) {
		c->on_data(c, data, len, h->flags);
		c->fwd_cnt += len;
		return;
	}
	if (len > c->ring_size - c->ring_len) {
		conn_abort(c, "peer overran the receive buffer", 1);
		return;
	}
	uint32_t tail = (c->ring_head + c->ring_len) % c->ring_size;
	uint32_t first = c->ring_size - tail < len ? c->ring_size - tail : len;

	memcpy(c->ring + tail, data, first);
	memcpy(c->ring, data + first, len - first);
	c->ring_len += len;
	if (c->type == VSOCK_TYPE_SEQPACKET &&
	    h->flags & (VIRTIO_VSOCK_SEQ_EOM | VIRTIO_VSOCK_SEQ_EOR)) {
		if (c->bound_count == VSOCK_MAX_BOUNDARIES) {
			conn_abort(c, "too many messages buffered", 1);
			return;
		}
		unsigned i = (c->bound_head + c->bound_count++) % VSOCK_MAX_BOUNDARIES;

		c->bound_pos[i] = c->rx_cnt;
		c->bound_flags[i] = h->flags & (VIRTIO_VSOCK_SEQ_EOM | VIRTIO_VSOCK_SEQ_EOR);
	}
}

/* A REQUEST to our listening port: a new connection (§5.10.6.5), which
 * answers with the handshake's second op. */
static void accept_request(const struct vsock_pkt *h)
{
	struct vsock_conn *c = alloc_conn();

	if (!c) {               /* "insufficient resources": RST */
		send_rst_reply(h);
		return;
	}
	c->type = (uint16_t)h->type;
	c->peer_cid = h->src_cid;
	c->peer_port = h->src_port;
	c->local_port = h->dst_port;
	c->pair = vsock_pair_of(c->local_port, c->peer_port);
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
	if (listen_accept && listen_accept(c)) {
		c->state = VSOCK_FREE;
		send_rst_reply(h);
		return;
	}
	c->state = VSOCK_ACCEPTING;
	if (proto->handshake_tsc)
		c->hs_deadline = rdtsc() + proto->handshake_tsc;
	hs_send(c, 1);
}

/* A datagram: to its port's handler, or dropped (and counted). */
static void handle_dgram(const struct vsock_pkt *h, const uint8_t *payload)
{
	for (unsigned i = 0; i < VSOCK_MAX_DGRAM_PORTS && h->op == VSOCK_OP_RW; i++) {
		if (dgram_ports[i].fn && dgram_ports[i].port == h->dst_port) {
			vsock_stats.dgram_rx++;
			dgram_ports[i].fn(h, payload, h->len);
			return;
		}
	}
	vsock_stats.dgram_dropped++;
}

/* A packet that arrived on another pair than its ports give it: what the
 * device does with one of ours - RST on the right pair for a stream packet,
 * resetting its connection; a datagram is dropped. */
static void wrong_pair(const struct vsock_pkt *h)
{
	vsock_stats.wrong_pair++;
	if (!said_wrong_pair++)
		say("vsock: a packet for ports %u -> %u arrived on queue pair %u, not %u",
		    h->src_port, h->dst_port, h->pair, vsock_pair_of(h->src_port, h->dst_port));
	if (h->type == VSOCK_TYPE_DGRAM) {
		vsock_stats.dgram_dropped++;
		return;
	}
	struct vsock_conn *c = find_conn(h);

	if (c && c->state != VSOCK_CLOSED)
		conn_abort(c, "packet on the wrong queue pair", h->op != VSOCK_OP_RST);
	else
		send_rst_reply(h);
}

static void handle_packet(const struct vsock_pkt *h, const uint8_t *payload)
{
	vsock_stats.rx_packets++;
	if (h->dst_cid != guest_cid) {
		vsock_stats.dropped++;
		return;
	}
	if (h->pair != vsock_pair_of(h->src_port, h->dst_port)) {
		wrong_pair(h);
		return;
	}
	if (h->type == VSOCK_TYPE_DGRAM && caps & VSOCK_CAP_DGRAM) {
		handle_dgram(h, payload);
		return;
	}
	/* §5.10.6.4.1: "A VIRTIO_VSOCK_OP_RST reply MUST be sent if a packet
	 * is received with an unknown type value."  SEQPACKET is unknown
	 * unless negotiated (§5.10.3), STREAM if NO_IMPLIED_STREAM without
	 * F_STREAM was. */
	if (!type_ok(h->type)) {
		send_rst_reply(h);
		return;
	}
	struct vsock_conn *c = find_conn(h);

	if (!c || c->state == VSOCK_CLOSED) {
		if (!c && h->op == proto->handshake[0] && listen_port &&
		    h->dst_port == listen_port)
			accept_request(h);
		else
			send_rst_reply(h);
		return;
	}
	if (h->type != c->type) {
		conn_abort(c, "packet of the wrong type", 1);
		return;
	}
	/* §5.10.6.3.1: every packet of a flow carries valid credit. */
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;

	if (c->state == VSOCK_CONNECTING || c->state == VSOCK_ACCEPTING) {
		handshake_step(c, h);
		return;
	}
	switch (h->op) {
	case VSOCK_OP_RW:
		receive(c, h, payload);
		break;
	case VSOCK_OP_CREDIT_UPDATE:
		break;                  /* the credit was taken above */
	case VSOCK_OP_CREDIT_REQUEST:   /* (only the standard's wire has it) */
		if (c->state == VSOCK_ESTABLISHED)
			send_ctrl(c, VSOCK_OP_CREDIT_UPDATE, 0);
		break;
	case VSOCK_OP_SHUTDOWN:
		c->peer_shutdown |= h->flags & VIRTIO_VSOCK_SHUTDOWN_BOTH;
		if (c->state == VSOCK_CLOSING &&
		    c->peer_shutdown == VIRTIO_VSOCK_SHUTDOWN_BOTH) {
			/* Both sides have shut down: end it with an RST. */
			send_ctrl(c, VSOCK_OP_RST, 0);
			c->state = VSOCK_CLOSED;
		}
		break;
	case VSOCK_OP_RST:
		if (c->state == VSOCK_CLOSING)
			c->state = VSOCK_CLOSED;        /* the clean end */
		else
			conn_abort(c, "reset by peer (RST)", 0);
		break;
	default:                        /* a handshake op, INVALID, unknown */
		conn_abort(c, "unexpected op on a connection", 1);
		break;
	}
}

/* §5.10.6.7: TRANSPORT_RESET - re-read guest_cid, drop every connection,
 * keep listening. */
static void handle_event(uint32_t id)
{
	if (id != VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
		return;
	guest_cid = proto->config_cid(dev);
	vsock_stats.transport_resets++;
	for (unsigned i = 0; i < VSOCK_MAX_CONNS; i++) {
		struct vsock_conn *c = &vsock_conns[i];

		if (c->state != VSOCK_FREE && c->state != VSOCK_CLOSED)
			conn_abort(c, "transport reset", 0);
	}
	say("vsock transport reset, cid %lu", (unsigned long)guest_cid);
}

/* Per-connection timers and credit (see the top of this file). */
static void housekeeping(void)
{
	uint64_t now = rdtsc();

	for (unsigned i = 0; i < VSOCK_MAX_CONNS; i++) {
		struct vsock_conn *c = &vsock_conns[i];

		if (c->state == VSOCK_CLOSING && (int64_t)(now - c->close_deadline) > 0) {
			send_ctrl(c, VSOCK_OP_RST, 0);
			c->state = VSOCK_CLOSED;
			vsock_stats.close_timeouts++;
		}
		if ((c->state == VSOCK_CONNECTING || c->state == VSOCK_ACCEPTING) &&
		    c->hs_deadline && (int64_t)(now - c->hs_deadline) > 0) {
			vsock_stats.handshake_timeouts++;
			conn_abort(c, proto->handshake_timeout_why, 1);
		}
		if (c->state != VSOCK_ESTABLISHED)
			continue;
		if (proto->credit_due(c))
			send_ctrl(c, VSOCK_OP_CREDIT_UPDATE, 0);
		if (proto->credit_request && c->stalled_since &&
		    now - c->stalled_since > CREDIT_REQUEST_TSC) {
			send_ctrl(c, VSOCK_OP_CREDIT_REQUEST, 0);
			c->stalled_since = now;
		}
	}
}

/* One used rx buffer b of pair i, `len` bytes written by the device. */
static void rx_one(unsigned i, struct rx_buf *b, uint32_t len)
{
	struct vsock_pkt p;
	const uint8_t *payload = b->bytes + proto->hdr_size;

	proto->decode(&p, b->bytes);
	p.pair = i;
	/* The device writes header + len bytes (used.len, §2.7.8). */
	if (len < proto->hdr_size || len > sizeof(*b) || p.len > len - proto->hdr_size) {
		vsock_stats.dropped++;
		if (!said_bad_rx++)
			say("vsock: dropped an rx packet: used len %u, header len %u", len, p.len);
	} else if (!vsock_rx_hook || !vsock_rx_hook(&p, payload)) {
		handle_packet(&p, payload);
	}
}

unsigned vsock_poll(void)
{
	unsigned n = reap_tx();
	struct rx_buf *b;
	uint32_t *e;
	uint32_t len;

	for (unsigned i = 0; i < npairs; i++) {
		while ((b = virtq_get_used(&rxqs[i], &len))) {
			n++;
			rx_one(i, b, len);
			post_rx(i, b);
		}
	}
	while (evq_on && (e = virtq_get_used(&evq, &len))) {
		n++;
		if (len >= sizeof(*e))
			handle_event(*e);
		post_event(e);
	}
	housekeeping();
	for (unsigned i = 0; i < npairs; i++)
		virtq_kick(&rxqs[i]);
	if (evq_on)
		virtq_kick(&evq);
	vsock_flush();
	return n;
}

/* --- set-up ---------------------------------------------------------------- */

void vsock_open(const struct args *a, uint64_t idle)
{
	static const uint32_t ids[] = { VIRTIO_ID_VSOCK, VIRTIO_ID_VSOCK_DRAFT };
	int index;

	idle_ticks = idle;
	dev = virtio_mmio_find_any(a, ids, 2, &index);
	if (!dev)
		guest_exit(1);
	proto = dev->device_id == VIRTIO_ID_VSOCK_DRAFT ? &vsock_proto_draft :
		&vsock_proto_standard;
	/* A (re)start is a device reset (§2.4.1): every connection is gone. */
	for (unsigned i = 0; i < VSOCK_MAX_CONNS; i++)
		if (vsock_conns[i].state != VSOCK_FREE && vsock_conns[i].state != VSOCK_CLOSED)
			conn_abort(&vsock_conns[i], "device reset", 0);
	if (virtio_mmio_begin(dev, (proto->features | vsock_extra_features) & vsock_feature_mask))
		guest_exit(1);

	/* The queue pairs: all the device has (up to MAX_PAIRS), or fewer if
	 * the command line says vsock-pairs=K. */
	device_pairs = proto->config_pairs(dev);
	if (device_pairs == 0) {
		say("vsock: max_virtqueue_pairs 0 in config");
		virtio_mmio_fail(dev);
		guest_exit(1);
	}
	uint64_t want = device_pairs;

	arg_u64(a, "vsock-pairs", &want, 1, device_pairs);
	npairs = want < MAX_PAIRS ? (unsigned)want : MAX_PAIRS;
	rx_per_pair = RX_POOL / npairs < RX_BUFS ? RX_POOL / npairs : RX_BUFS;

	unsigned too_small = npairs;

	for (unsigned i = 0; i < npairs; i++) {
		if (virtio_mmio_setup_queue(dev, &rxqs[i], proto->rx_base + 2 * i, RX_QUEUE_SIZE) ||
		    virtio_mmio_setup_queue(dev, &txqs[i], proto->tx_base + 2 * i, TX_QUEUE_SIZE))
			guest_exit(1);
		if (too_small == npairs &&
		    (rxqs[i].size < rx_per_pair || txqs[i].size < 2 * TX_SLOTS))
			too_small = i;
	}
	evq_on = proto->event_queue >= 0;
	if (evq_on && virtio_mmio_setup_queue(dev, &evq, (unsigned)proto->event_queue,
					      EVENT_QUEUE_SIZE))
		guest_exit(1);
	if (too_small < npairs || (evq_on && evq.size < EVENT_BUFS)) {
		unsigned i = too_small < npairs ? too_small : 0;

		say("vsock: queues too small (rx %u, tx %u, event %u)",
		    rxqs[i].size, txqs[i].size, evq_on ? evq.size : 0);
		virtio_mmio_fail(dev);
		guest_exit(1);
	}
	caps = proto->caps(dev->features);
	/* §5.10.5 step 1: the cid, from the device's config. */
	guest_cid = proto->config_cid(dev);
	if (guest_cid <= VSOCK_HOST_CID || guest_cid >= 0xffffffffull) {
		say("vsock: reserved guest_cid %lu in config", (unsigned long)guest_cid);
		virtio_mmio_fail(dev);
		guest_exit(1);
	}
	if (vsock_queues_hook)
		vsock_queues_hook();
	if (virtio_mmio_driver_ok(dev))
		guest_exit(1);
	if (vsock_open_hook)
		vsock_open_hook();
	/* §5.10.5 steps 2-3: event buffers, then rx buffers. */
	for (unsigned i = 0; evq_on && i < EVENT_BUFS; i++)
		post_event(&event_bufs[i]);
	for (unsigned i = 0; i < npairs; i++)
		for (unsigned k = 0; k < rx_per_pair; k++)
			post_rx(i, &rx_bufs[i * rx_per_pair + k]);
	if (evq_on)
		virtq_kick(&evq);
	for (unsigned i = 0; i < npairs; i++)
		virtq_kick(&rxqs[i]);
	for (unsigned i = 0; i < TX_SLOTS; i++)
		tx_free[i] = &tx_slots[i];
	tx_nfree = TX_SLOTS;
	if (proto->announce)
		proto->announce(index, guest_cid, npairs, device_pairs);
	say("vsock cid %lu features 0x%lx at 0x%lx", (unsigned long)guest_cid,
	    (unsigned long)dev->features, (unsigned long)dev->base);
}

void vsock_listen(uint32_t port, vsock_accept_fn accept)
{
	listen_port = port;
	listen_accept = accept;
}

struct vsock_conn *vsock_connect(uint64_t cid, uint32_t port, uint16_t type,
				 vsock_accept_fn c_init)
{
	if (!type_ok(type)) {
		say("vsock connect: type %u: %s", type, type == VSOCK_TYPE_SEQPACKET ?
		    proto->no_seqpacket_why : "not a socket type of this device");
		return NULL;
	}
	struct vsock_conn *c = alloc_conn();

	if (!c) {
		say("vsock connect: no free connection slot");
		return NULL;
	}
	c->type = type;
	c->peer_cid = cid;
	c->peer_port = port;
	c->local_port = next_local_port++;
	c->pair = vsock_pair_of(c->local_port, c->peer_port);
	if (c_init && c_init(c)) {
		c->state = VSOCK_FREE;
		return NULL;
	}
	c->state = VSOCK_CONNECTING;
	if (proto->handshake_tsc)
		c->hs_deadline = rdtsc() + proto->handshake_tsc;
	hs_send(c, 0);
	vsock_flush();

	uint64_t last = rdtsc();

	while (c->state == VSOCK_CONNECTING) {
		if (vsock_poll()) {
			last = rdtsc();
		} else if (rdtsc() - last > idle_ticks) {
			conn_abort(c, proto->handshake_timeout_why, 1);
			vsock_flush();
		} else {
			cpu_relax();
		}
	}
	if (c->state == VSOCK_ESTABLISHED)
		return c;
	say("vsock connect to %lu:%u failed: %s", (unsigned long)cid, port,
	    c->why ? c->why : "closed");
	vsock_release(c);
	return NULL;
}

/* --- datagrams ------------------------------------------------------------- */

int vsock_dgram_bind(uint32_t port, vsock_dgram_fn fn)
{
	unsigned i, free_i = VSOCK_MAX_DGRAM_PORTS;

	if (!(caps & VSOCK_CAP_DGRAM) || !fn)
		return -1;
	for (i = 0; i < VSOCK_MAX_DGRAM_PORTS; i++) {
		if (dgram_ports[i].fn && dgram_ports[i].port == port)
			break;
		if (!dgram_ports[i].fn && free_i == VSOCK_MAX_DGRAM_PORTS)
			free_i = i;
	}
	if (i == VSOCK_MAX_DGRAM_PORTS)
		i = free_i;
	if (i == VSOCK_MAX_DGRAM_PORTS)
		return -1;
	dgram_ports[i].port = port;
	dgram_ports[i].fn = fn;
	return 0;
}

void vsock_dgram_unbind(uint32_t port)
{
	for (unsigned i = 0; i < VSOCK_MAX_DGRAM_PORTS; i++)
		if (dgram_ports[i].fn && dgram_ports[i].port == port)
			dgram_ports[i].fn = NULL;
}

int vsock_dgram_send(uint64_t dst_cid, uint32_t src_port, uint32_t dst_port,
		     const void *data, uint32_t len)
{
	if (!(caps & VSOCK_CAP_DGRAM) || len > VSOCK_DGRAM_MAX)
		return -1;
	struct tx_slot *s = tx_get(0);

	if (!s)
		return 0;
	/* No connection, no credit (fwd_cnt = buf_alloc = 0), no shut. */
	struct vsock_pkt p = {
		.src_cid = guest_cid,
		.dst_cid = dst_cid,
		.src_port = src_port,
		.dst_port = dst_port,
		.len = len,
		.type = VSOCK_TYPE_DGRAM,
		.op = VSOCK_OP_RW,
	};

	memcpy(s->payload, data, len);
	proto->encode(s->hdr, &p);
	tx_submit(s, len, vsock_pair_of(src_port, dst_port));
	vsock_stats.dgram_tx++;
	return 1;
}

void vsock_say_stats(void)
{
	const struct vsock_stats *s = &vsock_stats;
	uint64_t rx_n = 0, rx_s = 0, tx_n = 0, tx_s = 0;

	for (unsigned i = 0; i < npairs; i++) {
		rx_n += rxqs[i].notifies;
		rx_s += rxqs[i].notifies_suppressed;
		tx_n += txqs[i].notifies;
		tx_s += txqs[i].notifies_suppressed;
	}
	say("vsock stats rx %lu tx %lu rst_sent %lu credit_updates %lu "
	    "credit_requests %lu dropped %lu credit_violations %lu close_timeouts %lu",
	    (unsigned long)s->rx_packets, (unsigned long)s->tx_packets,
	    (unsigned long)s->rst_sent, (unsigned long)s->credit_updates_sent,
	    (unsigned long)s->credit_requests_sent, (unsigned long)s->dropped,
	    (unsigned long)s->credit_violations, (unsigned long)s->close_timeouts);
	say("vsock notifies rx %lu/%lu tx %lu/%lu (sent/suppressed)",
	    (unsigned long)rx_n, (unsigned long)rx_s, (unsigned long)tx_n, (unsigned long)tx_s);
	if (proto->say_stats)
		proto->say_stats(s, npairs);
}
