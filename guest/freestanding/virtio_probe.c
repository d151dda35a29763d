/*
 * virtio_probe.c - the virtio-probe scenario: list every virtio-mmio
 * device the guest finds (virtio_mmio.c) and take each one it has a driver
 * for through §3.1.1 to DRIVER_OK, with its queues, then reset it again.
 * For VMM tests of the transport: the status sequence, feature
 * negotiation, queue registers.
 *
 *   P: virtio_mmio.device=<value> on the command line      (one per word), or
 *   P: no virtio_mmio.device= on the command line: scanned 0xfeb00000..
 *   P: virtio device <i> at 0x<base> irq <irq> id <id> vendor 0x<vendor>
 *   P: virtio device <i> driver ok features 0x<negotiated> offered 0x<offered>
 *   P: virtio device <i> vsock guest_cid <cid>        (device 19 only)
 *   P: virtio device <i> vsock draft guest_cid <cid> pairs 1/<N>   (device 13 only)
 *   P: virtio probe done <n> devices
 */
#include <stdint.h>

#include "console.h"
#include "guest.h"
#include "virtio_mmio.h"
#include "virtqueue.h"

/* Queues per device type this guest knows (§5.3.2, §5.10.2; vsock.h for
 * the draft): how many, from *first on. */
static unsigned queues_for(uint32_t device_id, unsigned *first)
{
	*first = 0;
	switch (device_id) {
	case VIRTIO_ID_CONSOLE:
		return 2;       /* port 0 rx, tx; no MULTIPORT */
	case VIRTIO_ID_VSOCK:
		return 3;       /* rx, tx, event */
	case VIRTIO_ID_VSOCK_DRAFT:
		*first = 1;     /* pair 0 (rx 1, tx 2); the controlq left alone */
		return 2;
	default:
		return 0;
	}
}

static struct virtq probe_queues[3];

void scenario_virtio_probe(const struct args *a)
{
	static struct virtio_mmio_dev devs[VIRTIO_MMIO_MAX_DEVICES];
	int n = virtio_mmio_discover(a, devs, VIRTIO_MMIO_MAX_DEVICES);
	int failed = 0;

	for (int i = 0; i < a->ndevices; i++)
		say("virtio_mmio.device=%s on the command line", a->devices[i]);
	if (!a->ndevices)
		say("no virtio_mmio.device= on the command line: scanned 0x%x..",
		    MICROVM_VIRTIO_BASE);
	for (int i = 0; i < n; i++) {
		struct virtio_mmio_dev *d = &devs[i];
		unsigned first, nq = queues_for(d->device_id, &first);

		say("virtio device %d at 0x%lx irq %u id %u vendor 0x%x", i,
		    (unsigned long)d->base, d->irq, d->device_id, d->vendor_id);
		if (!nq)
			continue;       /* no driver here: leave it untouched */
		int bad = virtio_mmio_begin(d, VIRTIO_BIT(VIRTIO_F_EVENT_IDX));

		for (unsigned q = 0; q < nq && !bad; q++)
			bad = virtio_mmio_setup_queue(d, &probe_queues[q], first + q, 64);
		if (!bad)
			bad = virtio_mmio_driver_ok(d);
		if (bad) {
			failed = 1;
			continue;
		}
		say("virtio device %d driver ok features 0x%lx offered 0x%lx", i,
		    (unsigned long)d->features, (unsigned long)d->offered);
		if (d->device_id == VIRTIO_ID_VSOCK)
			say("virtio device %d vsock guest_cid %lu", i,
			    (unsigned long)virtio_mmio_config_read64(d, 0));
		if (d->device_id == VIRTIO_ID_VSOCK_DRAFT)
			say("virtio device %d vsock draft guest_cid %u pairs 1/%u", i,
			    virtio_mmio_config_read32(d, 0), virtio_mmio_config_read32(d, 4));
		/* Reset (§2.4): the device forgets the queues, which are
		 * reused for the next device. */
		virtio_mmio_write(d, VIRTIO_MMIO_STATUS, 0);
	}
	say("virtio probe done %d devices", n);
	guest_exit(failed);
}
