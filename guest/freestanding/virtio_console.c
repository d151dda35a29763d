/*
 * virtio_console.c - the virtio console device (virtio 1.2 §5.3, device ID
 * 3) as a byte pipe, in one of two set-ups:
 *
 *   single port (the default): port 0 only, receiveq(port0) = queue 0 and
 *     transmitq(port0) = queue 1; VIRTIO_CONSOLE_F_MULTIPORT is not
 *     negotiated, so no control queues (§5.3.2: "The port 0 receive and
 *     transmit queues always exist: other queues only exist if
 *     VIRTIO_CONSOLE_F_MULTIPORT is set").  Works with any console device.
 *     QEMU: -device virtio-serial-device -device virtconsole,chardev=X.
 *     QEMU opens port 0 for a non-multiport guest at DRIVER_OK, but a
 *     console port is not flow-controlled: when the chardev (a Unix socket)
 *     takes fewer bytes than offered, QEMU drops the rest
 *     (hw/char/virtio-console.c, flush_buf: only non-console ports are
 *     throttled).  Lossless only while the host reads faster than the guest
 *     writes.
 *
 *   port=N (N >= 1): MULTIPORT negotiated, the control queues (2, 3) and
 *     port N's queues (2 + 2N, 3 + 2N) set up, and the control protocol of
 *     §5.3.6.2 run: DEVICE_READY; for each DEVICE_ADD a PORT_READY; a
 *     PORT_OPEN for CONSOLE_PORT (MUST) and for port N (so the device sends
 *     it data).  QEMU: -device virtserialport,chardev=X,nr=N, a generic port
 *     that QEMU throttles when the chardev is full: a lossless pipe.
 *
 * Neither F_SIZE nor F_EMERG_WRITE is used.
 *
 * Scenarios (README.md, "Scenarios"):
 *   console-echo [bytes=N] [port=P] [idle=TICKS]   echo every byte received
 *   console-bulk-send bytes=N [chunk=S] [port=P] [verify=full|word]
 *                                                  send N bytes of the test stream
 *   console-bulk-recv bytes=N [port=P] [verify=full|word]
 *                                                  receive and check N bytes of it
 * verify (teststream.h): how the bytes are checked and hashed ("fnv" or
 * "whash" in the result lines).
 */
#include <stdint.h>

#include "console.h"
#include "fmt.h"
#include "guest.h"
#include "io.h"
#include "teststream.h"
#include "tsc.h"
#include "virtio_mmio.h"
#include "virtqueue.h"

#define CONSOLE_QUEUE_SIZE      32
#define CONSOLE_BUFS            16      /* rx buffers posted; tx buffers */
#define CONSOLE_BUF_SIZE        4096

/* §5.3.3 feature bits and §5.3.4 config layout */
#define VIRTIO_CONSOLE_F_MULTIPORT      1
#define CONSOLE_CONFIG_MAX_NR_PORTS     4       /* le32 after le16 rows, cols */

/* §5.3.6.2 "Multiport Device Operation": control messages */
struct __attribute__((packed)) virtio_console_control {
	uint32_t id;            /* port number */
	uint16_t event;
	uint16_t value;
};
#define VIRTIO_CONSOLE_DEVICE_READY     0
#define VIRTIO_CONSOLE_DEVICE_ADD       1
#define VIRTIO_CONSOLE_DEVICE_REMOVE    2
#define VIRTIO_CONSOLE_PORT_READY       3
#define VIRTIO_CONSOLE_CONSOLE_PORT     4
#define VIRTIO_CONSOLE_RESIZE           5
#define VIRTIO_CONSOLE_PORT_OPEN        6
#define VIRTIO_CONSOLE_PORT_NAME        7
#define CONTROL_BUFS                    8
#define CONTROL_BUF_SIZE                256     /* PORT_NAME carries a name */

static struct virtq rxq, txq, ctrl_rxq, ctrl_txq;
static uint8_t rx_buf[CONSOLE_BUFS][CONSOLE_BUF_SIZE];
static uint8_t tx_buf[CONSOLE_BUFS][CONSOLE_BUF_SIZE];
static uint8_t *tx_free[CONSOLE_BUFS];  /* a stack of idle tx buffers */
static unsigned tx_nfree;
static uint8_t ctrl_rx_buf[CONTROL_BUFS][CONTROL_BUF_SIZE];
static struct virtio_console_control ctrl_tx_buf[CONTROL_BUFS];
static unsigned ctrl_tx_next;
static int multiport, port_added, host_open;
static uint32_t our_port;

/* --- the control queues (MULTIPORT only) ---------------------------------- */

static void control_send(uint32_t id, uint16_t event, uint16_t value, uint64_t idle)
{
	uint32_t len;

	/* Reuse the ring of control tx buffers; wait (bounded) while all are
	 * with the device. */
	while (virtq_get_used(&ctrl_txq, &len))
		;
	if (!ctrl_txq.num_free) {
		virtq_kick(&ctrl_txq);
		if (virtq_wait_used(&ctrl_txq, idle)) {
			say("console: timeout: control tx queue stuck");
			guest_exit(1);
		}
		virtq_get_used(&ctrl_txq, &len);
	}
	struct virtio_console_control *m = &ctrl_tx_buf[ctrl_tx_next++ % CONTROL_BUFS];
	struct virtq_buf b = { m, sizeof(*m) };

	m->id = id;
	m->event = event;
	m->value = value;
	virtq_add(&ctrl_txq, &b, 1, 0, m);
	virtq_kick(&ctrl_txq);
}

/* Handle every control message the device has sent; returns how many. */
static unsigned control_poll(uint64_t idle)
{
	unsigned n = 0;
	uint32_t len;
	uint8_t *buf;

	if (!multiport)
		return 0;
	while ((buf = virtq_get_used(&ctrl_rxq, &len))) {
		const struct virtio_console_control *m = (const void *)buf;

		n++;
		if (len >= sizeof(*m)) {
			switch (m->event) {
			case VIRTIO_CONSOLE_DEVICE_ADD:
				/* §5.3.5 step 3: PORT_READY once the port is set up. */
				control_send(m->id, VIRTIO_CONSOLE_PORT_READY, 1, idle);
				if (m->id == our_port) {
					port_added = 1;
					control_send(m->id, VIRTIO_CONSOLE_PORT_OPEN, 1, idle);
				}
				break;
			case VIRTIO_CONSOLE_CONSOLE_PORT:
				/* §5.3.6.2.2: MUST answer with PORT_OPEN, value 1. */
				control_send(m->id, VIRTIO_CONSOLE_PORT_OPEN, 1, idle);
				break;
			case VIRTIO_CONSOLE_PORT_OPEN:
				if (m->id == our_port)
					host_open = m->value;
				break;
			default:        /* REMOVE, RESIZE, NAME: nothing to do */
				break;
			}
		}
		struct virtq_buf b = { buf, CONTROL_BUF_SIZE };

		virtq_add(&ctrl_rxq, &b, 0, 1, buf);
	}
	if (n)
		virtq_kick(&ctrl_rxq);
	return n;
}

/* Probe (§3.1.1), set up the queues, post every rx buffer; in MULTIPORT
 * mode run the control protocol until our port is added and opened. */
static struct virtio_mmio_dev *console_open(const struct args *a, uint64_t idle)
{
	struct virtio_mmio_dev *d = virtio_mmio_find(a, VIRTIO_ID_CONSOLE);
	uint64_t port = 0;

	arg_u64(a, "port", &port, 1, 0x7ffe);
	if (!d)
		guest_exit(1);
	multiport = port != 0;
	our_port = (uint32_t)port;
	if (virtio_mmio_begin(d, VIRTIO_BIT(VIRTIO_F_EVENT_IDX) |
			      (multiport ? VIRTIO_BIT(VIRTIO_CONSOLE_F_MULTIPORT) : 0)))
		guest_exit(1);
	if (multiport) {
		if (!(d->features & VIRTIO_BIT(VIRTIO_CONSOLE_F_MULTIPORT))) {
			say("console: port=%u needs VIRTIO_CONSOLE_F_MULTIPORT, not offered",
			    our_port);
			virtio_mmio_fail(d);
			guest_exit(1);
		}
		uint32_t max_ports = virtio_mmio_config_read32(d, CONSOLE_CONFIG_MAX_NR_PORTS);

		if (our_port >= max_ports) {
			say("console: port %u >= max_nr_ports %u", our_port, max_ports);
			virtio_mmio_fail(d);
			guest_exit(1);
		}
	}
	/* §5.3.2: port 0 uses queues 0 and 1, port N >= 1 queues 2+2N, 3+2N;
	 * the control queues are 2 and 3. */
	unsigned rx_index = multiport ? 2 + 2 * our_port : 0;

	if (virtio_mmio_setup_queue(d, &rxq, rx_index, CONSOLE_QUEUE_SIZE) ||
	    virtio_mmio_setup_queue(d, &txq, rx_index + 1, CONSOLE_QUEUE_SIZE) ||
	    (multiport &&
	     (virtio_mmio_setup_queue(d, &ctrl_rxq, 2, CONTROL_BUFS) ||
	      virtio_mmio_setup_queue(d, &ctrl_txq, 3, CONTROL_BUFS))) ||
	    virtio_mmio_driver_ok(d))
		guest_exit(1);
	/* §5.3.5 step 4: "The receiveq for each port is populated with one or
	 * more receive buffers" - device-writable only (§5.3.6.1). */
	for (unsigned i = 0; i < CONSOLE_BUFS; i++) {
		struct virtq_buf b = { rx_buf[i], CONSOLE_BUF_SIZE };

		virtq_add(&rxq, &b, 0, 1, rx_buf[i]);
	}
	virtq_kick(&rxq);
	for (unsigned i = 0; i < CONSOLE_BUFS; i++)
		tx_free[i] = tx_buf[i];
	tx_nfree = CONSOLE_BUFS;
	if (multiport) {
		for (unsigned i = 0; i < CONTROL_BUFS; i++) {
			struct virtq_buf b = { ctrl_rx_buf[i], CONTROL_BUF_SIZE };

			virtq_add(&ctrl_rxq, &b, 0, 1, ctrl_rx_buf[i]);
		}
		virtq_kick(&ctrl_rxq);
		/* §5.3.6.2.2: "The driver MUST send a VIRTIO_CONSOLE_DEVICE_READY
		 * message if VIRTIO_CONSOLE_F_MULTIPORT is negotiated." */
		control_send(0, VIRTIO_CONSOLE_DEVICE_READY, 1, idle);

		uint64_t start = rdtsc();

		while (!port_added) {
			if (!control_poll(idle) && rdtsc() - start > idle) {
				say("console: timeout: the device did not add port %u", our_port);
				guest_exit(1);
			}
			cpu_relax();
		}
	}
	say("console ready at 0x%lx features 0x%lx port %u", (unsigned long)d->base,
	    (unsigned long)d->features, our_port);
	return d;
}

/* Take back every tx buffer the device has finished with. */
static void reap_tx(void)
{
	uint32_t len;
	void *t;

	while ((t = virtq_get_used(&txq, &len)))
		tx_free[tx_nfree++] = t;
}

/* An idle tx buffer, waiting (bounded) for one if all are in flight. */
static uint8_t *get_tx_buffer(uint64_t idle)
{
	reap_tx();
	if (!tx_nfree) {
		virtq_kick(&txq);
		if (virtq_wait_used(&txq, idle)) {
			say("console: timeout: the device returned no tx buffer "
			    "in %lu ticks", (unsigned long)idle);
			guest_exit(1);
		}
		reap_tx();
	}
	return tx_free[--tx_nfree];
}

static void send(uint8_t *buf, uint32_t len)
{
	struct virtq_buf b = { buf, len };

	virtq_add(&txq, &b, 1, 0, buf);         /* CONSOLE_BUFS <= queue size */
}

/* Wait (bounded) until the device has consumed every tx buffer. */
static void drain_tx(uint64_t idle)
{
	virtq_kick(&txq);
	while (reap_tx(), tx_nfree < CONSOLE_BUFS) {
		if (virtq_wait_used(&txq, idle)) {
			say("console: timeout: %u tx buffers still with the device "
			    "after %lu ticks", CONSOLE_BUFS - tx_nfree, (unsigned long)idle);
			guest_exit(1);
		}
	}
}

static void say_stats(void)
{
	say("console rx notifies %lu suppressed %lu, tx notifies %lu suppressed %lu",
	    (unsigned long)rxq.notifies, (unsigned long)rxq.notifies_suppressed,
	    (unsigned long)txq.notifies, (unsigned long)txq.notifies_suppressed);
}

void scenario_console_echo(const struct args *a)
{
	uint64_t want = 0, idle = IDLE_TSC_DEFAULT, echoed = 0;

	arg_u64(a, "bytes", &want, 0, UINT64_MAX);
	arg_u64(a, "idle", &idle, 1, UINT64_MAX);
	console_open(a, idle);

	uint64_t last = rdtsc();

	while (!want || echoed < want) {
		uint32_t len;
		uint8_t *in = virtq_get_used(&rxq, &len);

		if (!in) {
			virtq_kick(&txq);       /* flush what this pass queued */
			virtq_kick(&rxq);
			if (control_poll(idle))
				last = rdtsc();
			else if (rdtsc() - last > idle)
				break;
			cpu_relax();
			continue;
		}
		last = rdtsc();
		if (len > CONSOLE_BUF_SIZE) {
			say("console: device wrote %u bytes into a %u-byte buffer",
			    len, CONSOLE_BUF_SIZE);
			guest_exit(1);
		}
		if (len) {
			uint8_t *out = get_tx_buffer(idle);

			memcpy(out, in, len);
			send(out, len);
			echoed += len;
		}
		struct virtq_buf b = { in, CONSOLE_BUF_SIZE };

		virtq_add(&rxq, &b, 0, 1, in);  /* re-post; kicked when idle */
	}
	drain_tx(idle);
	say_stats();
	if (want && echoed < want) {
		say("console echo: timeout: %lu of %lu bytes after %lu idle ticks",
		    (unsigned long)echoed, (unsigned long)want, (unsigned long)idle);
		guest_exit(1);
	}
	say("console echo done %lu bytes%s", (unsigned long)echoed, want ? "" : " (idle)");
	guest_exit(0);
}

void scenario_console_bulk_send(const struct args *a)
{
	uint64_t total = 0, chunk = CONSOLE_BUF_SIZE, idle = IDLE_TSC_DEFAULT, sent = 0;
	struct stream_end s;

	stream_end_init(&s, arg_verify(a));

	if (!arg_value(a, "bytes")) {
		say("console-bulk-send: needs bytes=N");
		guest_exit(1);
	}
	arg_u64(a, "bytes", &total, 0, UINT64_MAX);
	arg_u64(a, "chunk", &chunk, 1, CONSOLE_BUF_SIZE);
	arg_u64(a, "idle", &idle, 1, UINT64_MAX);
	console_open(a, idle);

	uint64_t start = rdtsc();

	while (sent < total) {
		uint8_t *out = get_tx_buffer(idle);
		uint32_t n = (uint32_t)(total - sent < chunk ? total - sent : chunk);

		stream_end_fill(&s, out, n);
		send(out, n);
		sent += n;
		if (!tx_nfree)
			virtq_kick(&txq);
	}
	drain_tx(idle);

	uint64_t ticks = rdtsc() - start;

	say_stats();
	say("console bulk sent %lu bytes %s %lx in %lu ticks", (unsigned long)sent,
	    stream_end_hash_name(&s), (unsigned long)stream_end_hash(&s), (unsigned long)ticks);
	say_tsc_frequency();
	guest_exit(0);
}

void scenario_console_bulk_recv(const struct args *a)
{
	uint64_t total = 0, idle = IDLE_TSC_DEFAULT, got = 0, start = 0;
	uint64_t mismatch_at = 0;                              /* first bad byte + 1 */
	struct stream_end s;

	stream_end_init(&s, arg_verify(a));

	if (!arg_value(a, "bytes")) {
		say("console-bulk-recv: needs bytes=N");
		guest_exit(1);
	}
	arg_u64(a, "bytes", &total, 0, UINT64_MAX);
	arg_u64(a, "idle", &idle, 1, UINT64_MAX);
	console_open(a, idle);

	/* The time runs from the first byte received to the last. */
	uint64_t last = rdtsc();

	while (got < total) {
		uint32_t len;
		uint8_t *in = virtq_get_used(&rxq, &len);

		if (!in) {
			virtq_kick(&rxq);       /* re-posted buffers go back here */
			if (control_poll(idle)) {
				last = rdtsc();
			} else if (rdtsc() - last > idle) {
				say_stats();
				say("console bulk recv: timeout: %lu of %lu bytes after %lu idle ticks",
				    (unsigned long)got, (unsigned long)total, (unsigned long)idle);
				guest_exit(1);
			}
			cpu_relax();
			continue;
		}
		last = rdtsc();
		if (!got && len)
			start = last;
		if (len > CONSOLE_BUF_SIZE) {
			say("console: device wrote %u bytes into a %u-byte buffer",
			    len, CONSOLE_BUF_SIZE);
			guest_exit(1);
		}
		if (got + len > total) {
			say("console bulk recv: FAILED: %lu bytes (want %lu): more than asked for",
			    (unsigned long)(got + len), (unsigned long)total);
			guest_exit(1);
		}
		size_t good = stream_end_check(&s, in, len);

		if (good != len && !mismatch_at)
			mismatch_at = got + good + 1;
		got += len;

		struct virtq_buf b = { in, CONSOLE_BUF_SIZE };

		virtq_add(&rxq, &b, 0, 1, in);  /* re-post; kicked when idle */
	}
	virtq_kick(&rxq);

	uint64_t ticks = total ? rdtsc() - start : 0;

	say_stats();
	if (mismatch_at) {
		say("console bulk recv: FAILED: %lu bytes (want %lu), first bad byte %lu",
		    (unsigned long)got, (unsigned long)total, (unsigned long)(mismatch_at - 1));
		guest_exit(1);
	}
	say("console bulk received %lu bytes %s %lx in %lu ticks", (unsigned long)got,
	    stream_end_hash_name(&s), (unsigned long)stream_end_hash(&s), (unsigned long)ticks);
	say_tsc_frequency();
	guest_exit(0);
}
