"""The guest agent's wire protocol: its frames, their payloads, and a bounded decoder (sans-I/O).

This module owns the one description of the protocol between the host (:mod:`pyvmm.agent.client`)
and ``pyvmm-agent`` in the guest (``guest/progs/pyvmm-agent.c``; its names are the ones here,
verbatim).  Nothing here does I/O: it turns requests into bytes and bytes into checked values.

Transport: one stream connection, vsock port :data:`AGENT_PORT` (10000) by default -- clear of
the ports vsock_test uses (1234, 1235), the vsock-tcp-relay's 9999 and the e2e tests' 1301-4444,
and below the host's ephemeral range the device hands out (2^30 and up).  From the host it is
reached through the vsock device's Unix socket (``CONNECT 10000\\n``) or ``Machine.vsock``.

Frame: a 5-byte header, then the payload::

    u32 length   payload bytes, little endian, at most FRAME_MAX (64 KiB)
    u8  type     FrameType
    payload      length bytes

All integers are little endian.  Strings are bytes (UTF-8 by convention, never decoded by the
agent).  Frame types and payloads (``h->a`` host to agent, ``a->h`` agent to host):

==========  ====  =====  ==========================================================================
type        value dir    payload
==========  ====  =====  ==========================================================================
HELLO       1     both   ``"PVMA"`` u32 version (:data:`AGENT_VERSION` = 1)
EXEC        2     h->a   u32 timeout_ms (0: none), u16 argc (>= 1), u16 envc (argc + envc <=
                         4096), then 1 + argc + envc NUL-terminated strings: cwd (empty: the
                         agent's), argv (argv[0] not empty; looked up in PATH), env (``NAME=VALUE``,
                         added to the agent's environment); nothing after the last NUL
DATA        3     both   bytes: h->a the stdin of an EXEC or the contents of a PUT, a->h the
                         contents of a GET; an *empty* DATA from the host ends its input
PUT         4     h->a   u32 mode (<= 0o7777), path (absolute, < 4096 bytes, no NUL)
GET         5     h->a   u64 max bytes (the agent caps it at GET_MAX), path (as for PUT)
STDOUT      6     a->h   bytes the command wrote to stdout
STDERR      7     a->h   bytes the command wrote to stderr
EXIT        8     a->h   i32 exit code (-1 if killed by a signal), u32 signal (0 if it exited),
                         u8 timed_out, u64 stdout bytes dropped, u64 stderr bytes dropped
DONE        9     a->h   i32 errno (0: done), u64 bytes (written by PUT / sent by GET)
ERROR       10    both   u32 ErrorCode, reason (at most 200 bytes); the sender then closes
==========  ====  =====  ==========================================================================

Order: the agent speaks first -- HELLO, or ERROR BUSY when it already serves MAX_SESSIONS (16)
connections (it then closes).  The host answers HELLO (the agent checks magic and version).
Then requests, one at a time (no request ids: one connection carries one request at a time;
connect again for concurrency):

* ``EXEC``, ``DATA``... (stdin), empty ``DATA`` (end of stdin; always sent, even with no stdin)
  -> ``STDOUT`` / ``STDERR`` frames as the command writes, then ``EXIT``.  The command runs in
  a session and process group of its own; at the deadline the group gets SIGKILL and EXIT says
  timed_out.  Each of stdout and stderr is sent up to OUTPUT_MAX (16 MiB); the rest is read and
  dropped, and EXIT counts it.  EXIT may come before the host's input has ended (a command that
  does not read its stdin): the host then stops sending stdin and sends the empty DATA; the
  agent drops stdin bytes nobody reads.  The next request may follow the empty DATA and EXIT.
* ``PUT``, ``DATA``..., empty ``DATA`` -> ``DONE`` (errno: the open, chmod or a write failed;
  the file is created or truncated, then given exactly ``mode``).
* ``GET`` -> ``DATA``... then ``DONE``.  A regular file only (a directory: EISDIR, else
  EINVAL); one longer than its bound gives ``DONE`` EFBIG after the bytes up to the bound,
  which the host discards.

Hostile or broken frames, from either side: a length over FRAME_MAX (BAD_LENGTH), an unknown
type (BAD_TYPE), a payload that does not parse (BAD_PAYLOAD), a frame the state does not allow
(BAD_ORDER), another version (BAD_VERSION), a frame begun but not finished within
FRAME_TIMEOUT_S, 30 s (TIMEOUT, agent side) -- each is answered with ERROR and the connection is
closed; the agent kills the session's command.  Memory stays bounded on both sides: a frame is
at most FRAME_MAX, outputs at most OUTPUT_MAX, a GET at most its bound, and both ends count
what they receive against those bounds.  The agent also gives up on a host that does not take
one of its frames within SEND_TIMEOUT_S (30 s), and on a host that closes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "AGENT_MAGIC", "AGENT_PORT", "AGENT_VERSION", "DONE_PAYLOAD", "ERROR_MESSAGE_MAX",
    "EXEC_HEAD", "EXEC_STRINGS_MAX", "EXIT_DRAIN_MS", "EXIT_PAYLOAD", "ErrorCode", "ExecRequest",
    "ExitInfo", "FRAME_HEADER", "FRAME_HEADER_SIZE", "FRAME_MAX", "FRAME_TIMEOUT_S", "Frame",
    "FrameDecoder", "FrameType", "GET_HEAD", "GET_MAX", "HELLO_PAYLOAD", "MAX_SESSIONS",
    "OUTPUT_MAX", "PATH_MAX", "PUT_HEAD", "ProtocolError", "SEND_TIMEOUT_S", "encode_data",
    "encode_done", "encode_error", "encode_exec", "encode_exit", "encode_frame", "encode_get",
    "encode_hello", "encode_put", "parse_done", "parse_error", "parse_exec", "parse_exit",
    "parse_get", "parse_hello", "parse_put",
]

#: the agent's default vsock port (guest/progs/pyvmm-agent.c AGENT_PORT)
AGENT_PORT = 10000
#: the protocol version both sides say in HELLO
AGENT_VERSION = 1
AGENT_MAGIC = b"PVMA"
#: u32 payload length, u8 type
FRAME_HEADER = struct.Struct("<IB")
FRAME_HEADER_SIZE = FRAME_HEADER.size
#: the largest payload of one frame, either way
FRAME_MAX = 64 * 1024
#: bytes of stdout, and of stderr, the agent sends for one command (the rest is dropped, counted)
OUTPUT_MAX = 16 * 1024 * 1024
#: the largest file a GET returns
GET_MAX = 64 * 1024 * 1024
#: argc + envc of one EXEC
EXEC_STRINGS_MAX = 4096
#: a PUT or GET path is shorter than this (Linux's PATH_MAX, the NUL included)
PATH_MAX = 4096
#: connections the agent serves at once; the next one gets ERROR BUSY
MAX_SESSIONS = 16
#: seconds the agent gives a frame once begun (and the host's HELLO)
FRAME_TIMEOUT_S = 30
#: seconds the agent waits for the host to take one of its frames
SEND_TIMEOUT_S = 30
#: milliseconds the agent still reads a command's output pipes after its process ended
EXIT_DRAIN_MS = 500
#: the longest reason in an ERROR frame
ERROR_MESSAGE_MAX = 200

HELLO_PAYLOAD = struct.Struct("<4sI")       # magic, version
EXEC_HEAD = struct.Struct("<IHH")           # timeout_ms, argc, envc; then the strings
PUT_HEAD = struct.Struct("<I")              # mode; then the path
GET_HEAD = struct.Struct("<Q")              # max bytes; then the path
EXIT_PAYLOAD = struct.Struct("<iIBQQ")      # exit code, signal, timed_out, dropped x2
DONE_PAYLOAD = struct.Struct("<iQ")         # errno, bytes
ERROR_HEAD = struct.Struct("<I")            # code; then the reason


class FrameType(enum.IntEnum):
    HELLO = 1
    EXEC = 2
    DATA = 3
    PUT = 4
    GET = 5
    STDOUT = 6
    STDERR = 7
    EXIT = 8
    DONE = 9
    ERROR = 10


class ErrorCode(enum.IntEnum):
    BAD_LENGTH = 1
    BAD_TYPE = 2
    BAD_PAYLOAD = 3
    BAD_ORDER = 4
    BAD_VERSION = 5
    BUSY = 6
    TIMEOUT = 7


class ProtocolError(Exception):
    """A frame broke the protocol; ``code`` is what the ERROR frame says."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Frame:
    type: FrameType
    payload: bytes


def encode_frame(type: FrameType, payload: bytes = b"") -> bytes:
    if len(payload) > FRAME_MAX:
        raise ValueError(f"a {type.name} payload of {len(payload)} bytes is over FRAME_MAX")
    return FRAME_HEADER.pack(len(payload), type) + payload


class FrameDecoder:
    """Bytes in, whole checked frames out.  Holds at most one header and one payload of
    FRAME_MAX beyond what it was last fed: the length is checked as soon as the header is in."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        while len(self._buf) >= FRAME_HEADER_SIZE:
            length, type_ = FRAME_HEADER.unpack_from(self._buf)
            if length > FRAME_MAX:
                raise ProtocolError(ErrorCode.BAD_LENGTH, f"frame length {length} > FRAME_MAX")
            if type_ not in FrameType._value2member_map_:
                raise ProtocolError(ErrorCode.BAD_TYPE, f"unknown frame type {type_}")
            end = FRAME_HEADER_SIZE + length
            if len(self._buf) < end:
                break
            frames.append(Frame(FrameType(type_), bytes(self._buf[FRAME_HEADER_SIZE:end])))
            del self._buf[:end]
        return frames

    @property
    def mid_frame(self) -> bool:
        """Part of a frame is held: an end of the stream here is a truncated frame."""
        return bool(self._buf)


def _bad(what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_PAYLOAD, what)


# -- HELLO ---------------------------------------------------------------------------------------
def encode_hello(version: int = AGENT_VERSION) -> bytes:
    return encode_frame(FrameType.HELLO, HELLO_PAYLOAD.pack(AGENT_MAGIC, version))


def parse_hello(payload: bytes) -> int:
    """The version a HELLO says (checked: the magic, the size; the caller checks the version)."""
    if len(payload) != HELLO_PAYLOAD.size:
        raise _bad(f"HELLO of {len(payload)} bytes")
    magic, version = HELLO_PAYLOAD.unpack(payload)
    if magic != AGENT_MAGIC:
        raise _bad(f"HELLO magic {magic!r}")
    return version


# -- EXEC ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExecRequest:
    argv: tuple[bytes, ...]
    env: tuple[bytes, ...] = ()          # NAME=VALUE
    cwd: bytes = b""
    timeout_ms: int = 0


def _strings_ok(strings) -> bool:
    return all(b"\0" not in s for s in strings)


def encode_exec(req: ExecRequest) -> bytes:
    argv, env = list(req.argv), list(req.env)
    if not argv or not argv[0]:
        raise ValueError("argv needs a non-empty argv[0]")
    if len(argv) + len(env) > EXEC_STRINGS_MAX:
        raise ValueError(f"argc + envc over EXEC_STRINGS_MAX ({EXEC_STRINGS_MAX})")
    if not _strings_ok([req.cwd, *argv, *env]):
        raise ValueError("a NUL byte in cwd, argv or env")
    if any(e.startswith(b"=") or b"=" not in e for e in env):
        raise ValueError("env entries are NAME=VALUE")
    if not 0 <= req.timeout_ms <= 0xFFFF_FFFF:
        raise ValueError("timeout_ms is a u32")
    body = b"".join(s + b"\0" for s in [req.cwd, *argv, *env])
    payload = EXEC_HEAD.pack(req.timeout_ms, len(argv), len(env)) + body
    if len(payload) > FRAME_MAX:
        raise ValueError(f"the command, its environment and cwd take {len(payload)} bytes; "
                         f"an EXEC frame holds {FRAME_MAX}")
    return encode_frame(FrameType.EXEC, payload)


def parse_exec(payload: bytes) -> ExecRequest:
    """The agent's check of an EXEC, in Python (the model the C code follows)."""
    if len(payload) < EXEC_HEAD.size:
        raise _bad("EXEC shorter than its head")
    timeout_ms, argc, envc = EXEC_HEAD.unpack_from(payload)
    if argc == 0 or argc + envc > EXEC_STRINGS_MAX:
        raise _bad(f"EXEC argc {argc}, envc {envc}")
    strings = payload[EXEC_HEAD.size:].split(b"\0")
    if len(strings) != 1 + argc + envc + 1 or strings[-1] != b"":
        raise _bad("EXEC strings do not match argc and envc")
    cwd, argv, env = strings[0], strings[1:1 + argc], strings[1 + argc:-1]
    if not argv[0] or any(e.startswith(b"=") or b"=" not in e for e in env):
        raise _bad("EXEC: empty argv[0] or an env entry not NAME=VALUE")
    return ExecRequest(tuple(argv), tuple(env), cwd, timeout_ms)


# -- DATA, PUT, GET ------------------------------------------------------------------------------
def encode_data(chunk: bytes = b"") -> bytes:
    return encode_frame(FrameType.DATA, chunk)


def _check_path(path: bytes) -> None:
    if not path.startswith(b"/") or len(path) >= PATH_MAX or b"\0" in path:
        raise ValueError(f"agent paths are absolute, shorter than {PATH_MAX} bytes, no NUL")


def encode_put(path: bytes, mode: int) -> bytes:
    _check_path(path)
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode {mode:#o} is not a permission mode")
    return encode_frame(FrameType.PUT, PUT_HEAD.pack(mode) + path)


def parse_put(payload: bytes) -> tuple[bytes, int]:
    if len(payload) < PUT_HEAD.size:
        raise _bad("PUT shorter than its head")
    (mode,), path = PUT_HEAD.unpack_from(payload), payload[PUT_HEAD.size:]
    if mode > 0o7777 or not path.startswith(b"/") or len(path) >= PATH_MAX or b"\0" in path:
        raise _bad("PUT: bad mode or path")
    return path, mode


def encode_get(path: bytes, max_bytes: int = GET_MAX) -> bytes:
    _check_path(path)
    if not 0 <= max_bytes < 1 << 64:
        raise ValueError("max_bytes is a u64")
    return encode_frame(FrameType.GET, GET_HEAD.pack(max_bytes) + path)


def parse_get(payload: bytes) -> tuple[bytes, int]:
    if len(payload) < GET_HEAD.size:
        raise _bad("GET shorter than its head")
    (max_bytes,), path = GET_HEAD.unpack_from(payload), payload[GET_HEAD.size:]
    if not path.startswith(b"/") or len(path) >= PATH_MAX or b"\0" in path:
        raise _bad("GET: bad path")
    return path, min(max_bytes, GET_MAX)


# -- EXIT, DONE, ERROR ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ExitInfo:
    exit_code: int | None       # None: killed by a signal
    signal: int | None          # None: it exited
    timed_out: bool
    stdout_dropped: int
    stderr_dropped: int


def encode_exit(info: ExitInfo) -> bytes:
    code = -1 if info.exit_code is None else info.exit_code
    return encode_frame(FrameType.EXIT, EXIT_PAYLOAD.pack(
        code, info.signal or 0, int(info.timed_out), info.stdout_dropped, info.stderr_dropped))


def parse_exit(payload: bytes) -> ExitInfo:
    if len(payload) != EXIT_PAYLOAD.size:
        raise _bad(f"EXIT of {len(payload)} bytes")
    code, sig, timed_out, out_dropped, err_dropped = EXIT_PAYLOAD.unpack(payload)
    exited = 0 <= code <= 255 and sig == 0
    killed = code == -1 and 1 <= sig <= 64
    if not (exited or killed) or timed_out > 1:
        raise _bad(f"EXIT code {code}, signal {sig}, timed_out {timed_out}")
    return ExitInfo(code if exited else None, sig if killed else None, bool(timed_out),
                    out_dropped, err_dropped)


def encode_done(errno: int, nbytes: int) -> bytes:
    return encode_frame(FrameType.DONE, DONE_PAYLOAD.pack(errno, nbytes))


def parse_done(payload: bytes) -> tuple[int, int]:
    """(errno, bytes); errno 0 is success."""
    if len(payload) != DONE_PAYLOAD.size:
        raise _bad(f"DONE of {len(payload)} bytes")
    err, nbytes = DONE_PAYLOAD.unpack(payload)
    if not 0 <= err < 4096:
        raise _bad(f"DONE errno {err}")
    return err, nbytes


def encode_error(code: ErrorCode, reason: str) -> bytes:
    text = reason.encode("utf-8", "replace")[:ERROR_MESSAGE_MAX]
    return encode_frame(FrameType.ERROR, ERROR_HEAD.pack(code) + text)


def parse_error(payload: bytes) -> tuple[int, str]:
    """(code, reason) of an ERROR; an unknown code is kept as a number."""
    if len(payload) < ERROR_HEAD.size or len(payload) > ERROR_HEAD.size + ERROR_MESSAGE_MAX:
        raise _bad(f"ERROR of {len(payload)} bytes")
    (code,) = ERROR_HEAD.unpack_from(payload)
    return code, payload[ERROR_HEAD.size:].decode("utf-8", "replace")
