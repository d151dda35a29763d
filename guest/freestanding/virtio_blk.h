/*
 * virtio_blk.h - a minimal virtio-blk driver (virtio 1.2, §5.2 "Block
 * Device", device ID 2; names as in Linux include/uapi/linux/virtio_blk.h)
 * over virtio_mmio.c and virtqueue.c, polled like the vsock driver.
 *
 * One request queue.  A request is a chain of three or more descriptors:
 * the 16-byte header (device-readable), the data (readable for OUT,
 * DISCARD and WRITE_ZEROES, writable for IN and GET_ID; one descriptor per
 * size_max bytes) and the status byte (writable).  Several requests can be
 * in flight: blk_submit adds one, blk_kick publishes the batch, blk_reap
 * takes one completion.
 */
#ifndef PYVMM_GUEST_VIRTIO_BLK_H
#define PYVMM_GUEST_VIRTIO_BLK_H

#include <stdint.h>

#include "guest.h"
#include "virtio_mmio.h"
#include "virtqueue.h"

#define VIRTIO_ID_BLOCK                 2

/* §5.2.3 feature bits (bit numbers) */
#define VIRTIO_BLK_F_SIZE_MAX           1
#define VIRTIO_BLK_F_SEG_MAX            2
#define VIRTIO_BLK_F_RO                 5
#define VIRTIO_BLK_F_BLK_SIZE           6
#define VIRTIO_BLK_F_FLUSH              9
#define VIRTIO_BLK_F_DISCARD            13
#define VIRTIO_BLK_F_WRITE_ZEROES       14

/* §5.2.4 struct virtio_blk_config: the offsets this driver reads */
#define VIRTIO_BLK_CFG_CAPACITY         0       /* le64, 512-byte sectors */
#define VIRTIO_BLK_CFG_SIZE_MAX         8       /* le32 */
#define VIRTIO_BLK_CFG_SEG_MAX          12      /* le32 */
#define VIRTIO_BLK_CFG_MAX_DISCARD_SECTORS 36   /* le32 */
#define VIRTIO_BLK_CFG_MAX_DISCARD_SEG  40      /* le32 */
#define VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SECTORS 48
#define VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SEG 52

/* §5.2.6 request types and status values */
#define VIRTIO_BLK_T_IN                 0
#define VIRTIO_BLK_T_OUT                1
#define VIRTIO_BLK_T_FLUSH              4
#define VIRTIO_BLK_T_GET_ID             8
#define VIRTIO_BLK_T_DISCARD            11
#define VIRTIO_BLK_T_WRITE_ZEROES       13
#define VIRTIO_BLK_S_OK                 0
#define VIRTIO_BLK_S_IOERR              1
#define VIRTIO_BLK_S_UNSUPP             2
#define VIRTIO_BLK_ID_BYTES             20

#define SECTOR_SHIFT                    9
#define SECTOR_SIZE                     512

struct virtio_blk_outhdr {
	uint32_t type;
	uint32_t ioprio;
	uint64_t sector;
};

struct virtio_blk_discard_write_zeroes {
	uint64_t sector;
	uint32_t num_sectors;
	uint32_t flags;
};

/* Requests in flight at most (blk_req slots): the queue holds 256
 * descriptors, a request of one data descriptor takes 3. */
#define BLK_MAX_INFLIGHT                64
/* Queue size asked for. */
#define BLK_QUEUE_SIZE                  256
/* Data descriptors per request at most (bytes / size_max, rounded up). */
#define BLK_MAX_DATA_DESC               16

/* One request slot: header, discard/write-zeroes segment and status live
 * here (guest RAM the device reads and writes); data is the caller's. */
struct blk_req {
	struct virtio_blk_outhdr hdr;
	struct virtio_blk_discard_write_zeroes seg;
	volatile uint8_t status;
	int busy;
	unsigned slot;
	uint32_t written;       /* used.len of the completion */
};

struct blk_dev {
	struct virtio_mmio_dev *mmio;
	struct virtq q;
	int index;              /* 0 = vda, 1 = vdb, ... (order of the blk devices) */
	uint64_t capacity;      /* sectors */
	uint32_t size_max;      /* bytes per data descriptor (0 = not stated) */
	uint32_t seg_max;
	uint32_t max_discard_sectors, max_write_zeroes_sectors;
	int ro, flush, discard, write_zeroes;
	uint64_t idle;          /* TSC ticks a wait may last */
	struct blk_req req[BLK_MAX_INFLIGHT];
};

/* Find the nth (0-based) device with ID 2 among the discovered ones, take
 * it to DRIVER_OK with VERSION_1 (+ EVENT_IDX, SIZE_MAX, SEG_MAX, RO, FLUSH,
 * DISCARD, WRITE_ZEROES where offered) and read its configuration.
 * Returns 0, or -1 after a line saying why. */
int blk_open(const struct args *a, int nth, struct blk_dev *b);

/* Add a request of `type` at `sector` with `len` data bytes at `data`
 * (DISCARD / WRITE_ZEROES: len is the sector count, data unused) in a free
 * slot; not visible to the device until blk_kick.  Returns the slot, or
 * NULL when every slot is busy. */
struct blk_req *blk_submit(struct blk_dev *b, uint32_t type, uint64_t sector,
			   void *data, uint32_t len);
void blk_kick(struct blk_dev *b);

/* Wait (bounded by b->idle) for one completion and return its slot, freed
 * for reuse (its status and written stay readable until the next submit);
 * NULL on timeout, after a line. */
struct blk_req *blk_reap(struct blk_dev *b);

/* Submit one request, kick, wait for it: its status byte, or -1 on
 * timeout. */
int blk_do(struct blk_dev *b, uint32_t type, uint64_t sector, void *data, uint32_t len);

/* Scenarios (virtio_blk.c) */
void scenario_blk_check(const struct args *a) __attribute__((noreturn));
void scenario_blk_load(const struct args *a) __attribute__((noreturn));

#endif
