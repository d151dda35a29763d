"""TCP forwarding: host TCP addresses <-> guest vsock ports (``pyvmm run --forward``).

This module owns the TCP host end of the vsock device: a
:class:`~pyvmm.vsock.backend.VsockBackend`, :class:`TcpForwardBackend`, a sibling of
the Unix one (:mod:`pyvmm.vsock.unix`), and the ``--forward`` syntax it is configured
with.  Existing TCP programs on the host (ssh, curl, a browser) reach a guest with no
network device, and guest programs reach host TCP services, with pyvmm as the relay.
There is still no host AF_VSOCK anywhere: the host end of each connection is a TCP
socket, moved by the same :class:`~pyvmm.vsock.unix.SocketStream` as a Unix one
(zero-copy scatter/gather; half-close and hang-up mean the same on TCP).

Two directions, each given as ``--forward FROM=TO`` and repeatable:

* ``tcp:[ADDR:]PORT=vsock:GUESTPORT`` (:class:`TcpToVsock`) -- a host TCP listener on
  ADDR:PORT (ADDR an IP literal, ``[...]`` for IPv6; default 127.0.0.1, loopback only:
  another address exposes the guest's port to whoever reaches it, and pyvmm says so in
  a warning).  PORT 0 lets the kernel choose a free port; the port bound is logged and
  in :attr:`TcpForwardBackend.listening` (``Machine.vsock_forward``).  Each connection
  accepted becomes a host-initiated STREAM connection to the guest's GUESTPORT (no
  CONNECT line: the listener names the port).  If the guest refuses (RST, or no answer
  within CONN_REQUEST_TIMEOUT), the TCP client gets a reset (SO_LINGER 0), the TCP
  way of saying "refused".
* ``vsock:PORT=tcp:HOST:HOSTPORT`` (:class:`VsockToTcp`) -- a guest connection to CID 2
  port PORT is connected, non-blocking, to HOST:HOSTPORT (a name is resolved once, when
  the machine is built: no DNS on the I/O thread).  The guest's RESPONSE waits until the
  TCP connect completes (the muxer holds it: :meth:`VsockHost.guest_connect_done`); a
  refused or unreachable address, or none within :data:`FORWARD_CONNECT_TIMEOUT`,
  gives the guest an RST, as the Unix backend does for a missing ``<uds_path>_<port>``.
  STREAM only: TCP has no records, so a SEQPACKET connect to a forwarded port is
  refused (RST), as Linux refuses a type mismatch.

Bounds (the Unix end's, for TCP peers):

* every connection is one of the device's MAX_CONNECTIONS (1023); a listener stops
  accepting while this backend's own host-initiated connections fill ``max_connections``
  (default MAX_CONNECTIONS) and resumes as one ends: further clients wait in the
  kernel's listen backlog (:data:`FORWARD_LISTEN_BACKLOG`), which is the TCP way of
  pushing back.  A client accepted while the table is full for other reasons (Unix
  peers, guest connections) is reset, and the listener pauses :data:`ACCEPT_RETRY`;
* accept() failing for want of a resource (EMFILE at the fd limit, ENFILE, ENOBUFS,
  ENOMEM) pauses that listener for ACCEPT_RETRY instead of spinning (the pending client
  keeps the socket readable), as the Unix listener does; a guest connect that cannot
  get a socket (EMFILE) is an RST for the guest and a counted host error (the muxer's
  rule for any backend);
* a guest connect to a forwarded port waits at most FORWARD_CONNECT_TIMEOUT for TCP.

``attach`` resolves the targets and binds the listeners: an address in use, one not on
this host, or a name that does not resolve is a ConfigError (``pyvmm run``: one line,
exit 2).  ``start`` starts accepting; ``stop`` closes the listeners.

Counters (the device's): ``tcp_accepted``, ``tcp_listener_paused``, ``tcp_connects``
(guest connections that reached their TCP address), ``tcp_connect_failed``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Sequence

from ..errors import ConfigError
from .backend import VsockBackend, VsockHost
from .connection import HostStream
from .muxer import MAX_CONNECTIONS
from .unix import ACCEPT_RETRY, SocketStream
from .wire import VMADDR_PORT_ANY, VirtioVsockType

__all__ = [
    "FORWARD_CONNECT_TIMEOUT",
    "FORWARD_LISTEN_BACKLOG",
    "TcpForwardBackend",
    "TcpStream",
    "TcpToVsock",
    "VsockToTcp",
    "parse_forward",
]

logger = logging.getLogger("pyvmm.vsock")

STREAM = VirtioVsockType.VIRTIO_VSOCK_TYPE_STREAM

#: seconds a guest connection to a forwarded port waits for its TCP connect; then the
#: guest gets an RST.  Linux's vsock connect gives up after 2 s by default
#: (VSOCK_DEFAULT_CONNECT_TIMEOUT), so a longer wait would only hold a dead entry
FORWARD_CONNECT_TIMEOUT = 2.0
#: the listen(2) backlog of a forward's TCP listener: where clients wait while it pauses
#: (the kernel caps it at net.core.somaxconn)
FORWARD_LISTEN_BACKLOG = 128
#: connections accepted per listener wake-up (the rest wait for the next loop pass)
_ACCEPT_BATCH = 16
_LINGER_RESET = struct.pack("ii", 1, 0)         # SO_LINGER on, 0 s: close() sends an RST


@dataclass(frozen=True)
class TcpToVsock:
    """``tcp:[ADDR:]PORT=vsock:GUESTPORT``: a host TCP listener for guest port ``guest_port``."""
    addr: str
    port: int
    guest_port: int

    def __str__(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"tcp:{host}:{self.port}=vsock:{self.guest_port}"


@dataclass(frozen=True)
class VsockToTcp:
    """``vsock:PORT=tcp:HOST:HOSTPORT``: guest connections to CID 2 ``port`` go to TCP."""
    port: int
    host: str
    host_port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"vsock:{self.port}=tcp:{host}:{self.host_port}"


_USAGE = "expected tcp:[ADDR:]PORT=vsock:GUESTPORT or vsock:PORT=tcp:HOST:PORT"
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>[0-9]+)")


def _number(text: str, high: int, what: str) -> int:
    if not text.isdigit() or not text.isascii() or int(text) > high:
        raise ValueError(f"{what} {text!r} is not a number 0 .. {high}")
    return int(text)


def _vsock_port(text: str) -> int:
    port = _number(text, 0xFFFF_FFFF, "vsock port")
    if port == VMADDR_PORT_ANY:
        raise ValueError("vsock port 4294967295 is VMADDR_PORT_ANY, not a port")
    return port


def parse_forward(text: str) -> TcpToVsock | VsockToTcp:
    """One ``--forward`` value (see the module docstring); ValueError with the reason."""
    left, eq, right = text.partition("=")
    if not eq:
        raise ValueError(_USAGE)
    if left.startswith("tcp:") and right.startswith("vsock:"):
        where = left[4:]
        if where.isdigit():
            addr, port_text = "127.0.0.1", where
        else:
            m = _HOST_PORT.fullmatch(where)
            if m is None:
                raise ValueError(f"listener {left!r}: {_USAGE}")
            addr, port_text = m["v6"] or m["host"], m["port"]
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ValueError(f"listener address {addr!r} is not an IP address "
                                 "(IPv6 in brackets: [::1]:PORT)") from None
            if m["v6"] and ":" not in addr:
                raise ValueError(f"listener address [{addr}]: brackets are for IPv6")
        return TcpToVsock(addr, _number(port_text, 65535, "TCP port"), _vsock_port(right[6:]))
    if left.startswith("vsock:") and right.startswith("tcp:"):
        m = _HOST_PORT.fullmatch(right[4:])
        if m is None:
            raise ValueError(f"target {right!r}: {_USAGE}")
        port = _number(m["port"], 65535, "TCP port")
        if port == 0:
            raise ValueError(f"target {right!r}: TCP port 0 cannot be connected to")
        return VsockToTcp(_vsock_port(left[6:]), m["v6"] or m["host"], port)
    raise ValueError(_USAGE)


class TcpStream(SocketStream):
    """A TCP socket as a HostStream that tells its backend when the muxer closes it.

    ``connecting`` is True while a guest connection's TCP connect is under way (the
    muxer holds the guest's RESPONSE meanwhile, see :mod:`pyvmm.vsock.backend`)."""

    def __init__(self, sock: socket.socket, on_close, *, from_listener: bool) -> None:
        super().__init__(sock)
        self.connecting = False
        #: accepted on a listener (counted in TcpForwardBackend.live), not a guest's connect
        self.from_listener = from_listener
        self._on_close = on_close

    def reset_on_close(self) -> None:
        """Make close() send an RST, not a FIN (the TCP peer sees ECONNRESET)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)              # while the fd is still open
        super().close()


class _Listener:
    """One ``tcp:...=vsock:...`` listener and whether it is paused."""

    def __init__(self, forward: TcpToVsock, sock: socket.socket) -> None:
        self.forward = forward
        self.sock = sock
        self.fd = sock.fileno()
        self.serving = False            # registered with the loop
        self.retry = None               # the ACCEPT_RETRY timer while paused for it


class _Pending:
    """A guest connection whose TCP connect is under way."""

    def __init__(self, key: tuple[int, int], timer) -> None:
        self.key = key
        self.timer = timer


class TcpForwardBackend(VsockBackend):
    """TCP forwarding (see the module docstring); a VsockBackend."""

    def __init__(self, forwards: Sequence[TcpToVsock | VsockToTcp], *,
                 max_connections: int = MAX_CONNECTIONS,
                 connect_timeout: float = FORWARD_CONNECT_TIMEOUT) -> None:
        self.to_guest = [f for f in forwards if isinstance(f, TcpToVsock)]
        self.to_host: dict[int, VsockToTcp] = {}
        for f in forwards:
            if isinstance(f, VsockToTcp):
                if f.port in self.to_host:
                    raise ConfigError(f"--forward {f}: vsock port {f.port} is forwarded twice")
                self.to_host[f.port] = f
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.host: VsockHost | None = None
        self._listeners: list[_Listener] = []
        #: (forward, (address, port) bound) per listener, after attach()
        self.listening: list[tuple[TcpToVsock, tuple]] = []
        self._targets: dict[int, tuple[int, tuple]] = {}    # vsock port -> (family, sockaddr)
        #: host-initiated connections of our listeners that are open (streams not closed)
        self.live = 0
        self._pending: dict[TcpStream, _Pending] = {}

    # -- VsockBackend: lifetime -------------------------------------------------------------
    def attach(self, host: VsockHost) -> None:
        """Resolve the targets and bind the listeners (ConfigError on any failure)."""
        self.host = host
        self.metrics = host.metrics
        self.host_errors = host.host_errors
        for port, f in self.to_host.items():
            try:
                family, _type, _proto, _name, addr = socket.getaddrinfo(
                    f.host, f.host_port, type=socket.SOCK_STREAM)[0]
            except (OSError, UnicodeError) as e:
                raise ConfigError(f"--forward {f}: cannot resolve {f.host!r}: {e}") from None
            self._targets[port] = (family, addr)
        for f in self.to_guest:
            family = socket.AF_INET6 if ":" in f.addr else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # not TIME_WAIT; a listener still refuses
                sock.bind((f.addr, f.port))
                sock.listen(FORWARD_LISTEN_BACKLOG)
            except OSError as e:
                sock.close()
                raise ConfigError(f"--forward {f}: cannot listen on TCP {f.addr} port {f.port}: "
                                  f"{e.strerror or e}") from None
            self._listeners.append(_Listener(f, sock))
            self.listening.append((f, sock.getsockname()[:2]))
            if not ipaddress.ip_address(f.addr).is_loopback:
                logger.warning("--forward %s: listening on a non-loopback address: whoever "
                               "reaches it reaches guest port %d", f, f.guest_port)

    def start(self) -> None:
        """Start accepting (loop thread)."""
        for lst in self._listeners:
            self._serve(lst)

    def stop(self) -> None:
        """Close the listeners; forget connects under way (idempotent, loop thread)."""
        for lst in self._listeners:
            if lst.retry is not None:
                lst.retry.cancel()
                lst.retry = None
            if lst.serving and self.host is not None:
                self.host.remove_fd(lst.fd)
            lst.serving = False
            lst.sock.close()
        self._listeners.clear()
        for stream in list(self._pending):
            self._forget_pending(stream)

    # -- host -> guest: the listeners ---------------------------------------------------------
    def _serve(self, lst: _Listener) -> None:
        if not lst.serving and lst.sock.fileno() >= 0:
            lst.serving = True
            self.host.add_reader(lst.fd, lambda: self._on_accept(lst))

    def _pause(self, lst: _Listener, retry: bool) -> None:
        """Stop accepting on ``lst``: until ACCEPT_RETRY passed (``retry``), or until one
        of our connections ends (:meth:`_stream_closed`)."""
        if lst.serving:
            lst.serving = False
            self.host.remove_fd(lst.fd)
            self.metrics["tcp_listener_paused"] += 1
        if retry and lst.retry is None:
            lst.retry = self.host.call_later(ACCEPT_RETRY, self._retry, lst)

    def _retry(self, lst: _Listener) -> None:
        lst.retry = None
        if self.live < self.max_connections:
            self._serve(lst)
            self._on_accept(lst)

    def _on_accept(self, lst: _Listener) -> None:
        for _ in range(_ACCEPT_BATCH):
            if self.live >= self.max_connections:
                self._pause(lst, retry=False)       # resumed when a connection ends
                return
            try:
                sock, _addr = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue                        # that client gave up while queued
                # EMFILE at the fd limit (ENFILE, ENOBUFS, ENOMEM): the client stays queued
                # and the listener readable; pause rather than spin
                self.host_errors.report("accept on a --forward TCP listener failed", str(e))
                self.metrics["host_errors"] += 1
                self._pause(lst, retry=True)
                return
            self.metrics["tcp_accepted"] += 1
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # we relay whole runs already
            self.live += 1
            stream = TcpStream(sock, self._stream_closed, from_listener=True)
            stream.reset_on_close()                 # until the guest accepts: a refusal is a reset

            def on_connect(ok: bool, stream=stream) -> None:
                if ok:                              # from now on a close is a normal FIN
                    try:
                        stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
                    except OSError:
                        pass

            if not self.host.connect_host(lst.forward.guest_port, STREAM, stream, on_connect=on_connect):
                self.host_errors.report("--forward TCP client reset: the vsock connection table "
                                        "is full", str(lst.forward))
                stream.close()                      # a reset; live drops again
                self._pause(lst, retry=True)
                return

    def _stream_closed(self, stream: TcpStream) -> None:
        """The muxer closes ``stream`` (its connection ended; or we do)."""
        if stream in self._pending:                 # the guest gave up while TCP connected
            self._forget_pending(stream)
        if not stream.from_listener:
            return
        self.live -= 1
        if self.live < self.max_connections:
            for lst in self._listeners:             # registered again: clients queued in the
                if not lst.serving and lst.retry is None:   # backlog make it readable at once
                    self._serve(lst)

    # -- guest -> host: connect to the forwarded address ---------------------------------
    def connect_guest(self, port: int, vtype: int, peer: tuple[int, int]) -> HostStream | None:
        forward = self.to_host.get(port)
        if forward is None:
            return None
        if vtype != STREAM:
            raise ConnectionRefusedError(f"--forward {forward}: TCP carries STREAM connections only")
        family, addr = self._targets[port]
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            err = sock.connect_ex(addr)
        except OSError as e:
            err = e.errno
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._connect_failed(forward, _strerror(err))
            raise ConnectionRefusedError(f"--forward {forward}: {_strerror(err)}")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = TcpStream(sock, self._stream_closed, from_listener=False)
        if err == 0:                                # connected at once: nothing to wait for
            self.metrics["tcp_connects"] += 1
            return stream
        stream.connecting = True
        key = (port, peer[1])
        timer = self.host.call_later(self.connect_timeout, self._connect_timed_out, stream)
        self._pending[stream] = _Pending(key, timer)
        self.host.add_writer(stream.fileno(), lambda: self._on_connect_writable(stream))
        return stream

    def _on_connect_writable(self, stream: TcpStream) -> None:
        pending = self._pending.get(stream)
        if pending is None:
            return
        err = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._forget_pending(stream)
        stream.connecting = False
        forward = self.to_host[pending.key[0]]
        if err:
            self._connect_failed(forward, _strerror(err))
        else:
            self.metrics["tcp_connects"] += 1
        self.host.guest_connect_done(*pending.key, stream, not err)

    def _connect_timed_out(self, stream: TcpStream) -> None:
        pending = self._pending.get(stream)
        if pending is None:
            return
        pending.timer = None
        self._forget_pending(stream)
        self._connect_failed(self.to_host[pending.key[0]],
                             f"no connection within {self.connect_timeout:g} s")
        self.host.guest_connect_done(*pending.key, stream, False)

    def _forget_pending(self, stream: TcpStream) -> None:
        pending = self._pending.pop(stream)
        if pending.timer is not None:
            pending.timer.cancel()
        if self.host is not None and stream.sock.fileno() >= 0:
            self.host.remove_writer(stream.sock.fileno())

    def _connect_failed(self, forward: VsockToTcp, why) -> None:
        self.metrics["tcp_connect_failed"] += 1
        self.host_errors.report("--forward connect to a host TCP address failed (guest RST)",
                                f"{forward}: {why}")


def _strerror(err: int) -> str:
    return f"{errno.errorcode.get(err, err)} ({os.strerror(err)})"
