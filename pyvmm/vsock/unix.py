"""The host ends of pyvmm's vsock: Unix sockets, and a Python API.

This module owns how host programs reach the guest's vsock (and the guest
reaches them): two :class:`~pyvmm.vsock.backend.VsockBackend`
implementations, which reach the device only through the
:class:`~pyvmm.vsock.backend.VsockHost` they are attached to.  There is no
host AF_VSOCK anywhere: every host end is an AF_UNIX socket.

:class:`SocketStream` -- a non-blocking AF_UNIX socket as the
:class:`~pyvmm.vsock.connection.HostStream` a connection moves bytes
through: ``recvmsg_into`` straight into guest rx buffers, ``sendmsg`` straight
from guest tx buffers (scatter/gather, no copy).

:class:`UnixBackend` -- Firecracker's convention (``firecracker/docs/vsock.md``,
``unix/muxer.rs``), so existing tooling (``socat``, Firecracker's test
helpers) works unchanged:

* Host -> guest: connect to ``uds_path`` (SOCK_STREAM) and write
  ``CONNECT <port>\\n``.  "connect" is matched case-insensitively, words are
  split on whitespace, the port is a u32 in decimal (optional ``+``, as
  Rust's ``u32::from_str``), further words are ignored -- all as Firecracker
  parses it.  The line, newline included, must arrive within
  :data:`CONNECT_LINE_MAX` (32) bytes and :data:`CONNECT_TIMEOUT` seconds;
  anything else closes the socket and counts ``unix_handshake_errors``.
  At most :data:`MAX_HANDSHAKES` (1024) peers may be in that handshake at
  once; beyond it the *oldest* is closed (counted) to admit the newest, so
  peers that connect and stay silent -- even re-opened in a loop -- cannot
  lock out a well-behaved client, which sends its line at once and so is
  always among the newest.
  Once the guest accepts (RESPONSE) we write ``OK <host_port>\\n`` (host
  ports round-robin from [2**30, 2**31)); if it refuses (RST) or does not
  answer, the socket is closed.  Bytes after the newline are payload: they
  are never read during the handshake (the line is consumed exactly, found
  with MSG_PEEK), so they stay in the socket for the connection.
* Guest -> host: a guest REQUEST to CID 2 port P connects (non-blocking) to
  ``<uds_path>_<P>``; nothing there, refused, backlog full, or the wrong
  socket type -> RST to the guest.
* ``attach`` binds both listeners (a path somebody still listens on, or a
  file that is not a socket, is a ConfigError); ``start`` starts accepting;
  ``stop`` closes and unlinks them.

SEQPACKET (VIRTIO_VSOCK_F_SEQPACKET; Firecracker has none) maps onto
SOCK_SEQPACKET Unix sockets, which keep record boundaries the way vsock
SEQPACKET keeps messages:

* Host -> guest: a *second* listener, ``<uds_path>.seqpacket``, speaking the
  same protocol, where ``CONNECT <port>\\n`` is the first record and
  ``OK <host_port>\\n`` our first record.  A second path is needed because a
  listening socket has one type: SOCK_STREAM clients cannot connect to a
  SOCK_SEQPACKET listener or vice versa, and the type cannot be negotiated
  in-band before the connection exists.  ``.seqpacket`` (not ``_...``) keeps
  it out of the ``<uds_path>_<port>`` namespace.
* Guest -> host: ``<uds_path>_<P>`` is connected with SOCK_SEQPACKET.  A host
  program serves both types on one port with two listeners only if it
  wants to; connecting SOCK_SEQPACKET to a SOCK_STREAM listener fails
  (EPROTOTYPE) and the guest gets an RST, as Linux does for a type mismatch.

:class:`VsockApi` -- the Python API the machine exposes (``Machine.vsock``):
``connect(port, type) -> socket`` (host-initiated: one end of a socketpair
whose other end the muxer serves, returned after the guest's RESPONSE;
ConnectionRefusedError on RST), ``listen(port, type) -> VsockListener``
(guest-initiated connections to CID 2 port P are delivered to
``listener.accept()`` instead of a Unix path; the machine gives the device
this backend before the Unix one, so the Python listeners are asked before
``<uds_path>_<P>``), ``counters()``, ``transport_reset()``.  Every method may
be called from any thread; work is handed to the device's I/O loop.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import re
import select
import socket
import stat
import struct
import threading
from typing import Sequence

from ..errors import ConfigError
from .backend import VsockBackend, VsockHost
from .connection import CONN_REQUEST_TIMEOUT, HostStream
from .wire import DGRAM_MAX_PAYLOAD, VMADDR_PORT_ANY, VirtioVsockType

__all__ = [
    "ACCEPT_RETRY",
    "CONNECT_LINE_MAX",
    "CONNECT_TIMEOUT",
    "DGRAM_SUFFIX",
    "MAX_HANDSHAKES",
    "SEQPACKET_SUFFIX",
    "SocketStream",
    "UNIX_RECORD_MAX",
    "UNIX_RECORD_OVERHEAD",
    "UnixBackend",
    "VsockApi",
    "VsockDatagram",
    "VsockListener",
    "default_backends",
    "parse_connect_line",
]

logger = logging.getLogger("pyvmm.vsock")

STREAM = VirtioVsockType.VIRTIO_VSOCK_TYPE_STREAM
SEQPACKET = VirtioVsockType.VIRTIO_VSOCK_TYPE_SEQPACKET
_SOCK_TYPE = {STREAM: socket.SOCK_STREAM, SEQPACKET: socket.SOCK_SEQPACKET}

#: the longest CONNECT line, newline included (Firecracker reads at most 32 bytes)
CONNECT_LINE_MAX = 32
#: seconds a host peer has to finish its CONNECT line
CONNECT_TIMEOUT = 2.0
#: Unix connections allowed to be in the CONNECT handshake at once; the oldest is closed to
#: admit a new one beyond it (a silent peer cannot lock others out; each costs one fd here)
MAX_HANDSHAKES = 1024
#: accepted per listener wake-up (the rest wait for the next loop iteration)
_ACCEPT_BATCH = 16
#: seconds a listener stops accepting after accept() failed for want of a resource (EMFILE,
#: ENFILE, ENOBUFS, ENOMEM): the pending peer keeps the socket readable, so retrying at once
#: would spin the I/O thread
ACCEPT_RETRY = 0.1
#: the SOCK_SEQPACKET listener is ``uds_path + SEQPACKET_SUFFIX``
SEQPACKET_SUFFIX = ".seqpacket"
#: draft mode: host datagrams for the guest go to ``uds_path + DGRAM_SUFFIX``; guest
#: datagrams to host port P go to ``<uds_path>_<P> + DGRAM_SUFFIX``
DGRAM_SUFFIX = ".dgram"
#: host datagrams read per wake-up of the datagram socket
_DGRAM_BATCH = 64
#: AF_UNIX refuses a datagram or SEQPACKET record longer than the sender's send buffer less
#: this (Linux net/unix/af_unix.c, unix_dgram_sendmsg: EMSGSIZE)
UNIX_RECORD_OVERHEAD = 32
#: the largest AF_UNIX record we count on, whatever the send buffer: a record is one skb whose
#: linear part is one kmalloc, at most KMALLOC_MAX_SIZE (4 MiB on x86-64; seen here: 4 MiB +
#: 69,312 bytes goes, one byte more is ENOBUFS)
UNIX_RECORD_MAX = 4 << 20
_PORT = re.compile(r"\+?[0-9]+")


def parse_connect_line(line: bytes) -> int | None:
    """The port of a ``CONNECT <port>\\n`` line, or None (Firecracker's rules)."""
    try:
        words = line.decode("utf-8").split()
    except UnicodeDecodeError:
        return None
    if len(words) < 2 or words[0].lower() != "connect" or not _PORT.fullmatch(words[1]):
        return None
    port = int(words[1])
    return port if port <= 0xFFFF_FFFF else None


class SocketStream:
    """A connected stream socket as a HostStream (non-blocking, zero-copy I/O): AF_UNIX
    here, TCP in :mod:`pyvmm.vsock.tcp` (on TCP a peer's close() and its shutdown(SHUT_WR)
    are the same FIN: both read as a half-close, and a write after a close gets the
    peer's RST, which ends the connection)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.seqpacket = sock.type == socket.SOCK_SEQPACKET

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into_views(self, views: list[memoryview]) -> int:
        return self.sock.recvmsg_into(views)[0]

    def recv_message(self, buf: memoryview) -> int | None:
        size = self.sock.recv_into(buf, 0, socket.MSG_TRUNC)   # the record's full length
        if size == 0 and self._poll() & (select.POLLRDHUP | select.POLLHUP):
            return None                 # end of file, not an empty record
        return size

    def send_views(self, views: list) -> int:
        return self.sock.sendmsg(views, (), socket.MSG_NOSIGNAL)

    def max_message(self, want: int) -> int:
        """The largest record one send takes (at most :data:`UNIX_RECORD_MAX`), after
        raising the send buffer (where ``net.core.wmem_max`` allows) so that a record of
        ``want`` bytes fits."""
        want = min(want, UNIX_RECORD_MAX)
        have = self._sndbuf() - UNIX_RECORD_OVERHEAD
        if have < want:
            try:                        # the kernel doubles what is asked for (socket(7))
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                     -(-(want + UNIX_RECORD_OVERHEAD) // 2))
            except OSError:
                pass
            have = self._sndbuf() - UNIX_RECORD_OVERHEAD
        return max(0, min(have, UNIX_RECORD_MAX))

    def _sndbuf(self) -> int:
        return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def hung_up(self) -> bool:
        return bool(self._poll() & select.POLLHUP)

    def _poll(self) -> int:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        return sum(ev for _, ev in poller.poll(0))

    def close(self) -> None:
        self.sock.close()


class _HandshakeError(Exception):
    """A host peer broke the CONNECT protocol (the message is the fixed reason)."""


class _Handshake:
    """A Unix connection that has not finished its CONNECT line yet."""

    def __init__(self, sock: socket.socket, vtype: int) -> None:
        self.sock = sock
        self.vtype = vtype
        self.line = bytearray()
        self.timer = None


def _bind_listener(path: str, kind: int) -> socket.socket:
    """A listening AF_UNIX socket at ``path``; a stale socket file is replaced,
    one somebody still listens on (or a non-socket file) is a ConfigError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"vsock uds path {path!r} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, kind)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)             # nobody listens: left over from a dead VMM
        else:
            raise ConfigError(f"vsock uds path {path!r} is in use by another listener")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        if kind != socket.SOCK_DGRAM:
            sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on vsock uds path {path!r}: {e}") from e
    return sock


class UnixBackend(VsockBackend):
    """Firecracker's Unix-socket host end (see the module docstring); a VsockBackend."""

    def __init__(self, uds_path: str, *, connect_timeout: float = CONNECT_TIMEOUT,
                 max_handshakes: int = MAX_HANDSHAKES) -> None:
        self.uds_path = uds_path
        self.seqpacket_path = uds_path + SEQPACKET_SUFFIX
        self.connect_timeout = connect_timeout
        self.max_handshakes = max_handshakes
        self.host: VsockHost | None = None
        self._listeners: list[tuple[socket.socket, str, int]] = []
        self._handshakes: dict[int, _Handshake] = {}
        self.dgram_path = uds_path + DGRAM_SUFFIX
        self._dgram: socket.socket | None = None
        self._dgram_source = re.compile(re.escape(uds_path) + r"_([0-9]+)" + re.escape(DGRAM_SUFFIX))

    # -- VsockBackend: lifetime ------------------------------------------------------------
    def attach(self, host: VsockHost) -> None:
        """Take the device's host face; bind ``uds_path`` and
        ``uds_path.seqpacket`` (ConfigError if either is in use)."""
        self.host = host
        self.metrics = host.metrics
        self.host_errors = host.host_errors
        for path, vtype in ((self.uds_path, STREAM), (self.seqpacket_path, SEQPACKET)):
            self._listeners.append((_bind_listener(path, _SOCK_TYPE[vtype]), path, vtype))
        if host.datagrams:
            self._dgram = _bind_listener(self.dgram_path, socket.SOCK_DGRAM)

    def start(self) -> None:
        """Start accepting on both listeners, and reading host datagrams (loop thread)."""
        for sock, _path, vtype in self._listeners:
            self.host.add_reader(sock.fileno(), lambda s=sock, t=vtype: self._on_accept(s, t))
        if self._dgram is not None:
            self.host.add_reader(self._dgram.fileno(), self._on_datagrams)

    def stop(self) -> None:
        """Close and unlink both listeners and the datagram socket, drop unfinished
        handshakes (idempotent)."""
        if self._dgram is not None:
            self._listeners.append((self._dgram, self.dgram_path, 0))
            self._dgram = None
        for sock, path, _vtype in self._listeners:
            self.host.remove_fd(sock.fileno())
            sock.close()
            try:
                os.unlink(path)
            except OSError:
                pass
        self._listeners.clear()
        for hs in list(self._handshakes.values()):
            self._drop(hs)

    # -- host -> guest: the CONNECT handshake --------------------------------------------
    def _on_accept(self, listener: socket.socket, vtype: int) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:       # e.g. EMFILE: pause this listener, then try again
                self.host_errors.report("accept on the vsock uds listener failed", str(e))
                self.metrics["host_errors"] += 1
                self.host.remove_fd(listener.fileno())
                self.host.call_later(ACCEPT_RETRY, self._resume_accept, listener, vtype)
                return
            self.metrics["unix_accepted"] += 1
            if len(self._handshakes) >= self.max_handshakes:
                oldest = next(iter(self._handshakes.values()))     # dicts keep insertion order
                self._drop(oldest)
                self.metrics["unix_handshake_errors"] += 1
                self.host_errors.report("oldest Unix peer in the CONNECT handshake closed "
                                        "(MAX_HANDSHAKES pending)")
            sock.setblocking(False)
            hs = _Handshake(sock, vtype)
            self._handshakes[sock.fileno()] = hs
            hs.timer = self.host.call_later(self.connect_timeout, self._handshake_timeout, hs)
            self.host.add_reader(sock.fileno(), lambda h=hs: self._on_handshake_readable(h))

    def _handshake_timeout(self, hs: _Handshake) -> None:
        """The CONNECT timer fired.  A loop turn that ran long (a busy I/O thread, a
        loaded host) can reach this timer while a line that arrived in time still sits
        unread in the socket: read what is there first, and fail only if the line is
        still not complete.  A peer that never finishes its line is closed as before."""
        hs.timer = None
        self._on_handshake_readable(hs)
        if self._handshakes.get(hs.sock.fileno()) is hs:
            self._fail(hs, "CONNECT line not finished in time")

    def _on_handshake_readable(self, hs: _Handshake) -> None:
        try:
            line = self._read_line(hs)
        except (BlockingIOError, InterruptedError):
            return
        except _HandshakeError as e:
            self._fail(hs, str(e))
            return
        except OSError as e:
            self._fail(hs, "Unix connection failed during the CONNECT handshake", str(e))
            return
        if line is None:
            return                      # not finished yet
        port = parse_connect_line(line)
        if port is None:
            self._fail(hs, "not a CONNECT <port> line", repr(bytes(line)))
            return
        self._drop(hs, close=False)
        stream = SocketStream(hs.sock)
        if not self.host.connect_host(port, hs.vtype, stream,
                                      preamble=lambda local_port: f"OK {local_port}\n".encode()):
            self._fail_sock(hs.sock, "host connection refused (table full or type not negotiated)")

    def _read_line(self, hs: _Handshake) -> bytes | None:
        """The complete CONNECT line, None if more must come; raises on failure."""
        room = CONNECT_LINE_MAX - len(hs.line)
        if hs.vtype == SEQPACKET:
            buf = bytearray(CONNECT_LINE_MAX)
            size = hs.sock.recv_into(buf, 0, socket.MSG_TRUNC)
            if size > CONNECT_LINE_MAX:
                raise _HandshakeError("CONNECT line longer than 32 bytes")
            if size == 0 or buf[size - 1] != ord("\n"):
                raise _HandshakeError("CONNECT record is empty or does not end in a newline")
            return bytes(buf[:size])
        peeked = hs.sock.recv(room, socket.MSG_PEEK)
        if not peeked:
            raise _HandshakeError("Unix peer closed before finishing its CONNECT line")
        end = peeked.find(b"\n")
        take = end + 1 if end >= 0 else len(peeked)
        hs.line += hs.sock.recv(take)   # exactly what we peeked: payload stays in the socket
        if end >= 0:
            return bytes(hs.line)
        if len(hs.line) >= CONNECT_LINE_MAX:
            raise _HandshakeError("CONNECT line longer than 32 bytes")
        return None

    def _fail(self, hs: _Handshake, reason: str, detail: str = "") -> None:
        self._drop(hs, close=False)
        self._fail_sock(hs.sock, reason, detail)

    def _fail_sock(self, sock: socket.socket, reason: str, detail: str = "") -> None:
        self.metrics["unix_handshake_errors"] += 1
        self.host_errors.report(reason, detail)
        sock.close()

    def _drop(self, hs: _Handshake, close: bool = True) -> None:
        fd = hs.sock.fileno()
        if self._handshakes.get(fd) is hs:
            del self._handshakes[fd]
            self.host.remove_fd(fd)
        if hs.timer is not None:
            hs.timer.cancel()
        if close:
            hs.sock.close()

    def _resume_accept(self, listener: socket.socket, vtype: int) -> None:
        if listener.fileno() >= 0:      # not closed by stop() meanwhile
            self.host.add_reader(listener.fileno(), lambda: self._on_accept(listener, vtype))
            self._on_accept(listener, vtype)

    # -- datagrams (draft mode) -------------------------------------------------------------
    def _on_datagrams(self) -> None:
        """Host datagrams on ``uds_path.dgram``: ``<guest port>\\n<payload>`` each; the
        source port is Q if the sender is bound at ``<uds_path>_<Q>.dgram``, else
        VMADDR_PORT_ANY (the guest cannot answer)."""
        for _ in range(_DGRAM_BATCH):
            try:
                data, _anc, flags, addr = self._dgram.recvmsg(DGRAM_MAX_PAYLOAD + CONNECT_LINE_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.host_errors.report("recvmsg on the vsock datagram socket failed", str(e))
                return
            line, nl, payload = data.partition(b"\n")
            port = int(line) if nl and _PORT.fullmatch(line.decode("ascii", "replace")) else None
            if port is None or port > 0xFFFF_FFFF or flags & socket.MSG_TRUNC or len(payload) > DGRAM_MAX_PAYLOAD:
                self.host_errors.report("host datagram without a '<port>\\n' line, or too large (dropped)",
                                        repr(data[:CONNECT_LINE_MAX]))
                self.metrics["dgram_dropped"] += 1
                continue
            source = self._dgram_source.fullmatch(addr) if isinstance(addr, str) else None
            src_port = int(source.group(1)) if source else VMADDR_PORT_ANY
            self.host.send_datagram(src_port if src_port <= 0xFFFF_FFFF else VMADDR_PORT_ANY, port, payload)

    def datagram_to_host(self, port: int, peer: tuple[int, int], data: bytes) -> bool | None:
        """A guest datagram: to ``<uds_path>_<port>.dgram`` as ``<guest port>\\n<payload>``,
        sent from ``uds_path.dgram`` (where answers go).  None if nobody is bound there."""
        if self._dgram is None:
            return None
        path = f"{self.uds_path}_{port}{DGRAM_SUFFIX}"
        try:
            self._dgram.sendto(b"%d\n" % peer[1] + data, path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except BlockingIOError:
            return False                # the receiver's queue is full
        except OSError as e:
            self.host_errors.report("send to <uds_path>_<port>.dgram failed", f"{path}: {e}")
            return False
        return True

    # -- VsockBackend: guest -> host, <uds_path>_<port> ------------------------------------
    def connect_guest(self, port: int, vtype: int, peer: tuple[int, int]) -> HostStream | None:
        path = f"{self.uds_path}_{port}"
        sock = socket.socket(socket.AF_UNIX, _SOCK_TYPE[vtype] | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)         # AF_UNIX: completes at once, or EAGAIN if the backlog is full
        except OSError as e:
            sock.close()
            if not isinstance(e, FileNotFoundError):
                self.host_errors.report("connect to <uds_path>_<port> failed", f"{path}: {e}")
            return None
        return SocketStream(sock)


# --- the Python API ---------------------------------------------------------------------

class VsockListener:
    """Guest connections to CID 2 ``port``, delivered in Python (``VsockApi.listen``).

    ``accept(timeout)`` returns ``(socket, (guest_cid, guest_port))``: a
    blocking AF_UNIX socket (SOCK_STREAM or SOCK_SEQPACKET) connected to the
    guest's socket.  At most ``backlog`` connections wait for accept(); a
    guest REQUEST beyond that gets an RST.
    """

    def __init__(self, api: VsockApi, port: int, vtype: int, backlog: int) -> None:
        self.api = api
        self.port = port
        self.type = vtype
        self._queue: queue.Queue = queue.Queue(maxsize=backlog)
        self.closed = False

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, tuple[int, int]]:
        """The next guest connection; TimeoutError after ``timeout`` seconds."""
        if self.closed:
            raise OSError("vsock listener is closed")
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no guest connection to port {self.port} within {timeout} s") from None

    def _offer(self, sock: socket.socket, peer: tuple[int, int]) -> bool:
        if self.closed:
            return False
        try:
            self._queue.put_nowait((sock, peer))
            return True
        except queue.Full:
            return False

    def close(self) -> None:
        self.closed = True
        self.api._unlisten(self)
        while True:
            try:
                sock, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            sock.close()

    def __enter__(self) -> VsockListener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VsockDatagram:
    """Datagrams on host port ``port`` (draft mode, ``VsockApi.dgram``).

    ``sendto(data, guest_port)`` queues one datagram (at most 4096 bytes) for the
    guest, fire and forget (a drop is counted in ``dgram_dropped``);
    ``recvfrom(timeout)`` returns ``(data, (guest_cid, guest_port))`` of the next
    guest datagram to ``port`` (TimeoutError).  Guest datagrams that find the
    queue full (the socket buffer of an internal socket pair) are dropped.
    """

    _PEER = struct.Struct("<II")

    def __init__(self, api: VsockApi, port: int) -> None:
        self.api = api
        self.port = port
        self._user, self._ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._ours.setblocking(False)
        self.closed = False

    def sendto(self, data: bytes, guest_port: int) -> None:
        if self.closed:
            raise OSError("vsock datagram socket is closed")
        if not 0 <= guest_port <= 0xFFFF_FFFF:
            raise ValueError(f"vsock port {guest_port} is not a u32")
        if len(data) > DGRAM_MAX_PAYLOAD:
            raise ValueError(f"a vsock datagram holds at most {DGRAM_MAX_PAYLOAD} bytes")
        host = self.api.host
        host.call_soon_threadsafe(host.send_datagram, self.port, guest_port, bytes(data))

    def recvfrom(self, timeout: float | None = None) -> tuple[bytes, tuple[int, int]]:
        self._user.settimeout(timeout)
        try:
            msg = self._user.recv(DGRAM_MAX_PAYLOAD + self._PEER.size)
        except (socket.timeout, BlockingIOError):
            raise TimeoutError(f"no guest datagram to port {self.port} within {timeout} s") from None
        return msg[self._PEER.size:], self._PEER.unpack_from(msg)

    def _deliver(self, peer: tuple[int, int], data: bytes) -> bool:
        try:
            self._ours.send(self._PEER.pack(*peer) + data)
            return True
        except OSError:                 # full (BlockingIOError), or closed
            return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.api._undgram(self)
            self._user.close()
            self._ours.close()

    def __enter__(self) -> VsockDatagram:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VsockApi(VsockBackend):
    """The Python face of the device (see the module docstring); a
    VsockBackend; thread-safe."""

    def __init__(self) -> None:
        self._host: VsockHost | None = None
        self._listeners: dict[int, VsockListener] = {}
        self._dgrams: dict[int, VsockDatagram] = {}
        self._lock = threading.Lock()

    # -- VsockBackend: lifetime -------------------------------------------------------------
    def attach(self, host: VsockHost) -> None:
        self._host = host

    def start(self) -> None:
        """Nothing to start: the API serves its callers' calls."""

    def stop(self) -> None:
        """Nothing to release: listeners are their callers' to close."""

    @property
    def host(self) -> VsockHost:
        if self._host is None:
            raise RuntimeError("this VsockApi is not attached to a vsock device")
        return self._host

    # -- host -> guest ----------------------------------------------------------------
    def connect_async(self, port: int, type: int = STREAM) -> concurrent.futures.Future:
        """Start connecting to guest ``port``; the Future gives the socket, or
        raises ConnectionRefusedError (guest RST, no answer in time, no room)."""
        host = self.host
        vtype = VirtioVsockType(type)
        if not 0 <= port <= 0xFFFF_FFFF:
            raise ValueError(f"vsock port {port} is not a u32")
        user, ours = socket.socketpair(socket.AF_UNIX, _SOCK_TYPE[vtype])
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def on_connect(ok: bool) -> None:
            if ok and fut.set_running_or_notify_cancel():
                fut.set_result(user)
                return
            user.close()
            if not fut.done() and fut.set_running_or_notify_cancel():
                fut.set_exception(ConnectionRefusedError(f"guest refused vsock port {port}"))

        def start() -> None:
            if not host.connect_host(port, vtype, SocketStream(ours), on_connect=on_connect):
                ours.close()
                on_connect(False)

        host.call_soon_threadsafe(start)
        return fut

    def connect(self, port: int, type: int = STREAM,
                timeout: float = CONN_REQUEST_TIMEOUT + 3.0) -> socket.socket:
        """Connect to guest ``port`` and return the connected (blocking) socket.

        Needs the machine's I/O thread running (``Machine.start()``), and must
        not be called on it.  Raises ConnectionRefusedError if the guest
        answers RST or not at all.
        """
        if not self.host.may_block():
            raise RuntimeError("VsockApi.connect needs the I/O thread and must not run on it; "
                               "use connect_async() and drive the loop instead")
        fut = self.connect_async(port, type)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            if not fut.cancel():    # resolved meanwhile, or running: close a late socket
                fut.add_done_callback(lambda f: f.exception() is None and f.result().close())
            raise TimeoutError(f"vsock connect to guest port {port} timed out") from None

    # -- guest -> host ------------------------------------------------------------------
    def listen(self, port: int, type: int = STREAM, backlog: int = 16) -> VsockListener:
        """Serve guest connections to CID 2 ``port`` in Python."""
        vtype = VirtioVsockType(type)
        if not 0 <= port <= 0xFFFF_FFFF or backlog < 1:
            raise ValueError("vsock port must be a u32 and backlog >= 1")
        with self._lock:
            if port in self._listeners:
                raise OSError(f"vsock port {port} already has a Python listener")
            listener = self._listeners[port] = VsockListener(self, port, vtype, backlog)
        return listener

    def _unlisten(self, listener: VsockListener) -> None:
        with self._lock:
            if self._listeners.get(listener.port) is listener:
                del self._listeners[listener.port]

    def connect_guest(self, port: int, vtype: int, peer: tuple[int, int]) -> HostStream | None:
        """VsockBackend: a guest REQUEST to ``port`` (loop thread)."""
        with self._lock:
            listener = self._listeners.get(port)
        if listener is None or listener.type != vtype:
            return None
        user, ours = socket.socketpair(socket.AF_UNIX, _SOCK_TYPE[vtype])
        if not listener._offer(user, peer):
            user.close()
            ours.close()
            raise ConnectionRefusedError("Python listener backlog full")
        return SocketStream(ours)

    # -- datagrams (draft mode) -------------------------------------------------------------
    def dgram(self, port: int) -> VsockDatagram:
        """Send and receive datagrams on host port ``port`` (proto=rfc2013 only)."""
        if not self.host.datagrams:
            raise OSError("vsock datagrams need proto=rfc2013")
        if not 0 <= port <= 0xFFFF_FFFF:
            raise ValueError(f"vsock port {port} is not a u32")
        with self._lock:
            if port in self._dgrams:
                raise OSError(f"vsock datagram port {port} is already bound in Python")
            dgram = self._dgrams[port] = VsockDatagram(self, port)
        return dgram

    def _undgram(self, dgram: VsockDatagram) -> None:
        with self._lock:
            if self._dgrams.get(dgram.port) is dgram:
                del self._dgrams[dgram.port]

    def datagram_to_host(self, port: int, peer: tuple[int, int], data: bytes) -> bool | None:
        """VsockBackend: a guest datagram to ``port`` (loop thread)."""
        with self._lock:
            dgram = self._dgrams.get(port)
        return None if dgram is None else dgram._deliver(peer, data)

    # -- observing ----------------------------------------------------------------------
    def counters(self) -> dict:
        """A snapshot of the device's counters (see ``device.counters()``)."""
        return self.host.counters()

    def transport_reset(self) -> None:
        """Post VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and drop every connection."""
        self.host.transport_reset()


def default_backends(uds_path: str | None, forwards: Sequence = ()) -> tuple[VsockApi, list]:
    """The host ends a machine gives its vsock device, in the order they are
    asked for guest connects: the Python API (its listeners come first), then
    TCP forwarding if ``forwards`` (:class:`~pyvmm.vsock.tcp.TcpForwardBackend`: the
    ports the command line names), then Firecracker's Unix socket if ``uds_path``
    (the catch-all ``<uds_path>_<port>`` convention).  The most specific claim on a
    port wins: a listener a program opened at run time, then a port named in
    ``--forward``, then whatever file happens to exist.  Returns (the API, the list)."""
    api = VsockApi()
    backends: list = [api]
    if forwards:
        from .tcp import TcpForwardBackend      # tcp imports this module
        backends.append(TcpForwardBackend(forwards))
    if uds_path:
        backends.append(UnixBackend(uds_path))
    return api, backends
