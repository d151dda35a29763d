/*
 * libvsockify.so -- run unmodified TCP programs over AF_VSOCK: an LD_PRELOAD library for guests.
 *
 *     VSOCKIFY_PORTS=22 LD_PRELOAD=/opt/vsockify/lib/libvsockify.so /opt/vsockify/bin/dropbear -F -p 22
 *     VSOCKIFY_PORTS=8080 LD_PRELOAD=/opt/vsockify/lib/libvsockify.so wget http://127.0.0.1:8080/f
 *     vsockify 22 dropbear ...            (the same, through the /usr/bin/vsockify wrapper script)
 *
 * Why: a guest without a network device still has vsock. The seed (Asias He's 2013 RFC of the
 * virtio vsock transport) "wrote a small libvsock.so to play the LD_PRELOAD trick and managed to
 * make sshd and ssh work over virtio-vsock without modifying the source code"; this is that
 * library. It is built against the guest image's glibc (Debian's, dynamic: guest/vsockify/
 * build.sh) and is loaded into dynamically linked programs only (a static busybox ignores it).
 *
 * What it maps (only AF_INET SOCK_STREAM sockets, only on the configured ports):
 *   connect(fd, 127.x.x.x:P)   P configured: the fd becomes an AF_VSOCK SOCK_STREAM socket
 *                              (same fd number, O_NONBLOCK and FD_CLOEXEC kept) connected to
 *                              VSOCKIFY_CID:P. A non-blocking connect gives EINPROGRESS and
 *                              SO_ERROR as usual (SOL_SOCKET options are vsock's own); a
 *                              repeated connect() of that fd is a vsock connect again
 *                              (EALREADY, EISCONN as the kernel says).
 *   bind(fd, ANY-ADDRESS:P)    P configured (and not 0): the fd becomes an AF_VSOCK socket bound
 *                              to VMADDR_CID_ANY:P; listen() and accept() then work on vsock.
 *                              The IPv4 address is not looked at (a guest has no network).
 * Every AF_VSOCK socket the program did not make itself is taken for a mapped one ("vsockified"):
 * the ones mapped here, the connections accepted on them, and those inherited across execve --
 * dropbear re-executes itself for each connection with the accepted socket, so the mapping must
 * not live in the parent's memory only. The program's own AF_VSOCK sockets (socket(AF_VSOCK),
 * accept on one, their dup/dup2/dup3 copies) are remembered in a table and left alone. On a
 * vsockified socket, addresses are shown as the program expects them:
 *   accept, accept4, getsockname, getpeername   return AF_INET 127.0.0.1 and the vsock port,
 *                              cut to the caller's *addrlen (which is set to the full size, as
 *                              the kernel does). A vsock port above 65535 (the kernel's
 *                              ephemeral ports are) is shown as 49152 + port % 16384.
 *   setsockopt(IPPROTO_TCP or IPPROTO_IP, any option)   succeeds and does nothing (TCP_NODELAY,
 *                              keep-alive tuning, IP_TOS: meaningless on vsock, harmless to drop).
 *   getsockopt(IPPROTO_TCP or IPPROTO_IP, ...)   succeeds with an int 0 (cut to *optlen), except
 *                              IP_OPTIONS, which is empty (length 0: no IP options, what sshd's
 *                              source-routing check wants to see).
 *   SOL_SOCKET options         go to the vsock socket (the kernel's generic ones work on it:
 *                              SO_REUSEADDR, SO_KEEPALIVE, SO_RCVTIMEO, SO_ERROR, ...). Of those
 *                              set on the AF_INET socket before it was replaced, SO_KEEPALIVE,
 *                              SO_RCVTIMEO, SO_SNDTIMEO and SO_LINGER are copied over.
 * Everything else goes to libc unchanged (dlsym(RTLD_NEXT, ...)): other families, UDP, ports
 * not configured, connects to non-loopback addresses, and every data call (read, send, poll...).
 *
 * Configuration (environment, read once at the first call):
 *   VSOCKIFY_PORTS   comma-separated ports and ranges ("22,80,8000-8099") or "all"; unset or
 *                    empty: nothing is mapped. At most VSOCKIFY_MAX_RANGES entries.
 *   VSOCKIFY_CID     the CID connects go to, decimal; default 2 (VMADDR_CID_HOST, the host).
 *                    1 (VMADDR_CID_LOCAL) reaches listeners in the same guest (vsock loopback).
 *   VSOCKIFY_DEBUG   "1": one line on stderr per mapping decision ("vsockify[PID]: ...").
 *   VSOCKIFY_DRY_RUN "1": decide and log as with VSOCKIFY_DEBUG=1, but map nothing (no AF_VSOCK
 *                    socket is ever created): to check a configuration, and how the host-side
 *                    unit tests check the decisions on a host whose AF_VSOCK is off limits.
 * A bad VSOCKIFY_PORTS or VSOCKIFY_CID prints one line on stderr and maps nothing.
 *
 * Errors: a mapping that fails returns -1 from connect/bind with socket(2)'s or dup3(2)'s errno
 * (EAFNOSUPPORT: the guest kernel has no vsock). The table of the program's own AF_VSOCK
 * sockets covers fds below VSOCKIFY_MAX_FDS: one of them at a higher fd is taken for a mapped
 * one (its addresses shown as AF_INET). Inputs are checked as the kernel checks them (a NULL addrlen with an address: EFAULT; a
 * negative *addrlen: EINVAL; an address too short for its family: passed to libc, which fails it).
 *
 * Limits (guest/vsockify/README.md): IPv4 only (the guest kernel has no IPv6); a program's own
 * AF_VSOCK socket inherited across execve, or copied with fcntl(F_DUPFD), is taken for a mapped
 * one; sendto() with an address (TCP Fast Open) is not mapped; SO_DOMAIN reads AF_VSOCK. Thread
 * safety: the configuration is read under pthread_once, the table is an array of bytes read and
 * written atomically.
 */
#define _GNU_SOURCE		/* RTLD_NEXT, accept4, dup3 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define VSOCKIFY_MAX_FDS 1024		/* the table of the program's own AF_VSOCK sockets */
#define VSOCKIFY_MAX_RANGES 64		/* entries in VSOCKIFY_PORTS */
#define EPHEMERAL_BASE 49152		/* where vsock ports > 65535 are shown ... */
#define EPHEMERAL_SPAN 16384		/* ... folded into 49152..65535 */

#define EXPORT __attribute__((visibility("default")))

/* --- the configuration ----------------------------------------------------------------------- */
static struct {
	int all;			/* VSOCKIFY_PORTS=all */
	int nranges;
	struct { unsigned lo, hi; } ranges[VSOCKIFY_MAX_RANGES];
	unsigned cid;			/* VSOCKIFY_CID */
	int debug, dry_run;
} cfg;

/* the functions we wrap, as libc has them */
static int (*real_socket)(int, int, int);
static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static int (*real_bind)(int, const struct sockaddr *, socklen_t);
static int (*real_accept)(int, struct sockaddr *, socklen_t *);
static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);
static int (*real_getsockname)(int, struct sockaddr *, socklen_t *);
static int (*real_getpeername)(int, struct sockaddr *, socklen_t *);
static int (*real_setsockopt)(int, int, int, const void *, socklen_t);
static int (*real_getsockopt)(int, int, int, void *, socklen_t *);
static int (*real_close)(int);
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);

/* 1 at [fd]: the program itself made fd an AF_VSOCK socket (socket(AF_VSOCK), accept on such a
 * one, a dup of one): not ours to translate. Cleared when the fd is closed or reused. */
static unsigned char native[VSOCKIFY_MAX_FDS];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void say(const char *fmt, ...)
{
	char line[256];
	int n = snprintf(line, sizeof(line), "vsockify[%d]: ", (int)getpid());
	va_list ap;

	va_start(ap, fmt);
	if (n > 0 && n < (int)sizeof(line))
		vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
	va_end(ap);
	n = strlen(line);
	line[n] = '\n';
	if (write(2, line, n + 1) < 0) {
		/* nothing to do: stderr is gone */
	}
}

/* "22,80,8000-8099" or "all" into cfg; 0 ok, -1 bad (cfg then maps nothing) */
static int parse_ports(const char *s)
{
	if (strcmp(s, "all") == 0) {
		cfg.all = 1;
		return 0;
	}
	while (*s) {
		char *end;
		unsigned long lo, hi;

		if (cfg.nranges == VSOCKIFY_MAX_RANGES || *s < '0' || *s > '9')
			return -1;
		lo = hi = strtoul(s, &end, 10);
		if (*end == '-') {
			if (end[1] < '0' || end[1] > '9')
				return -1;
			hi = strtoul(end + 1, &end, 10);
		}
		if (lo < 1 || hi > 65535 || lo > hi || (*end != ',' && *end != '\0'))
			return -1;
		cfg.ranges[cfg.nranges].lo = lo;
		cfg.ranges[cfg.nranges].hi = hi;
		cfg.nranges++;
		s = *end == ',' ? end + 1 : end;
		if (*end == ',' && *s == '\0')
			return -1;
	}
	return 0;
}

#define RESOLVE(name) (real_##name = (__typeof__(real_##name))dlsym(RTLD_NEXT, #name))

static void init(void)
{
	const char *ports = getenv("VSOCKIFY_PORTS"), *cid = getenv("VSOCKIFY_CID");
	const char *debug = getenv("VSOCKIFY_DEBUG"), *dry = getenv("VSOCKIFY_DRY_RUN");

	RESOLVE(socket); RESOLVE(connect); RESOLVE(bind); RESOLVE(accept); RESOLVE(accept4);
	RESOLVE(getsockname); RESOLVE(getpeername); RESOLVE(setsockopt); RESOLVE(getsockopt);
	RESOLVE(close); RESOLVE(dup); RESOLVE(dup2); RESOLVE(dup3);

	cfg.dry_run = dry && strcmp(dry, "1") == 0;
	cfg.debug = cfg.dry_run || (debug && strcmp(debug, "1") == 0);
	cfg.cid = VMADDR_CID_HOST;
	if (cid && *cid) {
		char *end;
		unsigned long v;

		errno = 0;
		v = strtoul(cid, &end, 10);
		if (*cid < '0' || *cid > '9' || *end || errno || v >= VMADDR_CID_ANY) {
			say("VSOCKIFY_CID=%.32s is not a CID (decimal, below %u); nothing is mapped",
			    cid, VMADDR_CID_ANY);
			return;		/* no ports: nothing mapped */
		}
		cfg.cid = v;
	}
	if (ports && *ports && parse_ports(ports) < 0) {
		say("VSOCKIFY_PORTS=%.64s: expected \"all\" or up to %d ports/ranges like 22,8000-8099;"
		    " nothing is mapped", ports, VSOCKIFY_MAX_RANGES);
		cfg.all = cfg.nranges = 0;
	}
	if (cfg.debug)
		say("ports %s, cid %u%s", cfg.all ? "all" : cfg.nranges ? ports : "none", cfg.cid,
		    cfg.dry_run ? ", dry run" : "");
}

static int ready(void)	/* 1 once the real functions are known */
{
	pthread_once(&once, init);
	return real_connect != NULL;
}

static int port_configured(unsigned port)
{
	if (port == 0)
		return 0;
	if (cfg.all)
		return 1;
	for (int i = 0; i < cfg.nranges; i++)
		if (port >= cfg.ranges[i].lo && port <= cfg.ranges[i].hi)
			return 1;
	return 0;
}

static int sock_int(int fd, int optname)	/* a SOL_SOCKET int option, or -1 */
{
	int v;
	socklen_t len = sizeof(v);

	return real_getsockopt(fd, SOL_SOCKET, optname, &v, &len) == 0 ? v : -1;
}

static int is_inet_stream(int fd)
{
	return sock_int(fd, SO_DOMAIN) == AF_INET && sock_int(fd, SO_TYPE) == SOCK_STREAM;
}

static void mark(int fd, unsigned char on)
{
	if (fd >= 0 && fd < VSOCKIFY_MAX_FDS)
		__atomic_store_n(&native[fd], on, __ATOMIC_RELEASE);
}

static int marked(int fd)
{
	return fd >= 0 && fd < VSOCKIFY_MAX_FDS && __atomic_load_n(&native[fd], __ATOMIC_ACQUIRE);
}

static int is_vsockified(int fd)	/* an AF_VSOCK socket the program did not make itself */
{
	return !marked(fd) && sock_int(fd, SO_DOMAIN) == AF_VSOCK;
}

/* copy the SOL_SOCKET options worth keeping from the AF_INET socket to its replacement */
static void copy_options(int from, int to)
{
	static const struct { int name; socklen_t len; } opts[] = {
		{ SO_KEEPALIVE, sizeof(int) }, { SO_RCVTIMEO, sizeof(struct timeval) },
		{ SO_SNDTIMEO, sizeof(struct timeval) }, { SO_LINGER, sizeof(struct linger) },
	};
	for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
		union { int i; struct timeval tv; struct linger l; } v;
		socklen_t len = opts[i].len;

		if (real_getsockopt(from, SOL_SOCKET, opts[i].name, &v, &len) == 0 && len == opts[i].len)
			real_setsockopt(to, SOL_SOCKET, opts[i].name, &v, len);	/* best effort */
	}
}

/* Make fd an AF_VSOCK SOCK_STREAM socket under the same number; 0 or -1 with errno. */
static int replace(int fd)
{
	int flags, fdflags, s, saved;

	if ((flags = fcntl(fd, F_GETFL)) < 0 || (fdflags = fcntl(fd, F_GETFD)) < 0)
		return -1;
	s = real_socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | ((flags & O_NONBLOCK) ? SOCK_NONBLOCK : 0),
			0);
	if (s < 0)
		return -1;
	copy_options(fd, s);
	if (real_dup3(s, fd, (fdflags & FD_CLOEXEC) ? O_CLOEXEC : 0) < 0) {
		saved = errno;
		real_close(s);
		errno = saved;
		return -1;
	}
	real_close(s);
	mark(fd, 0);
	return 0;
}

static unsigned short shown_port(unsigned port)
{
	if (port == VMADDR_PORT_ANY)
		return 0;
	return port <= 65535 ? port : EPHEMERAL_BASE + port % EPHEMERAL_SPAN;
}

/* write AF_INET 127.0.0.1:<vm's port> into (addr, *addrlen) as the kernel would */
static void show_inet(const struct sockaddr_vm *vm, struct sockaddr *addr, socklen_t *addrlen)
{
	struct sockaddr_in sin;
	socklen_t n = *addrlen < sizeof(sin) ? *addrlen : sizeof(sin);

	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons(shown_port(vm->svm_port));
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	memcpy(addr, &sin, n);
	*addrlen = sizeof(sin);
}

/* the checks the kernel makes of an (addr, addrlen) result pair; 0 ok, -1 with errno */
static int check_result_addr(const struct sockaddr *addr, const socklen_t *addrlen, int need_addr)
{
	if ((addr || need_addr) && !addrlen) {
		errno = EFAULT;
		return -1;
	}
	if (addrlen && (int)*addrlen < 0) {
		errno = EINVAL;
		return -1;
	}
	if (need_addr && !addr) {
		errno = EFAULT;
		return -1;
	}
	return 0;
}

/* An AF_INET address worth looking at: 0 and a copy in *sin, or -1 (pass it through). */
static int inet_address(const struct sockaddr *addr, socklen_t len, struct sockaddr_in *sin)
{
	sa_family_t family;

	if (!addr || len < sizeof(*sin))
		return -1;
	memcpy(&family, &addr->sa_family, sizeof(family));	/* any alignment */
	if (family != AF_INET)
		return -1;
	memcpy(sin, addr, sizeof(*sin));
	return 0;
}

/* --- the wrapped functions ------------------------------------------------------------------- */
EXPORT int socket(int domain, int type, int protocol)
{
	int fd;

	if (!ready()) {
		errno = ENOSYS;
		return -1;
	}
	fd = real_socket(domain, type, protocol);
	if (fd >= 0)
		mark(fd, domain == AF_VSOCK);	/* the program's own vsock socket, or none */
	return fd;
}

EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	struct sockaddr_in sin;
	struct sockaddr_vm vm;

	if (!ready()) {
		errno = ENOSYS;
		return -1;
	}
	if (inet_address(addr, len, &sin) < 0 || (ntohl(sin.sin_addr.s_addr) >> 24) != 127 ||
	    !port_configured(ntohs(sin.sin_port)))
		return real_connect(fd, addr, len);
	if (!is_vsockified(fd)) {	/* (a repeated connect of a non-blocking socket: it is) */
		if (!is_inet_stream(fd))
			return real_connect(fd, addr, len);
		if (cfg.debug)
			say("%sconnect fd %d 127.x:%u -> vsock %u:%u", cfg.dry_run ? "(dry run) " : "",
			    fd, ntohs(sin.sin_port), cfg.cid, ntohs(sin.sin_port));
		if (cfg.dry_run)
			return real_connect(fd, addr, len);
		if (replace(fd) < 0)
			return -1;
	}
	memset(&vm, 0, sizeof(vm));
	vm.svm_family = AF_VSOCK;
	vm.svm_cid = cfg.cid;
	vm.svm_port = ntohs(sin.sin_port);
	return real_connect(fd, (struct sockaddr *)&vm, sizeof(vm));
}

EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
	struct sockaddr_in sin;
	struct sockaddr_vm vm;

	if (!ready()) {
		errno = ENOSYS;
		return -1;
	}
	if (inet_address(addr, len, &sin) < 0 || !port_configured(ntohs(sin.sin_port)) ||
	    !is_inet_stream(fd))
		return real_bind(fd, addr, len);
	if (cfg.debug)
		say("%sbind fd %d port %u -> vsock any:%u", cfg.dry_run ? "(dry run) " : "", fd,
		    ntohs(sin.sin_port), ntohs(sin.sin_port));
	if (cfg.dry_run)
		return real_bind(fd, addr, len);
	if (replace(fd) < 0)
		return -1;
	memset(&vm, 0, sizeof(vm));
	vm.svm_family = AF_VSOCK;
	vm.svm_cid = VMADDR_CID_ANY;
	vm.svm_port = ntohs(sin.sin_port);
	return real_bind(fd, (struct sockaddr *)&vm, sizeof(vm));
}

static int accept_common(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags, int four)
{
	struct sockaddr_vm vm;
	socklen_t vlen = sizeof(vm);
	int c;

	if (!ready() || (four ? !real_accept4 : !real_accept)) {
		errno = ENOSYS;
		return -1;
	}
	if (!is_vsockified(fd)) {	/* the accepted socket is the program's own if the listener is */
		c = four ? real_accept4(fd, addr, addrlen, flags) : real_accept(fd, addr, addrlen);
		if (c >= 0)
			mark(c, marked(fd));
		return c;
	}
	if (check_result_addr(addr, addrlen, 0) < 0)
		return -1;
	memset(&vm, 0, sizeof(vm));
	c = four ? real_accept4(fd, (struct sockaddr *)&vm, &vlen, flags)
		 : real_accept(fd, (struct sockaddr *)&vm, &vlen);
	if (c < 0)
		return -1;
	mark(c, 0);
	if (cfg.debug)
		say("accept fd %d on vsockified fd %d from vsock %u:%u", c, fd, vm.svm_cid, vm.svm_port);
	if (addr)
		show_inet(&vm, addr, addrlen);
	return c;
}

EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *addrlen)
{
	return accept_common(fd, addr, addrlen, 0, 0);
}

EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags)
{
	return accept_common(fd, addr, addrlen, flags, 1);
}

static int name_common(int fd, struct sockaddr *addr, socklen_t *addrlen, int peer)
{
	int (*real)(int, struct sockaddr *, socklen_t *);
	struct sockaddr_vm vm;
	socklen_t vlen = sizeof(vm);

	if (!ready()) {
		errno = ENOSYS;
		return -1;
	}
	real = peer ? real_getpeername : real_getsockname;
	if (!is_vsockified(fd))
		return real(fd, addr, addrlen);
	if (check_result_addr(addr, addrlen, 1) < 0)
		return -1;
	memset(&vm, 0, sizeof(vm));
	if (real(fd, (struct sockaddr *)&vm, &vlen) < 0)
		return -1;
	show_inet(&vm, addr, addrlen);
	return 0;
}

EXPORT int getsockname(int fd, struct sockaddr *addr, socklen_t *addrlen)
{
	return name_common(fd, addr, addrlen, 0);
}

EXPORT int getpeername(int fd, struct sockaddr *addr, socklen_t *addrlen)
{
	return name_common(fd, addr, addrlen, 1);
}

EXPORT int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
{
	if (!ready()) {
		errno = ENOSYS;
		return -1;
	}
	if ((level != IPPROTO_TCP && level != IPPROTO_IP) || !is_vsockified(fd))
		return real_setsockopt(fd, level, optname, optval, optlen);
	if ((int)optlen < 0) {
		errno = EINVAL;
		return -1;
	}
	if (!optval && optlen) {
		errno = EFAULT;
		return -1;
	}
	return 0;		/* meaningless on vsock: accepted and dropped */
}

EXPORT int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
{
	int zero = 0;
	socklen_t n;

	if (!ready()) {
		errno = ENOSYS;
		return -1;
	}
	if ((level != IPPROTO_TCP && level != IPPROTO_IP) || !is_vsockified(fd))
		return real_getsockopt(fd, level, optname, optval, optlen);
	if (!optlen) {
		errno = EFAULT;
		return -1;
	}
	if ((int)*optlen < 0) {
		errno = EINVAL;
		return -1;
	}
	n = (level == IPPROTO_IP && optname == IP_OPTIONS) ? 0
	    : *optlen < sizeof(zero) ? *optlen : sizeof(zero);
	if (n && !optval) {
		errno = EFAULT;
		return -1;
	}
	memcpy(optval, &zero, n);
	*optlen = n;
	return 0;
}

EXPORT int close(int fd)
{
	if (!ready()) {
		errno = ENOSYS;
		return -1;
	}
	mark(fd, 0);
	return real_close(fd);
}

EXPORT int dup(int fd)
{
	int r;

	if (!ready()) {
		errno = ENOSYS;
		return -1;
	}
	r = real_dup(fd);
	if (r >= 0)
		mark(r, marked(fd));
	return r;
}

EXPORT int dup2(int fd, int fd2)
{
	int r;

	if (!ready()) {
		errno = ENOSYS;
		return -1;
	}
	r = real_dup2(fd, fd2);
	if (r >= 0 && fd != fd2)
		mark(fd2, marked(fd));
	return r;
}

EXPORT int dup3(int fd, int fd2, int flags)
{
	int r;

	if (!ready()) {
		errno = ENOSYS;
		return -1;
	}
	r = real_dup3(fd, fd2, flags);
	if (r >= 0)
		mark(fd2, marked(fd));
	return r;
}
