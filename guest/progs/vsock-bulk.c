/*
 * vsock-bulk -- move N bytes of a deterministic pseudo-random stream over one AF_VSOCK
 * connection, with SHA-256 and throughput on both ends.
 *
 *     vsock-bulk send --cid C --port P --bytes N [--chunk S]     connect to C:P and send
 *     vsock-bulk send --listen --port P --bytes N [--chunk S]    accept one connection, send
 *     vsock-bulk recv --port P [--expect N]                      accept one connection, receive
 *     vsock-bulk recv --cid C --port P [--expect N]              connect to C:P and receive
 *     common options: [--type stream|seqpacket] [--timeout SEC]
 *
 * So either side may connect, in both directions. Sizes take K/M/G suffixes (x1024^n). The
 * stream is xorshift64 seeded from N (bulk_gen below), 8 bytes per step, little-endian: a
 * receiver given --expect N regenerates it and checks every byte, so with --expect a corrupted
 * byte fails there and then; without it the receiver takes whatever arrives until EOF and only
 * hashes it. Writes are S bytes (default 64K); with --type seqpacket every write is one message
 * (S <= the peer's buf_alloc, Linux default 256 KiB). The sender shuts down its write side
 * when done and then waits for the receiver's close (EOF), so its time covers delivery. SEC
 * (default 30; 0 = none) bounds the connect and every send/recv, not the wait for a connection.
 * Time runs from the connection being established to EOF.
 *
 * Output (stdout; tests parse these lines; MB = 10^6 bytes):
 *     vsock-bulk: listening <type> <port>                     (listening forms) accept() is next
 *     vsock-bulk: sent <n> bytes sha256 <hex> in <sec> s (<MB/s> MB/s)
 *     vsock-bulk: received <n> bytes sha256 <hex> in <sec> s (<MB/s> MB/s)
 *     vsock-bulk: FAIL <reason>                               after the line above, if any
 * <hex> is the SHA-256 of the n bytes actually sent/received (as `sha256sum` would print it).
 * Exit status: 0; 1 on a short transfer (sent fewer than N, received != --expect), a content
 * mismatch or a socket error; 2 bad usage or no connection.
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include "sha256.h"
#include "vsock-util.h"

/* The test stream: xorshift64 (Marsaglia 2003, shifts 13, 7, 17) from a seed derived from the
 * byte count, each state emitted as 8 little-endian bytes; `left` bytes of `word` are unused. */
struct bulk_gen {
	uint64_t x, word;
	unsigned left;
};

static void bulk_gen_init(struct bulk_gen *g, uint64_t nbytes)
{
	g->x = nbytes ^ 0x9e3779b97f4a7c15ull;
	g->x = g->x ? g->x : 1;	/* xorshift never leaves 0 */
	g->left = 0;
}

static void bulk_gen_fill(struct bulk_gen *g, uint8_t *buf, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		if (g->left == 0) {
			g->x ^= g->x << 13;
			g->x ^= g->x >> 7;
			g->x ^= g->x << 17;
			g->word = g->x;
			g->left = 8;
		}
		buf[i] = (uint8_t)g->word;
		g->word >>= 8;
		g->left--;
	}
}

static int type = SOCK_STREAM;
static const char *errwhy = "";	/* what failed, for the FAIL line */

static void report(const char *verb, unsigned long long n, struct sha256 *h, double t0)
{
	char hex[65];
	double dt = now_s() - t0;

	sha256_hex(h, hex);
	printf("vsock-bulk: %s %llu bytes sha256 %s in %.3f s (%.2f MB/s)\n", verb, n, hex, dt,
	       dt > 0 ? n / dt / 1e6 : 0.0);
}

/* Send `total` bytes in `chunk`-byte writes, shut down, wait for EOF. Returns bytes sent. */
static unsigned long long do_send(int fd, unsigned long long total, size_t chunk, struct sha256 *h)
{
	uint8_t *buf = malloc(chunk);
	unsigned long long sent = 0;
	struct bulk_gen g;
	char c;

	if (!buf) {
		errwhy = "out of memory";
		return 0;
	}
	bulk_gen_init(&g, total);
	while (sent < total) {
		size_t n = total - sent < chunk ? total - sent : chunk;
		bulk_gen_fill(&g, buf, n);
		if (type == SOCK_SEQPACKET ? send(fd, buf, n, 0) != (ssize_t)n : write_all(fd, buf, n) < 0) {
			errwhy = strerror(errno);	/* EAGAIN: --timeout expired */
			return sent;
		}
		sha256_update(h, buf, n);
		sent += n;
	}
	shutdown(fd, SHUT_WR);			/* the receiver's EOF ... */
	while (recv(fd, &c, 1, 0) > 0)		/* ... answered by its close */
		;
	return sent;
}

/* Receive until EOF; with `expect` (!= ~0) also compare with the stream. Returns bytes. */
static unsigned long long do_recv(int fd, unsigned long long expect, struct sha256 *h)
{
	size_t size = type == SOCK_SEQPACKET ? vsock_buf_size(fd) + 1 : 64 * 1024;
	uint8_t *buf = malloc(size), *want = malloc(size);
	unsigned long long got = 0;
	struct bulk_gen g;
	static char why[96];

	if (!buf || !want) {
		errwhy = "out of memory";
		return 0;
	}
	bulk_gen_init(&g, expect);
	for (;;) {
		struct iovec iov = { buf, size };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
		ssize_t n = recvmsg(fd, &m, 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			errwhy = n < 0 ? strerror(errno) : "";
			return got;
		}
		if (m.msg_flags & MSG_TRUNC) {	/* SEQPACKET message over our buf_alloc: impossible */
			errwhy = "message truncated";
			return got;
		}
		if (expect != ~0ULL) {
			size_t check = got >= expect ? 0 : expect - got < (size_t)n ? expect - got : (size_t)n;
			bulk_gen_fill(&g, want, check);
			for (size_t i = 0; i < check; i++)
				if (buf[i] != want[i]) {
					snprintf(why, sizeof(why), "byte %llu is 0x%02x, want 0x%02x",
						 got + i, buf[i], want[i]);
					errwhy = why;
					sha256_update(h, buf, i);
					return got + i;
				}
		}
		sha256_update(h, buf, n);
		got += n;
	}
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "cid", required_argument, NULL, 'c' },
		{ "port", required_argument, NULL, 'p' },
		{ "bytes", required_argument, NULL, 'b' },
		{ "expect", required_argument, NULL, 'e' },
		{ "chunk", required_argument, NULL, 's' },
		{ "timeout", required_argument, NULL, 'T' },
		{ "type", required_argument, NULL, 't' },
		{ "listen", no_argument, NULL, 'l' },
		{ NULL, 0, NULL, 0 },
	};
	unsigned long long cid = ~0ULL, port = ~0ULL, bytes = ~0ULL, expect = ~0ULL, chunk = 65536;
	unsigned long long tmo = 30, n;
	/* the numeric options, indexed by their getopt_long code */
	unsigned long long *num[128] = { ['c'] = &cid, ['p'] = &port, ['b'] = &bytes, ['e'] = &expect,
					 ['s'] = &chunk, ['T'] = &tmo };
	int sending, listening = 0, opt, fd;
	struct sha256 h;
	double t0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN);	/* a closed peer: EPIPE from send, not death */
	if (argc < 2 || (strcmp(argv[1], "send") != 0 && strcmp(argv[1], "recv") != 0))
		goto usage;
	sending = strcmp(argv[1], "send") == 0;
	argc--, argv++;			/* getopt_long from the subcommand on */
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (opt == '?' || (opt == 't' && (type = vsock_parse_type(optarg)) < 0) ||
		    (opt != 't' && opt != 'l' && vsock_parse_num(optarg, num[opt]) < 0))
			goto usage;
		listening |= opt == 'l';
	}
	if (!sending)
		listening = cid == ~0ULL;	/* recv: listens unless given a peer */
	if (optind != argc || port > 0xffffffffu || (!listening && cid > 0xffffffffu) ||
	    (listening && cid != ~0ULL) || (sending && (bytes == ~0ULL || expect != ~0ULL)) ||
	    (!sending && bytes != ~0ULL) || chunk == 0 || chunk > (1ULL << 30) || tmo > 1000000)
		goto usage;

	if (listening) {
		int lfd = vsock_listen(type, port);
		if (lfd < 0) {
			perror("vsock-bulk: listen");
			return 2;
		}
		printf("vsock-bulk: listening %s %llu\n", vsock_type_name(type), port);
		fd = accept(lfd, NULL, NULL);
		close(lfd);
		if (fd >= 0 && tmo > 0)
			vsock_set_timeout(fd, tmo);
	} else {
		fd = vsock_connect(type, cid, port, tmo);
	}
	if (fd < 0) {
		printf("vsock-bulk: FAIL %s: %s\n", listening ? "accept" : "connect", strerror(errno));
		return 2;
	}

	sha256_init(&h);
	t0 = now_s();
	if (sending) {
		n = do_send(fd, bytes, chunk, &h);
		report("sent", n, &h, t0);
		if (n != bytes) {
			printf("vsock-bulk: FAIL short transfer: sent %llu of %llu bytes: %s\n", n, bytes, errwhy);
			return 1;
		}
	} else {
		n = do_recv(fd, expect, &h);
		report("received", n, &h, t0);
		if (*errwhy) {
			printf("vsock-bulk: FAIL after %llu bytes: %s\n", n, errwhy);
			return 1;
		}
		if (expect != ~0ULL && n != expect) {
			printf("vsock-bulk: FAIL %s transfer: received %llu of %llu bytes\n",
			       n < expect ? "short" : "long", n, expect);
			return 1;
		}
	}
	close(fd);
	return 0;

usage:
	fprintf(stderr, "usage: vsock-bulk send (--cid C | --listen) --port P --bytes N [--chunk S]\n"
			"       vsock-bulk recv [--cid C] --port P [--expect N]\n"
			"       common: [--type stream|seqpacket] [--timeout SEC]\n");
	return 2;
}
