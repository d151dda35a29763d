/*
 * vsock-seqpacket-test -- check that AF_VSOCK SOCK_SEQPACKET keeps message boundaries, sizes,
 * MSG_EOR and MSG_TRUNC semantics, in both directions of one connection.
 *
 *     vsock-seqpacket-test --server --port P [--timeout SEC]     accept one connection
 *     vsock-seqpacket-test --cid C --port P [--timeout SEC]      connect to C:P
 *
 * Both sides know the same plan (below): messages of sizes 1, 2, 3, 100, 100, 4096, 4097,
 * 65536, 65537 and MAX, some sent with MSG_EOR, where MAX is the socket's buf_alloc
 * (SO_VM_SOCKETS_BUFFER_SIZE, 256 KiB by default): the largest message Linux lets a sender
 * put to a peer with the same buffer. Message i going from client to server holds
 * pattern_fill(0, i) (vsock-util.h), server to client pattern_fill(1, i). The exchange:
 *
 *     client -> server   the plan's messages; the server receives and checks each
 *     server -> client   verdict message "ok" or "FAIL <reason>"
 *     server -> client   the plan's messages; the client receives and checks each
 *     client -> server   verdict
 *
 * Checking a message = one recvmsg() must return exactly it: its length (or, for the steps
 * that receive into a smaller buffer, the truncated length with MSG_TRUNC in msg_flags, or the
 * real length when recv was called with the MSG_TRUNC flag), MSG_EOR in msg_flags exactly when
 * the sender used MSG_EOR, and the right bytes. A side that finds a fault sends it as its
 * verdict and stops. SEC (default 30; 0 = none) bounds the connect and every send/recv.
 *
 * Output (stdout; tests parse these lines):
 *     vsock-seqpacket-test: listening seqpacket <port>     (--server) accept() is next
 *     vsock-seqpacket-test: ok <n> messages                n each way, both verified; exit 0
 *  or vsock-seqpacket-test: FAIL <reason>                  "FAIL peer: ..." = the peer's verdict;
 *                                                          exit 1
 * Bad usage or no connection: exit 2.
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include "vsock-util.h"

#define MAX 0		/* size placeholder: the socket's buf_alloc */

static const struct step {
	size_t size;	/* message length (MAX: buf_alloc) */
	int eor;	/* sent with MSG_EOR */
	size_t room;	/* receive buffer; 0 = size + 1, which must not truncate */
	int rflags;	/* recvmsg flags: MSG_TRUNC asks for the real length back */
} plan[] = {
	{ 1, MSG_EOR, 0, 0 },
	{ 2, 0, 0, 0 },			/* three tiny messages back to back: the receiver may */
	{ 3, MSG_EOR, 0, 0 },		/* queue them in one buffer, boundaries must survive */
	{ 100, 0, 10, MSG_TRUNC },	/* 10 bytes copied, returns 100, MSG_TRUNC set */
	{ 100, MSG_EOR, 10, 0 },	/* 10 bytes copied, returns 10, MSG_TRUNC set */
	{ 4096, 0, 0, 0 },		/* one page: one packet or more, depending on the device */
	{ 4097, MSG_EOR, 4096, 0 },	/* one byte too big for the buffer: truncated */
	{ 65536, 0, 0, 0 },		/* VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the largest packet */
	{ 65537, MSG_EOR, 0, 0 },	/* one byte over: at least two packets, EOM on the last */
	{ MAX, MSG_EOR, 0, 0 },		/* the whole receive buffer of the peer */
};
#define NSTEPS (sizeof(plan) / sizeof(plan[0]))

static size_t max_size;		/* vsock_buf_size(): the MAX above */
static uint8_t *buf, *want;	/* max_size + 1 bytes each */
static char verdict[200];	/* our verdict: "ok" or "FAIL <reason>" */

static size_t step_size(const struct step *s) { return s->size == MAX ? max_size : s->size; }

/* Send the plan as direction `dir`. Returns 0, or -1 after writing the reason to `verdict`. */
static int send_plan(int fd, uint32_t dir)
{
	for (size_t i = 0; i < NSTEPS; i++) {
		size_t n = step_size(&plan[i]);
		pattern_fill(buf, n, dir, i);
		if (send(fd, buf, n, plan[i].eor) != (ssize_t)n) {
			snprintf(verdict, sizeof(verdict), "FAIL send message %zu (%zu bytes): %s", i, n,
				 strerror(errno));
			return -1;
		}
	}
	return 0;
}

/* Receive and check the plan as direction `dir`. Returns 0, or -1 with the reason in `verdict`. */
static int recv_plan(int fd, uint32_t dir)
{
	for (size_t i = 0; i < NSTEPS; i++) {
		const struct step *s = &plan[i];
		size_t n = step_size(s), room = s->room ? s->room : n + 1;
		size_t copied = n < room ? n : room;
		ssize_t want_ret = s->rflags & MSG_TRUNC ? (ssize_t)n : (ssize_t)copied;
		int want_flags = (n > room ? MSG_TRUNC : 0) | s->eor;
		struct iovec iov = { buf, room };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
		ssize_t got = recvmsg(fd, &m, s->rflags);

		if (got < 0) {
			snprintf(verdict, sizeof(verdict), "FAIL recv message %zu: %s%s", i, strerror(errno),
				 errno == EAGAIN ? " (timeout)" : "");
			return -1;
		}
		if (got != want_ret || (m.msg_flags & (MSG_TRUNC | MSG_EOR)) != want_flags) {
			snprintf(verdict, sizeof(verdict),
				 "FAIL message %zu (%zu bytes%s, buffer %zu): recv returned %zd flags%s%s, want %zd flags%s%s",
				 i, n, s->eor ? " EOR" : "", room, got,
				 m.msg_flags & MSG_TRUNC ? " TRUNC" : "", m.msg_flags & MSG_EOR ? " EOR" : "",
				 want_ret, want_flags & MSG_TRUNC ? " TRUNC" : "", want_flags & MSG_EOR ? " EOR" : "");
			return -1;
		}
		pattern_fill(want, copied, dir, i);
		for (size_t j = 0; j < copied; j++)
			if (buf[j] != want[j]) {
				snprintf(verdict, sizeof(verdict), "FAIL message %zu byte %zu: got 0x%02x, want 0x%02x",
					 i, j, buf[j], want[j]);
				return -1;
			}
	}
	snprintf(verdict, sizeof(verdict), "ok");
	return 0;
}

/* Receive the peer's verdict; returns 0 if it is "ok", else -1 after printing FAIL. */
static int peer_verdict(int fd)
{
	char v[sizeof(verdict)];
	ssize_t n = recv(fd, v, sizeof(v) - 1, 0);

	if (n <= 0) {
		printf("vsock-seqpacket-test: FAIL no verdict from the peer: %s\n", n ? strerror(errno) : "EOF");
		return -1;
	}
	v[n] = 0;
	if (strcmp(v, "ok") == 0)
		return 0;
	if (strncmp(v, "FAIL ", 5) == 0)
		printf("vsock-seqpacket-test: FAIL peer: %s\n", v + 5);
	else
		printf("vsock-seqpacket-test: FAIL want a verdict, got a %zd-byte message\n", n);
	return -1;
}

/* Receiving failed: tell the peer (best effort, it may be blocked sending) and print why. */
static int recv_failed(int fd)
{
	send(fd, verdict, strlen(verdict), MSG_EOR | MSG_DONTWAIT);
	printf("vsock-seqpacket-test: %s\n", verdict);
	return 1;
}

/* Sending failed: most likely the peer found a fault, sent its verdict and closed. Print that
 * verdict if it has arrived, else our own error. */
static int send_failed(int fd)
{
	char v[sizeof(verdict)];
	ssize_t n = recv(fd, v, sizeof(v) - 1, MSG_DONTWAIT);

	if (n > 5 && strncmp(v, "FAIL ", 5) == 0) {
		v[n] = 0;
		printf("vsock-seqpacket-test: FAIL peer: %s\n", v + 5);
	} else {
		printf("vsock-seqpacket-test: %s\n", verdict);
	}
	return 1;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "server", no_argument, NULL, 'l' },
		{ "cid", required_argument, NULL, 'c' },
		{ "port", required_argument, NULL, 'p' },
		{ "timeout", required_argument, NULL, 'T' },
		{ NULL, 0, NULL, 0 },
	};
	unsigned long long cid = ~0ULL, port = ~0ULL, tmo = 30;
	int server = 0, opt, fd;

	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN);	/* a closed peer: EPIPE from send, not death */
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (opt == 'l')
			server = 1;
		else if (opt == '?' || vsock_parse_num(optarg, opt == 'c' ? &cid : opt == 'p' ? &port : &tmo) < 0)
			goto usage;
	}
	if (optind != argc || port > 0xffffffffu || tmo > 1000000 ||
	    (server ? cid != ~0ULL : cid > 0xffffffffu))	/* exactly one of --server, --cid */
		goto usage;

	if (server) {
		int lfd = vsock_listen(SOCK_SEQPACKET, port);
		if (lfd < 0) {
			perror("vsock-seqpacket-test: listen");
			return 2;
		}
		printf("vsock-seqpacket-test: listening seqpacket %llu\n", port);
		fd = accept(lfd, NULL, NULL);
		close(lfd);
		if (fd >= 0 && tmo > 0)
			vsock_set_timeout(fd, tmo);
	} else {
		fd = vsock_connect(SOCK_SEQPACKET, cid, port, tmo);
	}
	if (fd < 0) {
		printf("vsock-seqpacket-test: FAIL %s: %s\n", server ? "accept" : "connect", strerror(errno));
		return 2;
	}
	max_size = vsock_buf_size(fd);
	buf = malloc(max_size + 1);
	want = malloc(max_size + 1);
	if (!buf || !want) {
		printf("vsock-seqpacket-test: FAIL out of memory\n");
		return 1;
	}

	if (server) {				/* receive, verdict, send, peer's verdict */
		if (recv_plan(fd, 0) < 0)
			return recv_failed(fd);
		send(fd, verdict, strlen(verdict), MSG_EOR);
		if (send_plan(fd, 1) < 0)
			return send_failed(fd);
		if (peer_verdict(fd) < 0)
			return 1;
	} else {				/* send, peer's verdict, receive, verdict */
		if (send_plan(fd, 0) < 0)
			return send_failed(fd);
		if (peer_verdict(fd) < 0)
			return 1;
		if (recv_plan(fd, 1) < 0)
			return recv_failed(fd);
		send(fd, verdict, strlen(verdict), MSG_EOR);
	}
	printf("vsock-seqpacket-test: ok %zu messages\n", NSTEPS);
	close(fd);
	return 0;

usage:
	fprintf(stderr, "usage: vsock-seqpacket-test (--server | --cid C) --port P [--timeout SEC]\n");
	return 2;
}
