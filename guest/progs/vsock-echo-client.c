/*
 * vsock-echo-client -- drive an echo server over K concurrent AF_VSOCK connections and check
 * that every byte (SEQPACKET: every message) comes back exactly.
 *
 *     vsock-echo-client [--type stream|seqpacket] --cid C --port P [--size S] [--count N]
 *                       [--conns K] [--timeout SEC]
 *
 * Defaults: stream, S = 4096 bytes (K/M/G suffixes allowed), N = 10 messages, K = 1
 * connection, SEC = 30. Connection k (0..K-1) sends messages 0..N-1 of S bytes each; message s
 * holds pattern_fill(k, s) (vsock-util.h), so a byte from another connection or another
 * message never matches. Every connection is a process of its own, split in two: a writer child
 * sends the N messages and then shutdown(SHUT_WR); the connection's process reads the echo
 * meanwhile (so neither side can block the other however big S*N is), compares it byte by byte
 * (SEQPACKET: also that each recv returns exactly one S-byte message, never truncated), and
 * then expects EOF. SEC bounds the connect and every send/recv (a stalled peer = FAIL, not a
 * hang; 0 = no bound). SEQPACKET needs S <= the peer's buf_alloc (Linux default 256 KiB).
 *
 * Output (stdout; tests parse the last line):
 *     vsock-echo-client: <K> connections x <N> x <S> bytes echoed in <sec> s (<MB/s> MB/s)
 *     vsock-echo-client: ok <K> <bytes>            bytes = K*N*S, all verified; exit 0
 *  or vsock-echo-client: FAIL <reason>             reason of the first failed connection
 *                                                  and how many failed; exit 1
 * (MB = 10^6 bytes; the rate counts the bytes once, not both directions.) Bad usage: exit 2.
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include "vsock-util.h"

/* One per connection, in a MAP_SHARED mapping: the connection's two processes write why they
 * failed here, the parent reads it after wait(). Both empty and exit 0: the connection is ok. */
struct result {
	char reason[160];	/* the reader's */
	char writer[160];	/* the writer child's (the likelier cause: preferred) */
};

static int type = SOCK_STREAM;
static unsigned long long cid = ~0ULL, port = ~0ULL, size = 4096, count = 10, conns = 1, tmo = 30;

/* Writer side of connection k: N messages, then shutdown(SHUT_WR). Returns 0 or 1. */
static int send_messages(int fd, uint32_t k, uint8_t *buf, struct result *r)
{
	for (uint32_t s = 0; s < count; s++) {
		pattern_fill(buf, size, k, s);
		if (type == SOCK_SEQPACKET ? send(fd, buf, size, MSG_EOR) != (ssize_t)size
					   : write_all(fd, buf, size) < 0) {
			snprintf(r->writer, sizeof(r->writer), "conn %u: send message %u: %s%s", k, s,
				 strerror(errno), errno == EAGAIN ? " (timeout)" :
				 errno == ENOMEM || errno == EMSGSIZE ? " (message over buf_alloc?)" : "");
			shutdown(fd, SHUT_WR);	/* the reader then sees EOF instead of waiting */
			return 1;
		}
	}
	if (shutdown(fd, SHUT_WR) < 0) {
		snprintf(r->reason, sizeof(r->reason), "conn %u: shutdown: %s", k, strerror(errno));
		return 1;
	}
	return 0;
}

/* Reader side: receive and compare N echoed messages, then EOF. Returns 0 or 1. */
static int check_echo(int fd, uint32_t k, uint8_t *want, uint8_t *got, struct result *r)
{
	unsigned long long s = 0, off = 0;	/* message number, offset inside it */

	pattern_fill(want, size, k, 0);
	for (;;) {
		/* STREAM: any amount up to the end of the current message. SEQPACKET: room for one
		 * byte more than a message, so an over-long one cannot pass as S bytes. */
		size_t room = type == SOCK_SEQPACKET ? size + 1 : size - off;
		struct iovec iov = { got, room };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
		/* MSG_TRUNC: recv returns a SEQPACKET message's real length even if it is longer */
		ssize_t n = recvmsg(fd, &m, type == SOCK_SEQPACKET ? MSG_TRUNC : 0);
		const char *bad = NULL;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			snprintf(r->reason, sizeof(r->reason), "conn %u: recv message %llu: %s%s", k, s,
				 strerror(errno), errno == EAGAIN ? " (timeout)" : "");
			return 1;
		}
		if (n == 0 && s == count)
			return 0;	/* everything back, then EOF: done */
		if (n == 0)
			bad = "EOF";
		else if (s == count)
			bad = "data after the last message";
		else if (type == SOCK_SEQPACKET && ((size_t)n != size || (m.msg_flags & MSG_TRUNC)))
			bad = "message of a wrong size";
		if (!bad) {
			for (size_t i = 0; i < (size_t)n; i++)
				if (got[i] != want[off + i]) {
					snprintf(r->reason, sizeof(r->reason),
						 "conn %u: message %llu byte %llu: got 0x%02x, want 0x%02x",
						 k, s, off + i, got[i], want[off + i]);
					return 1;
				}
			off += n;
			if (off == size && ++s < count)
				pattern_fill(want, size, k, s);
			off %= size;
			continue;
		}
		snprintf(r->reason, sizeof(r->reason), "conn %u: message %llu offset %llu: %s (recv %zd)",
			 k, s, off, bad, n);
		return 1;
	}
}

/* Connection k, in its own process: connect, fork the writer, check the echo. Returns 0/1. */
static int connection(uint32_t k, struct result *r)
{
	uint8_t *out = malloc(size), *want = malloc(size), *got = malloc(size + 1);
	int fd, status;
	pid_t writer;

	if (!out || !want || !got) {
		snprintf(r->reason, sizeof(r->reason), "conn %u: out of memory for %llu bytes", k, size);
		return 1;
	}
	fd = vsock_connect(type, cid, port, tmo);
	if (fd < 0) {
		snprintf(r->reason, sizeof(r->reason), "conn %u: connect %llu:%llu: %s", k, cid, port,
			 strerror(errno));
		return 1;
	}
	writer = fork();
	if (writer == 0)
		_exit(send_messages(fd, k, out, r));
	if (writer < 0) {
		snprintf(r->reason, sizeof(r->reason), "conn %u: fork: %s", k, strerror(errno));
		return 1;
	}
	if (check_echo(fd, k, want, got, r) != 0) {
		kill(writer, SIGKILL);	/* our own child, maybe blocked in send */
		waitpid(writer, NULL, 0);
		return 1;
	}
	waitpid(writer, &status, 0);	/* the echo is complete, so the writer has finished */
	return !WIFEXITED(status) || WEXITSTATUS(status) != 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "type", required_argument, NULL, 't' },
		{ "cid", required_argument, NULL, 'c' },
		{ "port", required_argument, NULL, 'p' },
		{ "size", required_argument, NULL, 's' },
		{ "count", required_argument, NULL, 'n' },
		{ "conns", required_argument, NULL, 'k' },
		{ "timeout", required_argument, NULL, 'T' },
		{ NULL, 0, NULL, 0 },
	};
	/* the numeric options, indexed by their getopt_long code */
	unsigned long long *num[128] = { ['c'] = &cid, ['p'] = &port, ['s'] = &size, ['n'] = &count,
					 ['k'] = &conns, ['T'] = &tmo };
	unsigned long long failed = 0;
	struct result *results;
	int opt, status;
	double t0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN);	/* a closed peer: EPIPE from send, not death */
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1)
		if (opt == '?' || (opt == 't' && (type = vsock_parse_type(optarg)) < 0) ||
		    (opt != 't' && vsock_parse_num(optarg, num[opt]) < 0))
			goto usage;
	if (cid > 0xffffffffu || port > 0xffffffffu || size == 0 || count > 0xffffffffu ||
	    conns == 0 || conns > 4096 ||
	    size > (1ULL << 30) || tmo > 1000000)
		goto usage;

	results = mmap(NULL, conns * sizeof(*results), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (results == MAP_FAILED) {
		printf("vsock-echo-client: FAIL mmap: %s\n", strerror(errno));
		return 1;
	}
	t0 = now_s();
	for (uint32_t k = 0; k < conns; k++) {	/* all K connections at once */
		pid_t pid = fork();
		if (pid == 0)
			_exit(connection(k, &results[k]));
		if (pid < 0) {
			snprintf(results[k].reason, sizeof(results[k].reason), "conn %u: fork: %s", k,
				 strerror(errno));
			failed++;
		}
	}
	while (wait(&status) > 0)
		failed += !WIFEXITED(status) || WEXITSTATUS(status) != 0;
	if (failed) {
		for (uint32_t k = 0; k < conns; k++)	/* the first connection that says why */
			if (results[k].writer[0] || results[k].reason[0]) {
				printf("vsock-echo-client: FAIL %s (%llu of %llu connections failed)\n",
				       results[k].writer[0] ? results[k].writer : results[k].reason,
				       failed, conns);
				return 1;
			}
		printf("vsock-echo-client: FAIL %llu of %llu connections died\n", failed, conns);
		return 1;
	}
	double dt = now_s() - t0, bytes = (double)conns * count * size;
	printf("vsock-echo-client: %llu connections x %llu x %llu bytes echoed in %.3f s (%.2f MB/s)\n",
	       conns, count, size, dt, bytes / dt / 1e6);
	printf("vsock-echo-client: ok %llu %llu\n", conns, conns * count * size);
	return 0;

usage:
	fprintf(stderr, "usage: vsock-echo-client [--type stream|seqpacket] --cid C --port P [--size S]"
			" [--count N] [--conns K] [--timeout SEC]\n");
	return 2;
}
