/*
 * vsock.c - a polled driver for the virtio socket device (virtio 1.2
 * §5.10, device ID 19) and the connection protocol it carries, written
 * against the spec (quoted by section below).  The API is in vsock.h.
 *
 * Buffers.  rx: RX_BUFS buffers of one descriptor each, header plus
 * VSOCK_RX_PAYLOAD bytes (the layout Linux uses since 6.2; §5.10.6 lets the
 * driver provide more space than len needs).  tx: TX_SLOTS slots of header
 * plus VSOCK_TX_PAYLOAD bytes, sent as a chain of two descriptors (header,
 * payload) when there is payload, one descriptor otherwise - the layout of
 * Linux's driver.  event: EVENT_BUFS buffers of 4 bytes (§5.10.6.7).
 *
 * Credit (§5.10.6.3 "Buffer Space Management").  Every packet we send
 * carries our buf_alloc and fwd_cnt.  RW goes out only within
 * peer_buf_alloc - (tx_cnt - peer_fwd_cnt).  We send CREDIT_UPDATE when the
 * peer's view of our free space (buf_alloc - (rx_cnt - fwd_cnt_sent)) drops
 * below half of buf_alloc and we have consumed more since we last told it,
 * so a peer that only sends is never left waiting; we answer every
 * CREDIT_REQUEST; and if we have been unable to send for lack of credit for
 * CREDIT_REQUEST_TSC we ask with CREDIT_REQUEST.  An RW beyond the credit
 * we gave is counted (and reported once): it is a peer bug.
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

#define RX_QUEUE_SIZE           128
#define TX_QUEUE_SIZE           64
#define EVENT_QUEUE_SIZE        8
#define RX_BUFS                 64
#define TX_SLOTS                16      /* 2 descriptors each: <= TX_QUEUE_SIZE */
#define EVENT_BUFS              8       /* as Linux */

/* After our SHUTDOWN(both), how long we wait for the peer's RST before
 * sending one ourselves (§5.10.6.5: "an implementation-specific amount of
 * time"): 2^33 ticks, ~3.3 s at 2.6 GHz (Linux: 8 s). */
#define CLOSE_TIMEOUT_TSC       (1ull << 33)
/* Unable to send for lack of credit this long: CREDIT_REQUEST (~0.4 s). */
#define CREDIT_REQUEST_TSC      (1ull << 30)
#define FIRST_LOCAL_PORT        49152

struct __attribute__((packed, aligned(8))) rx_buf {
	struct virtio_vsock_hdr hdr;
	uint8_t payload[VSOCK_RX_PAYLOAD];
};

struct __attribute__((packed, aligned(8))) tx_slot {
	struct virtio_vsock_hdr hdr;
	uint8_t payload[VSOCK_TX_PAYLOAD];
};

static struct virtio_mmio_dev *dev;
static struct virtq rxq, txq, evq;
static struct rx_buf rx_bufs[RX_BUFS];
static struct tx_slot tx_slots[TX_SLOTS];
static struct tx_slot *tx_free[TX_SLOTS];
static unsigned tx_nfree;
static uint32_t event_bufs[EVENT_BUFS];
static uint64_t guest_cid;
static uint64_t idle_ticks;
static int seqpacket_ok, stream_ok;
static uint32_t listen_port;
static vsock_accept_fn listen_accept;
static uint32_t next_local_port = FIRST_LOCAL_PORT;
static int said_bad_rx, said_violation;

struct vsock_conn vsock_conns[VSOCK_MAX_CONNS];
struct vsock_stats vsock_stats;

int (*vsock_rx_hook)(const struct virtio_vsock_hdr *h, const uint8_t *payload);
void (*vsock_open_hook)(void);
uint64_t vsock_feature_mask = ~0ull;

struct virtio_mmio_dev *vsock_device(void)
{
	return dev;
}

struct virtq *vsock_queue(unsigned index)
{
	return index == VSOCK_RX_QUEUE ? &rxq : index == VSOCK_TX_QUEUE ? &txq : &evq;
}

uint64_t vsock_guest_cid(void)
{
	return guest_cid;
}

int vsock_seqpacket(void)
{
	return seqpacket_ok;
}

/* --- buffers --------------------------------------------------------------- */

static void post_rx(struct rx_buf *b)
{
	struct virtq_buf vb = { b, sizeof(*b) };

	virtq_add(&rxq, &vb, 0, 1, b);          /* RX_BUFS <= queue size */
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

	while ((t = virtq_get_used(&txq, &len))) {
		tx_free[tx_nfree++] = t;
		n++;
	}
	return n;
}

int vsock_tx_idle(void)
{
	reap_tx();
	return tx_nfree == TX_SLOTS;
}

/* A free tx slot; if `wait`, wait (bounded) for the device to return one. */
static struct tx_slot *tx_get(int wait)
{
	reap_tx();
	if (!tx_nfree && wait) {
		virtq_kick(&txq);
		if (virtq_wait_used(&txq, idle_ticks)) {
			say("vsock: timeout: the device returned no tx buffer in %lu ticks",
			    (unsigned long)idle_ticks);
			guest_exit(1);
		}
		reap_tx();
	}
	return tx_nfree ? tx_free[--tx_nfree] : NULL;
}

/* Queue slot s with `len` payload bytes: header descriptor, then payload. */
static void tx_submit(struct tx_slot *s, uint32_t len)
{
	struct virtq_buf b[2] = { { &s->hdr, sizeof(s->hdr) }, { s->payload, len } };

	virtq_add(&txq, b, len ? 2 : 1, 0, s);  /* 2 * TX_SLOTS <= queue size */
	vsock_stats.tx_packets++;
}

/* The header of a packet on connection c; it carries our credit. */
static void fill_hdr(struct virtio_vsock_hdr *h, struct vsock_conn *c,
		     uint16_t op, uint32_t flags, uint32_t len)
{
	h->src_cid = guest_cid;         /* §5.10.6.4.1: MUST be guest_cid */
	h->dst_cid = c->peer_cid;
	h->src_port = c->local_port;
	h->dst_port = c->peer_port;
	h->len = len;
	h->type = c->type;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = c->buf_alloc;
	h->fwd_cnt = c->fwd_cnt;
	c->fwd_cnt_sent = c->fwd_cnt;
}

static void send_ctrl(struct vsock_conn *c, uint16_t op, uint32_t flags)
{
	struct tx_slot *s = tx_get(1);

	fill_hdr(&s->hdr, c, op, flags, 0);
	tx_submit(s, 0);
	if (op == VIRTIO_VSOCK_OP_RST)
		vsock_stats.rst_sent++;
	else if (op == VIRTIO_VSOCK_OP_CREDIT_UPDATE)
		vsock_stats.credit_updates_sent++;
	else if (op == VIRTIO_VSOCK_OP_CREDIT_REQUEST)
		vsock_stats.credit_requests_sent++;
}

/* RST in answer to a packet that belongs to no connection (§5.10.6.5: no
 * listener; §5.10.6.4.1: unknown type).  Never an RST for an RST. */
static void send_rst_reply(const struct virtio_vsock_hdr *in)
{
	if (in->op == VIRTIO_VSOCK_OP_RST)
		return;
	struct tx_slot *s = tx_get(1);
	struct virtio_vsock_hdr *h = &s->hdr;

	memset(h, 0, sizeof(*h));
	h->src_cid = guest_cid;
	h->dst_cid = in->src_cid;
	h->src_port = in->dst_port;
	h->dst_port = in->src_port;
	h->type = in->type;
	h->op = VIRTIO_VSOCK_OP_RST;
	tx_submit(s, 0);
	vsock_stats.rst_sent++;
}

void vsock_flush(void)
{
	virtq_kick(&txq);
}

/* --- connections ---------------------------------------------------------- */

static struct vsock_conn *find_conn(const struct virtio_vsock_hdr *h)
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
		send_ctrl(c, VIRTIO_VSOCK_OP_RST, 0);
	c->state = VSOCK_CLOSED;
	c->reset = 1;
	c->why = why;
}

void vsock_close(struct vsock_conn *c)
{
	if (c->state == VSOCK_CONNECTING) {
		conn_abort(c, "closed while connecting", 1);
	} else if (c->state == VSOCK_ESTABLISHED) {
		if (c->peer_shutdown == VIRTIO_VSOCK_SHUTDOWN_BOTH) {
			/* The peer already said it will neither send nor
			 * receive: we are the side that answers with RST. */
			send_ctrl(c, VIRTIO_VSOCK_OP_RST, 0);
			c->state = VSOCK_CLOSED;
		} else {
			send_ctrl(c, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_BOTH);
			c->shutdown_sent = VIRTIO_VSOCK_SHUTDOWN_BOTH;
			c->state = VSOCK_CLOSING;
			c->close_deadline = rdtsc() + CLOSE_TIMEOUT_TSC;
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
 * in wrapping u32 arithmetic as in §5.10.6.3; 0 if the peer shrank its
 * buffer below what is in flight. */
static uint32_t peer_free(const struct vsock_conn *c)
{
	uint32_t in_flight = c->tx_cnt - c->peer_fwd_cnt;

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
		uint32_t credit = peer_free(c);

		if (n > credit)
			n = credit;
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
		fill_hdr(&s->hdr, c, VIRTIO_VSOCK_OP_RW, n == remaining ? end_flags : 0, n);
		tx_submit(s, n);
		c->tx_cnt += n;
		c->tx_bytes += n;
		*queued += n;
		if (n == remaining)
			return 1;
	}
}

/* --- receiving ------------------------------------------------------------- */

/* An RW payload for c (ESTABLISHED or CLOSING). */
static void receive(struct vsock_conn *c, const struct virtio_vsock_hdr *h,
		    const uint8_t *data)
{
	uint32_t len = h->len;

	/* The peer may have at most buf_alloc bytes beyond the fwd_cnt it
	 * was last told; it can only have seen an older (smaller) one, so
	 * this never blames an honest peer. */
	if ((uint32_t)(c->rx_cnt + len - c->fwd_cnt_sent) > c->buf_alloc) {
		vsock_stats.credit_violations++;
		if (!said_violation++)
			say("vsock: credit violation: port %u sent %u bytes with %u "
			    "outstanding against buf_alloc %u", c->peer_port, len,
			    c->rx_cnt - c->fwd_cnt_sent, c->buf_alloc);
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
	if (c->type == VIRTIO_VSOCK_TYPE_SEQPACKET &&
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

/* A REQUEST to our listening port: a new connection (§5.10.6.5). */
static void accept_request(const struct virtio_vsock_hdr *h)
{
	struct vsock_conn *c = alloc_conn();

	if (!c) {               /* "insufficient resources": RST */
		send_rst_reply(h);
		return;
	}
	c->type = h->type;
	c->peer_cid = h->src_cid;
	c->peer_port = h->src_port;
	c->local_port = h->dst_port;
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
	if (listen_accept && listen_accept(c)) {
		c->state = VSOCK_FREE;
		send_rst_reply(h);
		return;
	}
	c->state = VSOCK_ESTABLISHED;
	send_ctrl(c, VIRTIO_VSOCK_OP_RESPONSE, 0);
}

static void handle_packet(const struct virtio_vsock_hdr *h, const uint8_t *payload)
{
	vsock_stats.rx_packets++;
	if (h->dst_cid != guest_cid) {
		vsock_stats.dropped++;
		return;
	}
	/* §5.10.6.4.1: "A VIRTIO_VSOCK_OP_RST reply MUST be sent if a packet
	 * is received with an unknown type value."  SEQPACKET is unknown
	 * unless negotiated (§5.10.3), STREAM if NO_IMPLIED_STREAM without
	 * F_STREAM was. */
	if (!(h->type == VIRTIO_VSOCK_TYPE_STREAM && stream_ok) &&
	    !(h->type == VIRTIO_VSOCK_TYPE_SEQPACKET && seqpacket_ok)) {
		send_rst_reply(h);
		return;
	}
	struct vsock_conn *c = find_conn(h);

	if (!c || c->state == VSOCK_CLOSED) {
		if (!c && h->op == VIRTIO_VSOCK_OP_REQUEST && listen_port &&
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

	if (c->state == VSOCK_CONNECTING) {
		if (h->op == VIRTIO_VSOCK_OP_RESPONSE)
			c->state = VSOCK_ESTABLISHED;
		else if (h->op == VIRTIO_VSOCK_OP_RST)
			conn_abort(c, "connection refused (RST)", 0);
		else
			conn_abort(c, "unexpected packet while connecting", 1);
		return;
	}
	switch (h->op) {
	case VIRTIO_VSOCK_OP_RW:
		receive(c, h, payload);
		break;
	case VIRTIO_VSOCK_OP_CREDIT_UPDATE:
		break;                  /* the credit was taken above */
	case VIRTIO_VSOCK_OP_CREDIT_REQUEST:
		if (c->state == VSOCK_ESTABLISHED)
			send_ctrl(c, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
		break;
	case VIRTIO_VSOCK_OP_SHUTDOWN:
		c->peer_shutdown |= h->flags & VIRTIO_VSOCK_SHUTDOWN_BOTH;
		if (c->state == VSOCK_CLOSING &&
		    c->peer_shutdown == VIRTIO_VSOCK_SHUTDOWN_BOTH) {
			/* Both sides have shut down: end it with an RST. */
			send_ctrl(c, VIRTIO_VSOCK_OP_RST, 0);
			c->state = VSOCK_CLOSED;
		}
		break;
	case VIRTIO_VSOCK_OP_RST:
		if (c->state == VSOCK_CLOSING)
			c->state = VSOCK_CLOSED;        /* the clean end */
		else
			conn_abort(c, "reset by peer (RST)", 0);
		break;
	default:                        /* REQUEST, RESPONSE, INVALID, unknown */
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
	guest_cid = virtio_mmio_config_read64(dev, 0);
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
			send_ctrl(c, VIRTIO_VSOCK_OP_RST, 0);
			c->state = VSOCK_CLOSED;
			vsock_stats.close_timeouts++;
		}
		if (c->state != VSOCK_ESTABLISHED)
			continue;
		uint32_t peer_view_free = c->buf_alloc - (c->rx_cnt - c->fwd_cnt_sent);

		if (c->fwd_cnt != c->fwd_cnt_sent && peer_view_free < c->buf_alloc / 2)
			send_ctrl(c, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0);
		if (c->stalled_since && now - c->stalled_since > CREDIT_REQUEST_TSC) {
			send_ctrl(c, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0);
			c->stalled_since = now;
		}
	}
}

unsigned vsock_poll(void)
{
	unsigned n = reap_tx();
	struct rx_buf *b;
	uint32_t *e;
	uint32_t len;

	while ((b = virtq_get_used(&rxq, &len))) {
		n++;
		/* The device writes header + len bytes (used.len, §2.7.8). */
		if (len < sizeof(b->hdr) || len > sizeof(*b) ||
		    b->hdr.len > len - sizeof(b->hdr)) {
			vsock_stats.dropped++;
			if (!said_bad_rx++)
				say("vsock: dropped an rx packet: used len %u, header len %u",
				    len, b->hdr.len);
		} else if (!vsock_rx_hook || !vsock_rx_hook(&b->hdr, b->payload)) {
			handle_packet(&b->hdr, b->payload);
		}
		post_rx(b);
	}
	while ((e = virtq_get_used(&evq, &len))) {
		n++;
		if (len >= sizeof(*e))
			handle_event(*e);
		post_event(e);
	}
	housekeeping();
	virtq_kick(&rxq);
	virtq_kick(&evq);
	virtq_kick(&txq);
	return n;
}

/* --- set-up ---------------------------------------------------------------- */

void vsock_open(const struct args *a, uint64_t idle)
{
	idle_ticks = idle;
	dev = virtio_mmio_find(a, VIRTIO_ID_VSOCK);
	if (!dev)
		guest_exit(1);
	/* §5.10.3.1: take SEQPACKET, and NO_IMPLIED_STREAM if offered ("SHOULD
	 * accept"), and STREAM (which then says stream is supported). */
	uint64_t wanted = VIRTIO_BIT(VIRTIO_F_EVENT_IDX) |
		VIRTIO_BIT(VIRTIO_VSOCK_F_STREAM) | VIRTIO_BIT(VIRTIO_VSOCK_F_SEQPACKET) |
		VIRTIO_BIT(VIRTIO_VSOCK_F_NO_IMPLIED_STREAM);

	wanted &= vsock_feature_mask;

	if (virtio_mmio_begin(dev, wanted) ||
	    virtio_mmio_setup_queue(dev, &rxq, VSOCK_RX_QUEUE, RX_QUEUE_SIZE) ||
	    virtio_mmio_setup_queue(dev, &txq, VSOCK_TX_QUEUE, TX_QUEUE_SIZE) ||
	    virtio_mmio_setup_queue(dev, &evq, VSOCK_EVENT_QUEUE, EVENT_QUEUE_SIZE))
		guest_exit(1);
	if (rxq.size < RX_BUFS || txq.size < 2 * TX_SLOTS || evq.size < EVENT_BUFS) {
		say("vsock: queues too small (rx %u, tx %u, event %u)",
		    rxq.size, txq.size, evq.size);
		virtio_mmio_fail(dev);
		guest_exit(1);
	}
	seqpacket_ok = !!(dev->features & VIRTIO_BIT(VIRTIO_VSOCK_F_SEQPACKET));
	stream_ok = !(dev->features & VIRTIO_BIT(VIRTIO_VSOCK_F_NO_IMPLIED_STREAM)) ||
		!!(dev->features & VIRTIO_BIT(VIRTIO_VSOCK_F_STREAM));
	/* §5.10.5 step 1: the cid, from struct virtio_vsock_config. */
	guest_cid = virtio_mmio_config_read64(dev, 0);
	if (guest_cid <= VSOCK_HOST_CID || guest_cid >= 0xffffffffull) {
		say("vsock: reserved guest_cid %lu in config", (unsigned long)guest_cid);
		virtio_mmio_fail(dev);
		guest_exit(1);
	}
	if (virtio_mmio_driver_ok(dev))
		guest_exit(1);
	if (vsock_open_hook)
		vsock_open_hook();
	/* §5.10.5 steps 2-3: event buffers, then rx buffers. */
	for (unsigned i = 0; i < EVENT_BUFS; i++)
		post_event(&event_bufs[i]);
	for (unsigned i = 0; i < RX_BUFS; i++)
		post_rx(&rx_bufs[i]);
	virtq_kick(&evq);
	virtq_kick(&rxq);
	for (unsigned i = 0; i < TX_SLOTS; i++)
		tx_free[i] = &tx_slots[i];
	tx_nfree = TX_SLOTS;
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
	struct vsock_conn *c = alloc_conn();

	if (!c) {
		say("vsock connect: no free connection slot");
		return NULL;
	}
	c->type = type;
	c->peer_cid = cid;
	c->peer_port = port;
	c->local_port = next_local_port++;
	if (c_init && c_init(c)) {
		c->state = VSOCK_FREE;
		return NULL;
	}
	c->state = VSOCK_CONNECTING;
	send_ctrl(c, VIRTIO_VSOCK_OP_REQUEST, 0);
	vsock_flush();

	uint64_t last = rdtsc();

	while (c->state == VSOCK_CONNECTING) {
		if (vsock_poll()) {
			last = rdtsc();
		} else if (rdtsc() - last > idle_ticks) {
			conn_abort(c, "no RESPONSE (timeout)", 1);
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

void vsock_say_stats(void)
{
	const struct vsock_stats *s = &vsock_stats;

	say("vsock stats rx %lu tx %lu rst_sent %lu credit_updates %lu "
	    "credit_requests %lu dropped %lu credit_violations %lu close_timeouts %lu",
	    (unsigned long)s->rx_packets, (unsigned long)s->tx_packets,
	    (unsigned long)s->rst_sent, (unsigned long)s->credit_updates_sent,
	    (unsigned long)s->credit_requests_sent, (unsigned long)s->dropped,
	    (unsigned long)s->credit_violations, (unsigned long)s->close_timeouts);
	say("vsock notifies rx %lu/%lu tx %lu/%lu (sent/suppressed)",
	    (unsigned long)rxq.notifies, (unsigned long)rxq.notifies_suppressed,
	    (unsigned long)txq.notifies, (unsigned long)txq.notifies_suppressed);
}
