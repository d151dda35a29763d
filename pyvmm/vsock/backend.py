"""The seam between the vsock device and its host ends: ``VsockBackend`` and ``VsockHost``.

This module owns the contract, and only the contract, between
:class:`~pyvmm.vsock.device.VsockDevice` and the things on the host side of
the guest's CID 2 (Firecracker ``vsock/mod.rs``, ``VsockBackend``; virtio
1.2 §5.10 says nothing about the host side).  A backend is one way host
programs reach the guest and the guest reaches them:

* :class:`~pyvmm.vsock.unix.UnixBackend` -- Firecracker's Unix-socket
  convention (``CONNECT <port>`` on ``uds_path``, ``<uds_path>_<port>``);
* :class:`~pyvmm.vsock.unix.VsockApi` -- the Python API (``connect``,
  ``listen``, ``counters``, ``transport_reset``);
* :class:`~pyvmm.vsock.tcp.TcpForwardBackend` -- TCP forwarding (``--forward``):
  host TCP listeners whose connections reach guest ports, and guest ports of
  CID 2 connected to host TCP addresses.

The device is *given* its backends (``VsockDevice(guest_cid, backends)``) and
never builds one; the machine builds them.  A backend reaches the device only
through the :class:`VsockHost` it is attached to -- never the muxer, the
queues or the loop object themselves -- and the device reaches a backend
only through :class:`VsockBackend`.

Life of a backend, as the device drives it::

    backend.attach(host)     once, from VsockDevice.attach_loop(), on the
                             machine's thread before the I/O loop runs:
                             take the host; acquire host resources (bind a
                             socket) -- a ConfigError here fails the machine's
                             construction (CLI exit 2)
    backend.start()          on the I/O loop thread (or inline before it
                             runs): start serving (register fds, timers)
    backend.connect_guest(port, vtype, peer)
                             on the I/O loop thread, for each guest REQUEST
                             to CID 2 that no earlier backend took
    backend.stop()           on the I/O loop thread (or inline after it
                             stopped): stop serving, release what attach()
                             and start() acquired; idempotent, and safe even
                             if attach() failed or start() never came

Guest-initiated connections: the device asks its backends *in the order it
was given them* (the machine gives ``[VsockApi, TcpForwardBackend,
UnixBackend]``, :func:`~pyvmm.vsock.unix.default_backends`: Python listeners
first, then the ``--forward vsock:PORT=tcp:...`` ports, then
``<uds_path>_<port>``; the most specific claim first: a listener a program
opened at run time, then a port the command line names, then the catch-all
convention).  ``connect_guest`` returns a
connected non-blocking :class:`~pyvmm.vsock.connection.HostStream` (from
then on the muxer owns it, and closes it when the connection ends), None
("not mine": ask the next backend), or raises ConnectionRefusedError ("mine,
but refused": the guest gets an RST at once).  A stream whose connect is
still under way (a TCP connect) has the attribute ``connecting = True``: the
guest's RESPONSE is then held until the backend calls
:meth:`VsockHost.guest_connect_done` (ok: RESPONSE; not ok: RST); the backend
bounds that wait itself, and sees the stream closed if the guest gives up first.

Host-initiated connections: a backend calls
:meth:`VsockHost.connect_host` with a stream it made (on the loop thread).

Datagrams (the 2013 draft only, ``VsockHost.datagrams``): the muxer offers a
guest datagram to each backend in order through ``datagram_to_host(port,
peer, data)`` (None: not mine; True: delivered; False: dropped); a backend
sends one to the guest with :meth:`VsockHost.send_datagram`.  Backends
subclass :class:`VsockBackend` and so inherit "not mine" for datagrams.

Threads: every method of both protocols runs on the I/O loop thread, except
:meth:`VsockHost.call_soon_threadsafe`, :meth:`VsockHost.counters`,
:meth:`VsockHost.transport_reset` and :meth:`VsockHost.may_block`, which any
thread may call -- how a backend with callers of its own (the Python API)
hands work to the loop.
"""

from __future__ import annotations

import collections
from typing import Callable, Protocol

from ..virtio.eventloop import TimerHandle
from ..virtio.queue import GuestErrorLog
from .connection import HostStream
from .muxer import HostService

__all__ = ["VsockBackend", "VsockHost"]


class VsockHost(Protocol):
    """What the device offers its backends (see the module docstring)."""

    #: the device's counters (METRIC_NAMES); a backend counts its own events
    #: there (the Unix backend: "unix_accepted", "unix_handshake_errors")
    metrics: collections.Counter
    #: errors caused by host peers, counted by reason and logged once each
    host_errors: GuestErrorLog
    #: whether the device's protocol has datagrams (the 2013 draft)
    datagrams: bool

    def connect_host(self, port: int, vtype: int, stream: HostStream, *,
                     preamble: Callable[[int], bytes] | None = None,
                     on_connect: Callable[[bool], None] | None = None) -> bool:
        """Start a host-initiated connection to guest ``port`` over ``stream``.

        ``preamble(local_port)`` is written to ``stream`` once the guest
        accepts (the Unix backend's ``OK <port>\\n``); ``on_connect(ok)`` is
        called once with the outcome.  False if it cannot even start (table
        full, a type the driver did not negotiate): the caller closes
        ``stream``.  Loop thread.
        """

    def guest_connect_done(self, local_port: int, peer_port: int, stream: HostStream,
                           ok: bool) -> None:
        """``stream``, returned by ``connect_guest(local_port, vtype, (cid, peer_port))``
        with ``connecting = True``, has connected (``ok``: the guest gets its RESPONSE) or
        failed (the guest gets an RST; the muxer closes ``stream``).  A no-op if the
        connection is gone meanwhile.  Loop thread."""

    def send_datagram(self, src_port: int, dst_port: int, data: bytes) -> bool:
        """Queue a datagram from host ``src_port`` to guest ``dst_port``; False if it
        was dropped (counted): no datagrams, too large, or too many waiting.  Loop thread."""

    # -- the I/O loop, loop thread only -------------------------------------------
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable."""

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is writable (a
        non-blocking TCP connect completing)."""

    def remove_writer(self, fd: int) -> None:
        """Stop calling the writer of ``fd`` (its reader stays)."""

    def remove_fd(self, fd: int) -> None:
        """Forget ``fd`` (readers and writers); call before closing it."""

    def call_later(self, delay: float, callback: Callable, *args) -> TimerHandle:
        """Run ``callback(*args)`` after ``delay`` seconds of the loop's clock."""

    # -- any thread -------------------------------------------------------------------
    def call_soon_threadsafe(self, callback: Callable, *args) -> None:
        """Run ``callback(*args)`` on the loop thread soon; never blocks."""

    def may_block(self) -> bool:
        """True if the loop runs on a thread other than the caller's: only then
        may the caller wait for something the loop does."""

    def counters(self) -> dict:
        """A snapshot of the device's counters (``VsockDevice.counters()``)."""

    def transport_reset(self) -> None:
        """Post VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and drop every connection."""


class VsockBackend(HostService, Protocol):
    """A host end of the device (see the module docstring for the order of calls).

    ``connect_guest(port, vtype, peer) -> HostStream | None`` is inherited
    from :class:`~pyvmm.vsock.muxer.HostService`, the part of a backend the
    muxer sees.
    """

    def attach(self, host: VsockHost) -> None:
        """Take the device's host face; acquire host resources (ConfigError)."""

    def start(self) -> None:
        """Start serving (loop thread)."""

    def stop(self) -> None:
        """Stop serving and release everything; idempotent (loop thread)."""
