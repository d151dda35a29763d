"""The virtio-vsock device (virtio 1.2 §5.10 "Socket Device"): virtqueue glue.

This module owns the device as the transport and the machine see it: the
device ID, the virtqueues and their roles, the config space, feature bits,
the event queue, handing its backends the host face they use, and moving
buffers between the virtqueues and the :class:`~pyvmm.vsock.muxer.VsockMuxer`.
It is given its wire format (:mod:`pyvmm.vsock.wire`): :data:`~pyvmm.vsock.wire.VIRTIO`,
the standard Socket Device (ID 19, queues rx/tx/event, ``le64 guest_cid``),
or :data:`~pyvmm.vsock.wire.RFC2013`, the 2013 draft (ID 13, a controlq and
``pairs`` rx/tx queue pairs, ``le32 guest_cid; le32 max_virtqueue_pairs``,
no event queue; see "The draft's queues" below).  It
knows nothing about connections or sockets (Firecracker ``vsock/device.rs``),
and it never builds its host ends: it is given them as
:class:`~pyvmm.vsock.backend.VsockBackend` objects.

Contract with the machine
-------------------------

Construction and lifetime (the :class:`~pyvmm.virtio.device.VirtioDevice`
machine contract)::

    api, backends = default_backends(uds_path)   # [api, UnixBackend(uds_path)]: the
                                                 #   Python API, Firecracker's Unix end
    dev = VsockDevice(guest_cid, backends, max_connections=1023, conn_buf_size=256 KiB,
                      wire=VIRTIO, pairs=1)     # wire=RFC2013, pairs=1..16: the draft
        # guest_cid: 3 .. 2**32-2 (0, 1, 2, 2**32-1 reserved; upper 32 bits zero)
        # backends: asked in this order for guest connects to CID 2
        # conn_buf_size: the buf_alloc each connection advertises (64 KiB .. 64 MiB), within
        #   the muxer's global TX_BUFFER_BUDGET
        # group=VsockGroup(dir): VM-to-VM, packets for other CIDs go to the group's members
        #   (pyvmm.vsock.group; the standard wire only); it joins in attach_loop (ConfigError
        #   if the CID is taken), is live from DRIVER_OK to a reset, and leaves in stop()
    dev.attach_loop(loop)           # the machine's I/O loop; the backends attach
                                    #   here (unix binds uds_path and
                                    #   uds_path.seqpacket: ConfigError if busy)
    transport = MmioTransport(dev, memory, irq_trigger)   # as any virtio device
    dev.add_reader(fd, callback)    # the ioeventfd of each queue, see below
    dev.start()                     # the backends start serving
    loop.start_thread()             # the machine's one I/O thread, "pyvmm-io"
    ...
    dev.stop()                      # drop connections, stop the backends (idempotent)
    loop.stop_thread()
    dev.close()                     # stop(), forget the queues

ioeventfd: for each queue q (0 rx, 1 tx, 2 event) the machine registers
KVM_IOEVENTFD (QueueNotify, datamatch q) on an eventfd ``efd_q`` and calls
``dev.add_reader(efd_q, cb_q)`` where ``cb_q`` reads the eventfd (8 bytes,
non-blocking) and calls ``transport.queue_notify(q)``.  The callback runs on
the I/O thread, so ``queue_notify`` -> our :meth:`queue_notify` processes
the queue right there.  (A QueueNotify that reaches the transport through an
MMIO write instead runs on a vCPU thread; :meth:`queue_notify` then only hands
the work to the I/O thread.)  ``add_reader`` may be called before or after
the loop thread starts, from any thread.

irqfd: ``interrupt`` (given to :meth:`activate` by the transport) is called
from the I/O thread, once per batch, only when
``queue.needs_notification()`` says the driver wants it (VIRTIO_F_EVENT_IDX
or VIRTQ_AVAIL_F_NO_INTERRUPT).

Backends (:mod:`~pyvmm.vsock.backend`): each gets the device's
:class:`~pyvmm.vsock.backend.VsockHost` in :meth:`attach_loop`, ``start()``
in :meth:`start` and ``stop()`` in :meth:`stop`, all on the I/O thread (or
inline while it does not run).  The Python API users see (``Machine.vsock``)
is the :class:`~pyvmm.vsock.unix.VsockApi` backend: ``connect(port,
type=STREAM, timeout=5.0) -> socket.socket``, ``connect_async(port, type) ->
concurrent.futures.Future``, ``listen(port, type=STREAM, backlog=16) ->
VsockListener`` (``accept(timeout) -> (sock, (guest_cid, guest_port))``,
``close()``), ``counters() -> dict``, ``transport_reset()``.  ``type`` is
``VirtioVsockType.VIRTIO_VSOCK_TYPE_STREAM`` (1) or ``..._SEQPACKET`` (2).

Metrics: ``dev.counters()`` returns a fresh dict: every name in
:data:`~pyvmm.vsock.muxer.METRIC_NAMES` ("tx" = guest -> host, "rx" = host ->
guest; packets, bytes, messages, connections added/removed/killed/timed out/
refused, RSTs sent/received, credit violations, bad chains, ...), plus
``connections`` (open now), ``guest_errors_by_reason`` and
``host_errors_by_reason`` (the first of each reason is also logged).

Threads, and why ``reset()`` cannot deadlock
-----------------------------------------------

All vsock state (queues, muxer, connections, sockets, the backends' state)
belongs to the machine's I/O thread, the one thread of the
:class:`~pyvmm.virtio.eventloop.EventLoop` that every virtio device of the
machine shares; other threads hand it work with
``loop.call_soon_threadsafe`` (:meth:`EventLoop.run_in_loop`).  The
transport calls :meth:`activate` and :meth:`reset` on a vCPU thread while
holding its register lock (and the machine's bus lock), and §2.4 wants the
device quiet when reset returns, so those two *wait* (bounded,
:data:`~pyvmm.virtio.eventloop.LOOP_WAIT`) for the I/O thread to run the
job.  That is deadlock-free because no callback on the I/O thread, of this
device or any other, takes a lock a vCPU holds while calling a device: the
only transport code this device runs there is ``transport.queue_notify``
(lock-free by design) and the ``interrupt`` / queue-broken callables, which
take only the transport's small ISR lock, and the transport never holds
that while calling the device (:mod:`pyvmm.virtio.device` states the rule
for every device).  The wait may include a batch of another device's work;
batches are bounded (:data:`BATCH` here).  The transport has already
stopped the queues and bumped its epoch before ``reset()``, so even a job in
flight finds empty queues and a no-op ``interrupt``.  Before the loop thread
starts (and in unit tests) every call runs inline on the caller's thread,
which must then be the only one.

Feature bits (§5.10.3)
----------------------

Offered: VIRTIO_F_VERSION_1 (virtio-mmio v2 requires it), VIRTIO_F_EVENT_IDX,
VIRTIO_F_INDIRECT_DESC (the virtio core implements both), and
VIRTIO_VSOCK_F_SEQPACKET.  Not offered: VIRTIO_VSOCK_F_STREAM and
VIRTIO_VSOCK_F_NO_IMPLIED_STREAM.  Linux's driver knows only SEQPACKET and
never acks bit 0 or 2; spec 1.2 says "if no feature bit is set, only stream
socket type is supported. If VIRTIO_VSOCK_F_SEQPACKET has been negotiated,
the device MAY act as if VIRTIO_VSOCK_F_STREAM has also been negotiated",
and stream is exactly what every existing driver expects, so pyvmm always
supports STREAM.  Offering F_STREAM would add nothing for Linux, and offering
NO_IMPLIED_STREAM (a v1.3 bit whose point is letting a driver turn stream
*off*) would let a newer driver negotiate away the only type all peers use.
SEQPACKET packets are accepted only if F_SEQPACKET was acked (else RST).

Queues (§5.10.2, config §5.10.4, events §5.10.6.7): 0 rx, 1 tx, 2 event; QueueSizeMax 256 each.  Every
queue is worked in batches (:meth:`~pyvmm.virtio.queue.Queue.pop_batch`,
:meth:`~pyvmm.virtio.queue.Queue.add_used_batch`): the chains of a batch
are taken off the available ring in one pass and returned with one
``used.idx`` store, in ring order.  tx: every
chain is parsed (header copied once, payload zero-copy, any number of
descriptors), routed, and returned with used.len 0; malformed chains are
counted, logged once per reason, and returned.  rx: each chain gets one
packet (either rx layout, see :mod:`~pyvmm.vsock.packet`); chains are popped
a few ahead (:data:`RX_FIRST_BATCH`, doubling within a turn) into a stock,
the muxer fills a run of them for one connection at a time (one host read
for a run of STREAM data, at most
:data:`~pyvmm.vsock.muxer.RX_TURN_BUFFERS`), and those the muxer has nothing
for right now stay with the device until it has (a header-only buffer is
held aside for a control packet, so it does not block the ones behind it:
VIRTIO_F_IN_ORDER is not offered, so buffers may be used out of the order
they were made available, virtio 1.2 §2.7.9).  tx keeps being
processed while rx is full (§5.10.6.1): the muxer parks what it owes outside
the queue.  event: :meth:`transport_reset` posts
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (``le32 id = 0``) and drops every
connection, as Firecracker does at snapshot time; new host-initiated
connections then hold their REQUEST until the guest has taken the event
(:meth:`VsockDevice._watch_event_taken`).  A batch is bounded
(:data:`BATCH`) so a guest that refills without pause cannot starve host
sockets; the rest is rescheduled.

The draft's queues
------------------

Queue 0 is the controlq, queue 2i+1 receiveq i, queue 2i+2 transmitq i, for
i < ``pairs`` (:data:`MAX_PAIRS` at most; config ``max_virtqueue_pairs``).
Only pair 0 is required at DRIVER_OK; the pairs in use, *lanes*, are the
pairs 0..P-1 whose two queues are both ready (a ready pair after a gap is
ignored and logged), and each lane is an rx/tx pair exactly as the standard's
one (the muxer keeps each connection on its lane).  Nothing was ever defined
for the controlq: a buffer posted there is returned with used length 0,
counted ("controlq_buffers") and logged once.  There is no event queue, so
:meth:`transport_reset` only drops the connections.
"""

from __future__ import annotations

import collections
import itertools
import logging
import struct
from typing import Callable, Sequence

from ..errors import ConfigError
from ..memory import GuestMemory
from ..virtio.device import VIRTIO_MMIO_INT_VRING, VirtioDevice, VirtioFeature, feature_mask
from ..virtio.eventloop import EventLoop, TimerHandle
from ..virtio.queue import GuestErrorLog, Queue
from .backend import VsockBackend
from .connection import CONN_TX_BUF_SIZE, CONN_TX_BUF_SIZE_MIN, HostStream
from .group import VsockGroup
from .muxer import MAX_CONNECTIONS, RX_TURN_BUFFERS, TX_BUFFER_BUDGET, VsockMuxer, new_metrics
from .packet import RxBuffer, VsockPacketError, parse_tx_chain
from .wire import CONTROL, EVENT, RX, TX, VIRTIO, VirtioVsockEventId, VirtioVsockFeature, WireFormat

__all__ = ["BATCH", "EVENTQ", "MAX_PAIRS", "QUEUE_SIZE", "RXQ", "RX_FIRST_BATCH", "TRANSPORT_RESET_HOLD",
           "TXQ", "VsockDevice"]

logger = logging.getLogger("pyvmm.vsock")

#: the standard's queue indexes (§5.10.2)
RXQ, TXQ, EVENTQ = 0, 1, 2
QUEUE_SIZE = 256
#: the most queue pairs of the draft (``--vsock ...,pairs=N``)
MAX_PAIRS = 16
#: chains handled per queue per turn before other work gets the thread
BATCH = 256
#: rx chains popped by the first pop_batch of a turn (each next one pops twice as many)
RX_FIRST_BATCH = 8
#: seconds new host-initiated connections wait after a TRANSPORT_RESET event for the guest
#: to take it (re-post an event buffer) before their REQUESTs go out anyway
TRANSPORT_RESET_HOLD = 1.0
#: how often the device looks at the event queue's avail.idx during that wait
_HOLD_POLL = 0.005
_CONFIG = struct.Struct("<Q")           # struct virtio_vsock_config { le64 guest_cid; }
_DRAFT_CONFIG = struct.Struct("<II")    # the draft's { le32 guest_cid; le32 max_virtqueue_pairs; }
_EVENT = struct.Struct("<I")            # struct virtio_vsock_event { le32 id; }
_F_SEQPACKET = 1 << VirtioVsockFeature.VIRTIO_VSOCK_F_SEQPACKET


class VsockDevice(VirtioDevice):
    """virtio-vsock: see the module docstring for the machine-facing contract."""

    def __init__(self, guest_cid: int, backends: Sequence[VsockBackend] = (), *,
                 max_connections: int = MAX_CONNECTIONS,
                 conn_buf_size: int = CONN_TX_BUF_SIZE,
                 wire: WireFormat = VIRTIO, pairs: int = 1,
                 group: VsockGroup | None = None) -> None:
        if not 3 <= guest_cid < 0xFFFF_FFFF:
            raise ConfigError(f"vsock guest CID {guest_cid} is reserved or out of range (3 .. 2**32-2)")
        if not CONN_TX_BUF_SIZE_MIN <= conn_buf_size <= TX_BUFFER_BUDGET:
            raise ConfigError(f"vsock connection window {conn_buf_size} is outside "
                              f"{CONN_TX_BUF_SIZE_MIN} .. {TX_BUFFER_BUDGET} bytes")
        if not 1 <= pairs <= (MAX_PAIRS if wire.multiqueue else 1):
            raise ConfigError(f"vsock queue pairs {pairs}: proto={wire.name} takes "
                              + ("1 .. 16" if wire.multiqueue else "no pairs= (one rx/tx pair)"))
        if group is not None and wire.multiqueue:
            raise ConfigError(f"vsock group: proto={wire.name} cannot join one (the standard "
                              "device only)")
        self.wire = wire
        self.pairs = pairs
        #: the vsock group this device is a member of (VM-to-VM), or None
        self.group = group
        self.device_id = wire.device_id
        #: (role, lane) of each queue index, and the rx / tx queue index of each lane
        self.roles = wire.queue_roles(pairs)
        self._rx_index = [i for i, (role, _) in enumerate(self.roles) if role == RX]
        self._tx_index = [i for i, (role, _) in enumerate(self.roles) if role == TX]
        self.queue_max_sizes = (QUEUE_SIZE,) * len(self.roles)
        if wire.multiqueue:
            self.config_size = _DRAFT_CONFIG.size
            self.device_features = feature_mask(VirtioFeature.VIRTIO_F_VERSION_1,
                                                VirtioFeature.VIRTIO_F_EVENT_IDX,
                                                VirtioFeature.VIRTIO_F_INDIRECT_DESC)
        else:
            self.config_size = _CONFIG.size
            self.device_features = feature_mask(VirtioFeature.VIRTIO_F_VERSION_1,
                                                VirtioFeature.VIRTIO_F_EVENT_IDX,
                                                VirtioFeature.VIRTIO_F_INDIRECT_DESC,
                                                VirtioVsockFeature.VIRTIO_VSOCK_F_SEQPACKET)
        #: the pairs in use since DRIVER_OK (see "The draft's queues"; 1 in the standard)
        self.lanes = 0
        self.guest_cid = guest_cid
        #: the host ends, asked in this order for guest-initiated connections
        self.backends = list(backends)
        self.max_connections = max_connections
        self.conn_buf_size = conn_buf_size
        self.metrics = new_metrics()
        self.errors = GuestErrorLog("virtio-vsock (guest)", logger)
        self.host_errors = GuestErrorLog("virtio-vsock (host peers)", logger)
        self.muxer: VsockMuxer | None = None      # made by attach_loop()
        self._started = False
        self._memory: GuestMemory | None = None
        self._queues: list[Queue] | None = None
        self._interrupt: Callable[[int], None] | None = None
        # per lane: rx buffers popped ahead; header-only ones held aside; an rx turn scheduled
        self._rx_stock: list[collections.deque[RxBuffer]] = [collections.deque() for _ in range(pairs)]
        self._rx_held: list[collections.deque[RxBuffer]] = [collections.deque() for _ in range(pairs)]
        self._rx_scheduled: set[int] = set()
        self._more_scheduled: set[int] = set()
        self._events_owed = 0
        # after TRANSPORT_RESET: the event queue's avail.idx when the event was written
        # (None: not written yet), when the hold ends at the latest, the poll timer
        self._event_mark: int | None = None
        self._hold_until = 0.0
        self._hold_timer: TimerHandle | None = None

    # -- the machine's side (VirtioDevice) ------------------------------------------------
    def attach_loop(self, loop: EventLoop) -> None:
        """Run on ``loop``; make the muxer; attach every backend (which may bind
        host sockets: ConfigError).  If a backend fails, :meth:`close` still
        releases what the others acquired."""
        super().attach_loop(loop)
        self.muxer = VsockMuxer(guest_cid=self.guest_cid, loop=loop, metrics=self.metrics,
                                errors=self.errors, host_errors=self.host_errors,
                                max_connections=self.max_connections,
                                conn_buf_size=self.conn_buf_size, wire=self.wire)
        self.muxer.on_rx_pending = self._schedule_rx
        self.muxer.services = self.backends
        host = _DeviceHost(self, loop, self.muxer)
        for backend in self.backends:
            backend.attach(host)
        if self.group is not None:
            self.muxer.group = self.group
            self.group.on_rx_pending = self.muxer.group_rx_pending
            self.group.on_tx_resume = lambda: self._again(self._tx_index[0])
            self.group.attach(self.guest_cid, loop, self.metrics, self.errors, self.host_errors)

    def start(self) -> None:
        """The backends start serving (idempotent; any thread)."""
        self.loop.run_in_loop(self._do_start, wait=True)

    def stop(self) -> None:
        """Drop every connection and stop the backends (idempotent; any thread)."""
        if self.loop is not None:
            self.loop.run_in_loop(self._do_stop, wait=True)

    def close(self) -> None:
        """stop(), and forget the queues (after the loop thread stopped)."""
        self.stop()
        self._forget_queues()

    def _do_start(self) -> None:
        if not self._started:
            self._started = True
            for backend in self.backends:
                backend.start()
            if self.group is not None:
                self.group.start()

    def _do_stop(self) -> None:
        self._started = False
        self.muxer.reset_all()
        for backend in self.backends:
            backend.stop()
        if self.group is not None:
            self.group.stop()

    # -- VirtioDevice ------------------------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        """``struct virtio_vsock_config { le64 guest_cid; }`` (the draft's
        ``{ le32 guest_cid; le32 max_virtqueue_pairs; }``), any bytes of it."""
        config = (_DRAFT_CONFIG.pack(self.guest_cid, self.pairs) if self.wire.multiqueue
                  else _CONFIG.pack(self.guest_cid))
        data = config[offset:offset + size]
        return data + bytes(size - len(data))

    def queue_required(self, index: int) -> bool:
        """The standard's three queues; the draft's pair 0 only (see "The draft's queues")."""
        return not self.wire.multiqueue or self.roles[index] in ((RX, 0), (TX, 0))

    def activate(self, memory: GuestMemory, queues: list[Queue],
                 interrupt: Callable[[int], None]) -> None:
        self.loop.run_in_loop(self._do_activate, memory, queues, interrupt, wait=True)

    def queue_notify(self, index: int) -> None:
        self.loop.run_in_loop(self._process, index, wait=False)

    def reset(self) -> None:
        self.loop.run_in_loop(self._do_reset, wait=True)

    def transport_reset(self) -> None:
        """Post VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and drop all connections (any thread)."""
        self.loop.run_in_loop(self._do_transport_reset, wait=True)

    def counters(self) -> dict:
        out = dict(self.metrics)
        out["connections"] = len(self.muxer.connections)
        if self.group is not None:
            out["group"] = self.group.counters()
        out["guest_errors_by_reason"] = dict(self.errors.counts)
        out["host_errors_by_reason"] = dict(self.host_errors.counts)
        return out

    # -- on the I/O thread ---------------------------------------------------------------
    def _do_activate(self, memory: GuestMemory, queues: list[Queue],
                     interrupt: Callable[[int], None]) -> None:
        self._memory, self._queues, self._interrupt = memory, queues, interrupt
        self.muxer.seqpacket = bool(self.acked_features & _F_SEQPACKET)
        lanes = 0
        while lanes < self.pairs and queues[self._rx_index[lanes]] and queues[self._tx_index[lanes]]:
            lanes += 1
        if any(queues[i] for i in self._rx_index[lanes:] + self._tx_index[lanes:]):
            self.errors.report("queue pair enabled after a missing one (ignored)", f"{lanes} pairs in use")
        self.lanes = lanes
        self.muxer.set_lanes(lanes)
        if self.group is not None:
            self.group.set_live(True)
        for index, queue in enumerate(queues):
            if queue is not None and self.roles[index][0] != RX:
                self._process(index)
        for lane in range(lanes):
            self._process(self._rx_index[lane])

    def _do_reset(self) -> None:
        if self._queues is not None:
            self.metrics["device_resets"] += 1     # a live device: its connections end here
        self.muxer.reset_all()
        if self.group is not None:
            self.group.set_live(False)
        self.muxer.seqpacket = False
        self._forget_queues()
        self._events_owed = 0
        self.acked_features = 0

    def _forget_queues(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._memory = self._queues = self._interrupt = None
        self.lanes = 0
        for stock in self._rx_stock + self._rx_held:
            stock.clear()

    def _do_transport_reset(self) -> None:
        self.metrics["transport_resets"] += 1
        self.muxer.reset_all()
        if self.group is not None:
            self.group.guest_reset()
        if self._queues is not None and not self.wire.multiqueue:
            self._events_owed = 1        # one event says it all; resets coalesce
            self._event_mark = None
            self._hold_until = self.loop.time() + TRANSPORT_RESET_HOLD
            self.muxer.hold_requests()
            self._process(EVENTQ)
            if self._hold_timer is None:
                self._watch_event_taken()

    def _watch_event_taken(self) -> None:
        """Hold host REQUESTs (:meth:`VsockMuxer.hold_requests`) until the guest has
        added an event buffer since the event was written: a driver handles an event
        before it re-posts the buffer (Linux's ``virtio_transport_event_work``), so
        by then the connections the reset drops are gone; or until
        :data:`TRANSPORT_RESET_HOLD` is over (a driver that does not re-post)."""
        self._hold_timer = None
        if self._queues is None:
            return                      # a device reset ended the hold (reset_all)
        taken = (self._event_mark is not None
                 and self._queues[EVENTQ].avail_idx() != self._event_mark)
        if taken or self.loop.time() >= self._hold_until:
            self.muxer.release_requests()
        else:
            self._hold_timer = self.loop.call_later(_HOLD_POLL, self._watch_event_taken)

    def _process(self, index: int) -> None:
        """Handle queue ``index`` (a kick, or a rescheduled batch), then interrupt if due."""
        self._more_scheduled.discard(index)
        if self._queues is None or self._queues[index] is None:
            return
        role, lane = self.roles[index]
        if lane >= self.lanes:
            return                       # a pair not in use
        if role == TX:
            self._process_tx(index, lane)
        elif role == EVENT:
            self._process_event(index)
        elif role == CONTROL:
            self._process_control(index)
        for other in range(self.lanes):  # tx work and kicks of rx both end here
            if self.muxer.has_pending_rx(other):     # else an rx turn has nothing to fill
                self._process_rx(other)
        self._notify_guest()

    def _again(self, index: int) -> None:
        if index not in self._more_scheduled:
            self._more_scheduled.add(index)
            self.loop.call_soon(self._process, index)

    def _process_tx(self, index: int, lane: int) -> None:
        """Pop tx chains a batch at a time (:meth:`Queue.pop_batch`), hand the
        batch's packets to the muxer in ring order (:meth:`VsockMuxer.on_guest_packets`
        groups a connection's consecutive data into one host write), and return the
        whole batch with one ``used.idx`` store (:meth:`Queue.add_used_batch`,
        used.len 0).  The payloads are views of guest RAM until then."""
        tx = self._queues[index]
        budget = BATCH
        while True:
            tx.disable_notification()
            if self.muxer.tx_blocked:    # a group member is slow: the group calls us back
                return
            chains = tx.pop_batch(budget)
            if chains:
                try:
                    self._handle_tx_batch(chains, lane)
                finally:                 # even if the muxer raised: no chain stays in flight
                    tx.add_used_batch([(chain.head, 0) for chain in chains])
                budget -= len(chains)
                if budget == 0:
                    self._again(index)   # notifications stay off: we come back anyway
                    return
            # Whether more arrived meanwhile is what enable_notification() answers anyway:
            # no second pop_batch just to find the ring empty (one per kick saved)
            if not tx.enable_notification():
                return

    def _handle_tx_batch(self, chains, lane: int) -> None:
        """Parse each chain; runs of good packets go to the muxer together, a bad
        chain is reported in its place in the order."""
        good = []
        wire = self.wire
        for chain in chains:
            if chain.writable:
                self.errors.report("tx chain with device-writable descriptors (ignored)", repr(chain))
            try:
                good.append(parse_tx_chain(chain, wire))
            except VsockPacketError as e:
                if good:
                    self.muxer.on_guest_packets(good, lane)
                    good = []
                self.metrics["tx_bad_chains"] += 1
                self.errors.report(e.reason, e.hdr.describe() if e.hdr else repr(chain))
                if e.hdr is not None:
                    self.muxer.on_bad_guest_packet(e.hdr)
        if good:
            self.muxer.on_guest_packets(good, lane)

    def _schedule_rx(self, lane: int) -> None:
        """The muxer has a packet for the guest on ``lane`` (called on the I/O thread)."""
        if lane not in self._rx_scheduled:
            self._rx_scheduled.add(lane)
            self.loop.call_soon(self._run_rx, lane)

    def _run_rx(self, lane: int) -> None:
        self._rx_scheduled.discard(lane)
        if self._queues is not None and lane < self.lanes:
            self._process_rx(lane)
            self._notify_guest()

    def _process_rx(self, lane: int) -> None:
        """Fill rx buffers while the muxer owes the guest packets.

        Chains are popped a batch at a time into the stock ``_rx_stock`` (the
        first batch of a turn is :data:`RX_FIRST_BATCH`, each next one twice
        as big, so a lone reply pops few and a bulk transfer pops many), and
        every buffer filled or refused in this turn goes back with one
        ``used.idx`` store.  The muxer is offered the front of the stock (at
        most :data:`~pyvmm.vsock.muxer.RX_TURN_BUFFERS`) and fills a prefix
        of it, for one connection with one host read
        (:meth:`~pyvmm.vsock.muxer.VsockMuxer.fill_rx_burst`); the rest stays
        in the stock, in order.  Popped chains not needed yet stay with the
        device (in flight) for the next turn.  A header-only buffer (44
        bytes, no payload room) nobody has a control packet for is held
        aside (``_rx_held``, in flight) and offered first in later turns,
        so it neither stalls the buffers behind it nor makes the device spin.
        """
        index = self._rx_index[lane]
        rx = self._queues[index]
        used: list[tuple[int, int]] = []
        try:
            self._fill_rx(rx, used, lane, index)
        finally:
            rx.add_used_batch(used)

    def _fill_rx(self, rx: Queue, used: list[tuple[int, int]], lane: int, index: int) -> None:
        budget = BATCH
        want = RX_FIRST_BATCH
        stock = self._rx_stock[lane]
        held = self._rx_held[lane]
        muxer = self.muxer
        wire = self.wire
        hdr_len = wire.hdr_len
        while held and muxer.has_pending_rx(lane):    # control packets fit header-only buffers
            hdrs = muxer.fill_rx_burst([held[0]], lane)
            if not hdrs:
                break
            buf = held.popleft()
            used.append((buf.head, hdr_len + hdrs[0].len))
            budget -= 1
        while budget > 0 and muxer.has_pending_rx(lane):
            if not stock:
                chains = rx.pop_batch(min(want, budget))
                if not chains:
                    if rx.enable_notification():
                        continue        # buffers arrived while we looked
                    self.metrics["rx_starved"] += 1
                    return              # the guest will kick rx when it refills
                want *= 2
                stock.extend(RxBuffer(chain, wire) for chain in chains)
            buf = stock[0]
            if not buf.usable:
                stock.popleft()
                self.metrics["rx_bad_buffers"] += 1
                self.errors.report(f"rx buffer shorter than the {hdr_len}-byte header", repr(buf.chain))
                used.append((buf.head, 0))
                continue
            offer = min(budget, RX_TURN_BUFFERS, len(stock))
            hdrs = muxer.fill_rx_burst([buf] if offer == 1 else list(itertools.islice(stock, offer)), lane)
            if not hdrs:
                if buf.capacity == 0:
                    held.append(stock.popleft())   # no control packet for it now: aside
                    continue
                return                  # nothing to say right now; the stock waits
            for hdr in hdrs:
                used.append((stock.popleft().head, hdr_len + hdr.len))
            budget -= len(hdrs)
        if budget <= 0:
            self._again(index)

    def _process_control(self, index: int) -> None:
        """The draft's controlq: every buffer back with used length 0, counted."""
        queue = self._queues[index]
        queue.disable_notification()
        while True:
            while chains := queue.pop_batch(BATCH):
                self.metrics["controlq_buffers"] += len(chains)
                self.errors.report("controlq buffer (nothing is defined for it: used length 0)",
                                   repr(chains[0]))
                queue.add_used_batch([(chain.head, 0) for chain in chains])
            if not queue.enable_notification():
                return

    def _process_event(self, index: int) -> None:
        """Post the events owed, popping as many buffers as are owed at a time;
        the buffers used go back with one ``used.idx`` store."""
        ev = self._queues[index]
        used: list[tuple[int, int]] = []
        try:
            while self._events_owed:
                chains = ev.pop_batch(self._events_owed)
                if not chains:
                    ev.enable_notification()    # posted when the guest adds a buffer
                    return
                for chain in chains:
                    if chain.writable_len < _EVENT.size:
                        self.errors.report("event buffer shorter than 4 bytes", repr(chain))
                        used.append((chain.head, 0))
                        continue
                    chain.write_writable(_EVENT.pack(VirtioVsockEventId.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
                    self._event_mark = ev.avail_idx()   # before the guest can see the event
                    used.append((chain.head, _EVENT.size))
                    self._events_owed -= 1
                    self.metrics["events_sent"] += 1
        finally:
            ev.add_used_batch(used)

    def _notify_guest(self) -> None:
        if self._queues is None:
            return
        need = False
        for q in self._queues:          # every queue: each closes its own batch
            if q is not None:
                need |= q.needs_notification()
        if need:
            self.metrics["interrupts"] += 1
            self._interrupt(VIRTIO_MMIO_INT_VRING)


class _DeviceHost:
    """The device as its backends see it: :class:`~pyvmm.vsock.backend.VsockHost`."""

    def __init__(self, device: VsockDevice, loop: EventLoop, muxer: VsockMuxer) -> None:
        self._device, self._loop, self._muxer = device, loop, muxer
        self.metrics = device.metrics
        self.host_errors = device.host_errors
        self.datagrams = device.wire.datagrams

    def connect_host(self, port: int, vtype: int, stream: HostStream, *,
                     preamble: Callable[[int], bytes] | None = None,
                     on_connect: Callable[[bool], None] | None = None) -> bool:
        return self._muxer.connect_host(port, vtype, stream, preamble=preamble,
                                        on_connect=on_connect) is not None

    def guest_connect_done(self, local_port: int, peer_port: int, stream: HostStream,
                           ok: bool) -> None:
        self._muxer.guest_connect_done(local_port, peer_port, stream, ok)

    def send_datagram(self, src_port: int, dst_port: int, data: bytes) -> bool:
        return self._muxer.send_datagram(src_port, dst_port, data)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._loop.add_reader(fd, callback)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._loop.add_writer(fd, callback)

    def remove_writer(self, fd: int) -> None:
        self._loop.remove_writer(fd)

    def remove_fd(self, fd: int) -> None:
        self._loop.remove_fd(fd)

    def call_later(self, delay: float, callback: Callable, *args) -> TimerHandle:
        return self._loop.call_later(delay, callback, *args)

    def call_soon_threadsafe(self, callback: Callable, *args) -> None:
        self._loop.call_soon_threadsafe(callback, *args)

    def may_block(self) -> bool:
        return self._loop.running and not self._loop.in_loop_thread()

    def counters(self) -> dict:
        return self._device.counters()

    def transport_reset(self) -> None:
        self._device.transport_reset()
