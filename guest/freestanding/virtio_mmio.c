/*
 * virtio_mmio.c - finding virtio-mmio devices and the driver's half of
 * device initialisation (virtio 1.2 §3.1.1, §4.2.3), at CPL3 by MMIO.
 */
#include <stdint.h>

#include "console.h"
#include "fmt.h"
#include "guest.h"
#include "io.h"
#include "virtio_mmio.h"
#include "virtqueue.h"

/* Bound for the spins on device registers (reset completion): 2^32 TSC
 * ticks, about 1.5 s at 2.6 GHz.  A device acts on a register write before
 * the MMIO exit returns, so the first read normally succeeds. */
#define REGISTER_WAIT_TSC       (1ull << 32)

uint32_t virtio_mmio_read(const struct virtio_mmio_dev *d, unsigned reg)
{
	return mmio_read32(d->base + reg);
}

void virtio_mmio_write(const struct virtio_mmio_dev *d, unsigned reg, uint32_t v)
{
	mmio_write32(d->base + reg, v);
}

void virtio_mmio_notify(const struct virtio_mmio_dev *d, unsigned queue)
{
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_NOTIFY, queue);
}

/* --- discovery ----------------------------------------------------------- */

/* A number at *s: decimal, or hex with 0x; advances *s.  -1 if none. */
static int take_number(const char **s, uint64_t *out)
{
	const char *p = *s;
	unsigned base = 10;
	uint64_t v = 0;
	int digits = 0;

	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		base = 16;
		p += 2;
	}
	for (;; p++, digits++) {
		unsigned d;

		if (*p >= '0' && *p <= '9')
			d = (unsigned)(*p - '0');
		else if (base == 16 && *p >= 'a' && *p <= 'f')
			d = (unsigned)(*p - 'a' + 10);
		else if (base == 16 && *p >= 'A' && *p <= 'F')
			d = (unsigned)(*p - 'A' + 10);
		else
			break;
		v = v * base + d;
	}
	if (!digits)
		return -1;
	*s = p;
	*out = v;
	return 0;
}

/* "<size>@<base>:<irq>[:<id>]", size with an optional K/M/G suffix (Linux's
 * memparse), as vm_cmdline_set() in drivers/virtio/virtio_mmio.c reads it. */
static int parse_device_word(const char *s, struct virtio_mmio_dev *d)
{
	uint64_t size, base, irq;

	if (take_number(&s, &size))
		return -1;
	switch (*s) {
	case 'K': case 'k': size <<= 10; s++; break;
	case 'M': case 'm': size <<= 20; s++; break;
	case 'G': case 'g': size <<= 30; s++; break;
	}
	if (*s++ != '@' || take_number(&s, &base) || *s++ != ':' ||
	    take_number(&s, &irq) || (*s && *s != ':'))
		return -1;
	if (base > 0xffffffffull - 0x1000 || size < 0x100)
		return -1;              /* outside the 4 GiB this guest maps */
	d->base = (uintptr_t)base;
	d->size = size;
	d->irq = (uint32_t)irq;
	return 0;
}

/* Read the identification registers (§4.2.2); 0 if this is a usable
 * version-2 device, else -1 (with a line unless it is an empty slot). */
static int identify(struct virtio_mmio_dev *d, int quiet)
{
	uint32_t magic = virtio_mmio_read(d, VIRTIO_MMIO_MAGIC_VALUE);

	if (magic != VIRTIO_MMIO_MAGIC) {
		if (!quiet)
			say("virtio-mmio at 0x%lx: bad magic 0x%x",
			    (unsigned long)d->base, magic);
		return -1;
	}
	uint32_t version = virtio_mmio_read(d, VIRTIO_MMIO_VERSION);

	d->device_id = virtio_mmio_read(d, VIRTIO_MMIO_DEVICE_ID);
	d->vendor_id = virtio_mmio_read(d, VIRTIO_MMIO_VENDOR_ID);
	if (d->device_id == 0)          /* §4.2.3.1: a placeholder, skip */
		return -1;
	if (version != 2) {
		/* Version 1 is the legacy interface (§4.2.4), which this driver
		 * does not speak (QEMU: -global virtio-mmio.force-legacy=false). */
		say("virtio-mmio at 0x%lx: device %u has version %u, not 2: skipped",
		    (unsigned long)d->base, d->device_id, version);
		return -1;
	}
	return 0;
}

int virtio_mmio_discover(const struct args *a, struct virtio_mmio_dev *out, int max)
{
	int n = 0;

	for (int i = 0; i < a->ndevices && n < max; i++) {
		struct virtio_mmio_dev d = { 0 };

		if (parse_device_word(a->devices[i], &d)) {
			say("virtio-mmio: cannot parse 'virtio_mmio.device=%s'",
			    a->devices[i]);
			continue;
		}
		if (!identify(&d, 0))
			out[n++] = d;
	}
	if (a->ndevices)
		return n;
	/* Nothing announced: scan QEMU microvm's transports (no other machine
	 * this guest runs on has MMIO there; on pyvmm the command line always
	 * names its devices).  Empty transports read magic + DeviceID 0. */
	for (unsigned i = 0; i < MICROVM_VIRTIO_COUNT && n < max; i++) {
		struct virtio_mmio_dev d = { 0 };

		d.base = MICROVM_VIRTIO_BASE + i * MICROVM_VIRTIO_STRIDE;
		d.size = MICROVM_VIRTIO_STRIDE;
		if (!identify(&d, 1))
			out[n++] = d;
	}
	return n;
}

struct virtio_mmio_dev *virtio_mmio_find_any(const struct args *a, const uint32_t *ids,
					     unsigned nids, int *index)
{
	static struct virtio_mmio_dev devices[VIRTIO_MMIO_MAX_DEVICES];
	int n = virtio_mmio_discover(a, devices, VIRTIO_MMIO_MAX_DEVICES);
	char names[64];
	size_t used = 0;

	for (int i = 0; i < n; i++) {
		for (unsigned k = 0; k < nids; k++) {
			if (devices[i].device_id == ids[k]) {
				if (index)
					*index = i;
				return &devices[i];
			}
		}
	}
	names[0] = '\0';
	for (unsigned k = 0; k < nids; k++)
		used += format(names + used, sizeof(names) - used, "%s%u",
			       k ? " or " : "", ids[k]);
	say("virtio: no device with id %s (%d virtio-mmio devices found%s)",
	    names, n, a->ndevices ? "" : ", none on the command line");
	return NULL;
}

struct virtio_mmio_dev *virtio_mmio_find(const struct args *a, uint32_t device_id)
{
	return virtio_mmio_find_any(a, &device_id, 1, NULL);
}

/* --- initialisation (§3.1.1) -------------------------------------------- */

void virtio_mmio_fail(struct virtio_mmio_dev *d)
{
	virtio_mmio_write(d, VIRTIO_MMIO_STATUS,
			  virtio_mmio_read(d, VIRTIO_MMIO_STATUS) | VIRTIO_STATUS_FAILED);
}

static void add_status(struct virtio_mmio_dev *d, uint32_t bit)
{
	virtio_mmio_write(d, VIRTIO_MMIO_STATUS,
			  virtio_mmio_read(d, VIRTIO_MMIO_STATUS) | bit);
}

int virtio_mmio_begin(struct virtio_mmio_dev *d, uint64_t wanted)
{
	/* 1. Reset (§2.4.1: "The driver SHOULD consider a driver-initiated
	 *    reset complete when it reads device status as 0"). */
	virtio_mmio_write(d, VIRTIO_MMIO_STATUS, 0);
	uint64_t start = rdtsc();

	while (virtio_mmio_read(d, VIRTIO_MMIO_STATUS) != 0) {
		if (rdtsc() - start > REGISTER_WAIT_TSC) {
			say("virtio %u at 0x%lx: status not 0 after reset",
			    d->device_id, (unsigned long)d->base);
			return -1;
		}
		cpu_relax();
	}
	/* 2. ACKNOWLEDGE: we noticed the device.  3. DRIVER: we can drive it. */
	add_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	add_status(d, VIRTIO_STATUS_DRIVER);

	/* 4. Read the offered features, 32 bits per window (§4.2.2
	 *    DeviceFeaturesSel), and write back the subset we understand. */
	virtio_mmio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	d->offered = virtio_mmio_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
	virtio_mmio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	d->offered |= (uint64_t)virtio_mmio_read(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	if (!(d->offered & VIRTIO_BIT(VIRTIO_F_VERSION_1))) {
		/* §4.2.3.1 + §6: a version-2 device must offer VERSION_1. */
		say("virtio %u at 0x%lx: VIRTIO_F_VERSION_1 not offered (features 0x%lx)",
		    d->device_id, (unsigned long)d->base, (unsigned long)d->offered);
		virtio_mmio_fail(d);
		return -1;
	}
	d->features = d->offered & (wanted | VIRTIO_BIT(VIRTIO_F_VERSION_1));
	virtio_mmio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	virtio_mmio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)d->features);
	virtio_mmio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	virtio_mmio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(d->features >> 32));

	/* 5. FEATURES_OK, 6. read it back: still set = the device accepts. */
	add_status(d, VIRTIO_STATUS_FEATURES_OK);
	if (!(virtio_mmio_read(d, VIRTIO_MMIO_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
		say("virtio %u at 0x%lx: device refused features 0x%lx",
		    d->device_id, (unsigned long)d->base, (unsigned long)d->features);
		virtio_mmio_fail(d);
		return -1;
	}
	return 0;
}

/* The largest power of two <= n (n >= 1): split queue sizes must be
 * powers of two (§2.7 "Split Virtqueues": "Queue Size ... power of 2"). */
static unsigned pow2_floor(unsigned n)
{
	unsigned p = 1;

	while (p * 2 <= n)
		p *= 2;
	return p;
}

int virtio_mmio_setup_queue(struct virtio_mmio_dev *d, struct virtq *q,
			    unsigned index, unsigned want_size)
{
	/* §4.2.3.2 "Virtqueue Configuration", steps 1-8. */
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
	if (virtio_mmio_read(d, VIRTIO_MMIO_QUEUE_READY)) {
		say("virtio %u: queue %u already ready after reset", d->device_id, index);
		virtio_mmio_fail(d);
		return -1;
	}
	uint32_t max = virtio_mmio_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);

	if (max == 0) {
		say("virtio %u: queue %u not available", d->device_id, index);
		virtio_mmio_fail(d);
		return -1;
	}
	if (want_size > VIRTQ_MAX_SIZE)
		want_size = VIRTQ_MAX_SIZE;
	unsigned size = pow2_floor(max < want_size ? max : want_size);

	virtq_init(q, d, index, (uint16_t)size,
		   !!(d->features & VIRTIO_BIT(VIRTIO_F_EVENT_IDX)));
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_NUM, size);
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)(uintptr_t)q->desc);
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)((uint64_t)(uintptr_t)q->desc >> 32));
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (uint32_t)(uintptr_t)q->avail);
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (uint32_t)((uint64_t)(uintptr_t)q->avail >> 32));
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (uint32_t)(uintptr_t)q->used);
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (uint32_t)((uint64_t)(uintptr_t)q->used >> 32));
	virtio_mmio_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
	if (virtio_mmio_read(d, VIRTIO_MMIO_QUEUE_READY) != 1) {
		say("virtio %u: queue %u did not become ready", d->device_id, index);
		virtio_mmio_fail(d);
		return -1;
	}
	return 0;
}

int virtio_mmio_driver_ok(struct virtio_mmio_dev *d)
{
	add_status(d, VIRTIO_STATUS_DRIVER_OK);
	uint32_t status = virtio_mmio_read(d, VIRTIO_MMIO_STATUS);

	if (status & VIRTIO_STATUS_DEVICE_NEEDS_RESET || !(status & VIRTIO_STATUS_DRIVER_OK)) {
		say("virtio %u: status 0x%x after DRIVER_OK", d->device_id, status);
		virtio_mmio_fail(d);
		return -1;
	}
	return 0;
}

/* --- device configuration space ------------------------------------------ */

uint32_t virtio_mmio_config_read32(const struct virtio_mmio_dev *d, unsigned offset)
{
	return virtio_mmio_read(d, VIRTIO_MMIO_CONFIG + offset);
}

uint64_t virtio_mmio_config_read64(const struct virtio_mmio_dev *d, unsigned offset)
{
	/* §2.5.1: a field wider than 32 bits may tear; read it between two
	 * equal ConfigGeneration values.  Bounded: a device changes its
	 * config rarely, so a few rounds always suffice. */
	uint32_t gen, lo, hi;

	for (int tries = 0; tries < 1000; tries++) {
		gen = virtio_mmio_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = virtio_mmio_config_read32(d, offset);
		hi = virtio_mmio_config_read32(d, offset + 4);
		if (virtio_mmio_read(d, VIRTIO_MMIO_CONFIG_GENERATION) == gen)
			break;
	}
	return (uint64_t)hi << 32 | lo;
}
