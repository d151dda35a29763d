"""Test helpers for pyvmm.vsock: a Linux-like guest driver and a fake clock.

:class:`Guest` builds a :class:`~pyvmm.vsock.VsockDevice` behind a real
:class:`~pyvmm.virtio.mmio.MmioTransport`, with the machine's backends (the
Python API ``api``, first, and the Unix socket ``unix`` if given a path) or
the test's own, on an :class:`~pyvmm.virtio.eventloop.EventLoop` ``loop``
with a fake clock; probes it with
:class:`~pyvmm.virtio.mock.MockDriver` as Linux 6.1 does (features, three
queues, ``guest_cid`` read as two 32-bit halves, DRIVER_OK, rx filled, 8
event buffers of 4 bytes), and then plays the guest's vsock driver by hand:
``send()`` puts a packet on tx and kicks, ``recv()`` collects rx packets (and
checks used.len = 44 + len) and refills.  ``wire=RFC2013`` plays pyvmm's own
draft driver instead: device ID 13, the controlq (if ``controlq``) and
``use_pairs`` of the device's ``pairs`` rx/tx pairs, each packet on its pair
(``lane``: ``(src_port ^ dst_port) % use_pairs`` unless given), the 39-byte
header; ``recv(with_lane=True)`` says which pair a packet came on.  No I/O thread: ``pump()`` runs
the loop on the test thread until nothing more happens (or a test starts
the thread: ``loop.start_thread()``).
"""

from __future__ import annotations

import errno
import struct
import threading
import time

from pyvmm.memory import GuestMemory
from pyvmm.virtio.eventloop import EventLoop
from pyvmm.virtio.mmio import MmioTransport
from pyvmm.virtio.mock import MockDriver
from pyvmm.vsock import VsockDevice, default_backends
from pyvmm.vsock.wire import (HDR, VIRTIO, VIRTIO_VSOCK_HDR_LEN, VirtioVsockOp, VirtioVsockType, VsockHeader,
                              WireFormat)

Op = VirtioVsockOp
STREAM = VirtioVsockType.VIRTIO_VSOCK_TYPE_STREAM
SEQPACKET = VirtioVsockType.VIRTIO_VSOCK_TYPE_SEQPACKET
GUEST_CID = 3
HOST_CID = 2
GUEST_BUF = 256 * 1024          # Linux VSOCK_DEFAULT_BUFFER_SIZE


class FakeClock:
    """An injectable monotonic clock that moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def hdr(op: int, src_port: int, dst_port: int, *, type: int = STREAM, length: int = 0, flags: int = 0,
        buf_alloc: int = GUEST_BUF, fwd_cnt: int = 0, src_cid: int = GUEST_CID,
        dst_cid: int = HOST_CID) -> bytes:
    return HDR.pack(src_cid, dst_cid, src_port, dst_port, length, type, op, flags, buf_alloc, fwd_cnt)


class Guest:
    """One guest with a probed vsock device (see the module docstring)."""

    def __init__(self, uds_path: str | None = None, *, cid: int = GUEST_CID, rx_buffers: int = 64,
                 rx_layout: str = "split", rx_payload: int = 4096, features: int | None = None,
                 mem_mib: int = 64, backends: list | None = None, loop: EventLoop | None = None,
                 wire: WireFormat = VIRTIO, pairs: int = 1, use_pairs: int | None = None,
                 controlq: bool = False, **dev_kw) -> None:
        self.wire = wire
        self.use_pairs = pairs if use_pairs is None else use_pairs
        self.clock = FakeClock()
        self._own_loop = loop is None
        self.loop = EventLoop(self.clock) if self._own_loop else loop
        self.memory = GuestMemory(mem_mib << 20)
        self.api, machine_backends = default_backends(uds_path)      # as the machine
        self.unix = machine_backends[1] if uds_path else None
        if backends is None:
            backends = machine_backends
        if wire.multiqueue:
            dev_kw.update(wire=wire, pairs=pairs)
        self.dev = VsockDevice(cid, backends, **dev_kw)
        try:
            self.dev.attach_loop(self.loop)     # the Unix backend binds here
        except BaseException:
            self.close()
            raise
        self.dev.start()
        self.irqs = 0
        self.irq_event = threading.Event()
        self.transport = MmioTransport(self.dev, self.memory, self._irq)
        self.drv = MockDriver(self.memory, self.transport)
        self.rx_layout = rx_layout
        self.rx_payload = rx_payload
        if wire.multiqueue:
            if not self.drv.negotiate(features):
                raise AssertionError("vsock probe failed")
            self.cid_read, self.pairs_read = struct.unpack("<II", self.drv.read_config(0, 8))
            self.controlq = self.drv.setup_queue(0) if controlq else None
            self.rxqs, self.txqs = [], []
            for lane in range(self.use_pairs):
                self.rxqs.append(self.drv.setup_queue(2 * lane + 1))
                self.txqs.append(self.drv.setup_queue(2 * lane + 2))
            self.drv.driver_ok()
            self.evq = None
        else:
            if not self.drv.negotiate(features) or not self.drv.setup_queues(3):
                raise AssertionError("vsock probe failed")
            self.cid_read = struct.unpack("<Q", self.drv.read_config(0, 8))[0]
            self.drv.driver_ok()
            rxq, txq, self.evq = self.drv.queues
            self.rxqs, self.txqs = [rxq], [txq]
        self.rxq, self.txq = self.rxqs[0], self.txqs[0]
        for rxq in self.rxqs:
            for _ in range(rx_buffers):
                self.add_rx(rxq=rxq)
            rxq.kick(force=True)
        if self.evq is not None:
            for _ in range(8):
                self.evq.add_chain(writable=[4])
            self.evq.kick(force=True)
        self.pending: list[tuple[VsockHeader, bytes]] = []

    def _irq(self) -> None:
        self.irqs += 1
        self.irq_event.set()

    def wait_packets(self, timeout: float = 5.0) -> list[tuple[VsockHeader, bytes]]:
        """With the I/O thread running: the next rx packets, waiting for
        the device's interrupt (not polling); AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.irq_event.clear()
            packets = self.recv()
            if packets:
                return packets
            if not self.irq_event.wait(max(0.0, deadline - time.monotonic())):
                raise AssertionError("no rx packet from the device in time")

    # -- rx -------------------------------------------------------------------------
    def add_rx(self, layout: str | None = None, payload: int | None = None, *, rxq=None) -> int:
        layout = layout or self.rx_layout
        payload = self.rx_payload if payload is None else payload
        rxq = rxq or self.rxq
        hdr_len = self.wire.hdr_len
        if layout == "split":           # Linux <= 6.1: header descriptor + payload descriptor
            return rxq.add_chain(writable=[hdr_len, payload])
        if layout == "single":          # Linux 6.2+: one descriptor
            return rxq.add_chain(writable=[hdr_len + payload])
        if layout == "scattered":       # header itself split, payload in pieces
            return rxq.add_chain(writable=[20, hdr_len - 20 + payload // 2, payload - payload // 2])
        raise ValueError(layout)

    def recv(self, refill: bool = True, *, with_lane: bool = False) -> list:
        """Every rx packet the device completed since the last call (checked):
        ``(hdr, payload)``, or ``(lane, hdr, payload)`` if ``with_lane``."""
        out = []
        hdr_len = self.wire.hdr_len
        for lane, rxq in enumerate(self.rxqs):
            got = 0
            for used in rxq.used():
                if used.len < hdr_len:
                    raise AssertionError(f"rx used.len {used.len} < {hdr_len}")
                h = self.wire.unpack(used.data)
                if used.len != hdr_len + h.len:
                    raise AssertionError(f"used.len {used.len} != {hdr_len} + hdr.len {h.len}")
                payload = used.data[hdr_len:used.len]
                out.append((lane, h, payload) if with_lane else (h, payload))
                got += 1
                if refill:
                    self.add_rx(rxq=rxq)
            if got and refill:
                rxq.kick()
        return out

    def take(self, *, with_lane: bool = False) -> list:
        """pump() then recv()."""
        self.pump()
        return self.recv(with_lane=with_lane)

    # -- tx ---------------------------------------------------------------------------
    def send(self, op: int, src_port: int, dst_port: int, payload: bytes = b"", *,
             parts: list[bytes] | None = None, kick: bool = True, indirect: bool = False,
             lane: int | None = None, **kw) -> None:
        """Put one packet on tx (header descriptor + payload descriptor, as Linux);
        ``op``/``type`` are canonical values (pyvmm.vsock.wire)."""
        kw.setdefault("length", len(payload))
        kw.setdefault("src_cid", self.dev.guest_cid)
        if self.wire is VIRTIO:
            raw = hdr(op, src_port, dst_port, **kw)
        else:
            raw = self.wire.encode(VsockHeader(
                kw["src_cid"], kw.get("dst_cid", HOST_CID), src_port, dst_port, kw["length"],
                kw.get("type", STREAM), op, kw.get("flags", 0), kw.get("buf_alloc", GUEST_BUF),
                kw.get("fwd_cnt", 0)))
        if parts is None:
            parts = [raw, payload] if payload else [raw]
        txq = self.txqs[(src_port ^ dst_port) % self.use_pairs if lane is None else lane]
        txq.add_chain(readable=parts, indirect=indirect)
        if kick:
            txq.kick(force=True)

    def send_raw(self, parts: list[bytes], lane: int = 0) -> None:
        self.txqs[lane].add_chain(readable=parts)
        self.txqs[lane].kick(force=True)

    def tx_done(self) -> list:
        return [used for txq in self.txqs for used in txq.used()]

    # -- events -----------------------------------------------------------------------
    def events(self, repost: bool = False) -> list[int]:
        """The event ids the device wrote; ``repost``: then give each buffer back
        and kick, as Linux's driver does once it has handled the event."""
        ids = [struct.unpack("<I", u.data)[0] for u in self.evq.used()]
        if repost and ids:
            for _ in ids:
                self.evq.add_chain(writable=[4])
            self.evq.kick(force=True)
        return ids

    # -- time and the loop -----------------------------------------------------------
    def pump(self, rounds: int = 200) -> None:
        """Run the device loop on this thread until nothing is left to do."""
        for _ in range(rounds):
            if self.loop.run_once(0) == 0:
                return

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump()

    def close(self) -> None:
        """Stop the loop thread if a test started it, then close the device
        (and the loop, if this guest made it)."""
        if self._own_loop:
            self.loop.stop_thread()
        self.dev.close()
        if self._own_loop:
            self.loop.close()


# --- fakes for connection-level tests ----------------------------------------------------

class FakeChain:
    """Just what packet.py reads of a DescriptorChain: views of some buffers."""

    def __init__(self, readable=(), writable=()):
        self.head = 7
        self._r = [bytearray(b) for b in readable]
        self._w = [bytearray(n) for n in writable]
        self.readable_len = sum(map(len, self._r))
        self.writable_len = sum(map(len, self._w))
        self.writable = self._w

    def readable_views(self):
        return [memoryview(b) for b in self._r]

    def writable_views(self):
        return [memoryview(b) for b in self._w]

    def written(self, n):
        return b"".join(self._w)[:n]


class FakeStream:
    """A scripted host end: ``inbox``/``messages`` feed the guest, ``out``/
    ``records`` collect what the connection wrote, ``room`` is how many more
    bytes the host accepts before a write would block, ``max_record`` the
    largest record it takes (SEQPACKET)."""

    def __init__(self, seqpacket: bool = False, room: int = 1 << 30, max_record: int = 1 << 30) -> None:
        self.seqpacket = seqpacket
        self.max_record = max_record
        self.inbox = bytearray()
        self.messages: list[bytes] = []
        self.eof = self.hup = False
        self.out = bytearray()
        self.records: list[bytes] = []
        self.room = room
        self.fail: OSError | None = None
        self.shut_wr = self.closed = False

    def fileno(self) -> int:
        return -1

    def recv_into_views(self, views):
        if self.fail:
            raise self.fail
        if not self.inbox:
            if self.eof:
                return 0
            raise BlockingIOError
        done = 0
        for v in views:
            n = min(len(v), len(self.inbox) - done)
            v[:n] = self.inbox[done:done + n]
            done += n
        del self.inbox[:done]
        return done

    def recv_message(self, buf):
        if not self.messages:
            if self.eof:
                return None
            raise BlockingIOError
        m = self.messages.pop(0)
        n = min(len(m), len(buf))
        buf[:n] = m[:n]
        return len(m)

    def max_message(self, want):
        return self.max_record

    def send_views(self, views):
        if self.fail:
            raise self.fail
        data = b"".join(bytes(v) for v in views)
        if self.seqpacket:
            if len(data) > self.max_record:
                raise OSError(errno.EMSGSIZE, "Message too long")
            if self.room <= 0 or len(data) > self.room:     # a full socket takes no record
                raise BlockingIOError
            self.records.append(data)
            self.room -= len(data)
            return len(data)
        n = min(self.room, len(data))
        if n == 0 and data:
            raise BlockingIOError
        self.out += data[:n]
        self.room -= n
        return n

    def shutdown_write(self):
        self.shut_wr = True

    def hung_up(self):
        return self.hup

    def close(self):
        self.closed = True


def ops(packets) -> list:
    """The ops of a list of (header, payload) packets, for compact assertions."""
    return [h.op for h, _ in packets]
