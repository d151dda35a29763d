/*
 * vsock_scenarios.c - the vsock test scenarios, on top of the driver in
 * vsock.c.  The output lines are a test contract (README.md, "Scenarios").
 *
 *   vsock-echo-server port=P [conns=K]
 *   vsock-echo-client port=P size=S count=N [type=stream|seqpacket] [cid=C]
 *   vsock-echo-many port=P [conns=K] [size=S] [type=stream|seqpacket] [cid=C]
 *   vsock-bulk-send port=P bytes=N [chunk=S] [listen=1] [cid=C]
 *                   [type=stream|seqpacket]
 *   vsock-bulk-recv port=P bytes=N [listen=1] [cid=C]
 *   vsock-connect-loop port=P count=K [size=S] [cid=C]
 * and, datagrams (draft mode only):
 *   vsock-dgram-echo port=P [count=N]
 *   vsock-dgram-client port=P count=N [size=S] [cid=C] [sport=Q] [window=W]
 *                      [linger=TICKS] [maxlost=L] [go=serial]
 *   vsock-dgram-flood port=P count=N [size=S] [cid=C] [sport=Q]
 *   vsock-dgram-sink port=P [count=N] [check=1]
 * and, for all: idle=TICKS (IDLE_TSC_DEFAULT), how long nothing may happen
 * before the scenario gives up with a "timeout" line and exit 1;
 * die=triple-fault|reset after=B, end the machine that way once B bytes are
 * echoed (echo server) or sent (send_stream), connections open; for the
 * stream scenarios but the echo server: verify=full|word (teststream.h),
 * how the bytes are checked and hashed ("fnv" or "whash" in the result
 * lines).
 *
 * The data sent and checked is the xorshift test stream (teststream.h);
 * the echo server returns whatever it gets, keeping SEQPACKET message ends.
 *
 * The stream scenarios run unchanged on either device (vsock.h: standard,
 * ID 19, or the 2013 draft, ID 13); SEQPACKET does not exist in the draft,
 * so type=seqpacket there ends with one line and exit 1.  The datagram
 * scenarios need the draft.
 */
#include <stdint.h>

#include "console.h"
#include "cpu.h"
#include "fmt.h"
#include "guest.h"
#include "io.h"
#include "layout.h"
#include "teststream.h"
#include "tsc.h"
#include "vsock.h"

#define ECHO_RING               32768   /* per connection = its buf_alloc */
#define STAGE_SIZE              VSOCK_TX_PAYLOAD

static uint8_t echo_rings[VSOCK_MAX_CONNS][ECHO_RING];
static uint8_t stage[STAGE_SIZE];
static uint64_t idle;

/* What a scenario checks of the bytes it receives (on_data mode). */
static struct {
	struct stream_end stream;
	uint64_t bytes;
	uint64_t mismatch_at;           /* first bad byte + 1, or 0 */
	uint64_t message_size, eoms, eom_errors;
} rx;

static uint32_t need_port(const struct args *a)
{
	uint64_t port = 0;

	if (!arg_value(a, "port")) {
		say("%s: needs port=P", a->argv[0]);
		guest_exit(1);
	}
	arg_u64(a, "port", &port, 0, 0xffffffffull);
	return (uint32_t)port;
}

/* The die= option: how a scenario ends the machine once it has moved
 * die_after bytes, its connections still open, as a crashing or rebooting
 * guest would: a triple fault (an empty IDT, then #UD: KVM_EXIT_SHUTDOWN)
 * or the i8042 reset. */
static enum { DIE_NOT, DIE_TRIPLE_FAULT, DIE_RESET } die;
static uint64_t die_after;

static void die_args(const struct args *a)
{
	const char *v = arg_value(a, "die");

	die = DIE_NOT;
	die_after = 0;
	arg_u64(a, "after", &die_after, 0, UINT64_MAX);
	if (!v)
		return;
	if (!strcmp(v, "triple-fault"))
		die = DIE_TRIPLE_FAULT;
	else if (!strcmp(v, "reset"))
		die = DIE_RESET;
	else {
		say("%s: bad die=%s (triple-fault, reset)", a->argv[0], v);
		guest_exit(1);
	}
}

/* With die=, once `bytes` (moved so far) reach die_after: one line, then
 * the end, with no exit line. */
static void maybe_die(const char *what, uint64_t bytes, unsigned open)
{
	if (die == DIE_NOT || bytes < die_after)
		return;
	say("%s: dying by %s after %lu bytes, %u connections open", what,
	    die == DIE_RESET ? "reset" : "triple fault", (unsigned long)bytes, open);
	if (die == DIE_RESET)
		sys_outb(I8042_COMMAND_PORT, I8042_CMD_PULSE_RESET);
	syscall2(SYS_SHUTDOWN, 0, 0);   /* triple fault (also if the reset was ignored) */
	for (;;)
		cpu_relax();
}

static void common_args(const struct args *a, uint64_t *cid)
{
	idle = IDLE_TSC_DEFAULT;
	arg_u64(a, "idle", &idle, 1, UINT64_MAX);
	if (cid) {
		*cid = VSOCK_HOST_CID;
		arg_u64(a, "cid", cid, 0, 0xffffffffull);
	}
	die_args(a);
}

/* One step of a bounded wait: PAUSE, or fail with `what` after `idle`
 * ticks without progress. */
static void idle_step(uint64_t *last, unsigned progress, const char *what)
{
	uint64_t now = rdtsc();

	if (progress) {
		*last = now;
	} else if (now - *last > idle) {
		say("%s: timeout: nothing happened for %lu ticks", what,
		    (unsigned long)idle);
		vsock_say_stats();
		guest_exit(1);
	} else {
		cpu_relax();
	}
}

/* on_data: check the bytes against the test stream, hash and count them;
 * on SEQPACKET also that message ends fall every message_size bytes. */
static void check_rx(struct vsock_conn *c, const uint8_t *data, uint32_t len,
		     uint32_t flags)
{
	size_t good = stream_end_check(&rx.stream, data, len);

	if (good != len && !rx.mismatch_at)
		rx.mismatch_at = rx.bytes + good + 1;
	rx.bytes += len;
	if (c->type == VIRTIO_VSOCK_TYPE_SEQPACKET && rx.message_size) {
		int at_end = rx.bytes % rx.message_size == 0;

		if (flags & VIRTIO_VSOCK_SEQ_EOM) {
			rx.eoms++;
			rx.eom_errors += !at_end;
		} else if (at_end && len) {
			rx.eom_errors++;        /* a message end without EOM */
		}
	}
}

static int init_checked_rx(struct vsock_conn *c)
{
	c->on_data = check_rx;
	return 0;
}

static void reset_rx(uint64_t message_size, enum verify_mode mode)
{
	memset(&rx, 0, sizeof(rx));
	stream_end_init(&rx.stream, mode);
	rx.message_size = message_size;
}

/*
 * Send `total` bytes of stream s on c, at most `chunk` bytes per packet
 * (s hashes them); on SEQPACKET the last packet carries EOM.  Polls
 * the driver while it waits for credit or tx buffers.
 */
static void send_stream(struct vsock_conn *c, struct stream_end *s, uint64_t total,
			uint32_t chunk, const char *what)
{
	uint64_t sent = 0, last = rdtsc();
	uint32_t staged = 0, off = 0;

	/* A SEQPACKET message must fit the peer's buffer whole: the peer
	 * cannot hand on (and so never credits back) part of a message
	 * (Linux refuses larger ones with EMSGSIZE). */
	if (c->type == VIRTIO_VSOCK_TYPE_SEQPACKET && total > c->peer_buf_alloc) {
		say("%s: a %lu-byte message exceeds the peer's buf_alloc %lu (EMSGSIZE)",
		    what, (unsigned long)total, (unsigned long)c->peer_buf_alloc);
		guest_exit(1);
	}
	while (sent < total) {
		if (c->state != VSOCK_ESTABLISHED) {
			say("%s: connection ended after %lu of %lu bytes: %s", what,
			    (unsigned long)sent, (unsigned long)total,
			    c->why ? c->why : "closed by peer");
			vsock_say_stats();
			guest_exit(1);
		}
		if (off == staged) {
			staged = (uint32_t)(total - sent < chunk ? total - sent : chunk);
			stream_end_fill(s, stage, staged);
			off = 0;
		}
		uint32_t eom = c->type == VIRTIO_VSOCK_TYPE_SEQPACKET &&
			sent + (staged - off) == total ? VIRTIO_VSOCK_SEQ_EOM : 0;
		uint32_t queued;

		vsock_send(c, stage + off, staged - off, eom, &queued);
		off += queued;
		sent += queued;
		vsock_flush();
		maybe_die(what, sent, 1);
		idle_step(&last, queued + vsock_poll(), what);
	}
}

/* Close c cleanly and wait (bounded by the driver's close timeout) for the
 * end; returns its failure reason or NULL. */
static const char *close_and_wait(struct vsock_conn *c, const char *what)
{
	uint64_t last = rdtsc();

	vsock_close(c);
	vsock_flush();
	while (c->state != VSOCK_CLOSED)
		idle_step(&last, vsock_poll(), what);
	const char *why = c->reset ? c->why : NULL;

	vsock_release(c);
	return why;
}

/* Wait (bounded) until the device has taken every packet we queued. */
static void wait_tx_idle(const char *what)
{
	uint64_t last = rdtsc();

	vsock_flush();
	while (!vsock_tx_idle())
		idle_step(&last, vsock_poll(), what);
}

/* --- vsock-echo-server -------------------------------------------------- */

static int echo_accept(struct vsock_conn *c)
{
	c->ring = echo_rings[c - vsock_conns];
	c->ring_size = c->buf_alloc = ECHO_RING;
	return 0;
}

/* Echo what c's ring holds as far as credit allows, cutting packets at
 * SEQPACKET message ends and passing EOM/EOR on. */
static unsigned echo_pump(struct vsock_conn *c)
{
	unsigned progress = 0;

	for (;;) {
		int at_bound = c->bound_count &&
			c->bound_pos[c->bound_head] == c->fwd_cnt;

		if (!c->ring_len && !at_bound)
			return progress;
		uint32_t n = c->ring_len, flags = 0;

		if (c->ring_head + n > c->ring_size)
			n = c->ring_size - c->ring_head;        /* up to the wrap */
		if (c->bound_count) {
			uint32_t to_bound = c->bound_pos[c->bound_head] - c->fwd_cnt;

			if (to_bound <= n) {
				n = to_bound;
				flags = c->bound_flags[c->bound_head];
			}
		}
		uint32_t queued;
		int all = vsock_send(c, c->ring + c->ring_head, n, flags, &queued);

		if (queued) {
			vsock_consume(c, queued);
			progress++;
		}
		if (!all)
			return progress;
		if (flags) {
			c->bound_head = (c->bound_head + 1) % VSOCK_MAX_BOUNDARIES;
			c->bound_count--;
			progress++;
		}
	}
}

void scenario_vsock_echo_server(const struct args *a)
{
	uint32_t port = need_port(a);
	uint64_t conns = 1, done = 0, bytes = 0;
	int failed = 0;

	arg_u64(a, "conns", &conns, 1, 1000000);
	common_args(a, NULL);
	vsock_open(a, idle);
	vsock_listen(port, echo_accept);
	say("vsock listening %u", port);

	uint64_t last = rdtsc();

	while (done < conns) {
		unsigned progress = vsock_poll(), open = 0;
		uint64_t echoed = bytes;

		for (unsigned i = 0; i < VSOCK_MAX_CONNS; i++) {
			struct vsock_conn *c = &vsock_conns[i];

			if (c->state == VSOCK_ESTABLISHED) {
				progress += echo_pump(c);
				echoed += c->tx_bytes;
				open++;
				/* The peer sends no more and all is echoed, or it
				 * receives no more: our half of the clean close. */
				if ((c->peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND &&
				     !c->ring_len && !c->bound_count) ||
				    c->peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE) {
					vsock_close(c);
					progress++;
				}
			}
			if (c->state == VSOCK_CLOSED) {
				done++;
				bytes += c->tx_bytes;
				if (c->reset) {
					say("vsock echo: connection from %lu:%u ended: %s "
					    "(%lu bytes in, %lu echoed)",
					    (unsigned long)c->peer_cid, c->peer_port, c->why,
					    (unsigned long)c->rx_bytes, (unsigned long)c->tx_bytes);
					/* An RST from the peer ends a connection it
					 * is done with; anything else is a failure. */
					failed |= strcmp(c->why, "reset by peer (RST)") != 0;
				}
				vsock_release(c);
				progress++;
			}
		}
		vsock_flush();
		maybe_die("vsock echo", echoed, open);
		idle_step(&last, progress, "vsock echo");
	}
	wait_tx_idle("vsock echo");
	say("vsock echo done %lu %lu", (unsigned long)done, (unsigned long)bytes);
	vsock_say_stats();
	guest_exit(failed);
}

/* --- vsock-echo-client -------------------------------------------------- */

static uint16_t parse_type(const struct args *a)
{
	const char *t = arg_value(a, "type");

	if (!t || !strcmp(t, "stream"))
		return VIRTIO_VSOCK_TYPE_STREAM;
	if (!strcmp(t, "seqpacket")) {
		if (!vsock_seqpacket()) {
			/* standard: not offered; draft: does not exist */
			say("%s: %s", a->argv[0], vsock_no_seqpacket_why());
			guest_exit(1);
		}
		return VIRTIO_VSOCK_TYPE_SEQPACKET;
	}
	say("%s: bad type=%s (stream, seqpacket)", a->argv[0], t);
	guest_exit(1);
}

void scenario_vsock_echo_client(const struct args *a)
{
	uint32_t port = need_port(a);
	uint64_t size = 4096, count = 1, cid;
	enum verify_mode mode = arg_verify(a);
	struct stream_end tx;

	arg_u64(a, "size", &size, 1, 1ull << 32);
	arg_u64(a, "count", &count, 1, UINT64_MAX);
	common_args(a, &cid);
	vsock_open(a, idle);

	uint16_t type = parse_type(a);

	reset_rx(size, mode);
	stream_end_init(&tx, mode);

	struct vsock_conn *c = vsock_connect(cid, port, type, init_checked_rx);

	if (!c)
		guest_exit(1);

	uint64_t start = rdtsc();

	for (uint64_t i = 1; i <= count; i++) {
		uint64_t last = rdtsc();

		send_stream(c, &tx, size, VSOCK_TX_PAYLOAD, "vsock echo client");
		while (rx.bytes < i * size) {
			if (c->state != VSOCK_ESTABLISHED) {
				say("vsock echo client: connection ended after %lu of %lu "
				    "echoed bytes: %s", (unsigned long)rx.bytes,
				    (unsigned long)(size * count), c->why ? c->why : "closed");
				guest_exit(1);
			}
			idle_step(&last, vsock_poll(), "vsock echo client");
		}
	}
	uint64_t ticks = rdtsc() - start;
	const char *why = close_and_wait(c, "vsock echo client");

	if (rx.mismatch_at || rx.bytes != size * count || rx.eom_errors ||
	    (type == VIRTIO_VSOCK_TYPE_SEQPACKET && rx.eoms != count) || why) {
		say("vsock echo client: FAILED: got %lu of %lu bytes, first bad byte %ld, "
		    "%lu EOMs (%lu misplaced), close: %s", (unsigned long)rx.bytes,
		    (unsigned long)(size * count), (long)rx.mismatch_at - 1,
		    (unsigned long)rx.eoms, (unsigned long)rx.eom_errors, why ? why : "clean");
		vsock_say_stats();
		guest_exit(1);
	}
	say("vsock echo ok %lu", (unsigned long)rx.bytes);
	say("vsock echo %lu round trips of %lu bytes in %lu ticks", (unsigned long)count,
	    (unsigned long)size, (unsigned long)ticks);
	say_tsc_frequency();
	vsock_say_stats();
	guest_exit(0);
}

/* --- vsock-echo-many ---------------------------------------------------- */

/* K connections open at once, each its own test stream (the common one,
 * started STREAM_SKIP * i bytes in, so that bytes crossing connections
 * show): per connection, send `size` bytes, check them coming back. */
#define STREAM_SKIP 1021
#define MANY_STAGE 4096
static uint8_t many_stage[VSOCK_MAX_CONNS][MANY_STAGE];
static struct stream_end many_tx[VSOCK_MAX_CONNS], many_rx[VSOCK_MAX_CONNS];
static uint64_t many_bad[VSOCK_MAX_CONNS];     /* first bad byte + 1, or 0 */
static enum verify_mode many_mode;

static void many_check(struct vsock_conn *c, const uint8_t *data, uint32_t len,
		       uint32_t flags)
{
	unsigned i = (unsigned)(c - vsock_conns);
	size_t good = stream_end_check(&many_rx[i], data, len);

	(void)flags;
	if (good != len && !many_bad[i])
		many_bad[i] = c->user[1] + good + 1;
	c->user[1] += len;                      /* bytes checked */
}

static int many_init(struct vsock_conn *c)
{
	unsigned i = (unsigned)(c - vsock_conns);

	stream_end_init(&many_tx[i], many_mode);
	stream_end_init(&many_rx[i], many_mode);
	for (unsigned k = 0; k < 2; k++) {      /* skip into the stream: both ends alike */
		struct stream_end *e = k ? &many_rx[i] : &many_tx[i];

		for (uint64_t left = (uint64_t)STREAM_SKIP * i; left;) {
			uint32_t n = left < STAGE_SIZE ? (uint32_t)left : STAGE_SIZE;

			stream_end_fill(e, stage, n);
			left -= n;
		}
	}
	many_bad[i] = 0;
	c->user[0] = c->user[1] = c->user[2] = c->user[3] = 0;
	c->on_data = many_check;
	return 0;
}

void scenario_vsock_echo_many(const struct args *a)
{
	uint32_t port = need_port(a);
	uint64_t conns = VSOCK_MAX_CONNS, size = 65536, cid, total = 0;
	struct vsock_conn *cs[VSOCK_MAX_CONNS];
	int failed = 0;

	arg_u64(a, "conns", &conns, 1, VSOCK_MAX_CONNS);
	arg_u64(a, "size", &size, 1, 1ull << 40);
	many_mode = arg_verify(a);
	common_args(a, &cid);
	vsock_open(a, idle);

	uint16_t type = parse_type(a);

	for (unsigned k = 0; k < conns; k++) {
		cs[k] = vsock_connect(cid, port, type, many_init);
		if (!cs[k]) {
			say("vsock echo many: FAILED: connection %u of %lu", k + 1,
			    (unsigned long)conns);
			guest_exit(1);
		}
	}
	say("vsock echo many: %lu connections open", (unsigned long)conns);

	uint64_t start = rdtsc(), last = start;
	unsigned open = (unsigned)conns;

	while (open) {
		unsigned progress = vsock_poll();

		for (unsigned k = 0; k < conns; k++) {
			struct vsock_conn *c = cs[k];

			if (!c)
				continue;
			unsigned i = (unsigned)(c - vsock_conns);

			/* user[0]: bytes staged so far; the stage holds user[2]
			 * bytes, user[3] of them queued */
			if (c->state == VSOCK_ESTABLISHED &&
			    (c->user[3] < c->user[2] || c->user[0] < size)) {
				uint32_t queued;

				if (c->user[3] == c->user[2]) {
					uint64_t n = size - c->user[0] < MANY_STAGE ?
						size - c->user[0] : MANY_STAGE;

					stream_end_fill(&many_tx[i], many_stage[i], n);
					c->user[0] += n;
					c->user[2] = n;
					c->user[3] = 0;
				}
				vsock_send(c, many_stage[i] + c->user[3],
					   (uint32_t)(c->user[2] - c->user[3]),
					   type == VIRTIO_VSOCK_TYPE_SEQPACKET ? VIRTIO_VSOCK_SEQ_EOM : 0,
					   &queued);
				c->user[3] += queued;
				progress += queued != 0;
			}
			if (c->state == VSOCK_ESTABLISHED && c->user[1] >= size) {
				vsock_close(c);
				progress++;
			}
			if (c->state == VSOCK_CLOSED) {
				if (c->user[1] != size || many_bad[i] ||
				    (c->reset && strcmp(c->why, "reset by peer (RST)"))) {
					say("vsock echo many: FAILED: connection %u: %lu of %lu bytes back, "
					    "first bad byte %ld, end: %s", k + 1, (unsigned long)c->user[1],
					    (unsigned long)size, (long)many_bad[i] - 1,
					    c->reset ? c->why : "clean");
					failed = 1;
				}
				total += c->user[1];
				vsock_release(c);
				cs[k] = NULL;
				open--;
				progress++;
			}
		}
		vsock_flush();
		idle_step(&last, progress, "vsock echo many");
	}
	if (failed) {
		vsock_say_stats();
		guest_exit(1);
	}
	say("vsock echo many ok %lu %lu", (unsigned long)conns, (unsigned long)total);
	say("vsock echo many: %lu bytes each way in %lu ticks", (unsigned long)total,
	    (unsigned long)(rdtsc() - start));
	say_tsc_frequency();
	vsock_say_stats();
	guest_exit(0);
}

/* --- vsock-bulk-send / vsock-bulk-recv ---------------------------------- */

static struct vsock_conn *accepted;

static int bulk_accept(struct vsock_conn *c)
{
	if (accepted)
		return -1;              /* one connection only */
	accepted = c;
	return init_checked_rx(c);
}

/* Connect to cid:port, or with listen=1 wait for the peer to connect. */
static struct vsock_conn *bulk_open(const struct args *a, uint32_t port,
				    uint64_t cid, uint16_t type, const char *what)
{
	const char *listen = arg_value(a, "listen");

	if (!listen || !strcmp(listen, "0")) {
		struct vsock_conn *c = vsock_connect(cid, port, type, init_checked_rx);
		if (!c)
			guest_exit(1);
		return c;
	}
	vsock_listen(port, bulk_accept);
	say("vsock listening %u", port);

	uint64_t last = rdtsc();

	/* The accept hook runs at the peer's REQUEST; the draft's handshake
	 * goes on until its OFFER (a failed one leaves it CLOSED, which the
	 * caller reports). */
	while (!accepted || accepted->state == VSOCK_ACCEPTING)
		idle_step(&last, vsock_poll(), what);
	return accepted;
}

void scenario_vsock_bulk_send(const struct args *a)
{
	uint32_t port = need_port(a);
	uint64_t total = 0, chunk = 4096, cid;
	enum verify_mode mode = arg_verify(a);
	struct stream_end s;

	if (!arg_value(a, "bytes")) {
		say("vsock-bulk-send: needs bytes=N");
		guest_exit(1);
	}
	arg_u64(a, "bytes", &total, 0, UINT64_MAX);
	arg_u64(a, "chunk", &chunk, 1, VSOCK_TX_PAYLOAD);
	common_args(a, &cid);
	vsock_open(a, idle);
	reset_rx(0, mode);

	struct vsock_conn *c = bulk_open(a, port, cid, parse_type(a), "vsock bulk send");
	uint64_t start = rdtsc();

	stream_end_init(&s, mode);
	send_stream(c, &s, total, (uint32_t)chunk, "vsock bulk send");
	wait_tx_idle("vsock bulk send");

	uint64_t ticks = rdtsc() - start;
	const char *why = close_and_wait(c, "vsock bulk send");

	if (why)
		say("vsock bulk send: close: %s", why);
	say("vsock bulk sent %lu bytes %s %lx in %lu ticks", (unsigned long)total,
	    stream_end_hash_name(&s), (unsigned long)stream_end_hash(&s), (unsigned long)ticks);
	say_tsc_frequency();
	vsock_say_stats();
	guest_exit(0);
}

void scenario_vsock_bulk_recv(const struct args *a)
{
	uint32_t port = need_port(a);
	uint64_t total = 0, cid;
	enum verify_mode mode = arg_verify(a);

	if (!arg_value(a, "bytes")) {
		say("vsock-bulk-recv: needs bytes=N");
		guest_exit(1);
	}
	arg_u64(a, "bytes", &total, 0, UINT64_MAX);
	common_args(a, &cid);
	vsock_open(a, idle);
	reset_rx(0, mode);

	struct vsock_conn *c = bulk_open(a, port, cid, VIRTIO_VSOCK_TYPE_STREAM,
					 "vsock bulk recv");
	uint64_t start = rdtsc(), last = start;

	while (rx.bytes < total) {
		if (c->state != VSOCK_ESTABLISHED ||
		    c->peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND) {
			say("vsock bulk recv: peer closed after %lu of %lu bytes%s%s",
			    (unsigned long)rx.bytes, (unsigned long)total,
			    c->why ? ": " : "", c->why ? c->why : "");
			vsock_say_stats();
			guest_exit(1);
		}
		idle_step(&last, vsock_poll(), "vsock bulk recv");
	}
	uint64_t ticks = rdtsc() - start;
	const char *why = close_and_wait(c, "vsock bulk recv");

	if (rx.mismatch_at || rx.bytes != total) {
		say("vsock bulk recv: FAILED: %lu bytes (want %lu), first bad byte %ld",
		    (unsigned long)rx.bytes, (unsigned long)total, (long)rx.mismatch_at - 1);
		vsock_say_stats();
		guest_exit(1);
	}
	if (why)
		say("vsock bulk recv: close: %s", why);
	say("vsock bulk received %lu bytes %s %lx in %lu ticks", (unsigned long)rx.bytes,
	    stream_end_hash_name(&rx.stream), (unsigned long)stream_end_hash(&rx.stream),
	    (unsigned long)ticks);
	say_tsc_frequency();
	vsock_say_stats();
	guest_exit(0);
}

/* --- vsock-connect-loop --------------------------------------------------- */

/*
 * K times: connect to cid:port, send `size` bytes of the test stream, wait
 * for them back, close cleanly (SHUTDOWN(both), the peer's RST).  The
 * streams run on across connections, so every byte is checked.  Only then
 * the next connection: the rate is that of one connection at a time.
 */
void scenario_vsock_connect_loop(const struct args *a)
{
	uint32_t port = need_port(a);
	uint64_t size = 64, count = 1, cid;
	enum verify_mode mode = arg_verify(a);
	struct stream_end tx;

	arg_u64(a, "size", &size, 1, 1ull << 32);
	arg_u64(a, "count", &count, 1, UINT64_MAX);
	common_args(a, &cid);
	vsock_open(a, idle);
	reset_rx(0, mode);
	stream_end_init(&tx, mode);

	uint64_t start = rdtsc();

	for (uint64_t i = 1; i <= count; i++) {
		struct vsock_conn *c = vsock_connect(cid, port, VIRTIO_VSOCK_TYPE_STREAM,
						     init_checked_rx);
		uint64_t last = rdtsc();

		if (!c) {
			say("vsock connect loop: FAILED: connection %lu of %lu: connect failed",
			    (unsigned long)i, (unsigned long)count);
			vsock_say_stats();
			guest_exit(1);
		}
		send_stream(c, &tx, size, VSOCK_TX_PAYLOAD, "vsock connect loop");
		while (rx.bytes < i * size) {
			if (c->state != VSOCK_ESTABLISHED) {
				say("vsock connect loop: FAILED: connection %lu of %lu ended "
				    "after %lu of %lu echoed bytes: %s", (unsigned long)i,
				    (unsigned long)count, (unsigned long)(rx.bytes - (i - 1) * size),
				    (unsigned long)size, c->why ? c->why : "closed by peer");
				vsock_say_stats();
				guest_exit(1);
			}
			idle_step(&last, vsock_poll(), "vsock connect loop");
		}
		uint64_t timeouts = vsock_stats.close_timeouts;
		const char *why = close_and_wait(c, "vsock connect loop");

		if (!why && vsock_stats.close_timeouts != timeouts)
			why = "no RST from the peer after our SHUTDOWN (close timeout)";
		if (why || rx.mismatch_at || rx.bytes != i * size) {
			say("vsock connect loop: FAILED: connection %lu of %lu: %lu of %lu bytes "
			    "back, first bad byte %ld, close: %s", (unsigned long)i,
			    (unsigned long)count, (unsigned long)rx.bytes,
			    (unsigned long)(i * size), (long)rx.mismatch_at - 1,
			    why ? why : "clean");
			vsock_say_stats();
			guest_exit(1);
		}
	}
	uint64_t ticks = rdtsc() - start;

	say("vsock echo ok %lu", (unsigned long)rx.bytes);
	say("vsock connect loop %lu connections in %lu ticks", (unsigned long)count,
	    (unsigned long)ticks);
	say_tsc_frequency();
	vsock_say_stats();
	guest_exit(0);
}

/* --- datagrams (draft mode) ---------------------------------------------------- */

/*
 * The datagram pattern (client, flood; sink with check=1): datagram k of n
 * bytes is k as 8 little-endian bytes, then byte i = (k + i) & 0xff, cut
 * at n:
 *   def dgram(k, n):
 *       return (k.to_bytes(8, "little") + bytes((k + i) & 0xff for i in range(8, n)))[:n]
 * so any datagram of 8 bytes or more can be checked on its own.
 */
#define VMADDR_PORT_ANY         0xffffffffu     /* a host sender with no port */
#define DGRAM_CLIENT_PORT       50000           /* sport=, the guest's port */
#define DGRAM_LINGER_TSC        (1ull << 31)    /* ~0.8 s: outstanding = lost */

static void dgram_fill(uint8_t *buf, uint32_t n, uint64_t k)
{
	for (uint32_t i = 0; i < n; i++)
		buf[i] = i < 8 ? (uint8_t)(k >> (8 * i)) : (uint8_t)(k + i);
}

/* 0 and the datagram's k if buf is in the pattern, else -1. */
static int dgram_check(const uint8_t *buf, uint32_t n, uint64_t *k)
{
	uint64_t v = 0;

	if (n < 8)
		return -1;
	for (unsigned i = 0; i < 8; i++)
		v |= (uint64_t)buf[i] << (8 * i);
	for (uint32_t i = 8; i < n; i++)
		if (buf[i] != (uint8_t)(v + i))
			return -1;
	*k = v;
	return 0;
}

/* Open the device; datagrams exist only in the draft protocol. */
static void dgram_open(const struct args *a)
{
	vsock_open(a, idle);
	if (!vsock_datagrams()) {
		say("%s: no datagrams on this device: they exist only in the draft "
		    "protocol (device ID 13)", a->argv[0]);
		guest_exit(1);
	}
}

static void dgram_bind(uint32_t port, vsock_dgram_fn fn)
{
	if (vsock_dgram_bind(port, fn)) {
		say("vsock dgram: cannot bind port %u", port);
		guest_exit(1);
	}
	say("vsock dgram bound %u", port);
}

static struct {
	uint32_t port;                  /* ours */
	uint64_t cid, peer_port;        /* client: whom we send to */
	uint64_t size;
	uint64_t received, bytes, echoed, noreply, bad, reordered;
	uint64_t sent, written_off, last_k;
} dg;

/* --- vsock-dgram-echo --------------------------------------------------------- */

/* Echo a datagram to its sender, from the port it came to.  Called inside
 * vsock_poll: waiting for a tx buffer touches only tx. */
static void dgram_echo_rx(const struct vsock_pkt *h, const uint8_t *data, uint32_t len)
{
	int r;

	dg.received++;
	if (h->src_port == VMADDR_PORT_ANY) {
		dg.noreply++;           /* the host sent it from an unbound socket */
		return;
	}
	while ((r = vsock_dgram_send(h->src_cid, dg.port, h->src_port, data, len)) == 0)
		vsock_tx_wait();
	if (r < 0) {
		dg.noreply++;           /* longer than a datagram may be */
		return;
	}
	dg.echoed++;
	dg.bytes += len;
}

void scenario_vsock_dgram_echo(const struct args *a)
{
	uint32_t port = need_port(a);
	uint64_t count = 0;             /* 0: until `idle` ticks of silence */

	arg_u64(a, "count", &count, 1, UINT64_MAX);
	common_args(a, NULL);
	dgram_open(a);
	dg.port = port;
	dgram_bind(port, dgram_echo_rx);

	uint64_t last = rdtsc();
	int by_idle = 0;

	while (!count || dg.echoed < count) {
		if (vsock_poll()) {
			last = rdtsc();
		} else if (rdtsc() - last > idle) {
			if (count) {
				say("vsock dgram echo: timeout: %lu of %lu datagrams echoed after "
				    "%lu idle ticks", (unsigned long)dg.echoed,
				    (unsigned long)count, (unsigned long)idle);
				vsock_say_stats();
				guest_exit(1);
			}
			by_idle = 1;
			break;
		} else {
			cpu_relax();
		}
	}
	wait_tx_idle("vsock dgram echo");
	say("vsock dgram echo done echoed %lu bytes %lu noreply %lu%s",
	    (unsigned long)dg.echoed, (unsigned long)dg.bytes, (unsigned long)dg.noreply,
	    by_idle ? " (idle)" : "");
	vsock_say_stats();
	guest_exit(0);
}

/* --- vsock-dgram-client ------------------------------------------------------- */

static void dgram_client_rx(const struct vsock_pkt *h, const uint8_t *data, uint32_t len)
{
	uint64_t k;

	dg.received++;
	dg.bytes += len;
	if (h->src_cid != dg.cid || h->src_port != dg.peer_port || len != dg.size ||
	    dgram_check(data, len, &k) || k >= dg.sent) {
		dg.bad++;
		return;
	}
	if (dg.received > 1 && k <= dg.last_k)
		dg.reordered++;         /* one path, FIFO: each echo comes after the last */
	dg.last_k = k;
}

/* Sent and neither echoed nor given up for lost. */
static uint64_t dgram_outstanding(void)
{
	uint64_t settled = dg.received + dg.written_off;

	return settled >= dg.sent ? 0 : dg.sent - settled;
}

/*
 * Send `count` datagrams of `size` bytes (the pattern, k = 0, 1, ...) from
 * guest port sport to cid:port, at most `window` outstanding, and check
 * the echoes: from cid:port, `size` bytes, in the pattern, in order.  When
 * nothing was sent or came back for `linger` ticks, what is outstanding
 * counts as lost and sending goes on.
 */
void scenario_vsock_dgram_client(const struct args *a)
{
	uint32_t port = need_port(a);
	uint64_t count = 1, size = 64, cid, sport = DGRAM_CLIENT_PORT, window = 8;
	uint64_t linger = DGRAM_LINGER_TSC, maxlost = 0;
	const char *go = arg_value(a, "go");

	arg_u64(a, "count", &count, 1, UINT64_MAX);
	arg_u64(a, "size", &size, 8, VSOCK_DGRAM_MAX);
	arg_u64(a, "sport", &sport, 0, 0xfffffffeull);
	arg_u64(a, "window", &window, 1, 1u << 20);
	arg_u64(a, "linger", &linger, 1, UINT64_MAX);
	arg_u64(a, "maxlost", &maxlost, 0, UINT64_MAX);
	common_args(a, &cid);
	dgram_open(a);
	dg.port = (uint32_t)sport;
	dg.cid = cid;
	dg.peer_port = port;
	dg.size = size;
	dgram_bind((uint32_t)sport, dgram_client_rx);
	if (go && !strcmp(go, "serial")) {     /* the host's receiver is not up yet */
		say("vsock dgram client waiting for a byte on the serial port");
		while (serial_getc() < 0)
			cpu_relax();
	}

	uint64_t start = rdtsc(), last = start, last_move = start;

	while (dg.sent < count || dgram_outstanding()) {
		unsigned progress = 0;

		if (dg.sent < count && dgram_outstanding() < window) {
			dgram_fill(stage, (uint32_t)size, dg.sent);
			if (vsock_dgram_send(cid, (uint32_t)sport, port, stage, (uint32_t)size) > 0) {
				dg.sent++;
				progress++;
				vsock_flush();
			}
		}
		uint64_t before = dg.received;

		progress += vsock_poll();
		uint64_t now = rdtsc();

		if (progress || dg.received != before) {
			last_move = now;
		} else if (dgram_outstanding() && now - last_move > linger) {
			dg.written_off = dg.sent - dg.received;
			last_move = now;
			progress++;
		}
		idle_step(&last, progress, "vsock dgram client");
	}
	uint64_t ticks = rdtsc() - start;
	uint64_t lost = dg.sent > dg.received ? dg.sent - dg.received : 0;

	say("vsock dgram client sent %lu received %lu lost %lu bad %lu reordered %lu",
	    (unsigned long)dg.sent, (unsigned long)dg.received, (unsigned long)lost,
	    (unsigned long)dg.bad, (unsigned long)dg.reordered);
	say("vsock dgram client %lu datagrams of %lu bytes in %lu ticks", (unsigned long)count,
	    (unsigned long)size, (unsigned long)ticks);
	say_tsc_frequency();
	vsock_say_stats();
	if (dg.bad || dg.reordered || lost > maxlost) {
		say("vsock dgram client: FAILED: %lu lost (at most %lu allowed), %lu bad, "
		    "%lu out of order", (unsigned long)lost, (unsigned long)maxlost,
		    (unsigned long)dg.bad, (unsigned long)dg.reordered);
		guest_exit(1);
	}
	guest_exit(0);
}

/* --- vsock-dgram-flood -------------------------------------------------------- */

/* Send `count` datagrams of `size` bytes (the pattern) to cid:port as fast
 * as tx buffers come back; tx_waits = how often none was free. */
void scenario_vsock_dgram_flood(const struct args *a)
{
	uint32_t port = need_port(a);
	uint64_t count = 1, size = 1024, cid, sport = DGRAM_CLIENT_PORT + 1, waits = 0;

	arg_u64(a, "count", &count, 1, UINT64_MAX);
	arg_u64(a, "size", &size, 1, VSOCK_DGRAM_MAX);
	arg_u64(a, "sport", &sport, 0, 0xfffffffeull);
	common_args(a, &cid);
	dgram_open(a);

	uint64_t start = rdtsc();

	while (dg.sent < count) {
		dgram_fill(stage, (uint32_t)size, dg.sent);
		if (vsock_dgram_send(cid, (uint32_t)sport, port, stage, (uint32_t)size) > 0) {
			dg.sent++;
			continue;
		}
		waits++;
		vsock_tx_wait();        /* kicks, waits (bounded by idle), reaps */
		vsock_poll();           /* and whatever else came in */
	}
	wait_tx_idle("vsock dgram flood");

	uint64_t ticks = rdtsc() - start;

	say("vsock dgram flood sent %lu datagrams of %lu bytes in %lu ticks tx_waits %lu",
	    (unsigned long)dg.sent, (unsigned long)size, (unsigned long)ticks,
	    (unsigned long)waits);
	say_tsc_frequency();
	vsock_say_stats();
	guest_exit(0);
}

/* --- vsock-dgram-sink --------------------------------------------------------- */

static int sink_check;

static void dgram_sink_rx(const struct vsock_pkt *h, const uint8_t *data, uint32_t len)
{
	uint64_t k;

	(void)h;
	dg.received++;
	dg.bytes += len;
	if (sink_check && dgram_check(data, len, &k))
		dg.bad++;
}

/* Count the datagrams arriving at guest port P: `count` of them, or (no
 * count) until `idle` ticks of silence; with check=1 each must be in the
 * pattern. */
void scenario_vsock_dgram_sink(const struct args *a)
{
	uint32_t port = need_port(a);
	uint64_t count = 0, check = 0;

	arg_u64(a, "count", &count, 1, UINT64_MAX);
	arg_u64(a, "check", &check, 0, 1);
	common_args(a, NULL);
	sink_check = (int)check;
	dgram_open(a);
	dgram_bind(port, dgram_sink_rx);

	uint64_t last = rdtsc();
	int by_idle = 0;

	while (!count || dg.received < count) {
		if (vsock_poll()) {
			last = rdtsc();
		} else if (rdtsc() - last > idle) {
			by_idle = 1;
			break;
		} else {
			cpu_relax();
		}
	}
	say("vsock dgram sink received %lu bytes %lu bad %lu%s", (unsigned long)dg.received,
	    (unsigned long)dg.bytes, (unsigned long)dg.bad, by_idle ? " (idle)" : "");
	vsock_say_stats();
	if (count && dg.received < count) {
		say("vsock dgram sink: timeout: %lu of %lu datagrams after %lu idle ticks",
		    (unsigned long)dg.received, (unsigned long)count, (unsigned long)idle);
		guest_exit(1);
	}
	if (dg.bad) {
		say("vsock dgram sink: FAILED: %lu datagrams not in the pattern",
		    (unsigned long)dg.bad);
		guest_exit(1);
	}
	guest_exit(0);
}
