"""Fuzz targets: what a hostile guest (and a misbehaving host peer) can feed pyvmm, with no KVM.

Each target is ``fn(data: bytes) -> None``: it decodes ``data`` (with atheris's
``FuzzedDataProvider``) into actions, runs them, and raises :class:`Violation`
if an invariant breaks.  ``tests/fuzz/run.py`` drives them with atheris
(coverage-guided, libFuzzer underneath); ``tests/unit/test_fuzz.py`` replays the
kept inputs (``tests/fuzz/corpus/<target>/``) and runs a short fuzz of each.

* ``queue``: the split-queue parser (virtio 1.2 §2.7) over an arbitrary descriptor
  table and available ring in a small guest memory -- chains, indirect tables,
  loops, lengths, index wrap-around.  Invariants: no exception but the defined
  ones; every chain's buffers lie in guest memory (the views are slices of RAM:
  a view past it would raise); a queue that reports no error keeps its counters
  consistent (in flight == popped - used); ``pop_batch`` returns at most the
  budget; the walk ends (bounded by the table size: a hang is a libFuzzer timeout).
* ``mmio``: the virtio-mmio register file of a vsock device, any sequence of
  reads and writes, any width and offset, any status order, notifies included.
  Invariants: no exception escapes the bus interface; nothing escapes the device
  (``device_errors`` stays empty).
* ``vsock``: the vsock device behind a real transport, in each protocol mode
  (standard, and the 2013 draft with 1-4 pairs), driven by a mock guest driver
  sending arbitrary packets (any op, type, ports, CIDs, lengths, credit fields,
  any lane) and posting rx buffers of any layout, and by host events through the
  Python API (listen, connect, write, shut down, close), through Firecracker's
  Unix host end (peers on ``PATH`` and ``PATH.seqpacket`` sending CONNECT lines
  or any bytes, services at ``PATH_<port>`` the guest connects to, datagrams of
  any bytes on ``PATH.dgram`` in draft mode) and the clock.
  Invariants: nothing escapes the device or a loop callback; the device never
  needs a reset (the driver's rings are well formed here); every used element
  names a chain the driver made available, once (MockQueue checks that); the
  device never sends a connection more RW bytes than the guest's credit at the
  time; the tables stay within their named bounds; once the input is over and
  everything is closed, the process holds no more file descriptors than it held
  before (no host peer can make pyvmm leak one).
* ``blk``: the virtio-blk device behind a real transport over a small raw image
  (read-write or read-only), driven by a mock guest driver posting arbitrary
  requests: any type, sector (around the end of the disk and anywhere in u64),
  header, data and status lengths in either direction, any number of
  descriptors, DISCARD / WRITE_ZEROES segments with any fields, direct or
  indirect, kicked in batches.  Invariants: nothing escapes the device or a loop
  callback; the device never needs a reset; every used element names a chain
  the driver made available, once, with used.len within its writable bytes
  (MockQueue checks both); every answered status is VIRTIO_BLK_S_OK, _IOERR or
  _UNSUPP; the image never changes size, and a read-only image never changes.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "unit")]

with atheris.instrument_imports(include=["pyvmm"]):
    import pyvmm.virtio.mmio  # noqa: F401
    import pyvmm.virtio.queue  # noqa: F401
    import pyvmm.vsock  # noqa: F401
    import pyvmm.vsock.connection  # noqa: F401
    import pyvmm.blk.device  # noqa: F401
    import pyvmm.blk.raw  # noqa: F401

from pyvmm.memory import GuestMemory                                    # noqa: E402
from pyvmm.virtio import queue as vq                                    # noqa: E402
from pyvmm.virtio.eventloop import EventLoop                            # noqa: E402
from pyvmm.virtio.mmio import MmioTransport                             # noqa: E402
from pyvmm.vsock import VsockDevice                                     # noqa: E402
from pyvmm.vsock.connection import Connection                          # noqa: E402
from pyvmm.vsock.muxer import DGRAM_MAX_QUEUED, HOST_PORT_FIRST        # noqa: E402
from pyvmm.vsock.unix import (DGRAM_SUFFIX, SEQPACKET_SUFFIX, UnixBackend,  # noqa: E402
                              default_backends)
from pyvmm.vsock.wire import (DGRAM, OP_ATTACH, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,  # noqa: E402
                              OP_NEGOTIATE, OP_OFFER, OP_REQUEST, OP_RESPONSE, OP_RST,
                              OP_RW, OP_SHUTDOWN, RFC2013, SEQPACKET, STREAM, VIRTIO)

__all__ = ["TARGETS", "Violation"]


class Violation(AssertionError):
    """An invariant of the module docstring broke."""


# -- queue ----------------------------------------------------------------------------------
_QMEM = 64 * 1024
_QINDIRECT = 0x8000                     # where indirect tables are laid out
_U64, _U32 = (1 << 64) - 1, (1 << 32) - 1


def fuzz_queue(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    size = 1 << fdp.ConsumeIntInRange(0, 6)                   # 1 .. 64 entries
    mem = GuestMemory(_QMEM)
    try:
        desc, avail, used = 0x1000, 0x3000, 0x4000
        # mostly plausible values (addresses inside this memory, small lengths, next indexes
        # around the table size), sometimes anything: the fuzzer reaches deep chains quickly
        # and still sees every hostile value
        for table, entries in ((desc, size), (_QINDIRECT, fdp.ConsumeIntInRange(0, 16))):
            for i in range(entries):
                mem.write(table + 16 * i, struct.pack(
                    "<QIHH",
                    fdp.ConsumeIntInRange(0, _QMEM) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeInt(8) & _U64,
                    fdp.ConsumeIntInRange(0, 0x2000) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeInt(4) & _U32,
                    fdp.ConsumeIntInRange(0, 7) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeInt(2) & 0xFFFF,
                    fdp.ConsumeIntInRange(0, size + 1) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeInt(2) & 0xFFFF))
        ring = [fdp.ConsumeIntInRange(0, size + 1) for _ in range(size)]
        mem.write(avail, struct.pack(f"<HH{size}HH", fdp.ConsumeIntInRange(0, 1),
                                     fdp.ConsumeIntInRange(0, 0xFFFF) if fdp.ConsumeBool()
                                     else fdp.ConsumeIntInRange(0, size), *ring,
                                     fdp.ConsumeIntInRange(0, 0xFFFF)))
        try:
            q = vq.Queue(mem, size, desc, avail, used, event_idx=fdp.ConsumeBool(),
                         indirect_desc=fdp.ConsumeBool())
        except vq.QueueError:
            return
        popped = used_n = 0
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            budget = fdp.ConsumeIntInRange(1, 256)
            chains = q.pop_batch(budget)
            if len(chains) > budget:
                raise Violation(f"pop_batch({budget}) returned {len(chains)} chains")
            popped += len(chains)
            for chain in chains:
                for view in chain.readable_views() + chain.writable_views():
                    bytes(view[:1])                           # a view of RAM, readable
                if chain.readable_len < 0 or chain.writable_len < 0:
                    raise Violation("negative chain length")
            take = chains[:fdp.ConsumeIntInRange(0, len(chains))] if chains else []
            q.add_used_batch([(c.head, fdp.ConsumeIntInRange(0, 1 << 16)) for c in take])
            used_n += len(take)
            q.needs_notification()
            q.enable_notification()
            if fdp.ConsumeBool():                             # the driver moves avail.idx on
                mem.write(avail + 2, struct.pack("<H", fdp.ConsumeIntInRange(0, 0xFFFF)))
            if q.broken is None and q.in_flight != popped - used_n:
                raise Violation(f"in_flight {q.in_flight} != popped {popped} - used {used_n}")
    finally:
        mem.close()


# -- the vsock device, a mock guest, host events ---------------------------------------------------
_PORTS = (1000, 1001, 80, 81, HOST_PORT_FIRST, HOST_PORT_FIRST + 1)
_OPS = (OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST,
        OP_NEGOTIATE, OP_OFFER, OP_ATTACH)
_RX_LAYOUTS = ("split", "single", "scattered")


class _CreditCheck:
    """Wraps Connection.fill_rx / fill_rx_burst: the RW bytes of one call never exceed
    the guest's credit (``peer_credit()``) when the call began."""

    def __init__(self) -> None:
        self.violation: str | None = None
        self._fill_rx, self._fill_rx_burst = Connection.fill_rx, Connection.fill_rx_burst

    def __enter__(self):
        check = self

        def fill_rx(conn, rx, now):
            credit = conn.peer_credit()
            hdr = check._fill_rx(conn, rx, now)
            if hdr is not None and hdr.op == OP_RW and hdr.len > credit:
                check.violation = f"RW of {hdr.len} bytes with credit {credit}: {conn!r}"
            return hdr

        def fill_rx_burst(conn, bufs, now):
            credit = conn.peer_credit()
            hdrs = check._fill_rx_burst(conn, bufs, now)
            sent = sum(h.len for h in hdrs if h.op == OP_RW)
            if sent > credit:
                check.violation = f"{sent} RW bytes with credit {credit}: {conn!r}"
            return hdrs

        Connection.fill_rx, Connection.fill_rx_burst = fill_rx, fill_rx_burst
        return self

    def __exit__(self, *exc) -> None:
        Connection.fill_rx, Connection.fill_rx_burst = self._fill_rx, self._fill_rx_burst


_UDS_DIR = None                         # a temporary directory per process, made on first use
_UDS_SEQ = itertools.count()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fuzz_vsock(data: bytes) -> None:
    fds_before = _open_fds()
    _fuzz_vsock(data)
    fds_after = _open_fds()
    if fds_after > fds_before:          # fewer is fine: others' garbage collected meanwhile
        raise Violation(f"{fds_after - fds_before} file descriptors left open after the input")


def _fuzz_vsock(data: bytes) -> None:
    global _UDS_DIR
    from vsock_guest import Guest            # the mock Linux-like / draft driver (tests/unit)
    fdp = atheris.FuzzedDataProvider(data)
    draft = fdp.ConsumeBool()
    kw = dict(wire=RFC2013, pairs=fdp.ConsumeIntInRange(1, 4)) if draft else {}
    loop = EventLoop()
    if _UDS_DIR is None:
        _UDS_DIR = tempfile.mkdtemp(prefix="pyvmm-fuzz-")
    uds = os.path.join(_UDS_DIR, f"v{next(_UDS_SEQ)}")
    api, backends = default_backends(uds)
    g = Guest(None, loop=loop, backends=backends, rx_buffers=fdp.ConsumeIntInRange(0, 8),
              rx_layout=_RX_LAYOUTS[fdp.ConsumeIntInRange(0, 2)], mem_mib=16, **kw)
    g.api = api
    g.unix = next(b for b in backends if isinstance(b, UnixBackend))
    socks: list[socket.socket] = []
    listeners = [api.listen(80), api.listen(81, type=STREAM if draft else SEQPACKET)]
    services = []                            # host services the guest may connect to: PATH_<port>
    for port, kind in zip(_PORTS, (socket.SOCK_STREAM, socket.SOCK_SEQPACKET) * 3):
        svc = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK)
        svc.bind(f"{uds}_{port}")
        svc.listen(4)
        services.append(svc)
    try:
        with _CreditCheck() as credit:
            seen: list = []                           # the device's latest packets to the guest
            for _ in range(fdp.ConsumeIntInRange(1, 48)):
                if fdp.remaining_bytes() == 0:
                    break
                _step(fdp, g, api, socks, listeners, draft, seen, services)
                g.pump(50)
                seen = [h for h, _ in g.recv(refill=fdp.ConsumeBool())] or seen
                g.tx_done()
                if credit.violation:
                    raise Violation(credit.violation)
                _check(g)
    finally:
        for s in socks + services:
            s.close()
        for lst in listeners:
            lst.close()
        g.close()
        loop.close()
        for name in os.listdir(_UDS_DIR):
            os.unlink(os.path.join(_UDS_DIR, name))


#: what a well-behaved guest answers to the device's packets (the reflex action)
_REFLEX = {OP_REQUEST: {False: OP_RESPONSE, True: OP_NEGOTIATE}, OP_OFFER: {True: OP_ATTACH},
           OP_SHUTDOWN: {False: OP_RST, True: OP_RST}, OP_CREDIT_REQUEST: {False: OP_CREDIT_UPDATE}}


def _reflex(fdp, g, seen, draft: bool) -> None:
    """Answer the device's latest packets as a well-behaved guest would (handshake steps,
    credit for data, RST after SHUTDOWN), sometimes with data: the fuzzer reaches established
    connections and their data paths without having to guess every field."""
    for h in seen:
        txq = g.txqs[(h.src_port ^ h.dst_port) % g.use_pairs]
        if len(txq.free) < 5:
            return
        op = _REFLEX.get(h.op, {}).get(draft)
        if h.op == OP_RW and h.type != DGRAM:
            op = OP_CREDIT_UPDATE
        if op is None:
            continue
        g.send(op, h.dst_port, h.src_port, type=h.type, buf_alloc=fdp.ConsumeIntInRange(0, 1 << 18),
               fwd_cnt=(h.fwd_cnt if op != OP_CREDIT_UPDATE else fdp.ConsumeIntInRange(0, 1 << 20)))
        if fdp.ConsumeBool() and len(txq.free) >= 5 and h.type != DGRAM:
            g.send(OP_RW, h.dst_port, h.src_port, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 65536)),
                   type=h.type, flags=fdp.ConsumeIntInRange(0, 3), buf_alloc=256 * 1024)


def _step(fdp, g, api, socks, listeners, draft: bool, seen: list, services: list) -> None:
    action = fdp.ConsumeIntInRange(0, 13)
    if action >= 12:
        _unix_peer(fdp, g, socks, draft)
        return
    if action >= 10:
        _reflex(fdp, g, seen, draft)
        return
    if action <= 3:                                           # a guest packet
        op = _OPS[fdp.ConsumeIntInRange(0, len(_OPS) - 1)] if fdp.ConsumeBool() else \
            fdp.ConsumeIntInRange(0, 0xFF if draft else 0xFFFF)
        if draft and op in (OP_RESPONSE, OP_CREDIT_REQUEST):
            op = OP_RW                                        # not in the draft's wire
        if not draft and op in (OP_NEGOTIATE, OP_OFFER, OP_ATTACH):
            op = OP_REQUEST
        vtype = (STREAM, SEQPACKET if not draft else DGRAM, fdp.ConsumeIntInRange(0, 3))[
            fdp.ConsumeIntInRange(0, 2)]
        if draft and vtype not in (STREAM, DGRAM):
            vtype = STREAM
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 9000))
        length = len(payload) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 70000)
        src = _PORTS[fdp.ConsumeIntInRange(0, 5)] if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 0xFFFF_FFFF)
        dst = _PORTS[fdp.ConsumeIntInRange(0, 5)] if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 0xFFFF_FFFF)
        lane = fdp.ConsumeIntInRange(0, g.use_pairs - 1) if draft and fdp.ConsumeBool() else None
        txq = g.txqs[(src ^ dst) % g.use_pairs if lane is None else lane]
        if len(txq.free) < 5:
            return                                            # the driver waits for tx buffers
        g.send(op, src, dst, payload, type=vtype, length=length, lane=lane,
               flags=fdp.ConsumeIntInRange(0, 0xFF if draft else 0xFFFF_FFFF),
               buf_alloc=fdp.ConsumeIntInRange(0, 1 << 20) if fdp.ConsumeBool() else 256 * 1024,
               fwd_cnt=fdp.ConsumeIntInRange(0, 0xFFFF_FFFF) if fdp.ConsumeBool() else 0,
               src_cid=g.dev.guest_cid if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 9),
               dst_cid=2 if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 9),
               parts=_split(fdp, g, op, src, dst, payload) if fdp.ConsumeIntInRange(0, 7) == 0 else None,
               indirect=fdp.ConsumeBool())
    elif action == 4:                                         # rx buffers of any layout and size
        rxq = g.rxqs[fdp.ConsumeIntInRange(0, len(g.rxqs) - 1)]
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            if len(rxq.free) < 3:
                break
            g.add_rx(layout=_RX_LAYOUTS[fdp.ConsumeIntInRange(0, 2)],
                     payload=fdp.ConsumeIntInRange(0, 8192), rxq=rxq)
        rxq.kick(force=True)
    elif action == 5:                                         # the host connects to a guest port
        fut = api.connect_async(_PORTS[fdp.ConsumeIntInRange(0, 5)])
        fut.add_done_callback(lambda f: f.exception() is None and socks.append(f.result()))
    elif action == 6:                                         # a host peer writes
        for lst in listeners:
            while not lst._queue.empty():
                socks.append(lst._queue.get_nowait()[0])
        for svc in services:
            while True:
                try:
                    socks.append(svc.accept()[0])
                except OSError:
                    break
        if socks:
            s = socks[fdp.ConsumeIntInRange(0, len(socks) - 1)]
            s.setblocking(False)
            try:
                s.send(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 70000)))
            except OSError:
                pass
    elif action == 7:                                         # a host peer shuts down or closes
        if socks:
            s = socks.pop(fdp.ConsumeIntInRange(0, len(socks) - 1))
            if fdp.ConsumeBool():
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                socks.append(s)
            else:
                s.close()
    elif action == 8:                                         # time passes (handshake, close timers)
        g.advance(fdp.ConsumeIntInRange(0, 3000) / 1000)
    else:                                                     # the host resets the transport
        api.transport_reset()


def _unix_peer(fdp, g, socks, draft: bool) -> None:
    """A local peer of the Unix host end: connects to PATH or PATH.seqpacket and sends a
    CONNECT line to a known port or any bytes (the rest may follow as a "host peer
    writes" step); or, in draft mode, sends a datagram of any bytes to PATH.dgram."""
    uds = g.unix.uds_path
    if draft and fdp.ConsumeIntInRange(0, 3) == 0:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as s:
            body = (b"%d\n" % _PORTS[fdp.ConsumeIntInRange(0, 5)] if fdp.ConsumeBool() else b"")
            try:
                s.sendto(body + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 5000)), uds + DGRAM_SUFFIX)
            except OSError:
                pass
        return
    seqpacket = not draft and fdp.ConsumeBool()
    s = socket.socket(socket.AF_UNIX, (socket.SOCK_SEQPACKET if seqpacket else socket.SOCK_STREAM)
                      | socket.SOCK_NONBLOCK)
    try:
        s.connect(uds + SEQPACKET_SUFFIX if seqpacket else uds)
        if fdp.ConsumeBool():
            line = b"CONNECT %d\n" % _PORTS[fdp.ConsumeIntInRange(0, 5)]
        else:
            line = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        if line:
            s.send(line + (fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 100)) if fdp.ConsumeBool() else b""))
    except OSError:
        s.close()
        return
    socks.append(s)


def _split(fdp, g, op, src, dst, payload) -> list[bytes]:
    """The packet's bytes cut into 1-4 descriptors at arbitrary points (header split too)."""
    from pyvmm.vsock.wire import VsockHeader
    raw = g.wire.encode(VsockHeader(g.dev.guest_cid, 2, src, dst, len(payload), STREAM, op, 0,
                                    256 * 1024, 0)) + payload
    cuts = sorted({fdp.ConsumeIntInRange(1, max(1, len(raw) - 1)) for _ in range(fdp.ConsumeIntInRange(0, 3))})
    parts, start = [], 0
    for cut in cuts + [len(raw)]:
        if cut > start:
            parts.append(raw[start:cut])
            start = cut
    return parts


def _check(g) -> None:
    if g.transport.device_errors:
        raise Violation(f"exceptions escaped the device: {g.transport.device_errors}")
    if g.loop.callback_errors:
        raise Violation(f"exceptions in loop callbacks: {dict(g.loop.callback_errors)}")
    if g.transport._needs_reset:
        raise Violation("the device set DEVICE_NEEDS_RESET on well-formed rings")
    mux = g.dev.muxer
    if len(mux.connections) > mux.max_connections:
        raise Violation("more connections than max_connections")
    if sum(len(c) for c in mux._control) > mux.max_control:
        raise Violation("control queue beyond max_control")
    if len(g.unix._handshakes) > g.unix.max_handshakes:
        raise Violation("more Unix peers in the CONNECT handshake than max_handshakes")
    if any(len(d) > DGRAM_MAX_QUEUED for d in mux._dgrams):
        raise Violation("datagram queue beyond DGRAM_MAX_QUEUED")
    for q, live in zip(mux._rxq, mux._in_rxq):
        if len(q) > 2 * len(live) + 64:
            raise Violation(f"rx line of {len(q)} keys for {len(live)} live ones")
    for conn in mux.connections.values():
        if len(conn._tx_buf) > conn.buf_alloc:
            raise Violation(f"{len(conn._tx_buf)} guest bytes held beyond buf_alloc: {conn!r}")


# -- mmio -------------------------------------------------------------------------------------------
def fuzz_mmio(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mem = GuestMemory(1 << 20)
    loop = EventLoop()
    draft = fdp.ConsumeBool()
    dev = VsockDevice(3, wire=RFC2013 if draft else VIRTIO, pairs=fdp.ConsumeIntInRange(1, 3) if draft else 1)
    try:
        dev.attach_loop(loop)
        dev.start()
        t = MmioTransport(dev, mem)
        mem.write(0, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1024)))   # rings the registers name
        for _ in range(fdp.ConsumeIntInRange(1, 200)):
            if fdp.remaining_bytes() == 0:
                break
            offset = fdp.ConsumeIntInRange(0, 0x1FF) if fdp.ConsumeBool() else \
                (0x000, 0x010, 0x014, 0x020, 0x024, 0x030, 0x038, 0x044, 0x050, 0x060, 0x064,
                 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0FC, 0x100)[fdp.ConsumeIntInRange(0, 19)]
            width = (1, 2, 4, 8)[fdp.ConsumeIntInRange(0, 3)]
            if fdp.ConsumeBool():
                t.read(offset, width)
            else:
                t.write(offset, fdp.ConsumeBytes(width).ljust(width, b"\0"))
            loop.run_once(0)
        if t.device_errors:
            raise Violation(f"exceptions escaped the device: {t.device_errors}")
        if loop.callback_errors:
            raise Violation(f"exceptions in loop callbacks: {dict(loop.callback_errors)}")
    finally:
        dev.close()
        loop.close()
        mem.close()


# -- blk --------------------------------------------------------------------------------------------
_BLK_SECTORS = 64                       # a 32 KiB image
_BLK_TYPES = (0, 1, 4, 8, 11, 13, 2, 5, 10, 14, 15, 0x80000000)


def fuzz_blk(data: bytes) -> None:
    import hashlib

    from blk_guest import BlkGuest, segment
    from pyvmm.blk.raw import RawBackend
    from pyvmm.blk.wire import VIRTIO_BLK_OUTHDR

    fdp = atheris.FuzzedDataProvider(data)
    read_only = fdp.ConsumeBool()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.img"
        path.write_bytes(bytes(range(256)) * (_BLK_SECTORS * 2))
        before = hashlib.sha256(path.read_bytes()).digest()
        backend = RawBackend(str(path), read_only=read_only)
        backend.open()
        g = BlkGuest(backend, mem_mib=4)
        try:
            for _ in range(fdp.ConsumeIntInRange(1, 16)):
                if fdp.remaining_bytes() == 0:
                    break
                for _ in range(fdp.ConsumeIntInRange(1, 8)):
                    _blk_request(fdp, g, VIRTIO_BLK_OUTHDR, segment)
                g.q.kick(force=True)
                g.loop.run_once(0)
                for status, used_len, _ in g.answers():
                    if used_len and status not in (0, 1, 2):
                        raise Violation(f"status byte {status} answered")
            if g.transport.device_errors:
                raise Violation(f"exceptions escaped the device: {g.transport.device_errors}")
            if g.loop.callback_errors:
                raise Violation(f"exceptions in loop callbacks: {dict(g.loop.callback_errors)}")
            if g.drv.status & 64:
                raise Violation("the device needs a reset")
        finally:
            g.close()
        if path.stat().st_size != _BLK_SECTORS * 512:
            raise Violation(f"the image changed size: {path.stat().st_size}")
        if read_only and hashlib.sha256(path.read_bytes()).digest() != before:
            raise Violation("a read-only image changed")


def _blk_request(fdp, g, outhdr, segment) -> None:
    rtype = _BLK_TYPES[fdp.ConsumeIntInRange(0, len(_BLK_TYPES) - 1)] if fdp.ConsumeIntInRange(0, 7) \
        else fdp.ConsumeInt(4) & _U32
    sector = fdp.ConsumeIntInRange(0, _BLK_SECTORS + 2) if fdp.ConsumeIntInRange(0, 3) \
        else fdp.ConsumeInt(8) & _U64
    head = outhdr.pack(rtype, 0, sector)
    cut = fdp.ConsumeIntInRange(0, 16) if fdp.ConsumeIntInRange(0, 7) == 0 else 16
    readable = [head[:cut]] if fdp.ConsumeBool() or cut < 16 else [head[:8], head[8:]]
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        if fdp.ConsumeBool():
            readable.append(segment(fdp.ConsumeIntInRange(0, _BLK_SECTORS + 2),
                                    fdp.ConsumeIntInRange(0, 80), fdp.ConsumeIntInRange(0, 3)))
        else:
            readable.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1100)))
    readable = [r for r in readable if r]
    writable = [fdp.ConsumeIntInRange(1, 1100) if fdp.ConsumeIntInRange(0, 3) else 512
                for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if not readable and not writable:
        writable = [1]
    if len(readable) + len(writable) > len(g.q.free):
        return
    g.submit(readable, writable, indirect=fdp.ConsumeBool(), kick=False)


TARGETS = {"queue": fuzz_queue, "mmio": fuzz_mmio, "vsock": fuzz_vsock, "blk": fuzz_blk}
