/*
 * vsock_wire.c - the two vsock protocol modes as tables (vsock_wire.h):
 *
 *   standard  virtio 1.2 §5.10, device ID 19 (what vsock.c always spoke);
 *   draft     the 2013 RFC device, ID 13, exactly as fixed in
 *             docs/vsock-draft-vs-spec.md (vsock.h sums it up).
 *
 * Nothing else in the driver knows a wire op number, a header offset, the
 * handshake's length or the credit width.
 */
#include <stdint.h>

#include "console.h"
#include "fmt.h"
#include "virtio_mmio.h"
#include "vsock.h"
#include "vsock_wire.h"

/* After our SHUTDOWN(both), how long we wait for the peer's RST before
 * sending one ourselves (§5.10.6.5: "an implementation-specific amount of
 * time"): 2^33 ticks, ~3.3 s at 2.6 GHz (Linux: 8 s). */
#define STANDARD_CLOSE_TSC      (1ull << 33)
/* The draft's 2 s (handshake on both sides, close): 5 * 10^9 ticks, 2 s at
 * the ~2.5 GHz TSC of the hosts here (whose CPUID states no frequency). */
#define DRAFT_2S_TSC            5000000000ull
/* The draft's CREDIT threshold: min(64 KiB, buf_alloc / 4). */
#define DRAFT_CREDIT_MAX_THRESHOLD 65536

/* --- standard ---------------------------------------------------------------- */

static unsigned standard_caps(uint64_t f)
{
	unsigned caps = 0;

	/* §5.10.3: STREAM is implied unless NO_IMPLIED_STREAM was negotiated
	 * without F_STREAM. */
	if (!(f & VIRTIO_BIT(VIRTIO_VSOCK_F_NO_IMPLIED_STREAM)) ||
	    f & VIRTIO_BIT(VIRTIO_VSOCK_F_STREAM))
		caps |= VSOCK_CAP_STREAM;
	if (f & VIRTIO_BIT(VIRTIO_VSOCK_F_SEQPACKET))
		caps |= VSOCK_CAP_SEQPACKET;
	return caps;
}

static unsigned standard_config_pairs(const struct virtio_mmio_dev *d)
{
	(void)d;
	return 1;                       /* one rx/tx pair (§5.10.2) */
}

static uint64_t standard_config_cid(const struct virtio_mmio_dev *d)
{
	/* §5.10.4: le64 guest_cid */
	return virtio_mmio_config_read64(d, 0);
}

static void standard_encode(void *wire, const struct vsock_pkt *p)
{
	struct virtio_vsock_hdr *h = wire;

	h->src_cid = p->src_cid;
	h->dst_cid = p->dst_cid;
	h->src_port = p->src_port;
	h->dst_port = p->dst_port;
	h->len = p->len;
	h->type = (uint16_t)p->type;
	h->op = (uint16_t)p->op;
	h->flags = p->flags;
	h->buf_alloc = (uint32_t)p->buf_alloc;  /* u32 on this wire: wraps */
	h->fwd_cnt = (uint32_t)p->fwd_cnt;
}

static void standard_decode(struct vsock_pkt *p, const void *wire)
{
	const struct virtio_vsock_hdr *h = wire;

	p->src_cid = h->src_cid;
	p->dst_cid = h->dst_cid;
	p->src_port = h->src_port;
	p->dst_port = h->dst_port;
	p->len = h->len;
	p->type = h->type;              /* canonical numbers are the standard's */
	p->op = h->op;
	p->flags = h->flags;
	p->buf_alloc = h->buf_alloc;
	p->fwd_cnt = h->fwd_cnt;
}

/* CREDIT_UPDATE unasked when the peer's view of our free space drops below
 * half of buf_alloc and we have consumed more since we last told it, so a
 * peer that only sends is never left waiting. */
static int standard_credit_due(const struct vsock_conn *c)
{
	uint64_t peer_view_free = c->buf_alloc - (c->rx_cnt - c->fwd_cnt_sent);

	return c->fwd_cnt != c->fwd_cnt_sent && peer_view_free < c->buf_alloc / 2;
}

static const uint32_t standard_handshake[] = { VSOCK_OP_REQUEST, VSOCK_OP_RESPONSE };

const struct vsock_proto vsock_proto_standard = {
	.name = "standard",
	.device_id = VIRTIO_ID_VSOCK,
	.hdr_size = sizeof(struct virtio_vsock_hdr),
	/* §5.10.3.1: take SEQPACKET, and NO_IMPLIED_STREAM if offered ("SHOULD
	 * accept"), and STREAM (which then says stream is supported). */
	.features = VIRTIO_BIT(VIRTIO_F_EVENT_IDX) |
		VIRTIO_BIT(VIRTIO_VSOCK_F_STREAM) | VIRTIO_BIT(VIRTIO_VSOCK_F_SEQPACKET) |
		VIRTIO_BIT(VIRTIO_VSOCK_F_NO_IMPLIED_STREAM),
	.caps = standard_caps,
	.no_seqpacket_why = "the device did not offer VIRTIO_VSOCK_F_SEQPACKET",
	.rx_base = VSOCK_RX_QUEUE,
	.tx_base = VSOCK_TX_QUEUE,
	.event_queue = VSOCK_EVENT_QUEUE,
	.config_pairs = standard_config_pairs,
	.config_cid = standard_config_cid,
	.encode = standard_encode,
	.decode = standard_decode,
	.handshake = standard_handshake,
	.handshake_len = 2,
	.handshake_tsc = 0,
	.handshake_timeout_why = "no RESPONSE (timeout)",
	.cnt_mask = 0xffffffffull,
	.credit_due = standard_credit_due,
	.credit_request = 1,
	.credit_violation_rst = 0,
	.close_tsc = STANDARD_CLOSE_TSC,
};

/* --- draft --------------------------------------------------------------------- */

static unsigned draft_caps(uint64_t f)
{
	(void)f;                        /* no device feature bits */
	return VSOCK_CAP_STREAM | VSOCK_CAP_DGRAM;
}

static unsigned draft_config_pairs(const struct virtio_mmio_dev *d)
{
	return virtio_mmio_config_read32(d, 4);         /* le32 max_virtqueue_pairs */
}

static uint64_t draft_config_cid(const struct virtio_mmio_dev *d)
{
	return virtio_mmio_config_read32(d, 0);         /* le32 guest_cid */
}

/* Wire op -> canonical op, for the draft's ops 0..8. */
static const uint32_t draft_ops[] = {
	[VSOCK_DRAFT_OP_INVALID] = VSOCK_OP_INVALID,
	[VSOCK_DRAFT_OP_REQUEST] = VSOCK_OP_REQUEST,
	[VSOCK_DRAFT_OP_NEGOTIATE] = VSOCK_OP_NEGOTIATE,
	[VSOCK_DRAFT_OP_OFFER] = VSOCK_OP_OFFER,
	[VSOCK_DRAFT_OP_ATTACH] = VSOCK_OP_ATTACH,
	[VSOCK_DRAFT_OP_RW] = VSOCK_OP_RW,
	[VSOCK_DRAFT_OP_CREDIT] = VSOCK_OP_CREDIT_UPDATE,
	[VSOCK_DRAFT_OP_RST] = VSOCK_OP_RST,
	[VSOCK_DRAFT_OP_SHUTDOWN] = VSOCK_OP_SHUTDOWN,
};
#define DRAFT_NOPS (sizeof(draft_ops) / sizeof(draft_ops[0]))

static uint8_t draft_wire_op(uint32_t op)
{
	for (uint8_t w = 0; w < DRAFT_NOPS; w++)
		if (draft_ops[w] == op)
			return w;
	if ((op & ~0xffu) == VSOCK_DRAFT_UNKNOWN)
		return (uint8_t)op;     /* an unknown op, sent back as it came */
	return VSOCK_DRAFT_OP_INVALID;  /* standard-only (RESPONSE, CREDIT_REQUEST) */
}

static uint8_t draft_wire_type(uint32_t type)
{
	if (type == VSOCK_TYPE_STREAM)
		return VSOCK_DRAFT_TYPE_STREAM;
	if (type == VSOCK_TYPE_DGRAM)
		return VSOCK_DRAFT_TYPE_DGRAM;
	return (uint8_t)type;           /* VSOCK_DRAFT_UNKNOWN | wire: back as it came */
}

static void draft_encode(void *wire, const struct vsock_pkt *p)
{
	struct vsock_draft_hdr *h = wire;

	h->src_cid = (uint32_t)p->src_cid;
	h->src_port = p->src_port;
	h->dst_cid = (uint32_t)p->dst_cid;
	h->dst_port = p->dst_port;
	h->len = p->len;
	h->type = draft_wire_type(p->type);
	h->op = draft_wire_op(p->op);
	/* shut: "SHUTDOWN only, else 0" */
	h->shut = p->op == VSOCK_OP_SHUTDOWN ? (uint8_t)(p->flags & VIRTIO_VSOCK_SHUTDOWN_BOTH) : 0;
	h->fwd_cnt = p->fwd_cnt;
	h->buf_alloc = p->buf_alloc;
}

static void draft_decode(struct vsock_pkt *p, const void *wire)
{
	const struct vsock_draft_hdr *h = wire;

	p->src_cid = h->src_cid;
	p->src_port = h->src_port;
	p->dst_cid = h->dst_cid;
	p->dst_port = h->dst_port;
	p->len = h->len;
	p->type = h->type == VSOCK_DRAFT_TYPE_STREAM ? VSOCK_TYPE_STREAM :
		h->type == VSOCK_DRAFT_TYPE_DGRAM ? VSOCK_TYPE_DGRAM :
		VSOCK_DRAFT_UNKNOWN | h->type;
	p->op = h->op < DRAFT_NOPS ? draft_ops[h->op] : VSOCK_DRAFT_UNKNOWN | h->op;
	p->flags = h->shut;
	p->fwd_cnt = h->fwd_cnt;
	p->buf_alloc = h->buf_alloc;
}

/* CREDIT when the peer's view of our free space, buf_alloc - (rx_cnt -
 * fwd_cnt_sent), is below threshold = min(64 KiB, buf_alloc / 4) and we
 * have consumed at least threshold bytes since we last told it, or
 * everything we received. */
static int draft_credit_due(const struct vsock_conn *c)
{
	uint64_t threshold = c->buf_alloc / 4;
	uint64_t peer_view_free = c->buf_alloc - (c->rx_cnt - c->fwd_cnt_sent);
	uint64_t consumed = c->fwd_cnt - c->fwd_cnt_sent;

	if (threshold > DRAFT_CREDIT_MAX_THRESHOLD)
		threshold = DRAFT_CREDIT_MAX_THRESHOLD;
	return consumed && peer_view_free < threshold &&
		(consumed >= threshold || c->fwd_cnt == c->rx_cnt);
}

static void draft_announce(int index, uint64_t cid, unsigned pairs, unsigned device_pairs)
{
	say("virtio device %d vsock draft guest_cid %lu pairs %u/%u", index,
	    (unsigned long)cid, pairs, device_pairs);
}

static void draft_say_stats(const struct vsock_stats *s, unsigned pairs)
{
	say("vsock draft stats pairs %u handshake_timeouts %lu wrong_pair %lu "
	    "dgram_rx %lu dgram_tx %lu dgram_dropped %lu", pairs,
	    (unsigned long)s->handshake_timeouts, (unsigned long)s->wrong_pair,
	    (unsigned long)s->dgram_rx, (unsigned long)s->dgram_tx,
	    (unsigned long)s->dgram_dropped);
}

static const uint32_t draft_handshake[] = {
	VSOCK_OP_REQUEST, VSOCK_OP_NEGOTIATE, VSOCK_OP_OFFER, VSOCK_OP_ATTACH,
};

const struct vsock_proto vsock_proto_draft = {
	.name = "draft",
	.device_id = VIRTIO_ID_VSOCK_DRAFT,
	.hdr_size = sizeof(struct vsock_draft_hdr),
	/* VERSION_1 (added by virtio_mmio_begin) and the ring feature this
	 * driver uses; not INDIRECT_DESC, which it never uses. */
	.features = VIRTIO_BIT(VIRTIO_F_EVENT_IDX),
	.caps = draft_caps,
	.no_seqpacket_why = "SEQPACKET does not exist in the draft protocol (device ID 13)",
	.rx_base = 1,                   /* queue 0 is the controlq: left alone */
	.tx_base = 2,
	.event_queue = -1,
	.config_pairs = draft_config_pairs,
	.config_cid = draft_config_cid,
	.encode = draft_encode,
	.decode = draft_decode,
	.handshake = draft_handshake,
	.handshake_len = 4,
	.handshake_tsc = DRAFT_2S_TSC,
	.handshake_timeout_why = "handshake not finished within 2 s (timeout)",
	.cnt_mask = ~0ull,
	.credit_due = draft_credit_due,
	.credit_request = 0,            /* none: a sender with zero credit waits */
	.credit_violation_rst = 1,
	.close_tsc = DRAFT_2S_TSC,
	.announce = draft_announce,
	.say_stats = draft_say_stats,
};
