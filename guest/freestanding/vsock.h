/*
 * vsock.h - virtio socket devices in two protocol modes, and the small
 * connection API this guest's scenarios (vsock_scenarios.c) use:
 *
 *   standard  virtio 1.2 §5.10 "Socket Device", device ID 19;
 *   draft     the June 2013 RFC's device, ID 13, as pyvmm implements it
 *             (docs/vsock-draft-vs-spec.md, summarised at
 *             struct vsock_draft_hdr below): 39-byte header, a 4-way
 *             handshake, u64 credit, datagrams, several rx/tx queue pairs.
 *
 * vsock_open finds whichever device is there first; everything else is one
 * connection layer for both (vsock.c), which sees packets only as struct
 * vsock_pkt.  What differs between the modes - header layout and op
 * numbers, handshake sequence, credit width and policy, queue layout,
 * timeouts - is one table per mode (vsock_wire.c).
 *
 * The driver (vsock.c) is single-threaded and polled: the scenario calls
 * vsock_poll() in its loop, which takes completed rx packets and tx
 * buffers off the virtqueues and runs the protocol (connection set-up and
 * tear-down, credit) for every connection.  Nothing here blocks except
 * vsock_connect and the wait for a free tx buffer for a control packet,
 * both bounded.
 */
#ifndef PYVMM_GUEST_VSOCK_H
#define PYVMM_GUEST_VSOCK_H

#include <stdint.h>

#include "guest.h"

/* === standard mode: virtio 1.2 §5.10, device ID 19 ======================== */

/* §5.10.6 "Device Operation": the packet header */
struct __attribute__((packed)) virtio_vsock_hdr {
	uint64_t src_cid;       /* le64, upper 32 bits reserved, zero */
	uint64_t dst_cid;
	uint32_t src_port;
	uint32_t dst_port;
	uint32_t len;           /* payload bytes after this header */
	uint16_t type;          /* VIRTIO_VSOCK_TYPE_* */
	uint16_t op;            /* VIRTIO_VSOCK_OP_* */
	uint32_t flags;
	uint32_t buf_alloc;     /* §5.10.6.3 "Buffer Space Management" */
	uint32_t fwd_cnt;
};
_Static_assert(sizeof(struct virtio_vsock_hdr) == 44, "virtio 1.2 §5.10.6");

#define VIRTIO_VSOCK_OP_INVALID         0
#define VIRTIO_VSOCK_OP_REQUEST         1
#define VIRTIO_VSOCK_OP_RESPONSE        2
#define VIRTIO_VSOCK_OP_RST             3
#define VIRTIO_VSOCK_OP_SHUTDOWN        4
#define VIRTIO_VSOCK_OP_RW              5
#define VIRTIO_VSOCK_OP_CREDIT_UPDATE   6
#define VIRTIO_VSOCK_OP_CREDIT_REQUEST  7

#define VIRTIO_VSOCK_TYPE_STREAM        1
#define VIRTIO_VSOCK_TYPE_SEQPACKET     2

/* SHUTDOWN flags (§5.10.6.5 "Stream Sockets"): bit 0 = the sender will
 * receive no more, bit 1 = it will send no more.  Sticky once sent.  The
 * draft's `shut` byte has the same bits. */
#define VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE 1
#define VIRTIO_VSOCK_SHUTDOWN_F_SEND    2
#define VIRTIO_VSOCK_SHUTDOWN_BOTH      3

/* RW flags on SEQPACKET (§5.10.6.6 "Seqpacket Sockets"). */
#define VIRTIO_VSOCK_SEQ_EOM            1       /* last packet of a message */
#define VIRTIO_VSOCK_SEQ_EOR            2       /* ... and of a record */

/* Feature bits (§5.10.3). */
#define VIRTIO_VSOCK_F_STREAM           0
#define VIRTIO_VSOCK_F_SEQPACKET        1
#define VIRTIO_VSOCK_F_NO_IMPLIED_STREAM 2

/* §5.10.6.7 "Device Events" */
#define VIRTIO_VSOCK_EVENT_TRANSPORT_RESET 0

#define VSOCK_HOST_CID                  2       /* §5.10.4 table */

/* Queues (§5.10.2). */
#define VSOCK_RX_QUEUE                  0
#define VSOCK_TX_QUEUE                  1
#define VSOCK_EVENT_QUEUE               2

/* === draft mode: the 2013 RFC device, ID 13 =============================== */
/*
 * The protocol both pyvmm and this guest implement (the fixed decisions of
 * docs/vsock-draft-vs-spec.md):
 *  - virtio-mmio v2; features VERSION_1 (+ ring features); none of its own.
 *  - config: le32 guest_cid @0, le32 max_virtqueue_pairs @4 (N, 1..16).
 *  - queues: 0 controlq (never used), 2i+1 receiveq i, 2i+2 transmitq i.
 *    The pairs in use are the ready prefix 0..P-1 at DRIVER_OK; no event
 *    queue.  Every packet of a connection or datagram travels, both ways,
 *    on pair (src_port ^ dst_port) % P.
 *  - handshake REQUEST -> NEGOTIATE -> OFFER -> ATTACH (each carries the
 *    sender's credit); RST for anything out of order; 2 s timeouts.
 *  - u64 credit counters; CREDIT (op 6) carries only credit; no credit
 *    request; a sender beyond its credit gets RST.
 *  - SHUTDOWN with the `shut` bits; close as in the standard.
 *  - datagrams: type DGRAM, op RW, len <= 4096, credit fields 0.
 */
struct __attribute__((packed)) vsock_draft_hdr {
	uint32_t src_cid;       /* @0, little-endian throughout */
	uint32_t src_port;      /* @4 */
	uint32_t dst_cid;       /* @8 */
	uint32_t dst_port;      /* @12 */
	uint32_t len;           /* @16 */
	uint8_t type;           /* @20 VSOCK_DRAFT_TYPE_* */
	uint8_t op;             /* @21 VSOCK_DRAFT_OP_* */
	uint8_t shut;           /* @22 SHUTDOWN only (VIRTIO_VSOCK_SHUTDOWN_* bits), else 0 */
	uint64_t fwd_cnt;       /* @23 */
	uint64_t buf_alloc;     /* @31 */
};
_Static_assert(sizeof(struct vsock_draft_hdr) == 39, "rfc2013-protocol.md: '<IIIIIBBBQQ'");

#define VSOCK_DRAFT_OP_INVALID          0
#define VSOCK_DRAFT_OP_REQUEST          1
#define VSOCK_DRAFT_OP_NEGOTIATE        2
#define VSOCK_DRAFT_OP_OFFER            3
#define VSOCK_DRAFT_OP_ATTACH           4
#define VSOCK_DRAFT_OP_RW               5
#define VSOCK_DRAFT_OP_CREDIT           6
#define VSOCK_DRAFT_OP_RST              7
#define VSOCK_DRAFT_OP_SHUTDOWN         8

#define VSOCK_DRAFT_TYPE_STREAM         1
#define VSOCK_DRAFT_TYPE_DGRAM          2

#define VSOCK_DRAFT_MAX_PAIRS           16
#define VSOCK_DGRAM_MAX                 4096    /* payload of one datagram */

/* === the canonical packet: what the connection layer sees ================= */
/*
 * Both wire headers decode into this and are encoded from it (vsock_wire.c).
 * Ops and types use the standard's numbers where the standard has the
 * thing, and numbers beyond any 16-bit wire value where only the draft
 * has it; an op or type a draft header carries that the draft does not
 * define decodes to VSOCK_DRAFT_UNKNOWN | wire value (and encodes back).
 */
#define VSOCK_OP_INVALID        VIRTIO_VSOCK_OP_INVALID
#define VSOCK_OP_REQUEST        VIRTIO_VSOCK_OP_REQUEST
#define VSOCK_OP_RESPONSE       VIRTIO_VSOCK_OP_RESPONSE        /* standard only */
#define VSOCK_OP_RST            VIRTIO_VSOCK_OP_RST
#define VSOCK_OP_SHUTDOWN       VIRTIO_VSOCK_OP_SHUTDOWN
#define VSOCK_OP_RW             VIRTIO_VSOCK_OP_RW
#define VSOCK_OP_CREDIT_UPDATE  VIRTIO_VSOCK_OP_CREDIT_UPDATE   /* the draft's CREDIT */
#define VSOCK_OP_CREDIT_REQUEST VIRTIO_VSOCK_OP_CREDIT_REQUEST  /* standard only */
#define VSOCK_OP_NEGOTIATE      0x10002u                        /* draft only */
#define VSOCK_OP_OFFER          0x10003u
#define VSOCK_OP_ATTACH         0x10004u

#define VSOCK_TYPE_STREAM       VIRTIO_VSOCK_TYPE_STREAM
#define VSOCK_TYPE_SEQPACKET    VIRTIO_VSOCK_TYPE_SEQPACKET     /* standard only */
#define VSOCK_TYPE_DGRAM        0x10002u                        /* draft only */

#define VSOCK_DRAFT_UNKNOWN     0x20000u

struct vsock_pkt {
	uint64_t src_cid, dst_cid;
	uint32_t src_port, dst_port;
	uint32_t len;           /* payload bytes */
	uint32_t type;          /* VSOCK_TYPE_* */
	uint32_t op;            /* VSOCK_OP_* */
	uint32_t flags;         /* standard: flags; draft: shut (SHUTDOWN only) */
	uint64_t buf_alloc;     /* the sender's credit: u32 on the standard's wire */
	uint64_t fwd_cnt;
	unsigned pair;          /* received: the queue pair it arrived on */
};

/* === the connection layer ================================================= */

/* Sizes chosen by this driver. */
#define VSOCK_RX_PAYLOAD        4096    /* per posted rx buffer, after the header */
#define VSOCK_TX_PAYLOAD        65536   /* largest RW payload sent (Linux: 64 KiB) */
#define VSOCK_MAX_CONNS         64      /* 64 concurrent connections, as tests/kvm asks */
#define VSOCK_DEFAULT_BUF_ALLOC (256 * 1024)    /* as Linux's default */
#define VSOCK_MAX_BOUNDARIES    256     /* SEQPACKET message ends buffered */
#define VSOCK_MAX_DGRAM_PORTS   8       /* ports bound for datagrams at once */

enum vsock_state {
	VSOCK_FREE = 0,
	VSOCK_CONNECTING,       /* we sent REQUEST; the handshake runs */
	VSOCK_ACCEPTING,        /* the peer's REQUEST was answered; the handshake
				 * runs (draft only: the standard's has 2 steps) */
	VSOCK_ESTABLISHED,
	VSOCK_CLOSING,          /* we sent SHUTDOWN(both); waiting for RST */
	VSOCK_CLOSED,           /* done; the scenario releases the slot */
};

struct vsock_conn;
/* Called for each RW payload (in order) of a connection in "consume at
 * once" mode; flags are the packet's (SEQ_EOM/EOR on SEQPACKET). */
typedef void (*vsock_data_fn)(struct vsock_conn *c, const uint8_t *data,
			      uint32_t len, uint32_t flags);

struct vsock_conn {
	enum vsock_state state;
	uint16_t type;                  /* VSOCK_TYPE_STREAM or _SEQPACKET */
	unsigned pair;                  /* its queue pair (always 0 in standard mode) */
	uint64_t peer_cid;
	uint32_t peer_port, local_port;
	unsigned hs_next;               /* handshake: index of the op expected next */
	uint64_t hs_deadline;           /* handshake: give up after (0: no limit) */

	/* Our receive side: what we advertise (§5.10.6.3).  fwd_cnt counts
	 * bytes consumed; rx_cnt bytes received; fwd_cnt_sent is the last
	 * fwd_cnt the peer was told (it rides on every packet we send).  All
	 * counters are u64; the standard's wire carries their low 32 bits. */
	uint64_t buf_alloc, fwd_cnt, rx_cnt, fwd_cnt_sent;
	/* Our send side: the peer's last credit, and bytes we sent. */
	uint64_t peer_buf_alloc, peer_fwd_cnt, tx_cnt;
	uint64_t stalled_since;         /* 0, or when we first lacked credit */

	uint32_t peer_shutdown;         /* SHUTDOWN flags received (sticky) */
	uint32_t shutdown_sent;
	uint64_t close_deadline;        /* VSOCK_CLOSING: RST ourselves after */
	int reset;                      /* ended by RST (not after our SHUTDOWN),
					 * transport reset or a protocol error */
	const char *why;                /* for a reset: what happened */

	/* Received data: either handed to on_data at once (and counted
	 * consumed), or kept in ring (ring mode, on_data == NULL) until the
	 * scenario calls vsock_consume. */
	vsock_data_fn on_data;
	uint8_t *ring;
	uint32_t ring_size, ring_head, ring_len;
	/* SEQPACKET message ends inside the ring, as rx_cnt positions. */
	uint64_t bound_pos[VSOCK_MAX_BOUNDARIES];
	uint32_t bound_flags[VSOCK_MAX_BOUNDARIES];
	unsigned bound_head, bound_count;

	uint64_t rx_bytes, tx_bytes;
	uint64_t user[4];               /* the scenario's */
};

/* Accept hook: set up a connection the peer just opened to our listening
 * port (on_data or ring, buf_alloc); return 0 to accept, -1 to refuse.
 * It runs when the peer's REQUEST arrives: in draft mode the connection is
 * VSOCK_ACCEPTING until the peer's OFFER (then ESTABLISHED), and may end
 * (VSOCK_CLOSED, reset) before that. */
typedef int (*vsock_accept_fn)(struct vsock_conn *c);

struct vsock_stats {
	uint64_t rx_packets, tx_packets, dropped, rst_sent, credit_requests_sent,
		 credit_updates_sent, credit_violations, close_timeouts, transport_resets;
	/* draft mode (printed on a line of their own) */
	uint64_t handshake_timeouts, wrong_pair, dgram_rx, dgram_tx, dgram_dropped;
};
extern struct vsock_stats vsock_stats;

/* Find the first vsock device (ID 19 or 13) and set it up: features, the
 * queues of its mode, guest_cid, the rx (and event) buffers.  Prints
 * "vsock cid <cid> features 0x<f> at 0x<base>"; in draft mode first
 * "virtio device <i> vsock draft guest_cid <cid> pairs <P>/<N>", P being
 * max_virtqueue_pairs or fewer if the command line says vsock-pairs=K.
 * Ends the run with a line on failure. */
void vsock_open(const struct args *a, uint64_t idle);
uint64_t vsock_guest_cid(void);
int vsock_draft(void);                          /* the device is the draft (ID 13) */
int vsock_seqpacket(void);                      /* SEQPACKET usable (F_SEQPACKET negotiated) */
const char *vsock_no_seqpacket_why(void);       /* ... and if not, why, for a line */
int vsock_datagrams(void);                      /* datagrams usable (draft mode) */
unsigned vsock_pairs(void);                     /* queue pairs in use (P) */
unsigned vsock_pair_of(uint32_t port_a, uint32_t port_b);      /* (a ^ b) % P */

void vsock_listen(uint32_t port, vsock_accept_fn accept);

/* The handshake (standard REQUEST -> RESPONSE, draft REQUEST -> NEGOTIATE
 * -> OFFER -> ATTACH).  The connection is set up with c_init before the
 * REQUEST goes out.  Returns the established connection or NULL after a
 * line saying why (RST, timeout, a type the mode lacks). */
struct vsock_conn *vsock_connect(uint64_t cid, uint32_t port, uint16_t type,
				 vsock_accept_fn c_init);

/* One pass of the driver over every queue pair; returns how many things
 * happened (packets in, tx buffers back, events), 0 if nothing. */
unsigned vsock_poll(void);

/* Publish queued tx packets to the device (one kick per tx queue with new
 * packets, if not suppressed). */
void vsock_flush(void);

/* Queue up to len bytes of data as RW packets, as far as the peer's credit
 * and free tx buffers allow.  end_flags (SEQ_EOM/EOR) go on the packet
 * carrying the last byte, and an empty RW is sent if len is 0 and
 * end_flags is not.  Returns 1 if everything (and end_flags) was queued,
 * else 0; *queued = bytes queued. */
int vsock_send(struct vsock_conn *c, const void *data, uint32_t len,
	       uint32_t end_flags, uint32_t *queued);

/* Ring mode: the scenario has used n bytes at the ring head. */
void vsock_consume(struct vsock_conn *c, uint32_t n);

/* Clean close (§5.10.6.5): SHUTDOWN(both) and wait for the peer's RST (or
 * RST at once if the peer already shut down both ways). */
void vsock_close(struct vsock_conn *c);

/* Give a VSOCK_CLOSED slot back. */
void vsock_release(struct vsock_conn *c);

/* Every connection slot, for the scenarios' loops. */
extern struct vsock_conn vsock_conns[VSOCK_MAX_CONNS];

/* Have all our tx buffers come back from the device? */
int vsock_tx_idle(void);

/* Kick the tx queues and wait (bounded by `idle`, else the run ends with a
 * line) until the device has returned a tx buffer.  Only tx is touched, so
 * a datagram handler may call it. */
void vsock_tx_wait(void);

void vsock_say_stats(void);

/* --- datagrams (draft mode) ---------------------------------------------- */

/* Called (from vsock_poll) for each datagram to a bound port; h has the
 * sender's cid and port.  data is valid only during the call. */
typedef void (*vsock_dgram_fn)(const struct vsock_pkt *h, const uint8_t *data,
			       uint32_t len);

/* Receive datagrams sent to `port`; 0, or -1 (no datagrams in this mode,
 * or VSOCK_MAX_DGRAM_PORTS bound already).  Binding a bound port replaces
 * its handler.  Datagrams to unbound ports are dropped and counted. */
int vsock_dgram_bind(uint32_t port, vsock_dgram_fn fn);
void vsock_dgram_unbind(uint32_t port);

/* Queue one datagram (one DGRAM RW packet, on pair (src_port ^ dst_port)
 * % P); vsock_flush publishes it.  Returns 1 if queued, 0 if no tx buffer
 * is free (vsock_poll or vsock_tx_wait, then again), -1 if len >
 * VSOCK_DGRAM_MAX or this mode has no datagrams. */
int vsock_dgram_send(uint64_t dst_cid, uint32_t src_port, uint32_t dst_port,
		     const void *data, uint32_t len);

/* --- hostile-mode hooks (hostile.c); the other scenarios leave them alone -- */
struct virtq;
struct virtio_mmio_dev;
/* Called for each rx packet that passed the length checks (decoded; its
 * pair set), before the driver handles it; nonzero = the hook consumed it. */
extern int (*vsock_rx_hook)(const struct vsock_pkt *h, const uint8_t *payload);
/* Called by vsock_open after its queues are set up, before DRIVER_OK
 * (hostile.c sets up the draft's controlq here). */
extern void (*vsock_queues_hook)(void);
/* Called by vsock_open after DRIVER_OK, before the event and rx buffers
 * are posted (so what it adds to an rx queue is used first). */
extern void (*vsock_open_hook)(void);
/* The feature bits vsock_open may accept (default: all it wants). */
extern uint64_t vsock_feature_mask;
/* Feature bits asked for on top of the mode's own (hostile: INDIRECT_DESC). */
extern uint64_t vsock_extra_features;
/* The device and its queues, for hand-written rings: vsock_queue by the
 * device's queue index (NULL for one the driver did not set up, such as
 * the draft's controlq), or by pair. */
struct virtio_mmio_dev *vsock_device(void);
struct virtq *vsock_queue(unsigned index);
struct virtq *vsock_rxq(unsigned pair);
struct virtq *vsock_txq(unsigned pair);
/* The wire header of the device's mode: its size, and p encoded into it. */
unsigned vsock_hdr_size(void);
void vsock_encode(void *wire, const struct vsock_pkt *p);

#endif
