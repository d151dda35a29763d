/*
 * virtio_mmio.h - the virtio-mmio transport, version 2, as a driver sees it
 * (virtio 1.2, §4.2 "Virtio Over MMIO"), plus the transport-independent
 * constants every virtio driver needs (§2.1 status bits, §6 reserved
 * feature bits, §5 device IDs).
 *
 * Everything here runs at CPL3: a virtio-mmio device is a page of 32-bit
 * registers, and MMIO needs no privilege (the page tables map 0..4 GiB with
 * U/S = 1, the top GiB uncached: tables.S).  Each register access is one
 * exit to the VMM (about 25 us from CPL3 on PVM hosts), so the data path
 * avoids them: virtqueues live in guest RAM (virtqueue.h) and only
 * QueueNotify is written per batch.
 */
#ifndef PYVMM_GUEST_VIRTIO_MMIO_H
#define PYVMM_GUEST_VIRTIO_MMIO_H

#include <stdint.h>

#include "guest.h"

/* --- §4.2.2 "MMIO Device Register Layout" (offsets from the base) ------- */
#define VIRTIO_MMIO_MAGIC_VALUE         0x000   /* R: 0x74726976, "virt" */
#define VIRTIO_MMIO_VERSION             0x004   /* R: 2 (1 = legacy) */
#define VIRTIO_MMIO_DEVICE_ID           0x008   /* R: 0 = no device here */
#define VIRTIO_MMIO_VENDOR_ID           0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES     0x010   /* R: 32 bits, window below */
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014   /* W: 0 = bits 0-31, 1 = 32-63 */
#define VIRTIO_MMIO_DRIVER_FEATURES     0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL           0x030   /* W: selects the queue below */
#define VIRTIO_MMIO_QUEUE_NUM_MAX       0x034   /* R: 0 = queue absent */
#define VIRTIO_MMIO_QUEUE_NUM           0x038   /* W: queue size chosen */
#define VIRTIO_MMIO_QUEUE_READY         0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY        0x050   /* W: queue index */
#define VIRTIO_MMIO_INTERRUPT_STATUS    0x060
#define VIRTIO_MMIO_INTERRUPT_ACK       0x064
#define VIRTIO_MMIO_STATUS              0x070   /* RW: 0 = reset */
#define VIRTIO_MMIO_QUEUE_DESC_LOW      0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH     0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW    0x090   /* the available ring */
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH   0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW    0x0a0   /* the used ring */
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION   0x0fc
#define VIRTIO_MMIO_CONFIG              0x100   /* device-specific config */

#define VIRTIO_MMIO_MAGIC               0x74726976

/* --- §2.1 "Device Status Field" ------------------------------------------ */
#define VIRTIO_STATUS_ACKNOWLEDGE       1
#define VIRTIO_STATUS_DRIVER            2
#define VIRTIO_STATUS_DRIVER_OK         4
#define VIRTIO_STATUS_FEATURES_OK       8
#define VIRTIO_STATUS_DEVICE_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED            128

/* --- §6 "Reserved Feature Bits" (bit numbers) ---------------------------- */
#define VIRTIO_F_INDIRECT_DESC          28
#define VIRTIO_F_EVENT_IDX              29
#define VIRTIO_F_VERSION_1              32
#define VIRTIO_BIT(n)                   (1ull << (n))

/* --- §5 "Device Types" (IDs used here) ----------------------------------- */
#define VIRTIO_ID_CONSOLE               3
#define VIRTIO_ID_VSOCK                 19
/* The 2013 RFC's vsock device (vsock.h, draft mode).  Since 2014 the spec
 * gives 13 to the memory balloon; pyvmm offers it only when asked. */
#define VIRTIO_ID_VSOCK_DRAFT           13

/*
 * Where devices are found.  pyvmm: device i at 0xd0000000 + i * 4 KiB, IRQ
 * 5 + i, each announced on the command line.  QEMU -M microvm: transports
 * at 0xfeb00000 + i * 512, announced on the command line too with
 * auto-kernel-cmdline=on (its default); without it this guest scans them.
 */
#define VIRTIO_MMIO_MAX_DEVICES         32
#define MICROVM_VIRTIO_BASE             0xfeb00000u
#define MICROVM_VIRTIO_STRIDE           0x200u
#define MICROVM_VIRTIO_COUNT            24      /* microvm without ioapic2 */

struct virtio_mmio_dev {
	uintptr_t base;
	uint64_t size;
	uint32_t irq;           /* 0 when found by scanning */
	uint32_t device_id;
	uint32_t vendor_id;
	uint64_t offered;       /* DeviceFeatures, bits 0-63 */
	uint64_t features;      /* what was negotiated (FEATURES_OK accepted) */
};

/* The devices announced by "virtio_mmio.device=<size>@<base>:<irq>[:<id>]"
 * words (Linux's format, drivers/virtio/virtio_mmio.c), or found by scanning
 * QEMU microvm's window when there are none.  Slots whose DeviceID is 0
 * (placeholders) are left out; so are slots without the magic value or
 * with a version other than 2, with one line saying why.  Returns the
 * count. */
int virtio_mmio_discover(const struct args *a, struct virtio_mmio_dev *out, int max);

/* The first discovered device with this DeviceID, or NULL (with a line). */
struct virtio_mmio_dev *virtio_mmio_find(const struct args *a, uint32_t device_id);
/* The first discovered device whose DeviceID is one of ids[0..n-1], and
 * its place among the discovered devices in *index; or NULL (with a line
 * naming the ids). */
struct virtio_mmio_dev *virtio_mmio_find_any(const struct args *a, const uint32_t *ids,
					     unsigned n, int *index);

struct virtq;

/*
 * §3.1.1 "Driver Requirements: Device Initialization", in three calls:
 *   virtio_mmio_begin        steps 1-6: reset, ACKNOWLEDGE, DRIVER, read the
 *                            offered features, write offered & wanted
 *                            (VIRTIO_F_VERSION_1 is required, since a version
 *                            2 device without it is not a virtio 1 device),
 *                            FEATURES_OK, read it back;
 *   virtio_mmio_setup_queue  step 7, once per queue (§4.2.3.2);
 *   virtio_mmio_driver_ok    step 8: DRIVER_OK.
 * Each returns 0, or -1 after printing why and setting FAILED.
 */
int virtio_mmio_begin(struct virtio_mmio_dev *d, uint64_t wanted);
int virtio_mmio_setup_queue(struct virtio_mmio_dev *d, struct virtq *q,
			    unsigned index, unsigned want_size);
int virtio_mmio_driver_ok(struct virtio_mmio_dev *d);

/* Mark the device FAILED (§2.1): the driver gave up on it. */
void virtio_mmio_fail(struct virtio_mmio_dev *d);

/* §4.2.3.3 "Available Buffer Notifications": write the queue index. */
void virtio_mmio_notify(const struct virtio_mmio_dev *d, unsigned queue);

uint32_t virtio_mmio_read(const struct virtio_mmio_dev *d, unsigned reg);
void virtio_mmio_write(const struct virtio_mmio_dev *d, unsigned reg, uint32_t v);

/* Device-specific configuration (§2.5, §4.2.2): 32-bit reads at
 * VIRTIO_MMIO_CONFIG + offset; a 64-bit field as two of them, retried
 * while ConfigGeneration changes (§2.5.1 "Driver Requirements: Device
 * Configuration Space"). */
uint32_t virtio_mmio_config_read32(const struct virtio_mmio_dev *d, unsigned offset);
uint64_t virtio_mmio_config_read64(const struct virtio_mmio_dev *d, unsigned offset);

#endif
