/*
 * vsock-util.h -- helpers shared by the guest vsock programs (guest/progs/vsock-*.c).
 *
 * AF_VSOCK comes from glibc's <sys/socket.h>; struct sockaddr_vm, VMADDR_CID_* and the
 * SO_VM_SOCKETS_* options from the kernel's <linux/vm_sockets.h> (linux-libc-dev), which has all
 * we need, so no constants are redefined here. What this adds:
 *
 *   vsock_parse_type("stream"|"seqpacket")  -> SOCK_STREAM / SOCK_SEQPACKET, -1 if neither
 *   vsock_parse_num(s, &v)                  decimal or 0x-hex, optional K/M/G suffix (x1024^n)
 *   vsock_listen(type, port)                socket + bind(VMADDR_CID_ANY:port) + listen
 *   vsock_connect(type, cid, port, tmo)     socket + connect, giving up after tmo seconds
 *   vsock_set_timeout(fd, tmo)              SO_RCVTIMEO + SO_SNDTIMEO: a stalled peer turns into
 *                                           EAGAIN after tmo seconds instead of a hang (0 = none)
 *   vsock_buf_size(fd)                      SO_VM_SOCKETS_BUFFER_SIZE: the socket's buf_alloc
 *   write_all(fd, buf, len)                 write until done (STREAM sockets may write less)
 *   pattern_fill(buf, len, a, b)            deterministic test bytes for message (a, b)
 *   now_s()                                 CLOCK_MONOTONIC in seconds
 *
 * Everything is `static inline` (multicall.c's rule: no shared non-static names; inline so a
 * program that skips a helper gets no unused-function warning). Socket helpers return -1 with
 * errno set, leaving the message to the caller.
 */
#ifndef PYVMM_VSOCK_UTIL_H
#define PYVMM_VSOCK_UTIL_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static inline int vsock_parse_type(const char *s)
{
	if (strcmp(s, "stream") == 0)
		return SOCK_STREAM;
	if (strcmp(s, "seqpacket") == 0)
		return SOCK_SEQPACKET;
	return -1;
}

static inline const char *vsock_type_name(int type)
{
	return type == SOCK_SEQPACKET ? "seqpacket" : "stream";
}

/* "4096", "0x1000", "64K", "16M", "1G" -> *v; returns 0, or -1 if s is not such a number. */
static inline int vsock_parse_num(const char *s, unsigned long long *v)
{
	char *end;

	errno = 0;
	*v = strtoull(s, &end, 0);
	if (errno || end == s || *s == '-')
		return -1;
	switch (*end) {
	case 'G': *v <<= 10; /* fall through */
	case 'M': *v <<= 10; /* fall through */
	case 'K': *v <<= 10; end++; break;
	}
	return *end ? -1 : 0;
}

static inline void vsock_addr(struct sockaddr_vm *a, unsigned cid, unsigned port)
{
	memset(a, 0, sizeof(*a));
	a->svm_family = AF_VSOCK;
	a->svm_cid = cid;
	a->svm_port = port;
}

/* A listening socket on VMADDR_CID_ANY:port; the backlog is large enough for every test. */
static inline int vsock_listen(int type, unsigned port)
{
	struct sockaddr_vm a;
	int fd = socket(AF_VSOCK, type, 0);

	vsock_addr(&a, VMADDR_CID_ANY, port);
	if (fd < 0)
		return -1;
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 1024) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

static inline int vsock_set_timeout(int fd, int seconds)
{
	struct timeval tv = { .tv_sec = seconds };

	return setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) ||
	       setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) ? -1 : 0;
}

/* Connect to cid:port. The kernel's connect timeout is 2 s (VSOCK_DEFAULT_CONNECT_TIMEOUT); a
 * VMM in Python under TCG can be slower, so it is raised to `seconds` (if > 0), and the same
 * value then bounds every later send/recv (vsock_set_timeout). */
static inline int vsock_connect(int type, unsigned cid, unsigned port, int seconds)
{
	struct sockaddr_vm a;
	struct timeval tv = { .tv_sec = seconds };
	int fd = socket(AF_VSOCK, type, 0);

	vsock_addr(&a, cid, port);
	if (fd < 0)
		return -1;
	if ((seconds > 0 &&
	     (setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof(tv)) < 0 ||
	      vsock_set_timeout(fd, seconds) < 0)) ||
	    connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

/* buf_alloc of a vsock socket: the most it can have queued for reading, hence also the largest
 * SEQPACKET message it can receive (Linux refuses to send a bigger one: EMSGSIZE/ENOMEM). */
static inline size_t vsock_buf_size(int fd)
{
	unsigned long long size = 0;
	socklen_t len = sizeof(size);

	if (getsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, &size, &len) < 0 || size == 0)
		size = 256 * 1024;	/* VSOCK_DEFAULT_BUFFER_SIZE */
	return size;
}

/* Write all len bytes; returns 0, or -1 with errno (EAGAIN = the vsock_set_timeout expired). */
static inline int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* len bytes that depend on (a, b) -- say a connection index and a message number -- and on
 * the position: xorshift32 from a seed mixed from a and b, one step per 4 bytes. A misplaced,
 * repeated, reordered or foreign message does not match. */
static inline void pattern_fill(uint8_t *buf, size_t len, uint32_t a, uint32_t b)
{
	uint32_t x = (a + 1) * 0x9e3779b9u ^ (b + 1) * 0x85ebca6bu;

	x = x ? x : 1;		/* xorshift never leaves 0 */
	for (size_t i = 0; i < len; i++) {
		if (i % 4 == 0) {
			x ^= x << 13;
			x ^= x >> 17;
			x ^= x << 5;
		}
		buf[i] = (uint8_t)(x >> (8 * (i % 4)));
	}
}

static inline double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

#endif
