/*
 * virtio_blk.c - the virtio-blk driver (virtio_blk.h) and its two
 * scenarios, blk-check (correctness: a pattern written, flushed, read back;
 * GET_ID, DISCARD, WRITE_ZEROES, read-only, reads past the end) and
 * blk-load (MB/s and IOPS by the TSC).  Output lines: README.md,
 * "Scenarios".
 */
#include <stddef.h>
#include <stdint.h>

#include "console.h"
#include "fmt.h"
#include "guest.h"
#include "io.h"
#include "tsc.h"
#include "virtio_blk.h"
#include "virtio_mmio.h"
#include "virtqueue.h"

/* --- the driver ----------------------------------------------------------- */

int blk_open(const struct args *a, int nth, struct blk_dev *b)
{
	static struct virtio_mmio_dev devs[VIRTIO_MMIO_MAX_DEVICES];
	int n = virtio_mmio_discover(a, devs, VIRTIO_MMIO_MAX_DEVICES), seen = 0;

	b->mmio = NULL;
	for (int i = 0; i < n && !b->mmio; i++)
		if (devs[i].device_id == VIRTIO_ID_BLOCK && seen++ == nth)
			b->mmio = &devs[i];
	if (!b->mmio) {
		say("blk: no block device %d (%d virtio-blk of %d virtio-mmio devices found)",
		    nth, seen, n);
		return -1;
	}
	struct virtio_mmio_dev *d = b->mmio;
	uint64_t wanted = VIRTIO_BIT(VIRTIO_F_EVENT_IDX) | VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX) |
		VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX) | VIRTIO_BIT(VIRTIO_BLK_F_RO) |
		VIRTIO_BIT(VIRTIO_BLK_F_FLUSH) | VIRTIO_BIT(VIRTIO_BLK_F_DISCARD) |
		VIRTIO_BIT(VIRTIO_BLK_F_WRITE_ZEROES);

	if (virtio_mmio_begin(d, wanted) ||
	    virtio_mmio_setup_queue(d, &b->q, 0, BLK_QUEUE_SIZE) ||
	    virtio_mmio_driver_ok(d))
		return -1;
	b->index = nth;
	b->capacity = virtio_mmio_config_read64(d, VIRTIO_BLK_CFG_CAPACITY);
	b->ro = !!(d->features & VIRTIO_BIT(VIRTIO_BLK_F_RO));
	b->flush = !!(d->features & VIRTIO_BIT(VIRTIO_BLK_F_FLUSH));
	b->discard = !!(d->features & VIRTIO_BIT(VIRTIO_BLK_F_DISCARD));
	b->write_zeroes = !!(d->features & VIRTIO_BIT(VIRTIO_BLK_F_WRITE_ZEROES));
	b->size_max = d->features & VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX) ?
		virtio_mmio_config_read32(d, VIRTIO_BLK_CFG_SIZE_MAX) : 0;
	b->seg_max = d->features & VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX) ?
		virtio_mmio_config_read32(d, VIRTIO_BLK_CFG_SEG_MAX) : 0;
	b->max_discard_sectors = b->discard ?
		virtio_mmio_config_read32(d, VIRTIO_BLK_CFG_MAX_DISCARD_SECTORS) : 0;
	b->max_write_zeroes_sectors = b->write_zeroes ?
		virtio_mmio_config_read32(d, VIRTIO_BLK_CFG_MAX_WRITE_ZEROES_SECTORS) : 0;
	b->idle = IDLE_TSC_DEFAULT;
	arg_u64(a, "idle", &b->idle, 1, UINT64_MAX);
	for (unsigned i = 0; i < BLK_MAX_INFLIGHT; i++) {
		b->req[i].busy = 0;
		b->req[i].slot = i;
	}
	return 0;
}

struct blk_req *blk_submit(struct blk_dev *b, uint32_t type, uint64_t sector,
			   void *data, uint32_t len)
{
	struct virtq_buf bufs[BLK_MAX_DATA_DESC + 2];
	struct blk_req *r = NULL;
	unsigned n = 0, n_out;

	for (unsigned i = 0; i < BLK_MAX_INFLIGHT && !r; i++)
		if (!b->req[i].busy)
			r = &b->req[i];
	if (!r)
		return NULL;
	r->hdr.type = type;
	r->hdr.ioprio = 0;
	r->hdr.sector = sector;
	r->status = 0xff;               /* not a VIRTIO_BLK_S_* value */
	r->written = 0;
	bufs[n++] = (struct virtq_buf){ &r->hdr, sizeof(r->hdr) };
	if (type == VIRTIO_BLK_T_DISCARD || type == VIRTIO_BLK_T_WRITE_ZEROES) {
		/* §5.2.6: one struct virtio_blk_discard_write_zeroes segment */
		r->seg.sector = sector;
		r->seg.num_sectors = len;
		r->seg.flags = 0;
		bufs[n++] = (struct virtq_buf){ &r->seg, sizeof(r->seg) };
	} else if (len) {
		/* One descriptor per size_max bytes (§5.2.4: "size_max is the
		 * maximum size of any single segment"). */
		uint32_t seg = b->size_max ? b->size_max : len;
		uint8_t *p = data;

		for (uint32_t off = 0; off < len; off += seg) {
			if (n == BLK_MAX_DATA_DESC + 1) {
				say("blk: %u bytes need more than %u data descriptors", len,
				    BLK_MAX_DATA_DESC);
				guest_exit(1);
			}
			bufs[n++] = (struct virtq_buf){ p + off, len - off < seg ? len - off : seg };
		}
	}
	/* Readable: the header, and the data of OUT / the segment. */
	n_out = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID ? 1 : n;
	bufs[n++] = (struct virtq_buf){ (const void *)&r->status, 1 };
	if (virtq_add(&b->q, bufs, n_out, n - n_out, r))
		return NULL;            /* descriptors short: the caller reaps first */
	r->busy = 1;
	return r;
}

void blk_kick(struct blk_dev *b)
{
	virtq_kick(&b->q);
}

struct blk_req *blk_reap(struct blk_dev *b)
{
	uint32_t len;

	if (virtq_wait_used(&b->q, b->idle)) {
		say("blk: vd%c: no completion within %lu ticks", 'a' + b->index,
		    (unsigned long)b->idle);
		return NULL;
	}
	struct blk_req *r = virtq_get_used(&b->q, &len);

	r->written = len;
	r->busy = 0;
	return r;
}

int blk_do(struct blk_dev *b, uint32_t type, uint64_t sector, void *data, uint32_t len)
{
	struct blk_req *r = blk_submit(b, type, sector, data, len);

	if (!r) {
		say("blk: no free request slot");
		return -1;
	}
	blk_kick(b);
	if (blk_reap(b) != r)
		return -1;
	return r->status;
}

/*
 * A range of sectors as requests of `chunk` sectors, up to `depth` in
 * flight: returns how many did not come back VIRTIO_BLK_S_OK, or -1 on a
 * timeout.
 */
static long blk_rw_range(struct blk_dev *b, uint32_t type, uint64_t sector, uint8_t *buf,
			 uint64_t sectors, uint64_t chunk, unsigned depth)
{
	uint64_t next = 0, inflight = 0;
	long bad = 0;

	while (next < sectors || inflight) {
		while (next < sectors && inflight < depth) {
			uint64_t n = sectors - next < chunk ? sectors - next : chunk;

			if (!blk_submit(b, type, sector + next, buf + (next << SECTOR_SHIFT),
					(uint32_t)(n << SECTOR_SHIFT)))
				break;
			next += n;
			inflight++;
		}
		blk_kick(b);
		struct blk_req *r = blk_reap(b);

		if (!r)
			return -1;
		inflight--;
		bad += r->status != VIRTIO_BLK_S_OK;
	}
	return bad;
}

/* --- the test pattern ----------------------------------------------------- */

/*
 * Word w (0..63) of sector s for seed k: splitmix64 (Steele, Lea, Flood,
 * "Fast splittable pseudorandom number generators", 2014) of
 * s * 64 + w + k * 0x9e3779b97f4a7c15, all modulo 2^64.  In Python (numpy,
 * uint64 arithmetic wraps):
 *     x = s * 64 + np.arange(64, dtype=np.uint64) + np.uint64(k) * GOLDEN
 *     z = x + GOLDEN; z = (z ^ (z >> 30)) * M1; z = (z ^ (z >> 27)) * M2
 *     words = z ^ (z >> 31)
 * The "sum" printed is the sum of all words of the range modulo 2^64.
 */
#define GOLDEN  0x9e3779b97f4a7c15ull

static uint64_t pattern_word(uint64_t sector, unsigned w, uint64_t seed)
{
	uint64_t z = sector * 64 + w + seed * GOLDEN + GOLDEN;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t pattern_fill(uint64_t *words, uint64_t sector, uint64_t sectors, uint64_t seed)
{
	uint64_t sum = 0;

	for (uint64_t s = 0; s < sectors; s++)
		for (unsigned w = 0; w < 64; w++)
			sum += words[s * 64 + w] = pattern_word(sector + s, w, seed);
	return sum;
}

static uint64_t words_sum(const uint64_t *words, uint64_t sectors)
{
	uint64_t sum = 0;

	for (uint64_t i = 0; i < sectors * 64; i++)
		sum += words[i];
	return sum;
}

/* The data buffer of both scenarios (guest RAM the device reads and
 * writes directly). */
#define BLK_BUF_BYTES   (4u << 20)
static uint64_t blk_buf[BLK_BUF_BYTES / 8] __attribute__((aligned(4096)));
static struct blk_dev blk;

/* Sectors at the end of the checked range that DISCARD and WRITE_ZEROES
 * work on (written with the pattern first). */
#define TAIL_SECTORS    16

static int arg_disk(const struct args *a)
{
	uint64_t disk = 0;

	arg_u64(a, "disk", &disk, 0, 25);
	return (int)disk;
}

/* --- blk-check ------------------------------------------------------------ */

void scenario_blk_check(const struct args *a)
{
	uint64_t start = 0, sectors = 2048, seed = 1, chunk = 128, depth = 8, hold = 0;
	const char *serial = arg_value(a, "serial");
	uint8_t *buf = (uint8_t *)blk_buf;
	static char id[VIRTIO_BLK_ID_BYTES + 1];
	int problems = 0, st;

	arg_u64(a, "start", &start, 0, UINT64_MAX / 2);
	arg_u64(a, "sectors", &sectors, 1, BLK_BUF_BYTES / SECTOR_SIZE - 2 * TAIL_SECTORS);
	arg_u64(a, "seed", &seed, 0, UINT64_MAX);
	arg_u64(a, "chunk", &chunk, 1, 2048);
	arg_u64(a, "depth", &depth, 1, BLK_MAX_INFLIGHT);
	arg_u64(a, "hold", &hold, 0, 1);
	if (blk_open(a, arg_disk(a), &blk))
		guest_exit(1);
	struct blk_dev *b = &blk;

	say("blk vd%c capacity %lu size_max %u seg_max %u features 0x%lx", 'a' + b->index,
	    (unsigned long)b->capacity, b->size_max, b->seg_max,
	    (unsigned long)b->mmio->features);

	/* GET_ID (§5.2.6): 20 bytes, NUL-padded. */
	st = blk_do(b, VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES);
	if (st < 0)
		guest_exit(1);
	id[VIRTIO_BLK_ID_BYTES] = '\0';
	say("blk id status %d '%s'", st, st == VIRTIO_BLK_S_OK ? id : "");
	if (serial && (st != VIRTIO_BLK_S_OK || strcmp(serial, id))) {
		say("blk id: FAILED: want '%s'", serial);
		problems++;
	}

	uint64_t total = sectors + (b->ro ? 0 : 2 * TAIL_SECTORS);

	if (start + total > b->capacity) {
		say("blk-check: range %lu+%lu is past the capacity %lu", (unsigned long)start,
		    (unsigned long)total, (unsigned long)b->capacity);
		guest_exit(1);
	}
	if (b->ro) {
		/* §5.2.6.2: the device MUST fail writes to a read-only disk. */
		st = blk_do(b, VIRTIO_BLK_T_OUT, start, buf, SECTOR_SIZE);
		if (st == VIRTIO_BLK_S_IOERR) {
			say("blk read-only write ioerr ok");
		} else {
			say("blk read-only write: FAILED: status %d", st);
			problems++;
		}
		long bad = blk_rw_range(b, VIRTIO_BLK_T_IN, start, buf, sectors, chunk, (unsigned)depth);

		if (bad)
			problems++;
		say("blk read %lu sectors bad %ld sum %lx", (unsigned long)sectors, bad,
		    (unsigned long)words_sum(blk_buf, sectors));
	} else {
		uint64_t sum = pattern_fill(blk_buf, start, total, seed);
		long bad = blk_rw_range(b, VIRTIO_BLK_T_OUT, start, buf, total, chunk, (unsigned)depth);

		say("blk wrote %lu sectors at %lu seed %lu bad %ld sum %lx", (unsigned long)total,
		    (unsigned long)start, (unsigned long)seed, bad, (unsigned long)sum);
		if (bad)
			problems++;
		if (b->flush) {
			st = blk_do(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0);
			say("blk flush status %d", st);
			if (st != VIRTIO_BLK_S_OK)
				problems++;
		} else {
			say("blk flush not offered");
		}
		if (hold) {
			/* For the test that kills the VMM here: the data must be
			 * in the image now. */
			say("blk holding");
			for (;;)
				cpu_relax();
		}
		memset(blk_buf, 0xa5, total * SECTOR_SIZE);
		bad = blk_rw_range(b, VIRTIO_BLK_T_IN, start, buf, total, chunk, (unsigned)depth);
		uint64_t got = words_sum(blk_buf, total);

		for (uint64_t s = 0; s < total; s++) {
			for (unsigned w = 0; w < 64; w++) {
				if (blk_buf[s * 64 + w] != pattern_word(start + s, w, seed)) {
					say("blk verify: FAILED: sector %lu word %u",
					    (unsigned long)(start + s), w);
					problems++;
					s = total;
					break;
				}
			}
		}
		say("blk verify %lu sectors bad %ld sum %lx %s", (unsigned long)total, bad,
		    (unsigned long)got, got == sum && !bad ? "ok" : "FAILED");
		problems += got != sum || bad;

		/* The tail: DISCARD the first half, WRITE_ZEROES the second. */
		uint64_t tail = start + sectors;
		uint8_t *tbuf = buf + (sectors << SECTOR_SHIFT);

		if (b->discard) {
			st = blk_do(b, VIRTIO_BLK_T_DISCARD, tail, NULL, TAIL_SECTORS);
			int rst = blk_do(b, VIRTIO_BLK_T_IN, tail, tbuf, TAIL_SECTORS * SECTOR_SIZE);
			int zero = 1;

			for (unsigned i = 0; i < TAIL_SECTORS * SECTOR_SIZE; i++)
				zero &= tbuf[i] == 0;
			/* §5.2.6.2: what a discarded range reads is unspecified */
			say("blk discard %u sectors status %d read status %d reads %s", TAIL_SECTORS,
			    st, rst, zero ? "zeroes" : "data");
			problems += st != VIRTIO_BLK_S_OK || rst != VIRTIO_BLK_S_OK;
		} else {
			say("blk discard not offered");
		}
		if (b->write_zeroes) {
			uint8_t *zbuf = tbuf + TAIL_SECTORS * SECTOR_SIZE;

			st = blk_do(b, VIRTIO_BLK_T_WRITE_ZEROES, tail + TAIL_SECTORS, NULL, TAIL_SECTORS);
			int rst = blk_do(b, VIRTIO_BLK_T_IN, tail + TAIL_SECTORS, zbuf,
					 TAIL_SECTORS * SECTOR_SIZE);
			int zero = 1;

			for (unsigned i = 0; i < TAIL_SECTORS * SECTOR_SIZE; i++)
				zero &= zbuf[i] == 0;
			say("blk write-zeroes %u sectors status %d read status %d %s", TAIL_SECTORS,
			    st, rst, zero && !st && !rst ? "zeroes ok" : "FAILED");
			problems += !zero || st != VIRTIO_BLK_S_OK || rst != VIRTIO_BLK_S_OK;
		} else {
			say("blk write-zeroes not offered");
		}
		if (b->flush && blk_do(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0) != VIRTIO_BLK_S_OK)
			problems++;
	}

	/* Past the end: one sector at capacity, and two straddling it. */
	int st1 = blk_do(b, VIRTIO_BLK_T_IN, b->capacity, buf, SECTOR_SIZE);
	int st2 = blk_do(b, VIRTIO_BLK_T_IN, b->capacity - 1, buf, 2 * SECTOR_SIZE);

	if (st1 == VIRTIO_BLK_S_IOERR && st2 == VIRTIO_BLK_S_IOERR) {
		say("blk read past capacity ioerr ok");
	} else {
		say("blk read past capacity: FAILED: status %d %d", st1, st2);
		problems++;
	}
	say("blk check %s problems %d notifies %lu suppressed %lu", problems ? "FAILED" : "ok",
	    problems, (unsigned long)b->q.notifies, (unsigned long)b->q.notifies_suppressed);
	guest_exit(problems ? 1 : 0);
}

/* --- blk-load ------------------------------------------------------------- */

/* mb= at most 64 GiB: keeps bytes * kHz (the rate below) inside 64 bits. */
#define BLK_LOAD_MB_MAX 65536

void scenario_blk_load(const struct args *a)
{
	const char *mode = arg_value(a, "mode");
	uint64_t bs = 4096, mb = 64, depth = 0, seed = 1;
	int write, random;

	if (!mode || (strcmp(mode, "seqread") && strcmp(mode, "seqwrite") &&
		      strcmp(mode, "randread") && strcmp(mode, "randwrite"))) {
		say("blk-load: mode=seqread|seqwrite|randread|randwrite needed");
		guest_exit(1);
	}
	write = !strcmp(mode, "seqwrite") || !strcmp(mode, "randwrite");
	random = mode[0] == 'r';
	arg_u64(a, "bs", &bs, SECTOR_SIZE, 1u << 20);
	arg_u64(a, "mb", &mb, 1, BLK_LOAD_MB_MAX);
	arg_u64(a, "seed", &seed, 1, UINT64_MAX);
	if (bs % SECTOR_SIZE) {
		say("blk-load: bs=%lu is not a multiple of 512", (unsigned long)bs);
		guest_exit(1);
	}
	uint64_t max_depth = BLK_BUF_BYTES / bs < BLK_MAX_INFLIGHT ? BLK_BUF_BYTES / bs
		: BLK_MAX_INFLIGHT;

	depth = bs >= (1u << 20) ? 4 : 32;
	if (depth > max_depth)
		depth = max_depth;
	arg_u64(a, "depth", &depth, 1, max_depth);
	if (blk_open(a, arg_disk(a), &blk))
		guest_exit(1);
	struct blk_dev *b = &blk;
	uint64_t blocks = (b->capacity << SECTOR_SHIFT) / bs;
	uint64_t ios = (mb << 20) / bs, issued = 0, done = 0, bad = 0, next = 0;

	if (!blocks || ios == 0 || (write && b->ro)) {
		say("blk-load: vd%c has %lu blocks of %lu bytes%s", 'a' + b->index,
		    (unsigned long)blocks, (unsigned long)bs, b->ro ? " and is read-only" : "");
		guest_exit(1);
	}
	pattern_fill(blk_buf, 0, depth * bs / SECTOR_SIZE, seed);
	say("blk load vd%c capacity %lu start", 'a' + b->index, (unsigned long)b->capacity);
	uint64_t t0 = rdtsc();

	while (done < ios) {
		while (issued < ios) {
			uint64_t block;

			if (random) {
				/* xorshift64 (Marsaglia 2003) */
				seed ^= seed << 13;
				seed ^= seed >> 7;
				seed ^= seed << 17;
				block = seed % blocks;
			} else {
				block = next++ % blocks;
			}
			/* Buffer i belongs to request slot i: blk_submit takes the
			 * first free slot, the one found here. */
			struct blk_req *r = NULL;
			unsigned slot = 0;

			while (slot < depth && b->req[slot].busy)
				slot++;
			if (slot == depth)
				break;
			r = blk_submit(b, write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN,
				       block * (bs >> SECTOR_SHIFT),
				       (uint8_t *)blk_buf + slot * bs, (uint32_t)bs);
			if (!r)
				break;
			issued++;
		}
		blk_kick(b);
		struct blk_req *r = blk_reap(b);

		if (!r)
			guest_exit(1);
		bad += r->status != VIRTIO_BLK_S_OK;
		done++;
		/* Take whatever else is already there before refilling. */
		while (done < ios && virtq_has_used(&b->q)) {
			r = blk_reap(b);
			bad += r->status != VIRTIO_BLK_S_OK;
			done++;
		}
	}
	uint64_t ticks = rdtsc() - t0;
	const char *source;
	uint64_t khz = tsc_khz(&source);

	/* pyvmm states no TSC frequency in CPUID: the host may pass it. */
	if (arg_value(a, "tsc_khz")) {
		arg_u64(a, "tsc_khz", &khz, 1, 100000000);
		source = "tsc_khz=";
	}

	if (write && b->flush && blk_do(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0) != VIRTIO_BLK_S_OK)
		bad++;
	say("blk load mode=%s bs=%lu depth=%lu ios=%lu bytes=%lu ticks=%lu bad=%lu", mode,
	    (unsigned long)bs, (unsigned long)depth, (unsigned long)ios,
	    (unsigned long)(ios * bs), (unsigned long)ticks, (unsigned long)bad);
	if (khz && ticks)
		say("blk load %s bs=%lu MiB/s %lu IOPS %lu (tsc %lu kHz from %s)", mode,
		    (unsigned long)bs, (unsigned long)(ios * bs * khz / ticks * 1000 >> 20),
		    (unsigned long)(ios * khz * 1000 / ticks), (unsigned long)khz, source);
	else
		say("blk load: tsc frequency unknown, no rates");
	guest_exit(bad ? 1 : 0);
}
