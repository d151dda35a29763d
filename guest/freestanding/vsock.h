/*
 * vsock.h - the virtio socket device (virtio 1.2 §5.10 "Socket Device",
 * device ID 19): the packet header and constants from the spec, and the
 * small connection API this guest's scenarios (vsock_scenarios.c) use.
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

/* --- §5.10.6 "Device Operation": the packet header ---------------------- */
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
 * receive no more, bit 1 = it will send no more.  Sticky once sent. */
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

/* Sizes chosen by this driver. */
#define VSOCK_RX_PAYLOAD        4096    /* per posted rx buffer, after the header */
#define VSOCK_TX_PAYLOAD        65536   /* largest RW payload sent (Linux: 64 KiB) */
#define VSOCK_MAX_CONNS         64      /* 64 concurrent connections, as tests/kvm asks */
#define VSOCK_DEFAULT_BUF_ALLOC (256 * 1024)    /* as Linux's default */
#define VSOCK_MAX_BOUNDARIES    256     /* SEQPACKET message ends buffered */

enum vsock_state {
	VSOCK_FREE = 0,
	VSOCK_CONNECTING,       /* we sent REQUEST */
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
	uint16_t type;
	uint64_t peer_cid;
	uint32_t peer_port, local_port;

	/* Our receive side: what we advertise (§5.10.6.3).  fwd_cnt counts
	 * bytes consumed; rx_cnt bytes received; fwd_cnt_sent is the last
	 * fwd_cnt the peer was told (it rides on every packet we send). */
	uint32_t buf_alloc, fwd_cnt, rx_cnt, fwd_cnt_sent;
	/* Our send side: the peer's last credit, and bytes we sent. */
	uint32_t peer_buf_alloc, peer_fwd_cnt, tx_cnt;
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
	uint32_t bound_pos[VSOCK_MAX_BOUNDARIES], bound_flags[VSOCK_MAX_BOUNDARIES];
	unsigned bound_head, bound_count;

	uint64_t rx_bytes, tx_bytes;
	uint64_t user[4];               /* the scenario's */
};

/* Accept hook: set up a connection the peer just opened to our listening
 * port (on_data or ring, buf_alloc); return 0 to accept, -1 to refuse. */
typedef int (*vsock_accept_fn)(struct vsock_conn *c);

struct vsock_stats {
	uint64_t rx_packets, tx_packets, dropped, rst_sent, credit_requests_sent,
		 credit_updates_sent, credit_violations, close_timeouts;
};
extern struct vsock_stats vsock_stats;

/* Probe the device, set up rx/tx/event, read guest_cid, post the rx and
 * event buffers (§5.10.5).  Ends the run with a line on failure. */
void vsock_open(const struct args *a, uint64_t idle);
uint64_t vsock_guest_cid(void);
int vsock_seqpacket(void);                      /* F_SEQPACKET negotiated */

void vsock_listen(uint32_t port, vsock_accept_fn accept);

/* REQUEST -> RESPONSE (§5.10.6.5).  The connection is set up with c_init
 * before the REQUEST goes out.  Returns the established connection or
 * NULL after a line saying why (RST, timeout). */
struct vsock_conn *vsock_connect(uint64_t cid, uint32_t port, uint16_t type,
				 vsock_accept_fn c_init);

/* One pass of the driver; returns how many things happened (packets in,
 * tx buffers back, events), 0 if nothing. */
unsigned vsock_poll(void);

/* Publish queued tx packets to the device (one kick if not suppressed). */
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

void vsock_say_stats(void);

/* --- hostile-mode hooks (hostile.c); the other scenarios leave them alone -- */
struct virtq;
struct virtio_mmio_dev;
/* Called for each rx packet that passed the length checks, before the
 * driver handles it; nonzero = the hook consumed it. */
extern int (*vsock_rx_hook)(const struct virtio_vsock_hdr *h, const uint8_t *payload);
/* Called by vsock_open after DRIVER_OK, before the event and rx buffers
 * are posted (so what it adds to the rx queue is used first). */
extern void (*vsock_open_hook)(void);
/* The feature bits vsock_open may accept (default: all it wants). */
extern uint64_t vsock_feature_mask;
/* The device and its queues (VSOCK_*_QUEUE), for hand-written rings. */
struct virtio_mmio_dev *vsock_device(void);
struct virtq *vsock_queue(unsigned index);

#endif
