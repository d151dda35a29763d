/*
 * pyvmm-agent -- run commands and move files for the host, over vsock.
 *
 *     pyvmm-agent [--port PORT] [--tcp IP:PORT] [--background] [--io-timeout SEC]
 *
 * Listens on AF_VSOCK port PORT (default AGENT_PORT, 10000; CID any), or with --tcp on an IPv4
 * TCP address instead (port 0: any free port) -- the same protocol, so the host's unit tests
 * run this very program with 127.0.0.1 sockets and never open AF_VSOCK on the host. /init
 * starts it with --background when the kernel cmdline has pyvmm.agent=PORT (or =1: the
 * default port): then the first process exits 0 once the socket listens, and a child in a
 * session of its own serves it, so /init knows the agent is reachable before its ready line.
 * --io-timeout SEC replaces both FRAME_TIMEOUT_S and SEND_TIMEOUT_S (30 s; tests use 1 s).
 *
 * The protocol is pyvmm/agent/wire.py's docstring (the one description; names here are
 * verbatim). In short: a frame is a 5-byte header, u32 payload length (little endian, at most
 * FRAME_MAX) and u8 type, then the payload. The agent speaks first: HELLO ("PVMA", version
 * AGENT_VERSION), or ERROR BUSY when MAX_SESSIONS sessions are open (then it closes). The host
 * answers HELLO; then, one request at a time:
 *     EXEC (timeout_ms, argc, envc, cwd, argv, env) + DATA... (stdin) + empty DATA (stdin's end)
 *         -> STDOUT / STDERR as the command writes them, then EXIT (exit code or signal,
 *            timed_out, bytes dropped from stdout and stderr beyond OUTPUT_MAX each)
 *     PUT (mode, path) + DATA... + empty DATA          -> DONE (errno, bytes written)
 *     GET (max bytes, path)                            -> DATA... then DONE (errno, bytes)
 * A frame that breaks the rules (length over FRAME_MAX, unknown type, a payload that does not
 * parse, a frame the state does not allow, a frame begun and not finished within
 * FRAME_TIMEOUT_S) is answered with ERROR (code, reason) and the connection is closed; the
 * command of the session, if any, is killed. So is a host that stops reading our frames for
 * SEND_TIMEOUT_S, and a host that closes: no session outlives its connection.
 *
 * A command runs in a session and process group of its own (setsid), with stdin, stdout and
 * stderr pipes, the agent's environment plus the EXEC's NAME=VALUE entries, in cwd (empty: the
 * agent's, /). argv[0] is looked up in PATH (execvp). If chdir or exec fails, the child writes
 * `pyvmm-agent: chdir|exec ARG: REASON` to its stderr and exits 127 (ENOENT) or 126. At the
 * deadline (timeout_ms after the EXEC, 0 = none) the whole process group gets SIGKILL, and
 * EXIT says timed_out. Once the command's process has ended, the output pipes are read until
 * EOF or for EXIT_DRAIN_MS more (a background process that keeps them open loses what it
 * writes later), then EXIT is sent.
 *
 * Each connection is served by a process of its own (fork): at most MAX_SESSIONS at once.
 * Memory per session is fixed (one inbound frame, one outbound frame, one stdin buffer).
 *
 * Output: stdout `pyvmm-agent: listening vsock:any:PORT` or `... tcp:IP:PORT` (the bound port)
 * once listen() succeeded; on SIGTERM/SIGINT `pyvmm-agent: done <sessions>` (sessions
 * accepted; open sessions get SIGTERM, which kills their commands). stderr, one line each:
 * `pyvmm-agent: session <i>: <what failed>`. Exit status: 0 after SIGTERM/SIGINT (with
 * --background: 0 once listening); 2 bad usage or the listening socket failed.
 */
#define _GNU_SOURCE		/* ppoll, accept4, pipe2 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include "vsock-util.h"

#define AGENT_PORT 10000	/* default vsock port: see pyvmm/agent/wire.py AGENT_PORT */
#define AGENT_VERSION 1
#define AGENT_MAGIC "PVMA"
#define FRAME_HEADER_SIZE 5	/* u32 length, u8 type */
#define FRAME_MAX (64 * 1024)	/* largest payload of one frame, either way */
#define OUTPUT_MAX (16 * 1024 * 1024)	/* bytes of stdout (and of stderr) sent per command */
#define GET_MAX (64ULL * 1024 * 1024)	/* largest file GET sends */
#define EXEC_STRINGS_MAX 4096	/* argc + envc of one EXEC */
#define MAX_SESSIONS 16		/* connections served at once; more get ERROR BUSY */
#define FRAME_TIMEOUT_S 30	/* to finish a frame once begun (and the host's HELLO) */
#define SEND_TIMEOUT_S 30	/* for the host to take one of our frames */
#define EXIT_DRAIN_MS 500	/* output pipes still read after the command's process ended */
#define LINGER_MS 1000		/* after ERROR: read and drop the host's bytes until EOF */
#define BACKLOG 16

/* frame types: pyvmm/agent/wire.py FrameType */
enum {
	HELLO = 1, EXEC = 2, DATA = 3, PUT = 4, GET = 5,
	STDOUT = 6, STDERR = 7, EXIT = 8, DONE = 9, ERROR = 10,
};
/* ERROR codes: pyvmm/agent/wire.py ErrorCode */
enum {
	BAD_LENGTH = 1, BAD_TYPE = 2, BAD_PAYLOAD = 3, BAD_ORDER = 4, BAD_VERSION = 5,
	BUSY = 6, TIMEOUT = 7,
};

enum state { S_HELLO, S_IDLE, S_EXEC, S_PUT, S_GET };

static volatile sig_atomic_t stop, child_event;
static unsigned long session_id;
static int frame_timeout = FRAME_TIMEOUT_S, send_timeout = SEND_TIMEOUT_S;	/* --io-timeout */

static void on_stop(int sig) { (void)sig; stop = 1; }
static void on_child(int sig) { (void)sig; child_event = 1; }

static int usage(void)
{
	fprintf(stderr, "usage: pyvmm-agent [--port PORT] [--tcp IP:PORT] [--background] "
		"[--io-timeout SEC]\n");
	return 2;
}

static void put_u16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put_u32(uint8_t *p, uint32_t v) { put_u16(p, v); put_u16(p + 2, v >> 16); }
static void put_u64(uint8_t *p, uint64_t v) { put_u32(p, v); put_u32(p + 4, v >> 32); }
static uint16_t get_u16(const uint8_t *p) { return p[0] | p[1] << 8; }
static uint32_t get_u32(const uint8_t *p) { return get_u16(p) | (uint32_t)get_u16(p + 2) << 16; }
static uint64_t get_u64(const uint8_t *p) { return get_u32(p) | (uint64_t)get_u32(p + 4) << 32; }

/* ------------------------------------------------------------------------------------------
 * One session: one connection, served by its own process, one ppoll loop.
 */
static struct {
	int conn;
	enum state state;
	/* the frame being received: header, then payload */
	uint8_t in[FRAME_HEADER_SIZE + FRAME_MAX];
	size_t in_len;
	double in_since;	/* when its first byte came (or the connection, for HELLO) */
	/* the frame being sent */
	uint8_t out[FRAME_HEADER_SIZE + FRAME_MAX];
	size_t out_off, out_len;
	double out_since;
	/* EXEC */
	pid_t pid;
	int pidfd, fd_in, fd_out[2];	/* our ends: command's stdin; its stdout, stderr */
	int exited, wstatus, timed_out, input_ended, exit_sent;
	double deadline, drain_until;	/* 0 = none */
	uint8_t stdin_buf[FRAME_MAX];
	size_t stdin_off, stdin_len;
	uint64_t sent[2], dropped[2];
	/* PUT and GET */
	int file;
	int file_err;
	uint64_t file_bytes, get_limit;
} s;

static void say(const char *fmt, const char *arg, int err)
{
	fprintf(stderr, "pyvmm-agent: session %lu: ", session_id);
	fprintf(stderr, fmt, arg);
	fprintf(stderr, err ? ": %s\n" : "\n", strerror(err));
}

static void queue_frame(int type, const void *payload, size_t len)
{
	put_u32(s.out, len);
	s.out[4] = type;
	if (payload && len)
		memcpy(s.out + FRAME_HEADER_SIZE, payload, len);
	s.out_off = 0;
	s.out_len = FRAME_HEADER_SIZE + len;
	s.out_since = now_s();
}

static void kill_command(void)
{
	if (s.pid > 0 && !s.exited) {
		kill(-s.pid, SIGKILL);
		waitpid(s.pid, NULL, 0);
		s.exited = 1;
	}
}

/* The end of the session: ERROR (if code) after the frame being sent, a bounded linger so the
 * host reads it rather than a reset, then exit. The command, if any, is killed first. */
static void __attribute__((noreturn)) end_session(int code, const char *reason)
{
	uint8_t frame[FRAME_HEADER_SIZE + 4 + 200];
	size_t n = strnlen(reason, 200);

	kill_command();
	if (code) {
		say("closing: %s", reason, 0);
		fcntl(s.conn, F_SETFL, 0);
		vsock_set_timeout(s.conn, send_timeout);
		if (s.out_len == 0 || write_all(s.conn, s.out + s.out_off, s.out_len) == 0) {
			put_u32(frame, 4 + n);
			frame[4] = ERROR;
			put_u32(frame + FRAME_HEADER_SIZE, code);
			memcpy(frame + FRAME_HEADER_SIZE + 4, reason, n);
			write_all(s.conn, frame, FRAME_HEADER_SIZE + 4 + n);
		}
		shutdown(s.conn, SHUT_WR);
		double until = now_s() + LINGER_MS / 1000.0;
		struct pollfd p = { .fd = s.conn, .events = POLLIN };
		char sink[4096];
		while (now_s() < until && poll(&p, 1, (int)((until - now_s()) * 1000) + 1) > 0 &&
		       read(s.conn, sink, sizeof(sink)) > 0)
			;
	}
	close(s.conn);
	exit(code ? 1 : 0);
}

static int set_nonblock(int fd)
{
	return fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* Start the command of an EXEC; returns 0, or -1 if the payload does not parse. */
static int start_exec(const uint8_t *p, size_t len)
{
	static char *strings[1 + EXEC_STRINGS_MAX + 1];
	static char text[FRAME_MAX];
	uint32_t timeout_ms;
	size_t argc, envc, nstr, off = 0;
	int in[2], out[2], err[2];

	if (len < 8)
		return -1;
	timeout_ms = get_u32(p);
	argc = get_u16(p + 4);
	envc = get_u16(p + 6);
	nstr = 1 + argc + envc;
	if (argc == 0 || argc + envc > EXEC_STRINGS_MAX)
		return -1;
	memcpy(text, p + 8, len - 8);
	for (size_t i = 0; i < nstr; i++) {	/* cwd, argv..., env...: each NUL-terminated */
		char *end = memchr(text + off, 0, len - 8 - off);
		if (!end)
			return -1;
		strings[i] = text + off;
		off = end - text + 1;
		if (i > argc && (strings[i][0] == '=' || !strchr(strings[i], '=')))
			return -1;	/* env entries are NAME=VALUE */
	}
	if (off != len - 8 || strings[1][0] == 0)
		return -1;	/* bytes left over, or an empty argv[0] */

	memset(s.sent, 0, sizeof(s.sent));
	memset(s.dropped, 0, sizeof(s.dropped));
	s.exited = s.timed_out = s.input_ended = s.exit_sent = 0;
	s.stdin_off = s.stdin_len = 0;
	s.deadline = timeout_ms ? now_s() + timeout_ms / 1000.0 : 0;
	s.drain_until = 0;
	s.state = S_EXEC;
	if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
		say("pipe", "", errno);
		end_session(0, "");
	}
	s.pid = fork();
	if (s.pid < 0) {
		say("fork", "", errno);
		end_session(0, "");
	}
	if (s.pid == 0) {
		sigset_t none;
		const char *what = "chdir", *arg = strings[0];

		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		signal(SIGPIPE, SIG_DFL);	/* ignored dispositions survive exec */
		signal(SIGTERM, SIG_DFL);
		signal(SIGINT, SIG_DFL);
		signal(SIGCHLD, SIG_DFL);
		setsid();
		dup2(in[0], 0);
		dup2(out[1], 1);
		dup2(err[1], 2);
		for (size_t i = 1 + argc; i < nstr; i++)
			putenv(strings[i]);
		strings[1 + argc] = NULL;
		if (strings[0][0] == 0 || chdir(strings[0]) == 0) {
			what = "exec";
			arg = strings[1];
			execvp(strings[1], strings + 1);
		}
		int e = errno;
		dprintf(2, "pyvmm-agent: %s %s: %s\n", what, arg, strerror(e));
		_exit(e == ENOENT ? 127 : 126);
	}
	close(in[0]);
	close(out[1]);
	close(err[1]);
	s.fd_in = in[1];
	s.fd_out[0] = out[0];
	s.fd_out[1] = err[0];
	set_nonblock(s.fd_in);
	set_nonblock(s.fd_out[0]);
	set_nonblock(s.fd_out[1]);
	s.pidfd = syscall(SYS_pidfd_open, s.pid, 0);
	if (s.pidfd < 0) {
		say("pidfd_open", "", errno);
		end_session(0, "");
	}
	return 0;
}

static void close_stdin(void)
{
	if (s.fd_in >= 0)
		close(s.fd_in);
	s.fd_in = -1;
	s.stdin_len = 0;
}

/* A path: the payload after a fixed part, absolute, shorter than PATH_MAX, no NUL. */
static const char *take_path(const uint8_t *p, size_t len)
{
	static char path[PATH_MAX];

	if (len == 0 || len >= PATH_MAX || p[0] != '/' || memchr(p, 0, len))
		return NULL;
	memcpy(path, p, len);
	path[len] = 0;
	return path;
}

static void done_frame(int err, uint64_t bytes)
{
	uint8_t d[12];

	put_u32(d, (uint32_t)err);
	put_u64(d + 4, bytes);
	queue_frame(DONE, d, sizeof(d));
	s.state = S_IDLE;
}

/* One complete frame from the host, in s.in. */
static void handle_frame(void)
{
	int type = s.in[4];
	const uint8_t *p = s.in + FRAME_HEADER_SIZE;
	size_t len = s.in_len - FRAME_HEADER_SIZE;
	const char *path;

	if (type == ERROR)
		end_session(0, "");	/* the host gave up; nothing to answer */
	switch (s.state) {
	case S_HELLO:
		if (type != HELLO)
			end_session(BAD_ORDER, "expected HELLO");
		if (len != 8 || memcmp(p, AGENT_MAGIC, 4) != 0)
			end_session(BAD_PAYLOAD, "HELLO: not \"PVMA\" + u32 version");
		if (get_u32(p + 4) != AGENT_VERSION)
			end_session(BAD_VERSION, "HELLO: this agent speaks version 1 only");
		s.state = S_IDLE;
		return;
	case S_IDLE:
		if (type == EXEC) {
			if (start_exec(p, len) < 0)
				end_session(BAD_PAYLOAD, "EXEC: malformed payload");
			return;
		}
		if (type == PUT) {
			if (len < 4 || get_u32(p) > 07777 || !(path = take_path(p + 4, len - 4)))
				end_session(BAD_PAYLOAD, "PUT: malformed payload");
			s.file_bytes = 0;
			s.file_err = 0;
			s.file = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, get_u32(p));
			if (s.file < 0 || fchmod(s.file, get_u32(p)) < 0)
				s.file_err = errno;
			s.state = S_PUT;
			return;
		}
		if (type == GET) {
			struct stat st;

			if (len < 8 || !(path = take_path(p + 8, len - 8)))
				end_session(BAD_PAYLOAD, "GET: malformed payload");
			s.get_limit = get_u64(p) < GET_MAX ? get_u64(p) : GET_MAX;
			s.file_bytes = 0;
			s.file = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
			if (s.file >= 0 && fstat(s.file, &st) == 0 && !S_ISREG(st.st_mode)) {
				close(s.file);
				s.file = -1;
				errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
			}
			if (s.file < 0)
				done_frame(errno, 0);
			else
				s.state = S_GET;
			return;
		}
		end_session(BAD_ORDER, "expected EXEC, PUT or GET");
	case S_EXEC:
		if (type != DATA || s.input_ended)
			end_session(BAD_ORDER, "during EXEC: expected DATA (stdin)");
		if (len == 0) {
			s.input_ended = 1;
			if (s.stdin_len == 0)
				close_stdin();
			if (s.exit_sent)
				s.state = S_IDLE;
		} else if (s.fd_in >= 0) {	/* else: the command's stdin is gone, drop it */
			memcpy(s.stdin_buf, p, len);
			s.stdin_off = 0;
			s.stdin_len = len;
		}
		return;
	case S_PUT:
		if (type != DATA)
			end_session(BAD_ORDER, "during PUT: expected DATA");
		if (len == 0) {
			if (s.file >= 0 && close(s.file) < 0 && !s.file_err)
				s.file_err = errno;
			s.file = -1;
			done_frame(s.file_err, s.file_bytes);
		} else if (!s.file_err) {
			if (write_all(s.file, p, len) < 0)
				s.file_err = errno;
			else
				s.file_bytes += len;
		}
		return;
	case S_GET:
		end_session(BAD_ORDER, "during GET: nothing is expected");
	}
}

/* Read from the connection what the current frame still lacks; 0, or -1 at EOF. */
static int receive(void)
{
	size_t want = FRAME_HEADER_SIZE;

	if (s.in_len >= FRAME_HEADER_SIZE)
		want += get_u32(s.in);
	ssize_t n = read(s.conn, s.in + s.in_len, want - s.in_len);
	if (n == 0)
		return -1;
	if (n < 0)
		return errno == EAGAIN || errno == EINTR ? 0 : -1;
	if (s.in_len == 0)
		s.in_since = now_s();
	s.in_len += n;
	if (s.in_len == FRAME_HEADER_SIZE) {
		if (get_u32(s.in) > FRAME_MAX)
			end_session(BAD_LENGTH, "frame length over FRAME_MAX");
		if (s.in[4] < HELLO || s.in[4] > ERROR)
			end_session(BAD_TYPE, "unknown frame type");
	}
	if (s.in_len >= FRAME_HEADER_SIZE && s.in_len == FRAME_HEADER_SIZE + get_u32(s.in)) {
		handle_frame();
		s.in_len = 0;
		s.in_since = 0;
	}
	return 0;
}

/* With the outbound frame empty: the next one, if there is one. */
static void produce(void)
{
	if (s.state == S_GET) {
		ssize_t n = read(s.file, s.out + FRAME_HEADER_SIZE, FRAME_MAX);

		if (n > 0 && s.file_bytes + n > s.get_limit) {
			close(s.file);
			done_frame(EFBIG, s.file_bytes);
		} else if (n > 0) {
			s.file_bytes += n;
			queue_frame(DATA, NULL, n);
		} else {
			int e = n < 0 ? errno : 0;
			close(s.file);
			done_frame(e, s.file_bytes);
		}
		return;
	}
	if (s.state == S_EXEC && !s.exit_sent && s.exited && s.fd_out[0] < 0 && s.fd_out[1] < 0) {
		uint8_t e[25];
		int sig = WIFSIGNALED(s.wstatus) ? WTERMSIG(s.wstatus) : 0;

		put_u32(e, sig ? (uint32_t)-1 : (uint32_t)WEXITSTATUS(s.wstatus));
		put_u32(e + 4, sig);
		e[8] = s.timed_out;
		put_u64(e + 9, s.dropped[0]);
		put_u64(e + 17, s.dropped[1]);
		queue_frame(EXIT, e, sizeof(e));
		s.exit_sent = 1;
		close(s.pidfd);
		s.pidfd = -1;
		s.pid = 0;
		close_stdin();
		if (s.input_ended)
			s.state = S_IDLE;
	}
}

/* Output of the command's stream i (0 stdout, 1 stderr) into the outbound frame; the part
 * beyond OUTPUT_MAX is read and dropped, counted. */
static void pipe_readable(int i)
{
	ssize_t n = read(s.fd_out[i], s.out + FRAME_HEADER_SIZE, FRAME_MAX);

	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) {
		close(s.fd_out[i]);
		s.fd_out[i] = -1;
		return;
	}
	uint64_t room = OUTPUT_MAX - s.sent[i];
	size_t keep = (uint64_t)n < room ? (size_t)n : (size_t)room;

	s.dropped[i] += n - keep;
	s.sent[i] += keep;
	if (keep)
		queue_frame(i ? STDERR : STDOUT, NULL, keep);
}

static double earliest(double a, double b)
{
	return a == 0 ? b : b == 0 ? a : a < b ? a : b;
}

static void __attribute__((noreturn)) serve(int conn, const sigset_t *during_poll)
{
	uint8_t hello[8];

	memset(&s, 0, sizeof(s));
	s.conn = conn;
	s.pidfd = s.fd_in = s.fd_out[0] = s.fd_out[1] = s.file = -1;
	s.in_since = now_s();	/* the host's HELLO is due within frame_timeout */
	memcpy(hello, AGENT_MAGIC, 4);
	put_u32(hello + 4, AGENT_VERSION);
	queue_frame(HELLO, hello, sizeof(hello));
	set_nonblock(conn);

	for (;;) {
		struct pollfd pfd[6];	/* conn, stdout, stderr, stdin, pidfd */
		double now = now_s(), until = 0;
		int out_free = s.out_len == 0;

		if (stop)
			end_session(0, "");
		if (out_free)
			produce();
		out_free = s.out_len == 0;
		if (s.state == S_GET && out_free)
			continue;	/* produce() reads the file until the frame or the end */

		/* the host's next frame is read unless the command has stdin bytes still to take,
		 * or the frame could need an answer while ours is still being sent */
		int may_read = s.stdin_len == 0 && !(s.out_len && (s.state == S_IDLE || s.state == S_PUT));
		pfd[0].fd = conn;
		pfd[0].events = (may_read ? POLLIN : 0) | (s.out_len ? POLLOUT : 0);
		for (int i = 0; i < 2; i++) {
			pfd[1 + i].fd = s.state == S_EXEC && out_free ? s.fd_out[i] : -1;
			pfd[1 + i].events = POLLIN;
		}
		pfd[3].fd = s.stdin_len ? s.fd_in : -1;
		pfd[3].events = POLLOUT;
		pfd[4].fd = s.state == S_EXEC && !s.exited ? s.pidfd : -1;
		pfd[4].events = POLLIN;
		for (int i = 0; i < 5; i++)
			pfd[i].revents = 0;

		if (s.in_since)
			until = earliest(until, s.in_since + frame_timeout);
		if (s.out_len)
			until = earliest(until, s.out_since + send_timeout);
		if (s.state == S_EXEC && !s.exited)
			until = earliest(until, s.deadline);
		if (s.state == S_EXEC && s.exited && (s.fd_out[0] >= 0 || s.fd_out[1] >= 0))
			until = earliest(until, s.drain_until);
		struct timespec ts, *tsp = NULL;
		if (until) {
			double left = until > now ? until - now : 0;
			ts.tv_sec = (time_t)left;
			ts.tv_nsec = (long)((left - ts.tv_sec) * 1e9);
			tsp = &ts;
		}
		if (ppoll(pfd, 5, tsp, during_poll) < 0 && errno != EINTR) {
			say("ppoll", "", errno);
			end_session(0, "");
		}
		now = now_s();

		if (pfd[0].revents & POLLOUT) {
			ssize_t n = write(conn, s.out + s.out_off, s.out_len);
			if (n < 0 && errno != EAGAIN && errno != EINTR)
				end_session(0, "");	/* the host is gone */
			if (n > 0) {
				s.out_off += n;
				s.out_len -= n;
				s.out_since = now;
			}
		}
		if ((pfd[0].revents & (POLLIN | POLLHUP | POLLERR)) && may_read && receive() < 0)
			end_session(0, "");	/* the host closed: kill the command, if any */
		if ((pfd[0].revents & (POLLHUP | POLLERR)) && !may_read)
			end_session(0, "");	/* gone both ways (reported whether asked or not) */
		if (pfd[3].revents && s.fd_in >= 0) {
			ssize_t n = write(s.fd_in, s.stdin_buf + s.stdin_off, s.stdin_len);
			if (n < 0 && errno != EAGAIN && errno != EINTR)
				close_stdin();	/* EPIPE: the command closed its stdin; drop */
			if (n > 0) {
				s.stdin_off += n;
				s.stdin_len -= n;
				if (s.stdin_len == 0 && s.input_ended)
					close_stdin();
			}
		}
		for (int i = 0; i < 2; i++)
			if (pfd[1 + i].revents && s.out_len == 0 && s.fd_out[i] >= 0)
				pipe_readable(i);
		if (pfd[4].revents && waitpid(s.pid, &s.wstatus, WNOHANG) == s.pid) {
			s.exited = 1;
			s.drain_until = now + EXIT_DRAIN_MS / 1000.0;
		}

		if (s.state == S_EXEC && !s.exited && s.deadline && now >= s.deadline) {
			kill(-s.pid, SIGKILL);	/* the pidfd then reports the end */
			s.timed_out = 1;
			s.deadline = 0;
		}
		if (s.state == S_EXEC && s.exited && s.drain_until && now >= s.drain_until)
			for (int i = 0; i < 2; i++)
				if (s.fd_out[i] >= 0) {
					close(s.fd_out[i]);
					s.fd_out[i] = -1;
				}
		if (s.in_since && now >= s.in_since + frame_timeout)
			end_session(TIMEOUT, s.state == S_HELLO ? "no HELLO in time"
							       : "frame not finished in time");
		if (s.out_len && now >= s.out_since + send_timeout) {
			say("the host took no frame in %s s: closing", "the --io-timeout", 0);
			end_session(0, "");	/* an ERROR would not get through either */
		}
	}
}

/* ------------------------------------------------------------------------------------------
 * The listener: accept, fork a session, count them.
 */
static pid_t sessions[MAX_SESSIONS];

static void reap(void)
{
	pid_t pid;

	child_event = 0;
	while ((pid = waitpid(-1, NULL, WNOHANG)) > 0)
		for (int i = 0; i < MAX_SESSIONS; i++)
			if (sessions[i] == pid)
				sessions[i] = 0;
}

static void refuse_busy(int fd)
{
	uint8_t frame[FRAME_HEADER_SIZE + 4 + 32];
	const char *why = "MAX_SESSIONS sessions open";
	size_t n = strlen(why);

	put_u32(frame, 4 + n);
	frame[4] = ERROR;
	put_u32(frame + FRAME_HEADER_SIZE, BUSY);
	memcpy(frame + FRAME_HEADER_SIZE + 4, why, n);
	/* a fresh socket's buffer takes these few bytes at once; the host has sent nothing yet
	 * (it waits for our first frame), so the close is a clean EOF, not a reset */
	if (write(fd, frame, FRAME_HEADER_SIZE + 4 + n) < 0)
		fprintf(stderr, "pyvmm-agent: refusing a session: %s\n", strerror(errno));
	close(fd);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "port", required_argument, NULL, 'p' },
		{ "tcp", required_argument, NULL, 't' },
		{ "background", no_argument, NULL, 'b' },
		{ "io-timeout", required_argument, NULL, 'T' },
		{ NULL, 0, NULL, 0 },
	};
	unsigned long long port = AGENT_PORT;
	const char *tcp = NULL;
	int background = 0, opt, lfd, one = 1;
	struct sockaddr_storage addr;
	socklen_t alen;
	char where[64];
	struct sigaction sa_stop = { .sa_handler = on_stop }, sa_child = { .sa_handler = on_child };
	sigset_t block, during_poll;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (opt == 'p' && (vsock_parse_num(optarg, &port) < 0 || port > 0xffffffffu)) {
			fprintf(stderr, "pyvmm-agent: bad port '%s'\n", optarg);
			return usage();
		}
		if (opt == 't')
			tcp = optarg;
		if (opt == 'b')
			background = 1;
		if (opt == 'T') {
			unsigned long long sec;
			if (vsock_parse_num(optarg, &sec) < 0 || sec == 0 || sec > 3600) {
				fprintf(stderr, "pyvmm-agent: bad --io-timeout '%s' (1 .. 3600)\n", optarg);
				return usage();
			}
			frame_timeout = send_timeout = sec;
		}
		if (opt == '?')
			return usage();
	}
	if (optind != argc)
		return usage();

	memset(&addr, 0, sizeof(addr));
	if (tcp) {
		struct sockaddr_in *in = (struct sockaddr_in *)&addr;
		const char *colon = strrchr(tcp, ':');
		char host[INET_ADDRSTRLEN];
		unsigned long long tport;

		if (colon && colon - tcp < (long)sizeof(host)) {
			memcpy(host, tcp, colon - tcp);
			host[colon - tcp] = 0;
		}
		if (!colon || colon - tcp >= (long)sizeof(host) ||
		    vsock_parse_num(colon + 1, &tport) < 0 || tport > 65535 ||
		    inet_pton(AF_INET, host, &in->sin_addr) != 1) {
			fprintf(stderr, "pyvmm-agent: bad --tcp address '%s' (IPv4:PORT)\n", tcp);
			return usage();
		}
		in->sin_family = AF_INET;
		in->sin_port = htons(tport);
		alen = sizeof(*in);
	} else {
		vsock_addr((struct sockaddr_vm *)&addr, VMADDR_CID_ANY, port);
		alen = sizeof(struct sockaddr_vm);
	}

	lfd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (lfd < 0 || (tcp && setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0) ||
	    bind(lfd, (struct sockaddr *)&addr, alen) < 0 || listen(lfd, BACKLOG) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&addr, &alen) < 0) {
		fprintf(stderr, "pyvmm-agent: listen on %s: %s\n", tcp ? tcp : "vsock", strerror(errno));
		return 2;
	}
	if (tcp) {
		struct sockaddr_in *in = (struct sockaddr_in *)&addr;
		char ip[INET_ADDRSTRLEN];
		inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
		snprintf(where, sizeof(where), "tcp:%s:%u", ip, ntohs(in->sin_port));
	} else {
		snprintf(where, sizeof(where), "vsock:any:%llu", port);
	}
	printf("pyvmm-agent: listening %s\n", where);
	if (background) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("pyvmm-agent: fork");
			return 2;
		}
		if (pid > 0)
			return 0;	/* the socket listens: the caller may go on */
		setsid();
	}

	/* SIGTERM/SIGINT/SIGCHLD stay blocked except inside ppoll (no lost wake-up) */
	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	sigaddset(&block, SIGCHLD);
	sigprocmask(SIG_BLOCK, &block, &during_poll);
	sigdelset(&during_poll, SIGTERM);
	sigdelset(&during_poll, SIGINT);
	sigdelset(&during_poll, SIGCHLD);
	sigaction(SIGTERM, &sa_stop, NULL);
	sigaction(SIGINT, &sa_stop, NULL);
	sigaction(SIGCHLD, &sa_child, NULL);
	signal(SIGPIPE, SIG_IGN);	/* a vanished host: EPIPE from write, not death */

	while (!stop) {
		struct pollfd pfd = { .fd = lfd, .events = POLLIN };

		if (ppoll(&pfd, 1, NULL, &during_poll) < 0 && errno != EINTR) {
			perror("pyvmm-agent: ppoll");
			return 2;
		}
		if (child_event)
			reap();
		if (!(pfd.revents & POLLIN))
			continue;
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC), slot = -1;
		if (fd < 0) {
			if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
				perror("pyvmm-agent: accept");
			continue;
		}
		session_id++;
		for (int i = 0; i < MAX_SESSIONS && slot < 0; i++)
			if (!sessions[i])
				slot = i;
		if (slot < 0) {
			refuse_busy(fd);
			continue;
		}
		pid_t pid = fork();
		if (pid == 0) {
			close(lfd);
			sigaction(SIGCHLD, &(struct sigaction){ .sa_handler = SIG_DFL }, NULL);
			serve(fd, &during_poll);
		}
		if (pid < 0)
			perror("pyvmm-agent: fork");
		else
			sessions[slot] = pid;
		close(fd);
	}
	for (int i = 0; i < MAX_SESSIONS; i++)
		if (sessions[i])
			kill(sessions[i], SIGTERM);
	printf("pyvmm-agent: done %lu\n", session_id);
	return 0;
}
