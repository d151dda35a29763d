/*
 * vsock_wire.h - what differs between the two vsock protocol modes, as one
 * table per mode (vsock_wire.c); vsock.c, the one connection layer, reads
 * only this.  Each difference lives in one field:
 *
 *   header layout, op and type numbers   encode / decode (struct vsock_pkt)
 *   handshake sequence                   handshake[], handshake_tsc
 *   credit width and policy              cnt_mask, credit_due,
 *                                        credit_request, credit_violation_rst
 *   queue layout, config                 rx_base / tx_base / event_queue,
 *                                        config_pairs, config_cid
 *   features and socket types            features, caps
 *   close timeout                        close_tsc
 */
#ifndef PYVMM_GUEST_VSOCK_WIRE_H
#define PYVMM_GUEST_VSOCK_WIRE_H

#include <stdint.h>

#include "vsock.h"

struct virtio_mmio_dev;

/* What a mode can carry (caps). */
#define VSOCK_CAP_STREAM        1
#define VSOCK_CAP_SEQPACKET     2
#define VSOCK_CAP_DGRAM         4

#define VSOCK_HDR_MAX           44      /* the larger of the two headers */

struct vsock_proto {
	const char *name;                       /* "standard", "draft" */
	uint32_t device_id;
	unsigned hdr_size;
	/* Features the driver asks for (ANDed with what is offered;
	 * VERSION_1 is always added by virtio_mmio_begin). */
	uint64_t features;
	unsigned (*caps)(uint64_t negotiated);  /* VSOCK_CAP_* */
	const char *no_seqpacket_why;

	/* Queue layout: pair i is rx queue rx_base + 2i, tx queue tx_base + 2i,
	 * for i < pairs; event_queue is the event queue's index, or -1. */
	unsigned rx_base, tx_base;
	int event_queue;
	/* Pairs the device has (config), and the guest's CID (config). */
	unsigned (*config_pairs)(const struct virtio_mmio_dev *d);
	uint64_t (*config_cid)(const struct virtio_mmio_dev *d);

	void (*encode)(void *wire, const struct vsock_pkt *p);
	void (*decode)(struct vsock_pkt *p, const void *wire);

	/* The handshake: ops alternate, initiator first (handshake[0] is the
	 * REQUEST a listener answers); each side is connected once it sent
	 * or received the last.  handshake_tsc: either side gives up (RST)
	 * after this long; 0 = only the scenario's idle bound (standard). */
	const uint32_t *handshake;
	unsigned handshake_len;
	uint64_t handshake_tsc;
	const char *handshake_timeout_why;

	/* Credit: counters are compared modulo cnt_mask + 1 (the width on the
	 * wire); credit_due says when to send CREDIT_UPDATE unasked;
	 * credit_request: stalled senders may ask (CREDIT_REQUEST);
	 * credit_violation_rst: a peer beyond its credit is reset (else only
	 * counted and reported once). */
	uint64_t cnt_mask;
	int (*credit_due)(const struct vsock_conn *c);
	int credit_request;
	int credit_violation_rst;

	/* After our SHUTDOWN(both), RST ourselves after this long. */
	uint64_t close_tsc;

	/* The mode's own console lines, or NULL: after vsock_open's set-up
	 * (index = the device's place among those found) and after the
	 * standard's two stats lines. */
	void (*announce)(int index, uint64_t cid, unsigned pairs, unsigned device_pairs);
	void (*say_stats)(const struct vsock_stats *s, unsigned pairs);
};

extern const struct vsock_proto vsock_proto_standard, vsock_proto_draft;

#endif
