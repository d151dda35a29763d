/*
 * vsock-echo-server -- echo every byte (SEQPACKET: every message) back to AF_VSOCK clients.
 *
 *     vsock-echo-server [--type stream|seqpacket] [--port P] [--count N]
 *
 * Listens on VMADDR_CID_ANY:P (default port 1234, type stream) and serves connections
 * concurrently, one forked child per connection. A child echoes until the peer's EOF (its
 * shutdown(SHUT_WR) or close), then closes. STREAM: bytes in, the same bytes out. SEQPACKET:
 * each message is received whole and sent back as one message of the same size, with MSG_EOR
 * if it arrived with MSG_EOR, so boundaries survive the round trip. After N connections
 * (default: unlimited) it stops accepting, waits for the children and exits.
 *
 * Output (stdout; tests wait for and parse these lines):
 *     vsock-echo-server: listening <type> <port>        once listen() succeeded: connect now
 *     vsock-echo-server: done <connections> <bytes>     at the end: connections accepted, bytes
 *                                                       echoed (all of them); also printed, with
 *                                                       what was echoed so far, on SIGTERM/SIGINT
 * stderr, one line per connection that failed:
 *     vsock-echo-server: conn <i>: <what failed>        (i counts accepted connections from 0)
 * Exit status: 0; 1 if a connection failed; 2 bad usage or the listening socket failed.
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include "vsock-util.h"

static uint64_t *echoed;	/* bytes echoed, in a MAP_SHARED page: children add, parent reads */
static volatile sig_atomic_t stop;	/* SIGTERM/SIGINT arrived */

static void on_signal(int sig) { (void)sig; stop = 1; }

/* Echo one connection until EOF. Returns 0, or 1 after printing what failed. */
static int echo(int fd, int type, unsigned long conn)
{
	/* SEQPACKET: a message is at most our buf_alloc long (the sender may not send more than
	 * our receive buffer); one byte more lets a bigger one show up as MSG_TRUNC. */
	size_t size = type == SOCK_SEQPACKET ? vsock_buf_size(fd) + 1 : 64 * 1024;
	char *buf = malloc(size);

	if (!buf) {
		fprintf(stderr, "vsock-echo-server: conn %lu: out of memory\n", conn);
		return 1;
	}
	for (;;) {
		struct iovec iov = { buf, size };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
		ssize_t n = recvmsg(fd, &m, 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			fprintf(stderr, "vsock-echo-server: conn %lu: recv: %s\n", conn, strerror(errno));
			return 1;
		}
		if (n == 0)		/* EOF: vsock never delivers an empty SEQPACKET message */
			return 0;
		if (type == SOCK_SEQPACKET) {
			if (m.msg_flags & MSG_TRUNC) {
				fprintf(stderr, "vsock-echo-server: conn %lu: message over %zu bytes\n",
					conn, size - 1);
				return 1;
			}
			if (send(fd, buf, n, m.msg_flags & MSG_EOR) != n) {	/* whole, or error */
				fprintf(stderr, "vsock-echo-server: conn %lu: send: %s\n", conn, strerror(errno));
				return 1;
			}
		} else if (write_all(fd, buf, n) < 0) {
			fprintf(stderr, "vsock-echo-server: conn %lu: write: %s\n", conn, strerror(errno));
			return 1;
		}
		__atomic_add_fetch(echoed, (uint64_t)n, __ATOMIC_RELAXED);
	}
}

/* Collect exited children (all of them if `block`); returns how many of them failed. */
static unsigned long reap(int block)
{
	unsigned long failed = 0;
	int status;

	while (waitpid(-1, &status, block ? 0 : WNOHANG) > 0)
		failed += !WIFEXITED(status) || WEXITSTATUS(status) != 0;
	return failed;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "type", required_argument, NULL, 't' },
		{ "port", required_argument, NULL, 'p' },
		{ "count", required_argument, NULL, 'n' },
		{ NULL, 0, NULL, 0 },
	};
	unsigned long long port = 1234, count = 0, conns = 0, failed = 0;
	int type = SOCK_STREAM, opt, lfd;
	struct sigaction sa = { .sa_handler = on_signal };	/* no SA_RESTART: accept() returns EINTR */

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if ((opt == 't' && (type = vsock_parse_type(optarg)) < 0) ||
		    (opt == 'p' && (vsock_parse_num(optarg, &port) < 0 || port > 0xffffffffu)) ||
		    (opt == 'n' && vsock_parse_num(optarg, &count) < 0) || opt == '?') {
			fprintf(stderr, "usage: vsock-echo-server [--type stream|seqpacket] [--port P] [--count N]\n");
			return 2;
		}
	}
	echoed = mmap(NULL, sizeof(*echoed), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (echoed == MAP_FAILED || (lfd = vsock_listen(type, port)) < 0) {
		perror("vsock-echo-server: listen");
		return 2;
	}
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);	/* a vanished client: EPIPE from send, not death */
	printf("vsock-echo-server: listening %s %llu\n", vsock_type_name(type), port);

	while (!stop && (count == 0 || conns < count)) {
		int fd = accept(lfd, NULL, NULL);

		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			perror("vsock-echo-server: accept");
			return 2;
		}
		failed += reap(0);	/* children that have finished meanwhile */
		pid_t pid = fork();
		if (pid == 0) {		/* child: this connection only */
			close(lfd);
			_exit(echo(fd, type, conns));
		}
		if (pid < 0)
			fprintf(stderr, "vsock-echo-server: conn %llu: fork: %s\n", conns, strerror(errno));
		failed += pid < 0;
		close(fd);
		conns++;
	}
	close(lfd);
	if (!stop)		/* --count reached: let every connection finish */
		failed += reap(1);
	printf("vsock-echo-server: done %llu %llu\n", conns,
	       (unsigned long long)__atomic_load_n(echoed, __ATOMIC_RELAXED));
	return failed ? 1 : 0;
}
