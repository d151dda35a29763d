"""An NBD client as a :class:`~pyvmm.blk.backend.BlockBackend`: how pyvmm reads every image
format that is not raw, through QEMU's storage daemon (:mod:`pyvmm.blk.daemon`).

This module owns the NBD protocol, client side (NetworkBlockDevice/nbd ``doc/proto.md``;
names verbatim from it): the wire format as values (the structs and numbers below), the
fixed-newstyle handshake with ``NBD_OPT_GO`` as a sans-I/O object (:class:`NbdHandshake`),
the splitting of a batch into NBD requests (:func:`plan`), and :class:`NbdBackend`, which
does the socket I/O.

The conversation, client ``C`` (pyvmm) and server ``S`` (``qemu-storage-daemon``)::

    S: NBDMAGIC, IHAVEOPT, handshake flags (NBD_FLAG_FIXED_NEWSTYLE required)
    C: client flags (NBD_FLAG_C_FIXED_NEWSTYLE)
    C: IHAVEOPT, NBD_OPT_GO, name of the export, [NBD_INFO_BLOCK_SIZE]
    S: NBD_REP_INFO NBD_INFO_EXPORT (size, transmission flags)      one or more
       NBD_REP_INFO NBD_INFO_BLOCK_SIZE (min, preferred, max payload) NBD_REP_INFO,
    S: NBD_REP_ACK -- or NBD_REP_ERR_*, which ends the attempt        then the end
    -- transmission --
    C: request (magic 0x25609513, flags, type, cookie, offset, length) [+ WRITE data] ...
    S: simple reply (magic 0x67446698, error, cookie) [+ READ data] ...
    C: NBD_CMD_DISC when done

Only simple replies: pyvmm never asks for structured replies, so a READ's answer is a
16-byte reply header and, if its error is 0, exactly the bytes asked for.

A batch (:meth:`NbdBackend.execute`) is pipelined: every request goes out before any
reply is awaited, WRITE data straight from the guest-memory views (``sendmsg``), READ
data straight into them (``recvmsg_into``), replies matched by cookie in whatever order
the server sends them.  The server may carry out requests in any order (proto.md
"Ordering of messages and writes"), while a batch is defined to happen in order, so a
batch goes out in *waves*: a new wave starts at a FLUSH (it must cover every write before
it, so those are answered first) and at a request that overlaps an earlier one of the
wave when either of the two writes.  Sending and receiving are interleaved (one
``poll``), so a server that stops reading until we read its replies cannot deadlock us.

The server is not trusted (SECURITY.md): every reply is checked (magic, a cookie that is
outstanding, an error value the spec defines); an answer that breaks the protocol, the
connection closing, or no answer within :data:`NBD_REPLY_TIMEOUT` fails every request
still outstanding with EIO, and the backend stays failed (every later request: EIO): a
stream that lost its framing cannot be trusted again.  Nothing the server says makes
pyvmm allocate more than :data:`NBD_OPTION_REPLY_MAX` bytes, or wait longer than the
two timeouts.
"""

from __future__ import annotations

import errno
import itertools
import logging
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Sequence

from ..errors import ConfigError, PyvmmError
from ..virtio.queue import GuestErrorLog
from .backend import BlockOp, BlockRequest

__all__ = [
    "IHAVEOPT",
    "NBD_DEFAULT_MAX_PAYLOAD",
    "NBD_HANDSHAKE_TIMEOUT",
    "NBD_MAGIC",
    "NBD_MAX_EFFECT",
    "NBD_MAX_INFO_REPLIES",
    "NBD_OPTION_REPLY_MAX",
    "NBD_REPLY_TIMEOUT",
    "NBD_REP_MAGIC",
    "NBD_REQUEST_MAGIC",
    "NBD_SIMPLE_REPLY_MAGIC",
    "NBD_STRUCTURED_REPLY_MAGIC",
    "NbdBackend",
    "NbdCmd",
    "NbdCmdFlag",
    "NbdCommand",
    "NbdError",
    "NbdExport",
    "NbdHandshake",
    "NbdInfo",
    "NbdOpt",
    "NbdProtocolError",
    "NbdRefused",
    "NbdRep",
    "NbdTransmissionFlag",
    "plan",
]

logger = logging.getLogger("pyvmm.blk")

# -- magic numbers (proto.md "Handshake", "Transmission") --------------------------------------
NBD_MAGIC = 0x4E42444D41474943                  # "NBDMAGIC", the server's first word
IHAVEOPT = 0x49484156454F5054                   # "IHAVEOPT": newstyle; also starts every option
NBD_REP_MAGIC = 0x0003E889045565A9              # starts every option reply
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF         # never negotiated here: a protocol error


class NbdHandshakeFlag(IntFlag):
    """Handshake flags, sent by the server after IHAVEOPT (16 bits)."""
    NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
    NBD_FLAG_NO_ZEROES = 1 << 1


class NbdClientFlag(IntFlag):
    """Client flags, our answer to the handshake flags (32 bits)."""
    NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
    NBD_FLAG_C_NO_ZEROES = 1 << 1


class NbdTransmissionFlag(IntFlag):
    """Transmission flags of an export (16 bits, in NBD_INFO_EXPORT)."""
    NBD_FLAG_HAS_FLAGS = 1 << 0                 # MUST always be 1
    NBD_FLAG_READ_ONLY = 1 << 1
    NBD_FLAG_SEND_FLUSH = 1 << 2
    NBD_FLAG_SEND_FUA = 1 << 3
    NBD_FLAG_ROTATIONAL = 1 << 4
    NBD_FLAG_SEND_TRIM = 1 << 5
    NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6         # also NBD_CMD_FLAG_NO_HOLE
    NBD_FLAG_SEND_DF = 1 << 7
    NBD_FLAG_CAN_MULTI_CONN = 1 << 8
    NBD_FLAG_SEND_RESIZE = 1 << 9
    NBD_FLAG_SEND_CACHE = 1 << 10
    NBD_FLAG_SEND_FAST_ZERO = 1 << 11


class NbdOpt(IntEnum):
    """Option types (option haggling)."""
    NBD_OPT_EXPORT_NAME = 1
    NBD_OPT_ABORT = 2
    NBD_OPT_LIST = 3
    NBD_OPT_STARTTLS = 5
    NBD_OPT_INFO = 6
    NBD_OPT_GO = 7
    NBD_OPT_STRUCTURED_REPLY = 8


class NbdRep(IntEnum):
    """Option reply types; the errors have bit 31 set."""
    NBD_REP_ACK = 1
    NBD_REP_SERVER = 2
    NBD_REP_INFO = 3
    NBD_REP_META_CONTEXT = 4
    NBD_REP_ERR_UNSUP = 2**31 + 1
    NBD_REP_ERR_POLICY = 2**31 + 2
    NBD_REP_ERR_INVALID = 2**31 + 3
    NBD_REP_ERR_PLATFORM = 2**31 + 4
    NBD_REP_ERR_TLS_REQD = 2**31 + 5
    NBD_REP_ERR_UNKNOWN = 2**31 + 6
    NBD_REP_ERR_SHUTDOWN = 2**31 + 7
    NBD_REP_ERR_BLOCK_SIZE_REQD = 2**31 + 8
    NBD_REP_ERR_TOO_BIG = 2**31 + 9
    NBD_REP_ERR_EXT_HEADER_REQD = 2**31 + 10


NBD_REP_FLAG_ERROR = 1 << 31


class NbdInfo(IntEnum):
    """Information types of NBD_REP_INFO (and of NBD_OPT_GO's requests)."""
    NBD_INFO_EXPORT = 0
    NBD_INFO_NAME = 1
    NBD_INFO_DESCRIPTION = 2
    NBD_INFO_BLOCK_SIZE = 3


class NbdCmd(IntEnum):
    """Request types."""
    NBD_CMD_READ = 0
    NBD_CMD_WRITE = 1
    NBD_CMD_DISC = 2
    NBD_CMD_FLUSH = 3
    NBD_CMD_TRIM = 4
    NBD_CMD_CACHE = 5
    NBD_CMD_WRITE_ZEROES = 6
    NBD_CMD_BLOCK_STATUS = 7


class NbdCmdFlag(IntFlag):
    """Command flags."""
    NBD_CMD_FLAG_FUA = 1 << 0
    NBD_CMD_FLAG_NO_HOLE = 1 << 1               # WRITE_ZEROES: allocate, do not punch a hole
    NBD_CMD_FLAG_DF = 1 << 2
    NBD_CMD_FLAG_REQ_ONE = 1 << 3
    NBD_CMD_FLAG_FAST_ZERO = 1 << 4


#: the reply's error field (proto.md "Error values") -> errno; anything else is EIO
NBD_ERRNO = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 22: errno.EINVAL,
             28: errno.ENOSPC, 75: errno.EOVERFLOW, 95: errno.EOPNOTSUPP,
             108: errno.ESHUTDOWN}
NBD_ESHUTDOWN = 108

# -- the structs, big-endian ("network byte order") ---------------------------------------------
#: S: u64 NBD_MAGIC, u64 IHAVEOPT, u16 handshake flags
GREETING = struct.Struct(">QQH")
#: C: u32 client flags
CLIENT_FLAGS = struct.Struct(">I")
#: C: u64 IHAVEOPT, u32 option, u32 length of the data that follows
OPTION = struct.Struct(">QII")
#: S: u64 NBD_REP_MAGIC, u32 option, u32 reply type, u32 length of the data that follows
OPTION_REPLY = struct.Struct(">QIII")
#: NBD_REP_INFO data of NBD_INFO_EXPORT: u16 type, u64 size, u16 transmission flags
INFO_EXPORT = struct.Struct(">HQH")
#: NBD_REP_INFO data of NBD_INFO_BLOCK_SIZE: u16 type, u32 minimum, preferred, maximum payload
INFO_BLOCK_SIZE = struct.Struct(">HIII")
#: C: u32 NBD_REQUEST_MAGIC, u16 command flags, u16 type, u64 cookie, u64 offset, u32 length
REQUEST = struct.Struct(">IHHQQI")
#: S: u32 NBD_SIMPLE_REPLY_MAGIC, u32 error, u64 cookie
SIMPLE_REPLY = struct.Struct(">IIQ")

# -- limits (SECURITY.md) --------------------------------------------------------------------
#: the largest READ/WRITE payload of one NBD request when the server names no smaller one
#: (2^25, proto.md "Size constraints"; qemu's NBD_MAX_BUFFER_SIZE); larger guest requests
#: are split into several NBD requests
NBD_DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
#: the largest range of one TRIM / WRITE_ZEROES request (its length field is 32 bits);
#: larger ones are split
NBD_MAX_EFFECT = 1024 * 1024 * 1024
#: the largest option reply we take during the handshake (proto.md: strings are at most
#: 4096 bytes; an info reply adds its 2-byte type); longer: protocol error
NBD_OPTION_REPLY_MAX = 4096 + 16
#: NBD_REP_INFO replies we take before NBD_REP_ACK; more: protocol error
NBD_MAX_INFO_REPLIES = 16
#: seconds from connect() to the end of the handshake (10 s was seen to pass in the lab, a
#: qcow2 overlay's daemon on a nested guest under TCG; as long as a reply may take)
NBD_HANDSHAKE_TIMEOUT = 30.0
#: seconds one execute() may wait for the server, whole batch; beyond: EIO, backend failed
NBD_REPLY_TIMEOUT = 30.0
#: the most buffers one sendmsg/recvmsg_into takes (Linux UIO_MAXIOV)
IOV_MAX = 1024
#: the device's sector: every offset and length is a multiple of it
SECTOR = 512


class NbdError(PyvmmError):
    """The NBD server cannot be used."""


class NbdProtocolError(NbdError):
    """The server broke the protocol (or closed the connection, or said nothing in time)."""


class NbdRefused(NbdError):
    """The server answered NBD_OPT_GO with an NBD_REP_ERR_* (``reply``), and maybe a message."""

    def __init__(self, reply: int, message: str) -> None:
        self.reply = reply
        try:
            name = NbdRep(reply).name
        except ValueError:
            name = f"error reply {reply:#x}"
        super().__init__(f"{name}{': ' + message if message else ''}")


@dataclass(frozen=True)
class NbdExport:
    """What the handshake learnt about the export."""
    size: int
    flags: int                                   # NbdTransmissionFlag bits
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = NBD_DEFAULT_MAX_PAYLOAD

    def has(self, flag: NbdTransmissionFlag) -> bool:
        return bool(self.flags & flag)


def _text(data: bytes) -> str:
    """A server's string for a log or an error message: printable, bounded."""
    text = data[:4096].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)


# -- the handshake, sans I/O --------------------------------------------------------------------

class NbdHandshake:
    """The client side of the fixed-newstyle handshake ending in NBD_OPT_GO, without I/O.

    The driver reads at most :meth:`wanted` bytes from the server, passes them to
    :meth:`receive`, and sends what that returns, until :attr:`export` is set.  Reading no
    more than :meth:`wanted` means no byte of the transmission phase is ever consumed here.
    :meth:`receive` raises :class:`NbdProtocolError` for anything outside the protocol and
    :class:`NbdRefused` when the server refuses the export.
    """

    def __init__(self, export_name: str) -> None:
        self.name = export_name.encode()
        if len(self.name) > 4096:
            raise ValueError("an NBD export name is at most 4096 bytes")
        self.export: NbdExport | None = None
        self._need = GREETING.size
        self._buf = bytearray()
        self._state = "greeting"
        self._reply: tuple[int, int] = (0, 0)    # (type, length) of the option reply being read
        self._infos = 0
        self._size_flags: tuple[int, int] | None = None
        self._block_size: tuple[int, int, int] | None = None

    @property
    def done(self) -> bool:
        return self.export is not None

    def wanted(self) -> int:
        """How many bytes the current message still needs (0 once done)."""
        return 0 if self.done else self._need - len(self._buf)

    def go_option(self) -> bytes:
        """NBD_OPT_GO for our export, asking for NBD_INFO_BLOCK_SIZE (we obey it)."""
        data = (struct.pack(">I", len(self.name)) + self.name
                + struct.pack(">HH", 1, NbdInfo.NBD_INFO_BLOCK_SIZE))
        return OPTION.pack(IHAVEOPT, NbdOpt.NBD_OPT_GO, len(data)) + data

    def receive(self, data: bytes) -> bytes:
        """Take bytes from the server; return the bytes to send to it (maybe none)."""
        if len(data) > self.wanted():
            raise ValueError("more bytes than wanted()")
        self._buf += data
        if len(self._buf) < self._need:
            return b""
        message, self._buf = bytes(self._buf), bytearray()
        if self._state == "greeting":
            return self._greeting(message)
        if self._state == "reply":
            magic, option, reply, length = OPTION_REPLY.unpack(message)
            if magic != NBD_REP_MAGIC:
                raise NbdProtocolError(f"option reply with magic {magic:#x}")
            if option != NbdOpt.NBD_OPT_GO:
                raise NbdProtocolError(f"reply to option {option}, which we did not send")
            if length > NBD_OPTION_REPLY_MAX:
                raise NbdProtocolError(f"option reply of {length} bytes "
                                       f"(at most {NBD_OPTION_REPLY_MAX})")
            self._reply = (reply, length)
            if length:
                self._state, self._need = "reply data", length
                return b""
            message = b""
        self._state, self._need = "reply", OPTION_REPLY.size
        self._option_reply(self._reply[0], message)
        return b""

    def _greeting(self, message: bytes) -> bytes:
        magic, ihaveopt, flags = GREETING.unpack(message)
        if magic != NBD_MAGIC:
            raise NbdProtocolError(f"not an NBD server (first word {magic:#x})")
        if ihaveopt != IHAVEOPT:
            raise NbdProtocolError("the server speaks oldstyle NBD; pyvmm needs fixed newstyle")
        if not flags & NbdHandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError("the server does not speak fixed newstyle NBD (no NBD_OPT_GO)")
        client = NbdClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE
        if flags & NbdHandshakeFlag.NBD_FLAG_NO_ZEROES:
            client |= NbdClientFlag.NBD_FLAG_C_NO_ZEROES
        self._state, self._need = "reply", OPTION_REPLY.size
        return CLIENT_FLAGS.pack(client) + self.go_option()

    def _option_reply(self, reply: int, data: bytes) -> None:
        if reply & NBD_REP_FLAG_ERROR:
            raise NbdRefused(reply, _text(data))
        if reply == NbdRep.NBD_REP_INFO:
            self._infos += 1
            if self._infos > NBD_MAX_INFO_REPLIES:
                raise NbdProtocolError(f"more than {NBD_MAX_INFO_REPLIES} NBD_REP_INFO replies")
            self._info(data)
        elif reply == NbdRep.NBD_REP_ACK:
            if data:
                raise NbdProtocolError("NBD_REP_ACK with data")
            if self._size_flags is None:
                raise NbdProtocolError("NBD_REP_ACK without NBD_INFO_EXPORT")
            size, flags = self._size_flags
            self.export = NbdExport(size, flags, *(self._block_size or ()))
        else:
            raise NbdProtocolError(f"option reply type {reply} to NBD_OPT_GO")

    def _info(self, data: bytes) -> None:
        if len(data) < 2:
            raise NbdProtocolError("NBD_REP_INFO shorter than its type")
        (kind,) = struct.unpack_from(">H", data)
        if kind == NbdInfo.NBD_INFO_EXPORT:
            if len(data) != INFO_EXPORT.size:
                raise NbdProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes (12)")
            _, size, flags = INFO_EXPORT.unpack(data)
            if not flags & NbdTransmissionFlag.NBD_FLAG_HAS_FLAGS:
                raise NbdProtocolError("transmission flags without NBD_FLAG_HAS_FLAGS")
            self._size_flags = (size, flags)
        elif kind == NbdInfo.NBD_INFO_BLOCK_SIZE:
            if len(data) != INFO_BLOCK_SIZE.size:
                raise NbdProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes (14)")
            _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(data)
            _check_block_size(minimum, preferred, maximum)
            self._block_size = (minimum, preferred, maximum)
        # NBD_INFO_NAME, NBD_INFO_DESCRIPTION and unknown types: ignored (proto.md: MUST)


def _power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_block_size(minimum: int, preferred: int, maximum: int) -> None:
    """proto.md "Size constraints", plus what pyvmm can obey: 512-byte sectors."""
    if not (_power_of_2(minimum) and minimum <= 65536):
        raise NbdProtocolError(f"minimum block size {minimum} (a power of 2, at most 65536)")
    if not (_power_of_2(preferred) and preferred >= max(minimum, 512)):
        raise NbdProtocolError(f"preferred block size {preferred} (a power of 2, at least "
                               f"512 and the minimum)")
    if maximum < preferred:
        raise NbdProtocolError(f"maximum payload {maximum} below the preferred block size")
    if minimum > SECTOR:
        raise NbdError(f"the export needs {minimum}-byte blocks; pyvmm's disks have "
                       f"{SECTOR}-byte sectors")


# -- the transmission phase, sans I/O: requests, replies, and the plan of a batch -----------------

def encode_request(cmd: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def parse_simple_reply(header: bytes) -> tuple[int, int]:
    """(error, cookie) of a 16-byte simple reply header; NbdProtocolError if it is none."""
    magic, error, cookie = SIMPLE_REPLY.unpack(header)
    if magic == NBD_STRUCTURED_REPLY_MAGIC:
        raise NbdProtocolError("a structured reply, which was never negotiated")
    if magic != NBD_SIMPLE_REPLY_MAGIC:
        raise NbdProtocolError(f"reply with magic {magic:#x}")
    return error, cookie


def nbd_errno(error: int) -> int:
    """The errno for a reply's error field; values the spec does not define are EIO."""
    return NBD_ERRNO.get(error, errno.EIO)


@dataclass
class NbdCommand:
    """One NBD request: part (or all) of ``batch[index]``."""
    index: int
    cmd: NbdCmd
    offset: int = 0
    length: int = 0
    flags: int = 0
    views: list[memoryview] = field(default_factory=list)   # WRITE: source, READ: destination
    done: bool = False                                      # its reply has arrived

    @property
    def writes(self) -> bool:
        return self.cmd in (NbdCmd.NBD_CMD_WRITE, NbdCmd.NBD_CMD_TRIM, NbdCmd.NBD_CMD_WRITE_ZEROES)


def split_views(views: Sequence[memoryview], size: int) -> list[list[memoryview]]:
    """Cut the concatenation of ``views`` into runs of ``size`` bytes (the last may be
    shorter), without copying: each run is a list of slices of the views."""
    runs: list[list[memoryview]] = [[]]
    room = size
    for view in views:
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        while len(view):
            if room == 0:
                runs.append([])
                room = size
            part = view[:room]
            runs[-1].append(part)
            room -= len(part)
            view = view[len(part):]
    return [run for run in runs if run]


_OPS = {BlockOp.READ: NbdCmd.NBD_CMD_READ, BlockOp.WRITE: NbdCmd.NBD_CMD_WRITE,
        BlockOp.DISCARD: NbdCmd.NBD_CMD_TRIM, BlockOp.WRITE_ZEROES: NbdCmd.NBD_CMD_WRITE_ZEROES}


def plan(batch: Sequence[BlockRequest], export: NbdExport,
         read_only: bool) -> tuple[list[int], list[list[NbdCommand]]]:
    """What to send for ``batch``: (results, waves).

    ``results`` holds, per request, an errno for the requests refused here without asking
    the server (a write to a read-only disk: EROFS; an operation the export does not offer:
    EOPNOTSUPP; out of bounds or unaligned: EINVAL) and 0 for the others.  ``waves`` are
    the NBD requests to send, in order: every request of a wave may be sent before any
    reply is read; a wave starts only when every reply of the one before has arrived
    (module docstring).  READ/WRITE are cut at the export's maximum payload (at most
    :data:`NBD_DEFAULT_MAX_PAYLOAD`), TRIM/WRITE_ZEROES at :data:`NBD_MAX_EFFECT`.  A FLUSH
    of an export without NBD_FLAG_SEND_FLUSH is done at once (the server says it has no
    cache to flush: proto.md "MUST NOT send a flush request unless").
    """
    payload = min(export.max_payload, NBD_DEFAULT_MAX_PAYLOAD) // SECTOR * SECTOR
    results = [0] * len(batch)
    commands: list[NbdCommand] = []
    for index, request in enumerate(batch):
        if request.op is BlockOp.FLUSH:
            if export.has(NbdTransmissionFlag.NBD_FLAG_SEND_FLUSH):
                commands.append(NbdCommand(index, NbdCmd.NBD_CMD_FLUSH))
            continue
        if request.op is not BlockOp.READ and read_only:
            results[index] = errno.EROFS
            continue
        if (request.op is BlockOp.DISCARD
                and not export.has(NbdTransmissionFlag.NBD_FLAG_SEND_TRIM)) or (
                request.op is BlockOp.WRITE_ZEROES
                and not export.has(NbdTransmissionFlag.NBD_FLAG_SEND_WRITE_ZEROES)):
            results[index] = errno.EOPNOTSUPP
            continue
        start, length = request.offset, request.length
        if (start < 0 or length < 0 or start + length > export.size
                or start % SECTOR or length % SECTOR):
            results[index] = errno.EINVAL
            continue
        cmd = _OPS[request.op]
        if cmd in (NbdCmd.NBD_CMD_READ, NbdCmd.NBD_CMD_WRITE):
            if sum(len(v) for v in request.buffers) != length:
                results[index] = errno.EINVAL
                continue
            for run in split_views(request.buffers, payload):
                run_length = sum(len(v) for v in run)
                commands.append(NbdCommand(index, cmd, start, run_length, views=run))
                start += run_length
            continue
        flags = 0
        if cmd == NbdCmd.NBD_CMD_WRITE_ZEROES and not request.unmap:
            flags = NbdCmdFlag.NBD_CMD_FLAG_NO_HOLE
        for part in range(start, start + length, NBD_MAX_EFFECT):
            commands.append(NbdCommand(index, cmd, part,
                                       min(NBD_MAX_EFFECT, start + length - part), flags))
    return results, _waves(commands)


def _waves(commands: list[NbdCommand]) -> list[list[NbdCommand]]:
    """Cut ``commands`` where the server's freedom to reorder could change the result: before
    a FLUSH, and before a request overlapping one of the wave when either writes."""
    waves: list[list[NbdCommand]] = []
    wave: list[NbdCommand] = []
    for command in commands:
        if wave and (command.cmd == NbdCmd.NBD_CMD_FLUSH or any(
                (command.writes or other.writes)
                and command.offset < other.offset + other.length
                and other.offset < command.offset + command.length
                for other in wave)):
            waves.append(wave)
            wave = []
        wave.append(command)
    if wave:
        waves.append(wave)
    return waves


# -- the socket ------------------------------------------------------------------------------------

class NbdBackend:
    """A :class:`~pyvmm.blk.backend.BlockBackend` on an NBD export reached through the Unix
    socket ``socket_path`` (module docstring).  ``read_only``: never write, even if the
    export is writable; a read-only export asked for read-write is a ConfigError.

    As the seam says: :meth:`open` on the machine's thread (blocking, at most
    :data:`NBD_HANDSHAKE_TIMEOUT`), :meth:`execute` on the I/O loop thread (at most
    :data:`NBD_REPLY_TIMEOUT` per batch), :meth:`close` once the loop has stopped."""

    def __init__(self, socket_path: str, export_name: str, read_only: bool) -> None:
        self.socket_path = str(socket_path)
        self.export_name = export_name
        self.read_only = read_only
        self.size = 0
        self.supports_discard = False
        self.supports_write_zeroes = False
        self.export: NbdExport | None = None
        #: why the backend failed for good (None while it works)
        self.failed: str | None = None
        #: the server's mistakes, counted by reason and logged once each
        self.errors = GuestErrorLog(f"nbd server {self.socket_path}", logger)
        self._sock: socket.socket | None = None
        self._cookies = itertools.count(1)

    # -- life ----------------------------------------------------------------------------------
    def open(self) -> None:
        deadline = time.monotonic() + NBD_HANDSHAKE_TIMEOUT
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            handshake = NbdHandshake(self.export_name)
            sock.settimeout(NBD_HANDSHAKE_TIMEOUT)
            sock.connect(self.socket_path)
            while not handshake.done:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = sock.recv(handshake.wanted())
                if not data:
                    raise NbdProtocolError("the server closed the connection in the handshake")
                reply = handshake.receive(data)
                if reply:
                    sock.sendall(reply)
        except NbdError as e:
            sock.close()
            raise ConfigError(f"NBD export {self.export_name!r} at {self.socket_path}: {e}") from e
        except socket.timeout:
            sock.close()
            raise ConfigError(f"NBD server at {self.socket_path}: no handshake within "
                              f"{NBD_HANDSHAKE_TIMEOUT:g} s") from None
        except OSError as e:
            sock.close()
            raise ConfigError(f"NBD server at {self.socket_path}: {e.strerror or e}") from e
        export = handshake.export
        if export.has(NbdTransmissionFlag.NBD_FLAG_READ_ONLY) and not self.read_only:
            sock.close()
            raise ConfigError(f"NBD export {self.export_name!r} at {self.socket_path} is "
                              f"read-only; open the disk read-only (ro)")
        sock.setblocking(False)
        self._sock = sock
        self.export = export
        self.size = export.size // SECTOR * SECTOR
        if self.size != export.size:
            logger.warning("NBD export %r: size %d is not a multiple of %d; its last %d "
                           "bytes are not visible", self.export_name, export.size, SECTOR,
                           export.size - self.size)
        writable = not self.read_only
        self.supports_discard = writable and export.has(NbdTransmissionFlag.NBD_FLAG_SEND_TRIM)
        self.supports_write_zeroes = writable and export.has(
            NbdTransmissionFlag.NBD_FLAG_SEND_WRITE_ZEROES)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self.failed is None:
            try:                                 # soft disconnect; no reply comes
                sock.send(encode_request(NbdCmd.NBD_CMD_DISC, 0, next(self._cookies), 0, 0))
            except OSError:
                pass
        sock.close()
        if self.failed is None:
            self.failed = "closed"

    # -- I/O -----------------------------------------------------------------------------------
    def execute(self, batch: Sequence[BlockRequest]) -> list[int]:
        if self._sock is None or self.export is None:
            if self.failed is None:
                self.failed = "not open"
            return [errno.EIO] * len(batch)
        results, waves = plan(batch, self.export, self.read_only)
        deadline = time.monotonic() + NBD_REPLY_TIMEOUT
        for number, wave in enumerate(waves):
            try:
                self._run_wave(wave, results, deadline)
            except (NbdProtocolError, OSError) as e:
                reason = str(e) if isinstance(e, NbdProtocolError) else f"socket: {e}"
                self._fail(reason)
                for rest in waves[number:]:
                    for command in rest:
                        if not command.done and not results[command.index]:
                            results[command.index] = errno.EIO
                break
        return results

    def _fail(self, reason: str) -> None:
        """Stop for good: the stream cannot be trusted any more."""
        if self.failed is None:
            self.failed = reason
            self.errors.report("NBD connection failed; every request now fails with EIO", reason)
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _run_wave(self, wave: list[NbdCommand], results: list[int], deadline: float) -> None:
        """Send every request of ``wave`` and take every reply, in one poll loop: the socket
        is written while it takes bytes and read while replies arrive, so neither side waits
        for the other.  Each reply completes its command (:meth:`_complete`); anything that
        breaks the stream raises NbdProtocolError (or OSError from the socket)."""
        if self.failed is not None:
            raise NbdProtocolError(self.failed)
        sock = self._sock
        outstanding: dict[int, NbdCommand] = {}
        out: list = []                           # bytes and views still to send, in order
        for command in wave:
            cookie = next(self._cookies)
            outstanding[cookie] = command
            out.append(encode_request(command.cmd, command.flags, cookie, command.offset,
                                      command.length))
            if command.cmd == NbdCmd.NBD_CMD_WRITE:
                out.extend(command.views)
        header = bytearray(SIMPLE_REPLY.size)
        got = 0                                  # bytes of ``header`` received
        reading: NbdCommand | None = None        # a READ whose data is arriving
        into: list[memoryview] = []              # where its remaining data goes
        poller = select.poll()
        while outstanding or reading is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NbdProtocolError(f"no reply within {NBD_REPLY_TIMEOUT:g} s")
            poller.register(sock, select.POLLIN | (select.POLLOUT if out else 0))
            if not poller.poll(left * 1000 + 1):
                continue
            while out:                           # send what the socket takes
                try:
                    sent = sock.sendmsg(out[:IOV_MAX])
                except BlockingIOError:
                    break
                out = _advance(out, sent)
            while outstanding or reading is not None:     # receive what has arrived
                try:
                    if reading is None:
                        n = sock.recv_into(memoryview(header)[got:])
                    else:
                        n = sock.recvmsg_into(into[:IOV_MAX])[0]
                except BlockingIOError:
                    break
                if n == 0:
                    raise NbdProtocolError("the server closed the connection")
                if reading is not None:
                    into = _advance(into, n)
                    if not into:
                        self._complete(reading, 0, results)
                        reading = None
                    continue
                got += n
                if got < len(header):
                    continue
                got = 0
                error, cookie = parse_simple_reply(bytes(header))
                command = outstanding.pop(cookie, None)
                if command is None:
                    raise NbdProtocolError(f"a reply for cookie {cookie}, which is not "
                                           f"outstanding")
                if error == NBD_ESHUTDOWN:
                    self._complete(command, errno.ESHUTDOWN, results)
                    raise NbdProtocolError("the server is shutting down (NBD_ESHUTDOWN)")
                if error:
                    if error not in NBD_ERRNO:
                        self.errors.report("an error value the NBD spec does not define",
                                           f"{error}")
                    self._complete(command, nbd_errno(error), results)
                elif command.cmd == NbdCmd.NBD_CMD_READ and command.length:
                    reading, into = command, list(command.views)
                else:
                    self._complete(command, 0, results)

    @staticmethod
    def _complete(command: NbdCommand, result: int, results: list[int]) -> None:
        command.done = True
        if result and not results[command.index]:
            results[command.index] = result


def _advance(buffers: list, n: int) -> list:
    """``buffers`` without their first ``n`` bytes (slices, no copies)."""
    i = 0
    while n:
        size = len(buffers[i])
        if n < size:
            buffers = buffers[i:]
            buffers[0] = memoryview(buffers[0])[n:]
            return buffers
        n -= size
        i += 1
    return buffers[i:]
