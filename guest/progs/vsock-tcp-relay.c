/*
 * vsock-tcp-relay -- carry TCP connections over AF_VSOCK (and back), for guests without a network.
 *
 *     vsock-tcp-relay (--from-vsock PORT | --from-tcp IP:PORT) (--to-tcp IP:PORT | --to-vsock CID:PORT)
 *
 * Why: the kernel's vsock_test (guest/vsock_test/) coordinates its client and server over a TCP
 * "control" connection (--control-host, --control-port), and our guests have loopback only. So
 * the server guest runs `vsock-tcp-relay --from-vsock 9999 --to-tcp 127.0.0.1:5555` next to
 * `vsock_test --mode=server --control-port=5555`, and the client guest runs
 * `vsock-tcp-relay --from-tcp 127.0.0.1:5555 --to-vsock <server cid>:9999` and points
 * `vsock_test --mode=client --control-host=127.0.0.1 --control-port=5555` at it.
 *
 * Ports: 9999 (the README's default) stays clear of every vsock port vsock_test uses: 6.1 uses
 * 1234 only (hard-coded; vsock_diag_test too), 6.12 uses --peer-port (default 1234) and
 * peer-port + 1 (the bind port of "SOCK_STREAM double bind connect"); vsock_perf's default is
 * 1234. The relay's own outgoing vsock connection gets an ephemeral port from the kernel, as
 * any connect does.
 *
 * What it does: listens on the --from address; for each connection accepted it connects to the
 * --to address and copies bytes both ways until both directions have ended. An EOF in one
 * direction (the peer's shutdown(SHUT_WR) or close) is passed on as shutdown(SHUT_WR) on the
 * other socket once the bytes before it are delivered, so a half-close crosses the relay. A read
 * or write error on either socket (a reset) ends that pair: both sockets are closed, with a
 * reset where the other one is TCP (SO_LINGER 0), and the reason goes to stderr. At most
 * MAX_PAIRS pairs at once; while that many are open the listening socket is not served (further
 * connections wait in its backlog), so memory is bounded: one BUF_SIZE buffer per direction.
 * One thread, non-blocking sockets, one ppoll(2) loop; the connect to the --to address is
 * non-blocking too (AF_VSOCK: it gives up after CONNECT_TIMEOUT_S, the kernel's default of 2 s
 * being short for a guest in a VMM under emulation). Any of the four from/to combinations
 * works; TCP to TCP is how tests/unit/test_vsock_tcp_relay.py checks the copying on a host
 * without AF_VSOCK. IP addresses are numeric IPv4 (guests have no resolver).
 *
 * Output (stdout; tests wait for and parse these lines):
 *     vsock-tcp-relay: listening FROM -> TO     once listen() succeeded, with the bound port
 *                                               (FROM/TO as "tcp:IP:PORT", "vsock:CID:PORT",
 *                                               "vsock:any:PORT" for --from-vsock)
 *     vsock-tcp-relay: done <pairs> <bytes forward> <bytes back>   on SIGTERM/SIGINT, then exit 0:
 *                                               pairs accepted, bytes copied FROM->TO and TO->FROM
 * stderr, one line per failure, the pair counted from 0 in accept order:
 *     vsock-tcp-relay: pair <i>: <what failed>
 * Exit status: 0 after SIGTERM/SIGINT; 2 bad usage or the listening socket failed.
 */
#define _GNU_SOURCE		/* ppoll, accept4 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include "vsock-util.h"

#define MAX_PAIRS 16		/* connections relayed at once */
#define BUF_SIZE (64 * 1024)	/* bytes in flight per direction of a pair */
#define CONNECT_TIMEOUT_S 30	/* AF_VSOCK connect to the --to address */
#define BACKLOG 16

struct endpoint {		/* a parsed --from/--to address */
	struct sockaddr_storage addr;
	socklen_t len;
	char text[64];		/* "tcp:127.0.0.1:5555", "vsock:3:9999", "vsock:any:9999" */
};

struct flow {			/* one direction of a pair: fd[d] -> fd[1 - d] */
	char buf[BUF_SIZE];
	size_t off, len;	/* buf[off, off + len) is read but not yet written */
	int eof;		/* the source said EOF */
	int shut;		/* ... and we passed it on: shutdown(destination, SHUT_WR) */
};

struct pair {
	int used;
	int connecting;		/* fd[1]'s connect is in progress */
	unsigned long id;
	int fd[2];		/* 0: accepted on --from, 1: connected to --to */
	struct flow flow[2];	/* flow[0]: fd[0] -> fd[1] (forward), flow[1]: back */
};

static struct pair pairs[MAX_PAIRS];
static unsigned long long copied[2];	/* bytes forward, bytes back */
static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

static int usage(void)
{
	fprintf(stderr, "usage: vsock-tcp-relay (--from-vsock PORT | --from-tcp IP:PORT) "
		"(--to-tcp IP:PORT | --to-vsock CID:PORT)\n");
	return 2;
}

/* "PORT" (vsock listen: CID any), "CID:PORT" (vsock) or "IP:PORT" (tcp) -> *e; -1 if malformed */
static int parse_endpoint(struct endpoint *e, int family, const char *s, int listen_vsock)
{
	unsigned long long cid = VMADDR_CID_ANY, port;
	const char *colon = strrchr(s, ':');
	char host[INET_ADDRSTRLEN];

	memset(e, 0, sizeof(*e));
	if (family == AF_VSOCK) {
		if (listen_vsock ? colon != NULL : (!colon || colon - s >= (long)sizeof(host)))
			return -1;
		if (!listen_vsock) {
			memcpy(host, s, colon - s);
			host[colon - s] = 0;
			if (vsock_parse_num(host, &cid) < 0 || cid > 0xffffffffu)
				return -1;
		}
		if (vsock_parse_num(listen_vsock ? s : colon + 1, &port) < 0 || port > 0xffffffffu)
			return -1;
		vsock_addr((struct sockaddr_vm *)&e->addr, cid, port);
		e->len = sizeof(struct sockaddr_vm);
		return 0;
	}
	struct sockaddr_in *in = (struct sockaddr_in *)&e->addr;

	if (!colon || colon - s >= (long)sizeof(host))
		return -1;
	memcpy(host, s, colon - s);
	host[colon - s] = 0;
	if (vsock_parse_num(colon + 1, &port) < 0 || port > 65535 ||
	    inet_pton(AF_INET, host, &in->sin_addr) != 1)
		return -1;
	in->sin_family = AF_INET;
	in->sin_port = htons(port);
	e->len = sizeof(*in);
	return 0;
}

static void describe(struct endpoint *e)
{
	if (e->addr.ss_family == AF_VSOCK) {
		struct sockaddr_vm *vm = (struct sockaddr_vm *)&e->addr;
		if (vm->svm_cid == VMADDR_CID_ANY)
			snprintf(e->text, sizeof(e->text), "vsock:any:%u", vm->svm_port);
		else
			snprintf(e->text, sizeof(e->text), "vsock:%u:%u", vm->svm_cid, vm->svm_port);
	} else {
		struct sockaddr_in *in = (struct sockaddr_in *)&e->addr;
		char ip[INET_ADDRSTRLEN];
		inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
		snprintf(e->text, sizeof(e->text), "tcp:%s:%u", ip, ntohs(in->sin_port));
	}
}

static int listen_on(struct endpoint *e)
{
	int one = 1, fd = socket(e->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -1;
	if ((e->addr.ss_family == AF_INET &&
	     setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0) ||
	    bind(fd, (struct sockaddr *)&e->addr, e->len) < 0 || listen(fd, BACKLOG) < 0 ||
	    getsockname(fd, (struct sockaddr *)&e->addr, &e->len) < 0) {	/* the port, if 0 */
		int err = errno;
		close(fd);
		errno = err;
		return -1;
	}
	return fd;
}

/* Start a non-blocking connect to e; the fd, or -1 with errno. */
static int connect_to(const struct endpoint *e)
{
	int fd = socket(e->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -1;
	if (e->addr.ss_family == AF_VSOCK) {
		struct timeval tv = { .tv_sec = CONNECT_TIMEOUT_S };
		if (setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof(tv)) < 0)
			goto fail;
	}
	if (connect(fd, (const struct sockaddr *)&e->addr, e->len) < 0 && errno != EINPROGRESS)
		goto fail;
	return fd;
fail:;
	int err = errno;
	close(fd);
	errno = err;
	return -1;
}

/* Close both sockets of p. After a failure (what != NULL: say what, err = errno) they are closed
 * with SO_LINGER 0, so a TCP peer sees a reset rather than a clean EOF, as it would have without
 * the relay. (An AF_VSOCK peer sees its usual close: a program cannot make vsock send a RST, so
 * across the vsock hop between two relays a reset arrives as an EOF.) */
static void end_pair(struct pair *p, const char *what, int err)
{
	if (what) {
		struct linger abort_close = { .l_onoff = 1, .l_linger = 0 };

		fprintf(stderr, "vsock-tcp-relay: pair %lu: %s: %s\n", p->id, what, strerror(err));
		for (int i = 0; i < 2; i++)
			if (p->fd[i] >= 0)
				setsockopt(p->fd[i], SOL_SOCKET, SO_LINGER, &abort_close, sizeof(abort_close));
	}
	close(p->fd[0]);
	close(p->fd[1]);
	p->used = 0;
}

/* Move what can be moved in direction d of pair p (src: the poll result of its source fd).
 * Returns 0, or -1 after ending the pair. */
static int pump(struct pair *p, int d, const struct pollfd *src,
		const struct endpoint *from, const struct endpoint *to)
{
	struct flow *f = &p->flow[d];
	const char *src_name = d == 0 ? from->text : to->text;
	const char *dst_name = d == 0 ? to->text : from->text;
	char what[96];

	if (f->len == 0 && !f->eof && (src->revents & (POLLIN | POLLHUP | POLLERR))) {
		ssize_t n = read(p->fd[d], f->buf, sizeof(f->buf));
		if (n < 0 && errno != EAGAIN && errno != EINTR) {
			snprintf(what, sizeof(what), "read from %s", src_name);
			end_pair(p, what, errno);
			return -1;
		}
		if (n == 0)
			f->eof = 1;
		if (n > 0) {
			f->off = 0;
			f->len = n;
		}
	}
	if (f->len > 0) {	/* tried whenever bytes wait: non-blocking, EAGAIN is fine */
		ssize_t n = write(p->fd[1 - d], f->buf + f->off, f->len);
		if (n < 0 && errno != EAGAIN && errno != EINTR) {
			snprintf(what, sizeof(what), "write to %s", dst_name);
			end_pair(p, what, errno);
			return -1;
		}
		if (n > 0) {
			f->off += n;
			f->len -= n;
			copied[d] += n;
		}
	}
	if (f->eof && f->len == 0 && !f->shut) {	/* everything before the EOF is delivered */
		f->shut = 1;
		if (shutdown(p->fd[1 - d], SHUT_WR) < 0 && errno != ENOTCONN) {
			snprintf(what, sizeof(what), "shutdown(SHUT_WR) of %s", dst_name);
			end_pair(p, what, errno);
			return -1;
		}
	}
	return 0;
}

/* poll events for fd[i] of p: read where its outgoing buffer is empty, write where the buffer
 * towards it holds bytes. An fd with nothing to wait for is left out (-1), so that a POLLHUP
 * which cannot be acted on yet does not spin the loop. */
static void want(const struct pair *p, struct pollfd *pfd)
{
	for (int i = 0; i < 2; i++) {
		const struct flow *out = &p->flow[i], *in = &p->flow[1 - i];
		short ev = 0;

		if (p->connecting)
			ev = i == 1 ? POLLOUT : 0;
		else
			ev = (out->len == 0 && !out->eof ? POLLIN : 0) | (in->len > 0 ? POLLOUT : 0);
		pfd[i].fd = ev ? p->fd[i] : -1;
		pfd[i].events = ev;
		pfd[i].revents = 0;
	}
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "from-vsock", required_argument, NULL, 'V' },
		{ "from-tcp", required_argument, NULL, 'T' },
		{ "to-vsock", required_argument, NULL, 'v' },
		{ "to-tcp", required_argument, NULL, 't' },
		{ NULL, 0, NULL, 0 },
	};
	struct endpoint from, to;
	int have_from = 0, have_to = 0, opt, lfd;
	unsigned long accepted = 0;
	struct sigaction sa = { .sa_handler = on_signal };
	sigset_t block, during_poll;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		int family = opt == 'V' || opt == 'v' ? AF_VSOCK : AF_INET;
		int is_from = opt == 'V' || opt == 'T';

		if (opt == '?')
			return usage();
		if ((is_from ? have_from++ : have_to++) > 0) {
			fprintf(stderr, "vsock-tcp-relay: more than one --%s address\n",
				is_from ? "from" : "to");
			return usage();
		}
		if (parse_endpoint(is_from ? &from : &to, family, optarg, opt == 'V') < 0) {
			fprintf(stderr, "vsock-tcp-relay: bad address '%s' (%s)\n", optarg,
				opt == 'V' ? "PORT" : family == AF_VSOCK ? "CID:PORT" : "IPv4:PORT");
			return usage();
		}
	}
	if (!have_from || !have_to || optind != argc)
		return usage();

	/* SIGTERM/SIGINT stay blocked except inside ppoll: a signal cannot slip in between the
	 * check of `stop` and the wait. */
	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	sigprocmask(SIG_BLOCK, &block, &during_poll);
	sigdelset(&during_poll, SIGTERM);
	sigdelset(&during_poll, SIGINT);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);	/* a vanished peer: EPIPE from write, not death */

	if ((lfd = listen_on(&from)) < 0) {
		describe(&from);
		fprintf(stderr, "vsock-tcp-relay: listen on %s: %s\n", from.text, strerror(errno));
		return 2;
	}
	describe(&from);
	describe(&to);
	printf("vsock-tcp-relay: listening %s -> %s\n", from.text, to.text);

	while (!stop) {
		struct pollfd pfd[1 + 2 * MAX_PAIRS];
		int used = 0;

		for (int i = 0; i < MAX_PAIRS; i++) {
			used += pairs[i].used;
			if (pairs[i].used)
				want(&pairs[i], &pfd[1 + 2 * i]);
			else
				pfd[1 + 2 * i].fd = pfd[2 + 2 * i].fd = -1;
		}
		pfd[0].fd = used < MAX_PAIRS ? lfd : -1;	/* full: leave them in the backlog */
		pfd[0].events = POLLIN;
		if (ppoll(pfd, 1 + 2 * MAX_PAIRS, NULL, &during_poll) < 0) {
			if (errno == EINTR)
				continue;
			perror("vsock-tcp-relay: ppoll");
			return 2;
		}

		for (int i = 0; i < MAX_PAIRS; i++) {
			struct pair *p = &pairs[i];
			struct pollfd *pf = &pfd[1 + 2 * i];

			if (!p->used || (pf[0].revents | pf[1].revents) == 0)
				continue;
			if (p->connecting) {
				int err = 0;
				socklen_t len = sizeof(err);
				if (getsockopt(p->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) < 0)
					err = errno;
				if (err) {
					char what[96];
					snprintf(what, sizeof(what), "connect to %s", to.text);
					end_pair(p, what, err);
					continue;
				}
				p->connecting = 0;
				continue;	/* poll again with the copying events */
			}
			if (pump(p, 0, &pf[0], &from, &to) < 0 || pump(p, 1, &pf[1], &from, &to) < 0)
				continue;
			if (p->flow[0].shut && p->flow[1].shut)
				end_pair(p, NULL, 0);	/* both directions ended: done */
		}

		if (pfd[0].revents & POLLIN) {
			int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
			struct pair *p = NULL;

			if (fd < 0) {
				if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
					perror("vsock-tcp-relay: accept");
					return 2;
				}
				continue;
			}
			for (int i = 0; i < MAX_PAIRS && !p; i++)
				p = pairs[i].used ? NULL : &pairs[i];
			/* a free slot exists: the listener is polled only then */
			for (int d = 0; d < 2; d++)	/* (the buffers need no clearing) */
				p->flow[d].off = p->flow[d].len = p->flow[d].eof = p->flow[d].shut = 0;
			p->used = 1;
			p->connecting = 1;
			p->id = accepted++;
			p->fd[0] = fd;
			p->fd[1] = connect_to(&to);
			if (p->fd[1] < 0) {
				char what[96];
				int err = errno;
				snprintf(what, sizeof(what), "connect to %s", to.text);
				p->fd[1] = -1;
				end_pair(p, what, err);
			}
		}
	}
	printf("vsock-tcp-relay: done %lu %llu %llu\n", accepted, copied[0], copied[1]);
	return 0;
}
