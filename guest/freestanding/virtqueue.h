/*
 * virtqueue.h - split virtqueues, the driver side (virtio 1.2, §2.7 "Split
 * Virtqueues").
 *
 * A split virtqueue is three areas of guest RAM the driver owns and the
 * device reads (and, for the used ring, writes):
 *   descriptor table  §2.7.5  size x 16 bytes, 16-byte aligned
 *   available ring    §2.7.6  driver -> device: heads of buffer chains
 *   used ring         §2.7.8  device -> driver: completed heads + lengths
 * This guest is identity-mapped, so a buffer's virtual address is also the
 * guest-physical address the device is given.
 *
 * Completions are POLLED, not taken as interrupts: the guest runs with
 * RFLAGS.IF = 0 and no interrupt controller set up (an interrupt from CPL3
 * would enter emulated CPL0 on PVM hosts: ~100 us each, the cost of a
 * system call), and the scenarios have nothing to do but wait for the
 * device.  The driver asks the device not to interrupt at all (§2.7.7,
 * VIRTQ_AVAIL_F_NO_INTERRUPT, or used_event kept out of reach with
 * VIRTIO_F_EVENT_IDX).  Every wait is bounded in TSC ticks, spins with
 * PAUSE, and ends with a line saying what did not arrive.
 */
#ifndef PYVMM_GUEST_VIRTQUEUE_H
#define PYVMM_GUEST_VIRTQUEUE_H

#include <stddef.h>
#include <stdint.h>

struct virtio_mmio_dev;

/* §2.7.5 "The Virtqueue Descriptor Table" */
struct virtq_desc {
	uint64_t addr;          /* le64 guest-physical address */
	uint32_t len;           /* le32 */
	uint16_t flags;         /* le16 VIRTQ_DESC_F_* */
	uint16_t next;          /* le16 index of the next, if F_NEXT */
};
#define VIRTQ_DESC_F_NEXT       1       /* the chain continues at .next */
#define VIRTQ_DESC_F_WRITE      2       /* device-writable (else read-only) */

/* §2.7.6 "The Virtqueue Available Ring": flags, idx, ring[size], then
 * used_event (only with VIRTIO_F_EVENT_IDX). */
struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[];
};
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

/* §2.7.8 "The Virtqueue Used Ring": flags, idx, ring[size], then
 * avail_event (only with VIRTIO_F_EVENT_IDX). */
struct virtq_used_elem {
	uint32_t id;            /* le32 head of the completed chain */
	uint32_t len;           /* le32 bytes the device wrote into it */
};
struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[];
};
#define VIRTQ_USED_F_NO_NOTIFY  1

/* The largest queue this driver sets up; also sizes the ring memory. */
#define VIRTQ_MAX_SIZE          256

/* One virtqueue: ring memory (page-aligned, §2.7 alignment needs only 16 /
 * 2 / 4 bytes) plus the driver's private bookkeeping. */
struct virtq {
	struct virtq_desc desc[VIRTQ_MAX_SIZE] __attribute__((aligned(4096)));
	/* avail: 4 + 2 * size + 2 bytes; used: 4 + 8 * size + 2 bytes */
	uint8_t avail_mem[4096] __attribute__((aligned(4096)));
	uint8_t used_mem[4096] __attribute__((aligned(4096)));

	struct virtq_avail *avail;
	struct virtq_used *used;
	const struct virtio_mmio_dev *dev;
	unsigned index;                 /* queue number on the device */
	uint16_t size;                  /* power of two, <= VIRTQ_MAX_SIZE */
	uint16_t num_free;              /* descriptors on the free list */
	uint16_t free_head;
	uint16_t avail_idx;             /* next avail->idx value (shadow) */
	uint16_t kicked_idx;            /* avail->idx at the last kick decision */
	uint16_t last_used;             /* next used->ring entry to read */
	int event_idx;                  /* VIRTIO_F_EVENT_IDX negotiated */
	void *token[VIRTQ_MAX_SIZE];    /* per chain head: the caller's cookie */
	uint64_t notifies, notifies_suppressed;
};

/* One buffer of a chain. */
struct virtq_buf {
	const void *addr;
	uint32_t len;
};

/* Set up the rings of q for a queue of `size` entries (done by
 * virtio_mmio_setup_queue, which then tells the device where they are). */
void virtq_init(struct virtq *q, const struct virtio_mmio_dev *dev,
		unsigned index, uint16_t size, int event_idx);

/*
 * §2.7.13 "Supplying Buffers to The Device": put one chain of n_out
 * device-readable then n_in device-writable buffers into the descriptor
 * table and its head into the next available-ring slot.  The device does
 * not see it until virtq_kick.  token (non-NULL) comes back from
 * virtq_get_used.  Returns 0, or -1 if fewer than n_out + n_in descriptors
 * are free.
 */
int virtq_add(struct virtq *q, const struct virtq_buf *bufs, unsigned n_out,
	      unsigned n_in, void *token);

/* Publish everything added since the last kick (avail->idx) and notify the
 * device unless it suppressed notifications (§2.7.10, §2.7.13.4). */
void virtq_kick(struct virtq *q);

/* §2.7.14 "Receiving Used Buffers From The Device": if the device has
 * returned a chain, free its descriptors, store the bytes written into
 * *len and return its token; else NULL.  Never blocks. */
void *virtq_get_used(struct virtq *q, uint32_t *len);

/* Has the device returned a chain that virtq_get_used has not taken? */
int virtq_has_used(const struct virtq *q);

/* Spin (PAUSE) until virtq_get_used would return something, for at most
 * `ticks` TSC ticks.  Returns 0, or -1 on timeout. */
int virtq_wait_used(const struct virtq *q, uint64_t ticks);

#endif
