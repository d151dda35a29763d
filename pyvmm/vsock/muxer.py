"""The vsock muxer: routes packets between the guest and the host's connections.

This module owns the connection table and everything that is not one
connection's business (compare Firecracker ``unix/muxer.rs``):

* routing each guest packet to its :class:`~pyvmm.vsock.connection.Connection`
  by ``(local_port, peer_port)`` = ``(hdr.dst_port, hdr.src_port)``;
* answering what has no connection (virtio 1.2 §5.10.6.4 and §5.10.6.5, Linux
  ``virtio_transport_reset_no_sock``): a REQUEST nobody on the host serves, a
  packet of a type other than STREAM / SEQPACKET (or SEQPACKET when
  VIRTIO_VSOCK_F_SEQPACKET was not negotiated), a packet for an unknown
  connection -> an RST.  An RST is never answered with an RST;
* creating connections: a guest REQUEST asks each host service (the
  device's backends, :mod:`~pyvmm.vsock.backend`) in turn, in the order the
  device was given them, for a host stream; a host-initiated connection gets a local port
  round-robin from [2**30, 2**31) as Firecracker does.  A service whose host end
  connects asynchronously (TCP forwarding, :mod:`~pyvmm.vsock.tcp`) returns a stream
  with ``connecting = True``: the connection's RESPONSE is held
  (:attr:`VsockMuxer._connecting`) until the service calls
  :meth:`VsockMuxer.guest_connect_done` -- then RESPONSE, or an RST exactly as for a
  REQUEST nobody serves;
* the bounds: at most :data:`MAX_CONNECTIONS` (1023, Firecracker's
  ``MAX_CONNECTIONS``) connections, a REQUEST beyond that gets an RST; at
  most :data:`MAX_CONTROL_PACKETS` RSTs for packets without a connection
  waiting for rx buffers (more are dropped and counted); the windows it
  gives connections add up to at most :data:`TX_BUFFER_BUDGET` plus the
  minimal window for each (the guest bytes slow host peers can make us hold);
* the rx side: which connection fills the next guest rx buffers
  (connections that owe a packet take turns; a turn is one packet, or a run
  of at most :data:`RX_TURN_BUFFERS` STREAM data buffers read with one host
  read; a host-initiated connection's REQUEST goes to the front of the line,
  so that a busy guest's data cannot hold it back past its
  CONN_REQUEST_TIMEOUT), and the I/O plumbing of each connection's host socket
  (reader/writer interest, its expiry timer) on the event loop: read
  interest is a flag, and the reader is unregistered only when the socket
  is readable while unwanted (see :meth:`VsockMuxer._sync`), so a burst
  costs no ``epoll_ctl``.

Flow control (§5.10.6.1: "The tx virtqueue MUST be processed even when the rx
virtqueue is full so long as there are additional resources available"): nothing a guest packet causes needs an rx buffer at
once.  A connection records what it owes (a flag set, bounded by nature),
the RSTs for unknown connections wait in the bounded control queue, and host
data stays in the host socket until there is a buffer to read it into.  So
tx processing never waits for rx.

Guest packets whose addresses are wrong are dropped, not answered: a
``src_cid`` other than the guest's own CID, or a ``dst_cid`` other than the
host (VMADDR_CID_HOST = 2), as Firecracker does -- unless the device is a member
of a vsock group (:mod:`pyvmm.vsock.group`): then packets for other CIDs go to
the group (:meth:`~pyvmm.vsock.group.VsockGroup.from_guest`), which carries them to
the member with that CID or answers with an RST.  The group's packets for the
guest take their turn in the rx line (:data:`GROUP_KEY`) like one connection,
and while the group holds too much for a slow peer, :attr:`VsockMuxer.tx_blocked`
tells the device to leave the guest's tx chains where they are.

The wire format (:mod:`pyvmm.vsock.wire`) is given: which connection types
exist, the handshake the connections run, and, in the 2013 draft, *lanes*
(queue pairs) and datagrams.  With ``lanes`` > 1 every connection and
datagram belongs to lane ``(local_port XOR peer_port) mod lanes``
(:meth:`~pyvmm.vsock.wire.WireFormat.lane`): its packets for the guest go
only into that lane's rx buffers (each lane has its own rx line and control
queue), and a guest packet that arrives on another lane's tx queue is
refused: a STREAM packet gets an RST on the right lane (and resets its
connection), a datagram is dropped; both counted ("wrong_lane").

Datagrams (draft only, type DGRAM): no connection and no credit.  A guest
datagram to CID 2 port P is offered to each host service in order
(:meth:`HostService.datagram_to_host`); a host datagram for the guest
(:meth:`VsockMuxer.send_datagram`) waits in its lane's queue, at most
:data:`DGRAM_MAX_QUEUED`, for an rx buffer.  Whatever cannot be delivered --
no receiver, a full queue or host socket, more than
:data:`~pyvmm.vsock.wire.DGRAM_MAX_PAYLOAD` bytes, an rx buffer too small --
is dropped and counted ("dgram_dropped"), never queued without bound.
"""

from __future__ import annotations

import collections
from typing import Callable, Protocol, Sequence

from ..virtio.eventloop import EventLoop, TimerHandle
from ..virtio.queue import GuestErrorLog
from .connection import CONN_TX_BUF_SIZE, CONN_TX_BUF_SIZE_MIN, Connection, ConnState, HostStream
from .packet import RxBuffer, TxPacket
from .wire import (DGRAM, DGRAM_MAX_PAYLOAD, OP_REQUEST, OP_RST, OP_RW, SEQPACKET, STREAM, VIRTIO,
                   VMADDR_CID_HOST, VsockHeader, WireFormat)

__all__ = [
    "DGRAM_MAX_QUEUED",
    "HOST_PORT_FIRST",
    "HOST_PORT_LAST",
    "HostService",
    "MAX_CONNECTIONS",
    "MAX_CONTROL_PACKETS",
    "RXQ_SLACK",
    "RX_TURN_BUFFERS",
    "TX_BUFFER_BUDGET",
    "METRIC_NAMES",
    "VsockMuxer",
    "new_metrics",
]


#: Firecracker ``defs::MAX_CONNECTIONS``
MAX_CONNECTIONS = 1023
#: RSTs owed for packets without a connection (Firecracker's rxq holds 256)
MAX_CONTROL_PACKETS = 256
#: the guest bytes all connections together may make pyvmm hold for slow host peers (the sum
#: of the ``buf_alloc`` we advertise): a new connection gets the configured window
#: (CONN_TX_BUF_SIZE, 256 KiB) while the sum stays within this, else CONN_TX_BUF_SIZE_MIN
#: (64 KiB).  Worst case: TX_BUFFER_BUDGET + MAX_CONNECTIONS * 64 KiB, about 128 MiB.
TX_BUFFER_BUDGET = 64 * 1024 * 1024
#: rx buffers one connection fills per turn (128 KiB of Linux <= 6.1's 4 KiB buffers) before the
#: next connection that owes the guest a packet gets its turn: one bulk stream cannot starve
#: the others (fairness), and a turn is still one host read for the whole run
RX_TURN_BUFFERS = 32
#: stale keys (of removed connections) the rx line may hold beyond twice its live ones before
#: it is compacted: a guest looping REQUEST + RST with no rx buffers cannot grow it
RXQ_SLACK = 32
#: host datagrams waiting for an rx buffer, per lane (draft mode); more are dropped and counted
DGRAM_MAX_QUEUED = 256
#: the rx line's key for packets from other group members (no connection has it: ports >= 0)
GROUP_KEY = (-1, -1)
#: host-initiated connections get local ports from [2**30, 2**31) (Firecracker)
HOST_PORT_FIRST = 1 << 30
HOST_PORT_LAST = (1 << 31) - 1

#: every counter the device exposes; "tx" is guest -> host (the tx virtqueue),
#: "rx" host -> guest.  Packets count headers, bytes count payload.
METRIC_NAMES = (
    "tx_packets", "tx_bytes", "tx_messages", "tx_buffered_bytes", "tx_dropped_bytes",
    "tx_bad_chains", "rx_packets", "rx_bytes", "rx_messages", "rx_bad_buffers",
    "conns_added", "conns_removed", "conns_killed", "conns_timed_out", "conns_refused",
    "host_connects", "guest_connects", "rst_sent", "rst_received", "control_dropped",
    "credit_violations", "credit_requests_sent", "seq_eor_rx", "guest_errors", "host_errors",
    "unix_accepted", "unix_handshake_errors", "events_sent", "transport_resets",
    # TCP forwarding (pyvmm.vsock.tcp)
    "tcp_accepted", "tcp_listener_paused", "tcp_connects", "tcp_connect_failed",
    "device_resets", "rx_starved", "interrupts", "dgram_tx", "dgram_rx", "dgram_dropped",
    "wrong_lane", "controlq_buffers",
    # VM-to-VM (pyvmm.vsock.group); tx_/rx_ packets and bytes above include these
    "group_no_member", "group_messages_sent", "group_messages_received", "group_bad_packets",
    "group_peers_left", "group_leave_rsts", "group_tx_throttled", "group_rx_paused",
)


def new_metrics() -> collections.Counter:
    return collections.Counter({name: 0 for name in METRIC_NAMES})


class HostService(Protocol):
    """Something on the host that may accept guest connections to CID 2: the
    part of a :class:`~pyvmm.vsock.backend.VsockBackend` the muxer sees.

    ``connect_guest`` returns a connected non-blocking :class:`HostStream`,
    or None if nobody here serves ``port`` (the muxer asks the next service),
    or raises ConnectionRefusedError (served, but refused: RST at once).
    """

    def connect_guest(self, port: int, vtype: int, peer: tuple[int, int]) -> HostStream | None: ...

    def datagram_to_host(self, port: int, peer: tuple[int, int], data: bytes) -> bool | None:
        """A guest datagram to host ``port`` from ``peer`` = (cid, port): None if nobody
        here receives on ``port`` (the muxer asks the next service), True if delivered,
        False if dropped (a full host socket).  Draft mode only; by default: not mine."""
        return None


class VsockMuxer:
    """The connection table, the routing, and the rx scheduling (see module doc)."""

    def __init__(self, *, guest_cid: int, loop: EventLoop, metrics: collections.Counter | None = None,
                 errors: GuestErrorLog | None = None, host_errors: GuestErrorLog | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 max_control: int = MAX_CONTROL_PACKETS,
                 conn_buf_size: int = CONN_TX_BUF_SIZE,
                 tx_buffer_budget: int = TX_BUFFER_BUDGET,
                 wire: WireFormat = VIRTIO, lanes: int = 1) -> None:
        if not CONN_TX_BUF_SIZE_MIN <= conn_buf_size <= tx_buffer_budget:
            raise ValueError(f"vsock connection window {conn_buf_size} is outside "
                             f"[{CONN_TX_BUF_SIZE_MIN}, {tx_buffer_budget}]")
        if lanes < 1:
            raise ValueError(f"vsock lanes {lanes}: at least 1")
        self.guest_cid = guest_cid
        self.wire = wire
        #: queue pairs in use (see the module docstring); the device sets it at DRIVER_OK
        self.lanes = lanes
        self.loop = loop
        self.metrics = metrics if metrics is not None else new_metrics()
        self.errors = errors or GuestErrorLog("virtio-vsock (guest)")
        self.host_errors = host_errors or GuestErrorLog("virtio-vsock (host peers)")
        self.max_connections = max_connections
        self.max_control = max_control
        self.conn_buf_size = conn_buf_size
        self.tx_buffer_budget = tx_buffer_budget
        #: the sum of the live connections' buf_alloc (bounded by tx_buffer_budget, see above)
        self.advertised = 0
        #: the connection types the guest may use now (SEQPACKET once negotiated: ``seqpacket``)
        self._types = wire.stream_types - {SEQPACKET}
        #: asked in order for guest-initiated connections
        self.services: list[HostService] = []
        #: called (on the loop thread) with the lane when a packet for the guest appears
        self.on_rx_pending: Callable[[int], None] = lambda lane: None
        self.connections: dict[tuple[int, int], Connection] = {}
        self._make_lanes()
        self._filling = False               # inside fill_rx_burst (see there)
        # per connection: [read interest, writing, timer, reader registered, reader callback]
        self._io: dict[tuple[int, int], list] = {}
        self._next_host_port = HOST_PORT_FIRST
        self._host_ports: collections.Counter[int] = collections.Counter()
        #: guest-initiated connections whose host end is still connecting: their RESPONSE
        #: waits for guest_connect_done (key -> the stream the service returned)
        self._connecting: dict[tuple[int, int], HostStream] = {}
        #: host-initiated connections whose REQUEST is held (an ordered set), or None: no hold
        self._held: dict[tuple[int, int], None] | None = None
        #: the vsock group this device is a member of (set by the device), or None
        self.group = None

    def _make_lanes(self) -> None:
        lanes = range(self.lanes)
        #: per lane: RSTs for packets without a connection; host datagrams; connections owing packets
        self._control: list[collections.deque[VsockHeader]] = [collections.deque() for _ in lanes]
        self._dgrams: list[collections.deque[tuple[VsockHeader, bytes]]] = [collections.deque() for _ in lanes]
        self._rxq: list[collections.deque[tuple[int, int]]] = [collections.deque() for _ in lanes]
        self._in_rxq: list[set[tuple[int, int]]] = [set() for _ in lanes]

    def set_lanes(self, lanes: int) -> None:
        """The queue pairs the driver enabled (DRIVER_OK, at least 1); drops every connection."""
        self.reset_all()
        self.lanes = max(1, lanes)
        self._make_lanes()

    @property
    def seqpacket(self) -> bool:
        """Whether VIRTIO_VSOCK_F_SEQPACKET was negotiated (the device sets it)."""
        return SEQPACKET in self._types

    @seqpacket.setter
    def seqpacket(self, on: bool) -> None:
        base = self.wire.stream_types - {SEQPACKET}
        self._types = base | {SEQPACKET} if on and SEQPACKET in self.wire.stream_types else base

    def _lane_of(self, port_a: int, port_b: int) -> int:
        return self.wire.lane(port_a, port_b, self.lanes)

    @property
    def tx_blocked(self) -> bool:
        """True while the group holds too much for a slow member: the device takes no tx."""
        return self.group is not None and self.group.tx_blocked

    def group_rx_pending(self) -> None:
        """The group has packets for the guest: give it a turn in the rx line."""
        in_rxq = self._in_rxq[0]
        if GROUP_KEY not in in_rxq:
            in_rxq.add(GROUP_KEY)
            self._rxq[0].append(GROUP_KEY)
            if not self._filling:
                self.on_rx_pending(0)

    def _to_group(self, hdr: VsockHeader) -> bool:
        """Whether a guest packet is the group's: our guest's, for another CID."""
        return (self.group is not None and hdr.dst_cid != VMADDR_CID_HOST
                and hdr.src_cid == self.guest_cid)

    # -- guest -> host ------------------------------------------------------------
    def on_guest_packets(self, pkts: list[TxPacket], lane: int = 0) -> None:
        """Route a tx batch's well-formed packets (from lane ``lane``'s tx queue), in order.

        A run of consecutive STREAM RW packets with the same addresses goes to its
        connection as one :meth:`Connection.on_guest_stream_run` (one host write, one
        credit decision, one :meth:`_sync`); everything else, packet by packet, to
        :meth:`on_guest_packet`.  Only a connection's own packets must stay in order,
        and a run keeps them in order, so the result is what routing each packet
        alone gives, with fewer system calls.
        """
        if self.lanes > 1:
            pkts = [pkt for pkt in pkts if self._on_its_lane(pkt.hdr, lane)]
        i, n = 0, len(pkts)
        while i < n:
            hdr = pkts[i].hdr
            j = i + 1
            if self._to_group(hdr):           # a run of packets for other guests: one message
                while j < n and self._to_group(pkts[j].hdr):
                    j += 1
                self.group.from_guest(pkts[i:j])
                i = j
                continue
            if hdr.op == OP_RW and hdr.type == STREAM:
                addr = (hdr.src_cid, hdr.src_port, hdr.dst_cid, hdr.dst_port)
                while j < n:
                    h = pkts[j].hdr
                    if h.op != OP_RW or h.type != STREAM or (h.src_cid, h.src_port, h.dst_cid, h.dst_port) != addr:
                        break
                    j += 1
            conn = self.connections.get((hdr.dst_port, hdr.src_port)) if j - i > 1 else None
            if (conn is None or conn.vtype != STREAM or hdr.src_cid != self.guest_cid
                    or hdr.dst_cid != VMADDR_CID_HOST):
                for k in range(i, j):       # one packet, or a run the per-packet rules must see
                    self.on_guest_packet(pkts[k])
            else:
                self.metrics["tx_packets"] += j - i
                conn.on_guest_stream_run(pkts[i:j], self.loop.time())
                self._sync(conn)
            i = j

    def _on_its_lane(self, hdr: VsockHeader, lane: int) -> bool:
        """Whether ``hdr`` came on its own lane; if not, refuse it (module docstring)."""
        right = self._lane_of(hdr.src_port, hdr.dst_port)
        if right == lane:
            return True
        self.metrics["tx_packets"] += 1
        self.metrics["wrong_lane"] += 1
        self._guest_error("guest packet on the wrong queue pair", hdr)
        if hdr.type != DGRAM and hdr.src_cid == self.guest_cid and hdr.dst_cid == VMADDR_CID_HOST:
            conn = self.connections.get((hdr.dst_port, hdr.src_port))
            if conn is not None:
                self._reset_for(conn, hdr, "guest packet on the wrong queue pair")
            else:
                self._reply_rst(hdr)
        return False

    def on_guest_packet(self, pkt: TxPacket) -> None:
        """Route one well-formed guest packet (from its lane's tx virtqueue)."""
        hdr = pkt.hdr
        if self._to_group(hdr):
            self.group.from_guest([pkt])
            return
        self.metrics["tx_packets"] += 1
        if hdr.src_cid != self.guest_cid:
            self._guest_error("guest packet with a src_cid other than its own (dropped)", hdr)
            return
        if hdr.dst_cid != VMADDR_CID_HOST:
            self._guest_error("guest packet for a CID other than the host (dropped)", hdr)
            return
        if hdr.type == DGRAM and self.wire.datagrams:
            self._guest_datagram(pkt)
            return
        key = (hdr.dst_port, hdr.src_port)
        conn = self.connections.get(key)
        if hdr.type not in self._types:
            self._guest_error("guest packet of an unknown or unnegotiated type", hdr)
            if conn is not None:
                self._reset_for(conn, hdr, "guest packet of an unknown or unnegotiated type")
            else:
                self._reply_rst(hdr)
            return
        if conn is None:
            if hdr.op == OP_REQUEST:
                self._guest_request(hdr)
            elif hdr.op == OP_RST:
                self.metrics["rst_received"] += 1       # never answer an RST with an RST
            else:
                self._guest_error("guest packet for an unknown connection", hdr)
                self._reply_rst(hdr)
            return
        if hdr.type != conn.vtype:
            self._guest_error("guest packet type differs from its connection's", hdr)
            self._reset_for(conn, hdr, "guest packet type differs from its connection's")
            return
        conn.on_guest_packet(hdr, pkt.payload, self.loop.time())
        self._sync(conn)

    def on_bad_guest_packet(self, hdr: VsockHeader) -> None:
        """A tx chain whose header was readable but whose length was wrong: the
        bytes of that connection are lost, so reset it (or answer with an RST)."""
        if self._to_group(hdr):
            self.group.bad_guest_packet(hdr)
            return
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != VMADDR_CID_HOST:
            return
        conn = self.connections.get((hdr.dst_port, hdr.src_port))
        if conn is not None:
            self._reset_for(conn, hdr, "malformed guest packet")
        elif hdr.op != OP_RST:
            self._reply_rst(hdr)

    def _reset_for(self, conn, hdr: VsockHeader, reason: str) -> None:
        """End ``conn`` after a bad guest packet: with an RST owed to the guest,
        unless that packet was itself an RST (never answer an RST with an RST,
        as Linux's virtio_transport_reset_no_sock)."""
        if hdr.op == OP_RST:
            self.metrics["rst_received"] += 1
            conn.abort()
        else:
            conn.kill(reason)
        self._sync(conn)

    def _guest_datagram(self, pkt: TxPacket) -> None:
        """A guest datagram: to the first host service that receives on its port."""
        hdr = pkt.hdr
        if hdr.op != OP_RW or hdr.len > DGRAM_MAX_PAYLOAD:
            self.metrics["dgram_dropped"] += 1
            self._guest_error("guest datagram larger than 4096 bytes or not RW (dropped)", hdr)
            return
        data = pkt.payload_bytes()
        for service in self.services:
            delivered = service.datagram_to_host(hdr.dst_port, (hdr.src_cid, hdr.src_port), data)
            if delivered is not None:
                break
        else:
            delivered = False                       # nobody receives on that port
        self.metrics["dgram_tx" if delivered else "dgram_dropped"] += 1

    def send_datagram(self, src_port: int, dst_port: int, data: bytes) -> bool:
        """Queue a host datagram for guest port ``dst_port``; False if dropped (counted):
        no datagrams in this protocol, too large, or its lane's queue full."""
        if not self.wire.datagrams or len(data) > DGRAM_MAX_PAYLOAD or not 0 <= dst_port <= 0xFFFF_FFFF:
            self.metrics["dgram_dropped"] += 1
            return False
        lane = self._lane_of(src_port, dst_port)
        queue = self._dgrams[lane]
        if len(queue) >= DGRAM_MAX_QUEUED:
            self.metrics["dgram_dropped"] += 1
            return False
        queue.append((VsockHeader(VMADDR_CID_HOST, self.guest_cid, src_port, dst_port, len(data), DGRAM,
                                  OP_RW, 0, 0, 0), data))
        self.on_rx_pending(lane)
        return True

    def _guest_error(self, reason: str, hdr: VsockHeader) -> None:
        self.errors.report(reason, hdr.describe())
        self.metrics["guest_errors"] += 1

    def _reply_rst(self, hdr: VsockHeader) -> None:
        """Queue an RST for a packet with no connection (echoes its type, as Linux does)."""
        if hdr.op == OP_RST:
            return
        lane = self._lane_of(hdr.src_port, hdr.dst_port)
        control = self._control[lane]
        if sum(len(c) for c in self._control) >= self.max_control:
            self.metrics["control_dropped"] += 1
            self.errors.report("control queue full: RST dropped", hdr.describe())
            return
        control.append(VsockHeader(VMADDR_CID_HOST, self.guest_cid, hdr.dst_port, hdr.src_port,
                                   0, hdr.type, OP_RST, 0, 0, 0))
        self.on_rx_pending(lane)

    def _guest_request(self, hdr: VsockHeader) -> None:
        if len(self.connections) >= self.max_connections:
            self.errors.report("connection table full: REQUEST refused", hdr.describe())
            self.metrics["conns_refused"] += 1
            self._reply_rst(hdr)
            return
        stream = None
        try:
            for service in self.services:
                stream = service.connect_guest(hdr.dst_port, hdr.type, (hdr.src_cid, hdr.src_port))
                if stream is not None:
                    break
        except ConnectionRefusedError:
            stream = None
        except OSError as e:            # a host resource ran out (EMFILE, ENOBUFS, ...): refused
            self.host_errors.report("host end could not take a guest connection", str(e))
            self.metrics["host_errors"] += 1
            stream = None
        if stream is None:
            self.metrics["conns_refused"] += 1
            self._reply_rst(hdr)
            return
        self.metrics["guest_connects"] += 1
        conn = Connection.peer_init(hdr, stream, lane=self._lane_of(hdr.src_port, hdr.dst_port),
                                    **self._conn_kw())
        if getattr(stream, "connecting", False):
            self._connecting[conn.key] = stream     # before _add: its RESPONSE waits
        self._add(conn)

    def guest_connect_done(self, local_port: int, peer_port: int, stream: HostStream, ok: bool) -> None:
        """The host end ``stream`` of the guest's connection (``local_port``, ``peer_port``),
        returned still connecting, has connected (``ok``: the RESPONSE goes out) or failed
        (the connection is forgotten and the guest gets an RST, as for a REQUEST nobody
        serves).  Nothing if that connection is gone meanwhile (the guest gave up: its RST,
        a reset) or is another one."""
        key = (local_port, peer_port)
        if self._connecting.get(key) is not stream:
            return
        del self._connecting[key]
        conn = self.connections[key]
        if ok:
            self._sync(conn)
            return
        self.metrics["conns_refused"] += 1
        conn.abort()
        self._remove(conn)
        self._reply_rst(VsockHeader(self.guest_cid, VMADDR_CID_HOST, peer_port, local_port, 0,
                                    conn.vtype, OP_REQUEST, 0, 0, 0))

    def _conn_kw(self) -> dict:
        window = self.conn_buf_size
        if self.advertised + window > self.tx_buffer_budget:
            window = CONN_TX_BUF_SIZE_MIN
        return dict(metrics=self.metrics, errors=self.errors, host_errors=self.host_errors,
                    buf_alloc=window, wire=self.wire)

    # -- host -> guest connections ---------------------------------------------------
    def connect_host(self, peer_port: int, vtype: int, stream: HostStream, *,
                     preamble: Callable[[int], bytes] | None = None,
                     on_connect: Callable[[bool], None] | None = None) -> Connection | None:
        """Start a host-initiated connection to guest port ``peer_port``.

        ``preamble(local_port)`` is written to ``stream`` when the guest
        accepts (the Unix backend's ``OK <port>\\n``); ``on_connect(ok)`` is
        called once with the outcome.  None if it cannot even start (table
        full, SEQPACKET not negotiated, bad type); the caller closes ``stream``.
        """
        if vtype not in self._types:
            return None
        if not 0 <= peer_port <= 0xFFFF_FFFF or len(self.connections) >= self.max_connections:
            self.metrics["conns_refused"] += 1
            return None
        local_port = self._allocate_host_port(peer_port)
        conn = Connection.local_init(peer_cid=self.guest_cid, local_port=local_port,
                                     peer_port=peer_port, vtype=vtype, stream=stream,
                                     now=self.loop.time(),
                                     preamble=preamble(local_port) if preamble else b"",
                                     on_connect=on_connect, lane=self._lane_of(local_port, peer_port),
                                     **self._conn_kw())
        self.metrics["host_connects"] += 1
        self._host_ports[local_port] += 1
        self._add(conn)
        return conn

    def _allocate_host_port(self, peer_port: int) -> int:
        """The next port of [2**30, 2**31) that no host-initiated connection uses and that
        makes no key already taken: a guest may have connected to such a host port itself."""
        while True:
            port = self._next_host_port
            self._next_host_port = port + 1 if port < HOST_PORT_LAST else HOST_PORT_FIRST
            if port not in self._host_ports and (port, peer_port) not in self.connections:
                return port                         # < 2 * 1023 taken: terminates quickly

    # -- the table ------------------------------------------------------------------
    def _add(self, conn: Connection) -> None:
        if conn.key in self.connections:    # the callers rule it out; never replace one silently
            raise RuntimeError(f"vsock connection key {conn.key} is taken")
        self.connections[conn.key] = conn
        self.advertised += conn.buf_alloc
        key = conn.key
        # read interest and registration differ: see _sync
        self._io[key] = [False, False, None, False, lambda: self._on_readable(key)]
        self.metrics["conns_added"] += 1
        self._sync(conn)

    def _remove(self, conn: Connection) -> None:
        key = conn.key
        if self.connections.get(key) is not conn:
            return
        del self.connections[key]
        self._connecting.pop(key, None)
        self.advertised -= conn.buf_alloc
        _interest, writing, timer, reading, _reader = self._io.pop(key)
        if timer is not None:
            timer.cancel()
        in_rxq, rxq = self._in_rxq[conn.lane], self._rxq[conn.lane]
        in_rxq.discard(key)                   # a stale key left in _rxq is skipped, and
        if len(rxq) > 2 * len(in_rxq) + RXQ_SLACK and not self._filling:   # compacted before
            live = list(dict.fromkeys(k for k in rxq if k in in_rxq))     # stale ones pile up
            rxq.clear()
            rxq.extend(live)
        if key[0] in self._host_ports:
            self._host_ports[key[0]] -= 1
            if self._host_ports[key[0]] <= 0:
                del self._host_ports[key[0]]
        fd = _fileno(conn.stream)
        if fd >= 0 and (reading or writing):
            self.loop.remove_fd(fd)
        try:
            conn.stream.close()
        except OSError:
            pass
        self.metrics["conns_removed"] += 1

    def _sync(self, conn: Connection) -> None:
        """After any call into ``conn``: fd interest, timer, rx turn, or removal.

        Read interest is a flag (``io[0]``), separate from the registration
        (``io[3]``), so that the usual rx cycle costs no ``epoll_ctl``: the host
        socket becomes readable -> the connection owes an RW (``want_read()``
        False) -> the device fills rx buffers in the same loop pass until the
        socket would block -> ``want_read()`` True again.  Losing interest only
        clears the flag; the reader stays registered.  The loop is
        level-triggered (:mod:`pyvmm.virtio.eventloop`), so a socket that stays
        readable while we are not interested (no rx buffers, the guest's
        window shut, end-of-file seen) would fire on every pass: the first
        such call (:meth:`_on_readable`) unregisters the reader, one
        ``epoll_ctl``, and regaining interest registers it again, one more.
        So ``epoll_ctl`` is paid per real stall, not per burst.
        """
        if conn.done:
            self._remove(conn)
            return
        key = conn.key
        io = self._io[key]
        fd = _fileno(conn.stream)
        want_read, want_write = conn.want_read(), conn.want_write()
        if fd >= 0:
            if want_read != io[0]:
                io[0] = want_read
                if want_read and not io[3]:
                    self.loop.add_reader(fd, io[4])
                    io[3] = True
            if want_write != io[1]:
                if want_write:
                    self.loop.add_writer(fd, lambda: self._on_writable(key))
                else:
                    self.loop.remove_writer(fd)
                io[1] = want_write
        timer: TimerHandle | None = io[2]
        if conn.expiry is None:
            if timer is not None:
                timer.cancel()
                io[2] = None
        elif timer is None or timer.when != conn.expiry:
            if timer is not None:
                timer.cancel()
            io[2] = self.loop.call_at(conn.expiry, self._on_timer, key)
        if conn.has_pending_rx():
            if key in self._connecting:
                return                          # its RESPONSE waits: see guest_connect_done
            if self._held is not None and conn.state is ConnState.LOCAL_INIT and conn.hs_step == 0:
                self._held[key] = None          # its REQUEST waits: see hold_requests
                return
            in_rxq = self._in_rxq[conn.lane]
            if key not in in_rxq:
                in_rxq.add(key)
                if conn.state is ConnState.LOCAL_INIT and conn.hs_step == 0:
                    self._rxq[conn.lane].appendleft(key)    # a host connect's REQUEST: first
                else:
                    self._rxq[conn.lane].append(key)
                if not self._filling:
                    self.on_rx_pending(conn.lane)

    def _on_readable(self, key: tuple[int, int]) -> None:
        conn = self.connections.get(key)
        if conn is None:
            return
        io = self._io[key]
        if not io[0]:                   # readable but not wanted: stop the level-triggered spin
            io[3] = False
            fd = _fileno(conn.stream)
            if fd >= 0:
                self.loop.remove_reader(fd)
            return
        conn.on_host_readable()
        self._sync(conn)

    def _on_writable(self, key: tuple[int, int]) -> None:
        conn = self.connections.get(key)
        if conn is not None:
            conn.on_host_writable(self.loop.time())
            self._sync(conn)

    def _on_timer(self, key: tuple[int, int]) -> None:
        conn = self.connections.get(key)
        if conn is not None:
            self._io[key][2] = None
            conn.on_timeout(self.loop.time())
            self._sync(conn)

    # -- host -> guest: filling rx buffers ---------------------------------------------
    def has_pending_rx(self, lane: int = 0) -> bool:
        return bool(self._control[lane] or self._in_rxq[lane] or self._dgrams[lane])

    def fill_rx(self, rx: RxBuffer, lane: int = 0) -> VsockHeader | None:
        """Write the next packet owed to the guest into ``rx``; its header, or None."""
        hdrs = self.fill_rx_burst([rx], lane)
        return hdrs[0] if hdrs else None

    def fill_rx_burst(self, bufs: Sequence[RxBuffer], lane: int = 0) -> list[VsockHeader]:
        """Fill rx buffers from the front of ``bufs`` for ONE connection (or one
        control RST); the headers of the buffers filled, a prefix of ``bufs``.

        The connections that owe packets take turns (``_rxq``): the first that
        has something for ``bufs[0]`` fills at most :data:`RX_TURN_BUFFERS`
        buffers (:meth:`Connection.fill_rx_burst`) and goes to the back of the
        line if it owes more.  While this runs, a connection put back in line
        does not call ``on_rx_pending``: the device is filling and asks
        :meth:`has_pending_rx` itself, and a connection that has nothing for
        these buffers (a header-only buffer while an RW is owed) must not
        schedule another fill of the same buffers (that would spin).  Only lane
        ``lane``'s packets go into ``bufs``: its control RSTs first, then its
        datagrams (one per buffer), then its connections.
        """
        if self._control[lane]:
            hdr = self._control[lane].popleft()
            bufs[0].write_header(hdr)
            self.metrics["rx_packets"] += 1
            self.metrics["rst_sent"] += 1
            return [hdr]
        dgrams = self._dgrams[lane]
        while dgrams and bufs[0].capacity:
            hdr, data = dgrams.popleft()
            if len(data) > bufs[0].capacity:
                self.metrics["dgram_dropped"] += 1      # the guest's buffers are too small for it
                continue
            bufs[0].write_payload(data)
            bufs[0].write_header(hdr)
            self.metrics["rx_packets"] += 1
            self.metrics["dgram_rx"] += 1
            return [hdr]
        if len(bufs) > RX_TURN_BUFFERS:
            bufs = bufs[:RX_TURN_BUFFERS]
        now = self.loop.time()
        self._filling = True
        rxq, in_rxq = self._rxq[lane], self._in_rxq[lane]
        try:
            for _ in range(len(rxq)):
                key = rxq.popleft()
                if key not in in_rxq:
                    continue                        # removed meanwhile
                in_rxq.discard(key)
                if key == GROUP_KEY:
                    hdrs = self.group.fill_rx_burst(bufs)
                    if self.group.has_pending():
                        in_rxq.add(key)
                        rxq.append(key)             # back in line
                    if hdrs:
                        return hdrs
                    continue
                conn = self.connections[key]
                hdrs = conn.fill_rx_burst(bufs, now)
                self._sync(conn)                    # back in line if it owes more
                if hdrs:
                    return hdrs
            return []
        finally:
            self._filling = False

    # -- resets ---------------------------------------------------------------------
    def reset_all(self) -> None:
        """Forget every connection without telling the guest (device reset or
        TRANSPORT_RESET: the guest drops its connections on its own); no hold."""
        self._held = None
        for conn in list(self.connections.values()):
            conn.abort()
            self._remove(conn)
        for queues in (self._control, self._dgrams, self._rxq, self._in_rxq):
            for queue in queues:
                queue.clear()

    def hold_requests(self) -> None:
        """Keep the REQUESTs of new host-initiated connections back until
        :meth:`release_requests`.  After a TRANSPORT_RESET event the guest drops
        the connections it has when it handles the event, silently (Linux:
        ``virtio_vsock_reset_sock``): a REQUEST it accepted just before would make
        a connection pyvmm thinks open and the guest has forgotten, and a host peer
        waiting to read would wait forever.  A held connection still times out
        (CONN_REQUEST_TIMEOUT) like any other."""
        if self._held is None:
            self._held = {}

    def release_requests(self) -> None:
        """Let the held REQUESTs go out, in the order their connections came."""
        held, self._held = self._held or {}, None
        for key in held:
            conn = self.connections.get(key)
            if conn is not None:
                self._sync(conn)


def _fileno(stream) -> int:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return -1

