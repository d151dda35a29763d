/*
 * virtqueue.c - split virtqueues, driver side (virtio 1.2 §2.7; see
 * virtqueue.h for the layout and why completions are polled).
 *
 * Memory ordering.  The device is another agent reading and writing this
 * RAM concurrently (a VMM thread on another host CPU).  x86 is TSO (Intel
 * SDM Vol. 3A, "Memory Ordering in P6 and More Recent Processor Families"):
 * stores become visible in program order, loads are not reordered with
 * other loads, and the only reordering is a later load passing an earlier
 * store to a different address.  So:
 *   - "write the descriptors and the ring entry, then avail->idx" (§2.7.13.3)
 *     needs only a compiler barrier;
 *   - "read used->idx, then the used-ring entry" (§2.7.14) needs only a
 *     compiler barrier;
 *   - "write avail->idx, then read the device's suppression state
 *     (used->flags or avail_event)" (§2.7.13.4) is store-then-load: it needs
 *     MFENCE, or the device could miss our idx while we miss its request
 *     for a notification, and both sides would wait forever.
 * The ring fields the device writes are read through volatile pointers so
 * each poll is a real load.  All fields are little-endian, as is x86.
 */
#include <stdint.h>

#include "console.h"
#include "fmt.h"
#include "guest.h"
#include "io.h"
#include "virtio_mmio.h"
#include "virtqueue.h"

static inline void compiler_barrier(void)
{
	__asm__ volatile("" : : : "memory");
}

static inline void full_barrier(void)
{
	__asm__ volatile("mfence" : : : "memory");
}

/* used_event and avail_event sit just past the rings (§2.7.6, §2.7.8). */
static volatile uint16_t *used_event(struct virtq *q)
{
	return &q->avail->ring[q->size];
}

static volatile uint16_t *avail_event(struct virtq *q)
{
	return (volatile uint16_t *)&q->used->ring[q->size];
}

static uint16_t used_idx(const struct virtq *q)
{
	return *(volatile const uint16_t *)&q->used->idx;
}

void virtq_init(struct virtq *q, const struct virtio_mmio_dev *dev,
		unsigned index, uint16_t size, int event_idx)
{
	memset(q->desc, 0, sizeof(q->desc));
	memset(q->avail_mem, 0, sizeof(q->avail_mem));
	memset(q->used_mem, 0, sizeof(q->used_mem));
	memset(q->token, 0, sizeof(q->token));
	q->avail = (struct virtq_avail *)q->avail_mem;
	q->used = (struct virtq_used *)q->used_mem;
	q->dev = dev;
	q->index = index;
	q->size = size;
	q->event_idx = event_idx;
	/* The free list threads through .next: 0 -> 1 -> ... -> size-1. */
	for (uint16_t i = 0; i < size; i++)
		q->desc[i].next = (uint16_t)(i + 1);
	q->free_head = 0;
	q->num_free = size;
	q->avail_idx = q->kicked_idx = q->last_used = 0;
	q->notifies = q->notifies_suppressed = 0;
	/* §2.7.7 "Used Buffer Notification Suppression": we poll, so ask for
	 * no used-buffer notifications.  Without EVENT_IDX that is the
	 * NO_INTERRUPT flag; with it the flags MUST be 0 and used_event says
	 * "not until entry N": N is kept 0x8000 ahead of what we have read
	 * (virtq_get_used), which the device, at most `size` entries ahead of
	 * us, never reaches. */
	if (event_idx)
		*used_event(q) = 0x8000;
	else
		q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
}

int virtq_add(struct virtq *q, const struct virtq_buf *bufs, unsigned n_out,
	      unsigned n_in, void *token)
{
	unsigned n = n_out + n_in;

	if (n == 0 || n > q->num_free || !token)
		return -1;
	/* Take n descriptors off the free list.  The list is threaded through
	 * .next, so each taken descriptor's .next already names the one taken
	 * after it: only addr, len and flags need writing (§2.7.5). */
	uint16_t head = q->free_head, i = head;

	for (unsigned k = 0; k < n; k++) {
		struct virtq_desc *d = &q->desc[i];

		d->addr = (uintptr_t)bufs[k].addr;      /* identity-mapped */
		d->len = bufs[k].len;
		d->flags = (uint16_t)((k < n - 1 ? VIRTQ_DESC_F_NEXT : 0) |
				      (k >= n_out ? VIRTQ_DESC_F_WRITE : 0));
		if (k < n - 1)
			i = d->next;
	}
	q->free_head = q->desc[i].next;
	q->num_free = (uint16_t)(q->num_free - n);
	q->token[head] = token;
	/* §2.7.13.2 "Updating The Available Ring": the head goes into
	 * ring[idx % size]; idx itself is published by virtq_kick. */
	q->avail->ring[q->avail_idx & (q->size - 1)] = head;
	q->avail_idx++;
	return 0;
}

/* §2.7.10: with EVENT_IDX the device asks to be notified when avail->idx
 * moves past avail_event; vring_need_event is the spec's formula, in
 * wrapping 16-bit arithmetic: did the move from old to new cross event? */
static int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
	return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

void virtq_kick(struct virtq *q)
{
	uint16_t old_idx = q->kicked_idx, new_idx = q->avail_idx;
	int notify;

	if (new_idx == old_idx)
		return;
	/* §2.7.13.3 "Updating idx": descriptors and ring entries before idx.
	 * Stores are not reordered with stores on x86: a compiler barrier. */
	compiler_barrier();
	*(volatile uint16_t *)&q->avail->idx = new_idx;
	/* §2.7.13.4 "Notifying The Device": idx must be visible before the
	 * suppression state is read - a store then a load: MFENCE. */
	full_barrier();
	if (q->event_idx)
		notify = vring_need_event(*avail_event(q), new_idx, old_idx);
	else
		notify = !(*(volatile uint16_t *)&q->used->flags & VIRTQ_USED_F_NO_NOTIFY);
	q->kicked_idx = new_idx;
	if (notify) {
		virtio_mmio_notify(q->dev, q->index);
		q->notifies++;
	} else {
		q->notifies_suppressed++;
	}
}

int virtq_has_used(const struct virtq *q)
{
	return used_idx(q) != q->last_used;
}

void *virtq_get_used(struct virtq *q, uint32_t *len)
{
	if (used_idx(q) == q->last_used)
		return NULL;
	/* §2.7.14: the entry is valid once idx covers it.  Loads are not
	 * reordered with loads on x86: a compiler barrier keeps GCC from
	 * reading the entry before idx. */
	compiler_barrier();
	const volatile struct virtq_used_elem *e =
		&q->used->ring[q->last_used & (q->size - 1)];
	uint32_t id = e->id;
	uint32_t written = e->len;

	if (id >= q->size || !q->token[id]) {
		/* A device bug (or ours): the chain was never handed out. */
		say("virtq %u: device returned id %u, which is not an outstanding "
		    "chain head (size %u)", q->index, id, q->size);
		guest_exit(1);
	}
	void *token = q->token[id];
	uint16_t i = (uint16_t)id, n = 1;

	q->token[id] = NULL;
	while (q->desc[i].flags & VIRTQ_DESC_F_NEXT) {
		i = q->desc[i].next;
		n++;
	}
	q->desc[i].next = q->free_head;          /* the chain back on the list */
	q->free_head = (uint16_t)id;
	q->num_free = (uint16_t)(q->num_free + n);
	q->last_used++;
	if (q->event_idx)
		*used_event(q) = (uint16_t)(q->last_used + 0x8000);
	*len = written;
	return token;
}

int virtq_wait_used(const struct virtq *q, uint64_t ticks)
{
	uint64_t start = rdtsc();

	while (!virtq_has_used(q)) {
		if (rdtsc() - start > ticks)
			return -1;
		cpu_relax();
	}
	return 0;
}
