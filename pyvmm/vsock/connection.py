"""One vsock connection: the per-connection protocol state machine.

Rule 1 (after h11 ``_state.py``): everything that decides what a single
connection does -- its state, the credit arithmetic both ways, the close
handshake, which packet it owes the guest next -- lives in this file.  The
muxer only routes packets to a :class:`Connection` and moves the resulting
packets into rx buffers; the device only moves buffers.

The connection is generic over its host end, a :class:`HostStream` (in
pyvmm a non-blocking Unix socket, see :mod:`pyvmm.vsock.unix`; in tests
anything with the same five methods), exactly as Firecracker's
``csm/connection.rs`` is generic over ``Read + Write + AsRawFd``.  It never
blocks: the stream is non-blocking, time is passed in (``now``), and it never
registers anything anywhere -- the muxer asks :meth:`Connection.want_read` /
:meth:`want_write` / :attr:`expiry` after every call and arranges the I/O.

Protocol primer (virtio 1.2 §5.10.6; Linux ``virtio_transport_common.c``)
-------------------------------------------------------------------------

*Handshake.*  The initiator sends VIRTIO_VSOCK_OP_REQUEST; the listener
answers VIRTIO_VSOCK_OP_RESPONSE (accepted) or VIRTIO_VSOCK_OP_RST.  The
handshake is data, the wire format's :attr:`~pyvmm.vsock.wire.WireFormat.handshake`:
an alternating sequence of ops, the initiator sending the even-numbered ones
(REQUEST, and in the 2013 draft OFFER), the listener the odd-numbered ones
(RESPONSE; the draft's NEGOTIATE and ATTACH).  ``hs_step`` is the index of
the next op of the sequence; the side that sends the last op is connected
when it goes out, the other when it arrives.  Anything but the expected op
(or an RST) during the handshake is a protocol violation: RST.  The whole
handshake must finish within :data:`CONN_REQUEST_TIMEOUT` of our first
handshake packet (the initiator's REQUEST, the listener's first answer when
more follow), else RST.

*Credit.*  Every packet carries the sender's ``buf_alloc`` (receive buffer
size) and ``fwd_cnt`` (free-running u32: bytes its receiver has consumed).
A sender may have at most ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)``
(wrapping u32; u64 in the draft: the wire's ``counter_mask``) payload bytes in
flight (§5.10.6.3).  Names, from *our*
side of the connection (as in Linux ``struct virtio_vsock_sock``; note that
"tx_cnt" counts bytes we send to the guest, i.e. on the *rx* virtqueue):

==================== ====================================================
``buf_alloc``        what we advertise (:data:`CONN_TX_BUF_SIZE` unless the
                     muxer gives less), the bound on guest bytes we hold
                     for a slow host peer
``fwd_cnt``          guest bytes we have written to the host end
``last_fwd_cnt_to_peer``  the ``fwd_cnt`` in the last packet we sent
``rx_cnt``           guest payload bytes received
``peer_buf_alloc``,  the guest's values from its latest packet
``peer_fwd_cnt``
``tx_cnt``           payload bytes we sent to the guest
==================== ====================================================

We never send the guest more than its window (:meth:`Connection.peer_credit`:
``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)``, 0 if the guest's numbers are
inconsistent).  A guest that sends beyond the window *we advertised*
(``rx_cnt + len - last_fwd_cnt_to_peer > buf_alloc``) breaks the protocol:
RST, counted.  That rule is also what bounds our per-connection buffer: guest
bytes we could not yet write to the host (``rx_cnt - fwd_cnt``) never exceed
``buf_alloc``.  We send VIRTIO_VSOCK_OP_CREDIT_UPDATE when the guest's view
of our free space is low (< :data:`CONN_CREDIT_UPDATE_THRESHOLD`, or a quarter of
``buf_alloc`` if less) and the host
has since consumed enough (>= the threshold, or everything), and in answer to
VIRTIO_VSOCK_OP_CREDIT_REQUEST; any packet we send carries the same news, so
a pending CREDIT_UPDATE is dropped when another packet goes out first.  When
the guest's window is 0 and the host has data, we send one
VIRTIO_VSOCK_OP_CREDIT_REQUEST and stop reading the host until the guest's
numbers move (the draft has no CREDIT_REQUEST: we just wait for them).

*Close* (§5.10.6.5).  VIRTIO_VSOCK_OP_SHUTDOWN carries VIRTIO_VSOCK_SHUTDOWN_RCV/SEND,
sticky.  Whoever has seen both directions finished sends RST; an endpoint
that asked to close and gets no RST sends one itself after a timeout.

*Host -> guest STREAM data* (§5.10.6.4) goes out in runs
(:meth:`Connection.fill_rx_burst`): one ``recvmsg_into`` scatters host
bytes straight into the payload areas of several rx buffers, as many as the
guest's window allows (the last one trimmed to it) and at most
:data:`RX_IOV_MAX` views, then each buffer gets its RW header (``len`` = the
bytes that landed in it).  Control packets and SEQPACKET records go one
packet per buffer, in the order :meth:`Connection._next_packet` defines.

*SEQPACKET* (§5.10.6.6, VIRTIO_VSOCK_F_SEQPACKET).  Message boundaries ride
in RW flags: VIRTIO_VSOCK_SEQ_EOM on the last packet of a message,
VIRTIO_VSOCK_SEQ_EOR as well if the sender used MSG_EOR.  Guest -> host: the
packets of one message are gathered (at most ``buf_alloc`` bytes: Linux
refuses larger messages with EMSGSIZE, and credit enforces it) and written
as ONE record of the SOCK_SEQPACKET host socket (EOR cannot be expressed on
an AF_UNIX socket: every record is one; it is counted in ``seq_eor_rx``).
So a SEQPACKET connection's ``buf_alloc`` is at most the largest record its
host socket takes (``HostStream.max_message``: AF_UNIX refuses one longer
than its send buffer less 32 bytes, so the send buffer is raised to fit the
window where ``net.core.wmem_max`` allows, and one beyond about 4 MiB).
Host -> guest: each record is read whole (at most
:data:`SEQPACKET_MAX_MSG` bytes, else RST) and cut into RW packets that fit
the rx buffers and the guest's window, the last one flagged EOM | EOR.

States (Firecracker's ``ConnState``) and what moves them
-----------------------------------------------------------

::

    state         meaning                                  leaves on
    LOCAL_INIT    host-initiated: handshake under way      last handshake op received -> ESTABLISHED
                  (expiry: CONN_REQUEST_TIMEOUT)           guest RST / other op / timeout -> gone
    PEER_INIT     guest-initiated: handshake under way     last handshake op sent -> ESTABLISHED
                                                           (draft: expiry while OFFER is awaited)
    ESTABLISHED   data both ways                           guest SHUTDOWN -> PEER_CLOSED
                                                           host hung up -> LOCAL_CLOSED
    PEER_CLOSED   guest sent SHUTDOWN (peer_shutdown)      guest finished both ways and our
                                                           buffer drained (or expiry) -> RST
    LOCAL_CLOSED  host hung up: SHUTDOWN(RCV|SEND) sent,   guest RST / guest SHUTDOWN -> gone
                  waiting for the guest's RST               expiry (CONN_SHUTDOWN_TIMEOUT) -> RST
    KILLED        RST owed to the guest (then gone)

    guest packet in a state                          answer
    RST, any state                                   gone, no reply (never RST an RST)
    the next handshake op, when it is the guest's    the next step; the last one in LOCAL_INIT:
      turn (LOCAL_INIT / PEER_INIT)                  ESTABLISHED, host told (``OK <port>``)
    anything else in LOCAL_INIT / PEER_INIT          RST (protocol violation, counted)
    RW within credit, ESTABLISHED / PEER_CLOSED      forwarded (or buffered) to the host
      without SEND
    RW beyond credit                                 RST (counted "guest exceeded credit")
    RW after the guest's SHUTDOWN(SEND)              RST (counted)
    RW in LOCAL_CLOSED                               dropped (the host is gone; a race)
    SHUTDOWN                                         see "Close" above
    CREDIT_UPDATE                                    credit refreshed (all packets do that)
    CREDIT_REQUEST                                   CREDIT_UPDATE owed
    a handshake op (REQUEST, RESPONSE, ...),         RST (counted)
      an unknown op, once open

Host-side half-close is kept: if the host peer only shuts down its write
side (EOF while the socket is not hung up), the guest gets
SHUTDOWN(SEND) and can keep sending; a guest SHUTDOWN(SEND) becomes
``shutdown(SHUT_WR)`` on the host socket once our buffer has drained.  A
host peer that closes entirely (POLLHUP) gets Firecracker's behaviour:
SHUTDOWN(RCV|SEND), then RST after CONN_SHUTDOWN_TIMEOUT unless the guest
answers first.
"""

from __future__ import annotations

import collections
from enum import Enum, IntFlag
from typing import Callable, Protocol, Sequence

from ..virtio.queue import GuestErrorLog
from .packet import RxBuffer
from .wire import (BOTH, EOM, EOR, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_RST, OP_RW, OP_SHUTDOWN, RCV,
                   SEND, SEQPACKET, VIRTIO, VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, VMADDR_CID_HOST, VsockHeader,
                   WireFormat)

__all__ = [
    "CONN_CREDIT_UPDATE_THRESHOLD",
    "CONN_REQUEST_TIMEOUT",
    "CONN_SHUTDOWN_TIMEOUT",
    "CONN_TX_BUF_SIZE",
    "CONN_TX_BUF_SIZE_MIN",
    "Connection",
    "ConnState",
    "HostStream",
    "PendingRx",
    "RX_IOV_MAX",
    "SEQPACKET_MAX_MSG",
    "SEQPACKET_MAX_QUEUED",
]


#: our default ``buf_alloc``: the guest bytes one connection may make us hold for a slow host
#: peer.  Linux's own default (VSOCK_DEFAULT_BUFFER_SIZE); Firecracker's 64 KiB stalls a guest
#: that writes 64 KiB at a time after every write (one credit update per write, measured).
#: The muxer may give a connection less (:data:`CONN_TX_BUF_SIZE_MIN`) under its global bound.
CONN_TX_BUF_SIZE = 256 * 1024
#: the smallest ``buf_alloc`` a connection gets (Firecracker's whole window)
CONN_TX_BUF_SIZE_MIN = 64 * 1024
#: see "Credit" above: as Linux's receiver, a CREDIT_UPDATE once the guest's view of our
#: free space drops below one maximal packet (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE) and the host
#: has consumed at least as much (or everything); a quarter of the window if that is less
CONN_CREDIT_UPDATE_THRESHOLD = 64 * 1024
#: seconds for the handshake from our first packet of it (Firecracker: 2 s for the guest's
#: RESPONSE to our REQUEST; the draft's initiator gives up after 2 s as af_vsock's connect)
CONN_REQUEST_TIMEOUT = 2.0
#: seconds to wait for the guest's RST after a SHUTDOWN (Firecracker: 2 s)
CONN_SHUTDOWN_TIMEOUT = 2.0
#: the largest host SEQPACKET record we deliver to the guest (= VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
SEQPACKET_MAX_MSG = VIRTIO_VSOCK_MAX_PKT_BUF_SIZE
#: the most buffers one ``sendmsg``/``recvmsg_into`` takes (Linux UIO_MAXIOV, IOV_MAX)
IOV_MAX = 1024
#: guest SEQPACKET messages waiting for a full host socket.  Credit bounds their
#: bytes but not their number (empty messages cost no credit): beyond this, RST
SEQPACKET_MAX_QUEUED = 256
#: the most payload views one host read scatters into (Linux ``UIO_MAXIOV``/IOV_MAX = 1024:
#: recvmsg fails with EMSGSIZE beyond it); an rx burst stops adding buffers before it
RX_IOV_MAX = 1024


class ConnState(Enum):
    LOCAL_INIT = "LocalInit"
    PEER_INIT = "PeerInit"
    ESTABLISHED = "Established"
    PEER_CLOSED = "PeerClosed"
    LOCAL_CLOSED = "LocalClosed"
    KILLED = "Killed"


class PendingRx(IntFlag):
    """Packets the connection owes the guest, in the order they are sent."""
    RST = 1
    HANDSHAKE = 2           # the handshake op at hs_step (REQUEST, RESPONSE, NEGOTIATE, ...)
    SHUTDOWN = 4
    RW = 8
    CREDIT_REQUEST = 16
    CREDIT_UPDATE = 32


# The per-packet code works on plain ints (the wire values: see pyvmm.vsock.packet); the
# enums stay the names at the API, in logs and in tests.
P_RST = int(PendingRx.RST)
P_HANDSHAKE = int(PendingRx.HANDSHAKE)
P_SHUTDOWN = int(PendingRx.SHUTDOWN)
P_RW = int(PendingRx.RW)
P_CREDIT_REQUEST = int(PendingRx.CREDIT_REQUEST)
P_CREDIT_UPDATE = int(PendingRx.CREDIT_UPDATE)


class HostStream(Protocol):
    """The host end of a connection: a non-blocking socket-like object.

    ``recv_into_views`` / ``send_views`` raise BlockingIOError when they
    would block and OSError on a dead socket; a 0 from ``recv_into_views``
    is end-of-file.  ``recv_message`` (SEQPACKET only) returns the full
    length of the next record (it may exceed ``len(buf)``: truncated), or
    None at end-of-file.  ``max_message(want)`` (SEQPACKET only) makes room
    for records of ``want`` bytes where it can and returns the largest record
    one send takes.  ``hung_up`` is POLLHUP: the peer closed both ways.
    """

    seqpacket: bool

    def fileno(self) -> int: ...
    def recv_into_views(self, views: list[memoryview]) -> int: ...
    def recv_message(self, buf: memoryview) -> int | None: ...
    def max_message(self, want: int) -> int: ...
    def send_views(self, views: list) -> int: ...
    def shutdown_write(self) -> None: ...
    def hung_up(self) -> bool: ...
    def close(self) -> None: ...


class _TxBuf:
    """Guest bytes waiting for the host socket (STREAM): a bytearray with a
    read offset.  Bounded by the credit rule (never more than buf_alloc)."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0

    def __len__(self) -> int:
        return len(self._data) - self._start

    def extend(self, views: list[memoryview]) -> None:
        for view in views:
            self._data += view

    def view(self) -> memoryview:
        return memoryview(self._data)[self._start:]

    def consume(self, n: int) -> None:
        self._start += n
        if self._start == len(self._data):
            self._data.clear()
            self._start = 0
        elif self._start > 4096 and self._start * 2 > len(self._data):
            del self._data[:self._start]
            self._start = 0

    def clear(self) -> None:
        self._data = bytearray()
        self._start = 0


class Connection:
    """One guest <-> host connection, keyed by (local_port, peer_port).

    ``local_port`` is the host's port (the guest's ``dst_port``), ``peer_port``
    the guest's.  Construct with :meth:`peer_init` (guest REQUEST accepted)
    or :meth:`local_init` (host wants to connect).  ``metrics`` is the
    device's counter table; ``errors``/``host_errors`` log guest / host peer
    mistakes once per reason.
    """

    def __init__(self, *, state: ConnState, peer_cid: int, local_port: int, peer_port: int,
                 vtype: int, stream: HostStream, metrics: collections.Counter,
                 errors: GuestErrorLog, host_errors: GuestErrorLog,
                 peer_buf_alloc: int = 0, peer_fwd_cnt: int = 0, preamble: bytes = b"",
                 buf_alloc: int = CONN_TX_BUF_SIZE, wire: WireFormat = VIRTIO, lane: int = 0,
                 on_connect: Callable[[bool], None] | None = None) -> None:
        self.state = state
        self.wire = wire
        #: the queue pair this connection's packets travel on (0 but in the draft's multiqueue)
        self.lane = lane
        self._handshake = wire.handshake
        self._mask = wire.counter_mask
        #: the index in ``wire.handshake`` of the next handshake op (sent or expected)
        self.hs_step = 0
        self.local_cid = VMADDR_CID_HOST
        self.peer_cid = peer_cid
        self.local_port = local_port
        self.peer_port = peer_port
        self.vtype = vtype
        self.seqpacket = vtype == SEQPACKET
        self.stream = stream
        self.metrics = metrics
        self.errors = errors
        self.host_errors = host_errors
        self.pending = 0
        self.expiry: float | None = None
        #: why the connection is being reset (for logs and tests), or None
        self.kill_reason: str | None = None
        #: True once the connection is finished: the muxer forgets it
        self.done = False
        # credit, see the table in the module docstring
        if self.seqpacket:
            # a guest message goes to the host as ONE record: never advertise a window the
            # host socket cannot take as one (Linux then refuses a larger message with
            # EMSGSIZE; a guest sending one anyway exceeds its credit and is reset)
            buf_alloc = min(buf_alloc, stream.max_message(buf_alloc))
        self.buf_alloc = buf_alloc
        self.credit_update_threshold = min(CONN_CREDIT_UPDATE_THRESHOLD, buf_alloc // 4)
        self.fwd_cnt = 0
        self.last_fwd_cnt_to_peer = 0
        self.rx_cnt = 0
        self.peer_buf_alloc = peer_buf_alloc
        self.peer_fwd_cnt = peer_fwd_cnt
        self.tx_cnt = 0
        self.credit_requested = False
        # close bookkeeping
        self.peer_shutdown = 0     # what the guest said (sticky)
        self.local_shutdown = 0    # what we said (sticky)
        self._shutdown_flags = 0   # the SHUTDOWN we owe
        self._host_eof = False                          # the host will send nothing more
        self._host_write_shut = False                   # we did shutdown(SHUT_WR)
        # guest -> host buffers
        self._preamble = memoryview(preamble) if preamble else None
        self._preamble_armed = False                    # preamble goes out once established
        self._tx_buf = _TxBuf()                         # STREAM
        self._tx_partial = bytearray()                  # SEQPACKET: message being gathered
        self._tx_partial_eor = False
        self._tx_msgs: collections.deque[tuple[bytearray, bool]] = collections.deque()
        # host -> guest SEQPACKET staging
        self._rx_staging: bytearray | None = None
        self._rx_msg: memoryview | None = None
        self._rx_msg_off = 0
        self._on_connect = on_connect

    # -- construction -------------------------------------------------------------
    @classmethod
    def peer_init(cls, hdr: VsockHeader, stream: HostStream, **kw) -> Connection:
        """The guest's REQUEST ``hdr`` was accepted: the next handshake op (RESPONSE) is owed."""
        conn = cls(state=ConnState.PEER_INIT, peer_cid=hdr.src_cid, local_port=hdr.dst_port,
                   peer_port=hdr.src_port, vtype=hdr.type, stream=stream,
                   peer_buf_alloc=hdr.buf_alloc, peer_fwd_cnt=hdr.fwd_cnt, **kw)
        conn.hs_step = 1
        conn.pending = P_HANDSHAKE
        return conn

    @classmethod
    def local_init(cls, *, peer_cid: int, local_port: int, peer_port: int, vtype: int,
                   stream: HostStream, now: float, **kw) -> Connection:
        """The host connects to guest port ``peer_port``: a REQUEST is owed.

        The connection expires CONN_REQUEST_TIMEOUT after the REQUEST goes
        out, and also if the REQUEST cannot go out that long (no rx buffers).
        """
        conn = cls(state=ConnState.LOCAL_INIT, peer_cid=peer_cid, local_port=local_port,
                   peer_port=peer_port, vtype=vtype, stream=stream, **kw)
        conn.pending = P_HANDSHAKE
        conn.expiry = now + CONN_REQUEST_TIMEOUT      # restarted when the REQUEST goes out
        return conn

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    # -- credit -------------------------------------------------------------------
    def peer_credit(self) -> int:
        """Payload bytes the guest can take now: ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)``."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & self._mask
        return self.peer_buf_alloc - in_flight if in_flight <= self.peer_buf_alloc else 0

    def _unforwarded(self) -> int:
        """Guest bytes we hold (buffered, or a partial SEQPACKET message)."""
        return (self.rx_cnt - self.fwd_cnt) & self._mask

    def _guest_may_send(self) -> bool:
        return (self.state in (ConnState.ESTABLISHED, ConnState.PEER_CLOSED)
                and not self.peer_shutdown & SEND)

    def _guest_may_receive(self) -> bool:
        return (self.state in (ConnState.ESTABLISHED, ConnState.PEER_CLOSED)
                and not self.peer_shutdown & RCV)

    def _maybe_credit_update(self) -> None:
        if not self._guest_may_send():
            return
        unadvertised = (self.fwd_cnt - self.last_fwd_cnt_to_peer) & self._mask
        if unadvertised == 0:
            return
        seen_free = self.buf_alloc - ((self.rx_cnt - self.last_fwd_cnt_to_peer) & self._mask)
        threshold = self.credit_update_threshold
        if seen_free < threshold and (unadvertised >= threshold or self._unforwarded() == 0):
            self.pending |= P_CREDIT_UPDATE

    # -- what the muxer asks after every call ---------------------------------------
    def has_pending_rx(self) -> bool:
        return bool(self.pending)

    def want_read(self) -> bool:
        """Poll the host end for input?  Not while a read is already owed (no
        rx buffer yet: level-triggered polling would spin), nor while the
        guest's window is shut and our CREDIT_REQUEST is out."""
        return (self._guest_may_receive() and not self._host_eof
                and not self.pending & (P_RW | P_RST)
                and (not self.credit_requested or self.peer_credit() > 0))

    def want_write(self) -> bool:
        """Poll the host end for output space?  Only while we hold guest bytes."""
        if self.state is ConnState.KILLED or self.done:
            return False
        return bool(self._preamble_armed or len(self._tx_buf) or self._tx_msgs)

    # -- events from the guest ----------------------------------------------------------
    def on_guest_packet(self, hdr: VsockHeader, payload: list[memoryview], now: float) -> None:
        """Absorb one guest packet addressed to this connection (tx virtqueue)."""
        if self.done or self.state is ConnState.KILLED:
            return                      # an RST is already owed
        self.peer_buf_alloc = hdr.buf_alloc
        self.peer_fwd_cnt = hdr.fwd_cnt
        if self.credit_requested and self.peer_credit() > 0:
            self.credit_requested = False
        if self._rx_msg is not None and self.peer_credit() > 0:
            # The rest of a staged host SEQPACKET record can go now.  Nothing
            # else would say so: the host socket has nothing more to read.
            self.pending |= P_RW
        op, state = hdr.op, self.state

        if op == OP_RST:
            self.metrics["rst_received"] += 1
            self._finish(connected=False)
            return
        if state is ConnState.LOCAL_INIT or state is ConnState.PEER_INIT:
            self._guest_handshake(hdr, now)
            return
        rule = _OPEN_RULES.get(op)
        if rule is not None:
            rule(self, hdr, payload, now)
        elif op in self._handshake:
            self._guest_violation("guest handshake op on an open connection", hdr)
        else:
            self._guest_violation("guest packet with an unknown op", hdr)

    def _guest_handshake(self, hdr: VsockHeader, now: float) -> None:
        """A guest packet while the handshake runs: the next op of the sequence, when it
        is the guest's turn (the host initiated: the odd steps; the guest: the even ones)."""
        step = self.hs_step
        guests_turn = (step % 2 == 1) == (self.state is ConnState.LOCAL_INIT)
        if self.pending & P_HANDSHAKE or not guests_turn or hdr.op != self._handshake[step]:
            self._guest_violation("guest packet out of order in the handshake", hdr)
            return
        self.hs_step = step = step + 1
        if step < len(self._handshake):
            self.pending |= P_HANDSHAKE             # our answer (the draft's OFFER / ATTACH)
            return
        self._connected()                           # the guest sent the last op: we initiated
        self._flush(now)

    def _connected(self) -> None:
        self.state = ConnState.ESTABLISHED
        self.expiry = None
        self._preamble_armed = self._preamble is not None
        self._report_connect(True)

    def _guest_credit_update(self, hdr: VsockHeader, payload, now: float) -> None:
        pass                            # every packet's credit fields were taken already

    def _guest_credit_request(self, hdr: VsockHeader, payload, now: float) -> None:
        if self._guest_may_send():
            self.pending |= P_CREDIT_UPDATE

    def on_guest_stream_run(self, run: list, now: float) -> None:
        """Several STREAM RW packets of this connection in a row (the ``TxPacket`` objects of one
        tx batch, in order): what :meth:`on_guest_packet` does for each, with one host
        write (:meth:`_send_to_host` gathers every payload) and one credit decision.

        Only an established connection the guest may still send on, with nothing
        waiting for the host socket, takes this path; anything else goes packet by
        packet, so every rule of the table above applies unchanged.  A packet beyond
        the credit we advertised ends the run: what came before it is forwarded, then
        the connection is reset, as packet by packet.
        """
        if (self.state not in (ConnState.ESTABLISHED, ConnState.PEER_CLOSED) or self.done
                or self.peer_shutdown & SEND or self._preamble_armed or len(self._tx_buf)):
            for pkt in run:
                self.on_guest_packet(pkt.hdr, pkt.payload, now)
            return
        views: list[memoryview] = []
        violation = None
        mask = self._mask
        for pkt in run:
            hdr = pkt.hdr
            if ((self.rx_cnt - self.last_fwd_cnt_to_peer) & mask) + hdr.len > self.buf_alloc:
                violation = hdr
                break
            self.rx_cnt = (self.rx_cnt + hdr.len) & mask
            self.peer_buf_alloc, self.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
            views += pkt.payload
        if self.credit_requested and self.peer_credit() > 0:
            self.credit_requested = False
        if views:
            self._send_to_host(views)
        if violation is not None:
            if not self.done:
                self.peer_buf_alloc, self.peer_fwd_cnt = violation.buf_alloc, violation.fwd_cnt
                self.metrics["credit_violations"] += 1
                self._guest_violation("guest exceeded the credit we advertised", violation)
            return
        self._maybe_credit_update()

    def _guest_rw(self, hdr: VsockHeader, payload: list[memoryview], now: float) -> None:
        if self.state is ConnState.LOCAL_CLOSED:
            self.metrics["tx_dropped_bytes"] += hdr.len   # sent before it saw our SHUTDOWN
            return
        if self.peer_shutdown & SEND:
            self._guest_violation("guest RW after its SHUTDOWN(SEND)", hdr)
            return
        in_flight = (self.rx_cnt - self.last_fwd_cnt_to_peer) & self._mask
        if in_flight + hdr.len > self.buf_alloc:
            self.metrics["credit_violations"] += 1
            self._guest_violation("guest exceeded the credit we advertised", hdr)
            return
        self.rx_cnt = (self.rx_cnt + hdr.len) & self._mask
        if self.seqpacket:
            self._guest_message_part(hdr, payload, now)
        elif hdr.len:
            self._send_to_host(payload)
        self._maybe_credit_update()

    def _send_to_host(self, payload: list[memoryview]) -> None:
        """STREAM: write straight to the host socket (at most :data:`IOV_MAX` views
        per ``sendmsg``); keep what does not fit."""
        written = 0
        total = sum(len(v) for v in payload)
        if not len(self._tx_buf) and not self._preamble_armed:
            try:
                for start in range(0, len(payload), IOV_MAX):
                    part = payload[start:start + IOV_MAX]
                    n = self.stream.send_views(part)
                    written += n
                    if n < sum(len(v) for v in part):
                        break
            except BlockingIOError:
                pass
            except OSError as e:
                self._forwarded(written)
                self._host_failed("host socket write failed", e)
                return
            self._forwarded(written)
        if written < total:
            rest = [bytes(v) for v in _skip(payload, written)]   # the one copy: guest RAM is reused
            self._tx_buf.extend([memoryview(b) for b in rest])
            self.metrics["tx_buffered_bytes"] += total - written

    def _guest_message_part(self, hdr: VsockHeader, payload: list[memoryview], now: float) -> None:
        """SEQPACKET: gather until VIRTIO_VSOCK_SEQ_EOM, then one host record."""
        eom = bool(hdr.flags & EOM)
        eor = bool(hdr.flags & EOR)
        if eor:
            self.metrics["seq_eor_rx"] += 1
        if eom and not self._tx_partial and not self._tx_msgs and not self._preamble_armed:
            try:                                            # zero-copy fast path
                sent = self.stream.send_views(payload)
            except BlockingIOError:
                sent = None
            except OSError as e:
                self._host_failed("host SEQPACKET write failed", e)
                return
            if sent is not None:
                self._forwarded(hdr.len, messages=1)
                return
        for view in payload:
            self._tx_partial += view
        if eom:
            if len(self._tx_msgs) >= SEQPACKET_MAX_QUEUED:
                self._guest_violation("guest queued too many SEQPACKET messages for a full host socket", hdr)
                return
            self._tx_msgs.append((self._tx_partial, eor))
            self._tx_partial = bytearray()
            self._flush(now)

    def _guest_shutdown(self, hdr: VsockHeader, payload, now: float) -> None:
        self.peer_shutdown |= hdr.flags & BOTH
        if hdr.flags & ~BOTH:
            self.errors.report("guest SHUTDOWN with undefined flags", hdr.describe())
        if self.state is ConnState.LOCAL_CLOSED:
            self._reset("guest SHUTDOWN after ours")   # both sides are done: RST now
            return
        self.state = ConnState.PEER_CLOSED
        if self.peer_shutdown & SEND:
            self.pending &= ~(P_CREDIT_UPDATE | P_CREDIT_REQUEST)
        if self.peer_shutdown & RCV:
            self.pending &= ~P_RW
        self._after_progress(now)

    # -- events from the host ---------------------------------------------------------
    def on_host_readable(self) -> None:
        """The host end has input: owe the guest an RW (filled in :meth:`fill_rx`)."""
        if self._guest_may_receive() and not self._host_eof:
            self.pending |= P_RW

    def on_host_writable(self, now: float) -> None:
        """The host end has room: flush what we hold."""
        self._flush(now)

    def on_timeout(self, now: float) -> None:
        """The muxer's timer for :attr:`expiry` fired."""
        if self.expiry is None or now < self.expiry or self.done:
            return
        self.expiry = None
        self.metrics["conns_timed_out"] += 1
        if self.state is ConnState.LOCAL_INIT and self.hs_step == 0:
            self._finish(connected=False)       # the REQUEST never went out: nothing to reset
        elif self.state is ConnState.LOCAL_INIT or self.state is ConnState.PEER_INIT:
            self._reset("guest did not finish the handshake in time")
        else:
            self._reset("close handshake timed out")

    # -- flushing guest bytes to the host ------------------------------------------------
    def _flush(self, now: float) -> None:
        try:
            if self._preamble_armed and self._preamble is not None:
                n = self.stream.send_views([self._preamble])
                self._preamble = self._preamble[n:] if n < len(self._preamble) else None
                if self._preamble is not None:
                    return
                self._preamble_armed = False
            while len(self._tx_buf):
                n = self.stream.send_views([self._tx_buf.view()])
                self._tx_buf.consume(n)
                self._forwarded(n)
            while self._tx_msgs:
                msg, _eor = self._tx_msgs[0]
                self.stream.send_views([msg])
                self._tx_msgs.popleft()
                self._forwarded(len(msg), messages=1)
        except BlockingIOError:
            pass
        except OSError as e:
            self._host_failed("host socket write failed", e)
            return
        self._after_progress(now)

    def _forwarded(self, n: int, messages: int = 0) -> None:
        self.fwd_cnt = (self.fwd_cnt + n) & self._mask
        self.metrics["tx_bytes"] += n
        self.metrics["tx_messages"] += messages

    def _after_progress(self, now: float) -> None:
        """After the guest closed something or our buffers drained: next close step."""
        if self.state in (ConnState.KILLED, ConnState.LOCAL_INIT, ConnState.PEER_INIT) or self.done:
            return
        drained = not self.want_write() and not self._tx_partial
        if self.peer_shutdown & SEND and drained and not self._host_write_shut:
            self._host_write_shut = True
            try:
                self.stream.shutdown_write()
            except OSError:
                pass
        both_done = self.peer_shutdown == BOTH or (self.peer_shutdown & SEND and self._host_eof)
        if both_done:
            if drained:
                self._reset(None)      # the orderly end: RST closes it (not an error)
            elif self.expiry is None:
                self.expiry = now + CONN_SHUTDOWN_TIMEOUT
        else:
            self._maybe_credit_update()

    # -- filling an rx buffer -------------------------------------------------------------
    def _header(self, op: int, length: int = 0, flags: int = 0) -> VsockHeader:
        return VsockHeader(self.local_cid, self.peer_cid, self.local_port, self.peer_port,
                           length, self.vtype, op, flags, self.buf_alloc, self.fwd_cnt)

    def fill_rx(self, rx: RxBuffer, now: float) -> VsockHeader | None:
        """Write the next packet owed to the guest into ``rx``; its header, or None."""
        hdr = self._next_packet(rx, now)
        if hdr is not None:
            self._emit(rx, hdr)                            # every packet carries our credit
        return hdr

    def fill_rx_burst(self, bufs: Sequence[RxBuffer], now: float) -> list[VsockHeader]:
        """Fill ``bufs`` from the front on; the headers of the buffers filled (a prefix).

        The burst path (STREAM, RW owed and nothing that :meth:`_next_packet`
        puts before RW, the guest's window open, ``bufs[0]`` with payload
        room): ONE ``recv_into_views`` over the payload views of as many
        buffers as the guest's window (:meth:`peer_credit`) allows, the last
        view trimmed to the window, at most :data:`RX_IOV_MAX` views; then one
        RW header per buffer that got bytes (in order, the last one possibly
        partial).  A buffer without payload room (header-only) ends the run.
        Everything else -- control packets, SEQPACKET records, end-of-file,
        errors, a shut window (CREDIT_REQUEST), a drained host socket (then
        the credit packets) -- is one packet in ``bufs[0]`` through
        :meth:`fill_rx`, exactly as for a single buffer.
        """
        pending = self.pending
        if ((pending & (P_RST | P_HANDSHAKE | P_SHUTDOWN | P_RW)) != P_RW or self.seqpacket
                or not bufs or bufs[0].capacity == 0 or self._host_eof or not self._guest_may_receive()):
            hdr = self.fill_rx(bufs[0], now) if bufs else None
            return [] if hdr is None else [hdr]
        credit = self.peer_credit()
        if credit == 0:
            hdr = self.fill_rx(bufs[0], now)              # CREDIT_REQUEST, once
            return [] if hdr is None else [hdr]
        views: list[memoryview] = []
        sizes: list[int] = []
        room = credit
        for buf in bufs:
            cap = buf.capacity
            if cap == 0:
                break                                     # header-only: not for data
            take = cap if cap < room else room
            part = buf.payload_views(take)
            if sizes and len(views) + len(part) > RX_IOV_MAX:
                break
            views += part
            sizes.append(take)
            room -= take
            if room == 0:
                break                                     # the guest's window is full
        try:
            n = self.stream.recv_into_views(views)
        except BlockingIOError:
            self.pending &= ~P_RW                         # drained: poll again
            hdr = self.fill_rx(bufs[0], now)              # the credit packets, if owed
            return [] if hdr is None else [hdr]
        except OSError as e:
            self._host_failed("host socket read failed", e)
            self.pending = 0
            hdr = self._header(OP_RST)
            self._emit(bufs[0], hdr)
            return [hdr]
        if n == 0:
            hdr = self._host_closed(now)
            self._emit(bufs[0], hdr)
            return [hdr]
        hdrs = []
        left = n
        fwd_cnt = self.fwd_cnt
        for buf, size in zip(bufs, sizes):
            got = size if size < left else left
            hdr = VsockHeader(self.local_cid, self.peer_cid, self.local_port, self.peer_port,
                              got, self.vtype, OP_RW, 0, self.buf_alloc, fwd_cnt)
            buf.write_header(hdr)
            hdrs.append(hdr)
            left -= got
            if left == 0:
                break
        self.tx_cnt = (self.tx_cnt + n) & self._mask
        self.last_fwd_cnt_to_peer = fwd_cnt               # every packet carries our credit
        self.pending &= ~P_CREDIT_UPDATE
        self.metrics["rx_bytes"] += n
        self.metrics["rx_packets"] += len(hdrs)
        return hdrs

    def _emit(self, rx: RxBuffer, hdr: VsockHeader) -> None:
        """What :meth:`fill_rx` does with a header it got from :meth:`_next_packet`."""
        self.last_fwd_cnt_to_peer = self.fwd_cnt
        self.pending &= ~P_CREDIT_UPDATE
        self.metrics["rx_packets"] += 1
        rx.write_header(hdr)
        if hdr.op == OP_RST:
            self.metrics["rst_sent"] += 1
            self._finish(connected=False)

    def _next_packet(self, rx: RxBuffer, now: float) -> VsockHeader | None:
        pending = self.pending
        if pending & P_RST:
            self.pending = 0
            return self._header(OP_RST)
        if pending & P_HANDSHAKE:
            self.pending &= ~P_HANDSHAKE
            step = self.hs_step
            op = self._handshake[step]
            self.hs_step = step + 1
            if self.hs_step == len(self._handshake):
                self._connected()               # we sent the last op: the guest initiated
            elif step < 2:
                self.expiry = now + CONN_REQUEST_TIMEOUT    # our first packet of the handshake
            return self._header(op)
        if pending & P_SHUTDOWN:
            self.pending &= ~P_SHUTDOWN
            return self._header(OP_SHUTDOWN, flags=self._shutdown_flags)
        if pending & P_RW:
            hdr = self._read_host(rx, now)
            if hdr is not None:
                return hdr
        if self.pending & P_CREDIT_REQUEST:
            self.pending &= ~P_CREDIT_REQUEST
            return self._header(OP_CREDIT_REQUEST)
        if self.pending & P_CREDIT_UPDATE:
            self.pending &= ~P_CREDIT_UPDATE
            return self._header(OP_CREDIT_UPDATE)
        return None

    def _read_host(self, rx: RxBuffer, now: float) -> VsockHeader | None:
        """Move host input into ``rx`` within the guest's window (RW owed)."""
        if not self._guest_may_receive() or self._host_eof:
            self.pending &= ~P_RW
            return None
        credit = self.peer_credit()
        if credit == 0:
            self.pending &= ~P_RW
            if not self.credit_requested:
                self.credit_requested = True            # stop reading until the guest's numbers move
                if self.wire.op_credit_request is not None:
                    self.metrics["credit_requests_sent"] += 1
                    return self._header(OP_CREDIT_REQUEST)
            return None
        if rx.capacity == 0:
            return None                 # a header-only buffer: RW stays owed
        if self.seqpacket:
            return self._read_host_message(rx, credit, now)
        try:
            n = self.stream.recv_into_views(rx.payload_views(credit))
        except BlockingIOError:
            self.pending &= ~P_RW       # drained: poll again
            return None
        except OSError as e:
            self._host_failed("host socket read failed", e)
            self.pending = 0
            return self._header(OP_RST)
        if n == 0:
            return self._host_closed(now)
        self.tx_cnt = (self.tx_cnt + n) & self._mask
        self.metrics["rx_bytes"] += n
        return self._header(OP_RW, n)

    def _read_host_message(self, rx: RxBuffer, credit: int, now: float) -> VsockHeader | None:
        if self._rx_msg is None:
            if self._rx_staging is None:
                self._rx_staging = bytearray(SEQPACKET_MAX_MSG)
            try:
                size = self.stream.recv_message(memoryview(self._rx_staging))
            except BlockingIOError:
                self.pending &= ~P_RW
                return None
            except OSError as e:
                self._host_failed("host socket read failed", e)
                self.pending = 0
                return self._header(OP_RST)
            if size is None:
                return self._host_closed(now)
            if size > SEQPACKET_MAX_MSG or size > self.peer_buf_alloc:
                # the guest could never take it whole: Linux waits for EOM forever
                self.host_errors.report("host SEQPACKET record larger than 64 KiB or the guest's buf_alloc",
                                        f"{size} bytes, guest buf_alloc {self.peer_buf_alloc}")
                self.metrics["host_errors"] += 1
                self.kill("host SEQPACKET record too large")
                self.pending = 0
                return self._header(OP_RST)
            self._rx_msg = memoryview(self._rx_staging)[:size]
            self._rx_msg_off = 0
        rest = len(self._rx_msg) - self._rx_msg_off
        n = min(rest, credit, rx.capacity)
        if n == 0 and rest:
            return None                  # a 44-byte-only rx buffer: nothing fits
        rx.write_payload(self._rx_msg[self._rx_msg_off:self._rx_msg_off + n])
        self._rx_msg_off += n
        flags = 0
        if self._rx_msg_off == len(self._rx_msg):
            flags = EOM | EOR
            self._rx_msg = None
            self.metrics["rx_messages"] += 1
        self.tx_cnt = (self.tx_cnt + n) & self._mask
        self.metrics["rx_bytes"] += n
        return self._header(OP_RW, n, flags)

    def _host_closed(self, now: float) -> VsockHeader:
        """End-of-file from the host: SHUTDOWN(SEND), or (RCV|SEND) if it hung up."""
        self._host_eof = True
        self.pending &= ~P_RW
        if self.stream.hung_up() or self.peer_shutdown & SEND:
            flags = BOTH
            self.state = ConnState.LOCAL_CLOSED
            self.expiry = now + CONN_SHUTDOWN_TIMEOUT
            self._tx_buf.clear()
            self._tx_msgs.clear()
        else:
            flags = SEND
        self.local_shutdown |= flags
        return self._header(OP_SHUTDOWN, flags=flags)

    # -- ending -----------------------------------------------------------------------
    def kill(self, reason: str) -> None:
        """Reset the connection: an RST is owed to the guest, nothing else."""
        self._reset(reason)

    def _reset(self, reason: str | None) -> None:
        if self.done:
            return
        if reason is not None:
            self.kill_reason = reason
            self.metrics["conns_killed"] += 1
        self.state = ConnState.KILLED
        self.pending = P_RST
        self.expiry = None
        self._tx_buf.clear()
        self._tx_msgs.clear()
        self._tx_partial = bytearray()
        self._preamble_armed = False
        self._report_connect(False)

    def _finish(self, *, connected: bool) -> None:
        """RST received or sent: the connection is over; the muxer closes the stream."""
        self.done = True
        self.state = ConnState.KILLED
        self.pending = 0
        self.expiry = None
        self._report_connect(connected)

    def abort(self) -> None:
        """Forget the connection without telling the guest (TRANSPORT_RESET, device reset)."""
        self._finish(connected=False)

    def _report_connect(self, ok: bool) -> None:
        cb, self._on_connect = self._on_connect, None
        if cb is not None:
            cb(ok)

    def _guest_violation(self, reason: str, hdr: VsockHeader) -> None:
        self.errors.report(reason, hdr.describe())
        self.metrics["guest_errors"] += 1
        self._reset(reason)

    def _host_failed(self, reason: str, error: OSError) -> None:
        self.host_errors.report(reason, f"port {self.local_port}<->{self.peer_port}: {error}")
        self.metrics["host_errors"] += 1
        self._reset(reason)

    def __repr__(self) -> str:
        return (f"Connection({self.local_port}<->{self.peer_cid}:{self.peer_port}, {self.state.value}, "
                f"pending={PendingRx(self.pending)!r}, credit={self.peer_credit()}, held={self._unforwarded()})")


#: what a guest packet does on an open connection (ESTABLISHED, PEER_CLOSED, LOCAL_CLOSED), by op;
#: a handshake op there, or any other op, is a violation (see the table in the module docstring)
_OPEN_RULES = {
    OP_RW: Connection._guest_rw,
    OP_SHUTDOWN: Connection._guest_shutdown,
    OP_CREDIT_UPDATE: Connection._guest_credit_update,
    OP_CREDIT_REQUEST: Connection._guest_credit_request,
}


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes."""
    out = []
    for view in views:
        if n >= len(view):
            n -= len(view)
            continue
        out.append(view[n:])
        n = 0
    return out
