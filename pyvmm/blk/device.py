"""The virtio-blk device (virtio 1.2 §5.2 "Block Device"): virtqueue glue and request checks.

This module owns the device as the transport and the machine see it: device
ID 2, its one request queue, the config space, the feature bits, and turning
each descriptor chain into checked :class:`~pyvmm.blk.backend.BlockRequest`
objects for the image behind it (a :class:`~pyvmm.blk.backend.BlockBackend`,
*given* to the device, never built by it; Firecracker
``devices/virtio/block/virtio/device.rs`` and ``request.rs``).  The guest's
layout is in :mod:`pyvmm.blk.wire`.

Contract with the machine (the :class:`~pyvmm.virtio.device.VirtioDevice`
machine contract, as vsock)::

    backend = open_backend(DiskConfig(path, read_only, cache, serial))  # opened: ConfigError
    dev = BlkDevice(backend, serial="disk0")    # serial: at most 20 ASCII bytes
    dev.attach_loop(loop)                       # the machine's one I/O loop
    transport = MmioTransport(dev, memory, irq_trigger)
    dev.add_reader(efd_0, cb_0)                 # the request queue's ioeventfd
    ...
    dev.close()                                 # after the loop stopped: closes the backend

Feature bits (§5.2.3).  Offered: VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX and
VIRTIO_F_INDIRECT_DESC (the virtio core implements both);
VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE and
VIRTIO_BLK_F_FLUSH always; VIRTIO_BLK_F_RO for a read-only backend;
VIRTIO_BLK_F_DISCARD / VIRTIO_BLK_F_WRITE_ZEROES only if the backend says it
``supports_discard`` / ``supports_write_zeroes`` (never on a read-only one).
Not offered: MQ (one queue: the one I/O thread serves every queue anyway),
CONFIG_WCE (the cache mode is the host's choice, ``cache=``), GEOMETRY,
TOPOLOGY, LIFETIME, SECURE_ERASE, ZONED.  FLUSH is offered in every cache
mode, so a write is durable only after a VIRTIO_BLK_T_FLUSH that followed
its completion (§5.2.6.2); a driver that does not negotiate FLUSH gets
write-through instead (the spec's case 1: every batch with writes is
followed by a flush before its writes complete).

Per wake-up (a kick, or a batch rescheduled): every available chain is
popped (:meth:`~pyvmm.virtio.queue.Queue.pop_batch`, up to :data:`BATCH`),
each is checked (:meth:`BlkDevice._parse`), the good ones become one list of
BlockRequests handed to ``backend.execute`` *once*, the status bytes are
written, all chains are returned with one ``used.idx`` store, and the guest
gets at most one interrupt for the turn.  ``used.len`` is the number of bytes
the device wrote into the chain: the data read (IN) or the 20-byte ID
(GET_ID), plus the status byte.

A request is checked as byte ranges of its chain, whatever the descriptor
boundaries (§2.6.4): the first 16 device-readable bytes are the header
(copied out once), the last device-writable byte is the status, and what is
between them is the data.  What the guest can get wrong, and the answer
(each logged once per reason and counted in ``guest_errors_by_reason``):

==============================================================  ==========================
guest mistake                                                    answer
==============================================================  ==========================
no device-writable byte (nowhere to put a status)                returned, used.len 0
fewer than 16 device-readable bytes (header)                     VIRTIO_BLK_S_IOERR
data in the wrong direction (readable data for IN / GET_ID,      VIRTIO_BLK_S_IOERR
writable data besides the status for OUT / FLUSH / DISCARD /
WRITE_ZEROES)
IN / OUT data empty or not a multiple of 512 bytes               VIRTIO_BLK_S_IOERR
IN / OUT with more than :data:`SEG_MAX` data segments, or one    VIRTIO_BLK_S_IOERR
larger than :data:`SIZE_MAX`
sector range not inside the disk (any u64 sector)                VIRTIO_BLK_S_IOERR
GET_ID buffer shorter than 20 bytes                              VIRTIO_BLK_S_IOERR
OUT / DISCARD / WRITE_ZEROES on a read-only disk                 VIRTIO_BLK_S_IOERR
DISCARD / WRITE_ZEROES not negotiated, an unknown flag, or       VIRTIO_BLK_S_UNSUPP
``unmap`` on a DISCARD (§5.2.6.2)
DISCARD / WRITE_ZEROES payload not whole 16-byte segments, more  VIRTIO_BLK_S_IOERR
segments or sectors per segment than advertised
an unknown request type                                          VIRTIO_BLK_S_UNSUPP
==============================================================  ==========================

Nothing the guest sends reaches the backend unless it passed these checks, so
the backend never sees a range outside ``[0, backend.size)``; a backend error
(an errno) is answered VIRTIO_BLK_S_IOERR and counted in
``host_errors_by_reason``.  The request buffers handed to the backend are
views of guest RAM (no copy); they are valid until ``execute`` returns.

What a request costs.  A 4 KiB request is one system call and otherwise
Python on the I/O thread.  Measured in-process with ``bench.micro_blk``'s
driver and a timer around each part (random 4 KiB reads, 32 requests per
kick, as the freestanding guest's ``blk-load`` keeps them; 2-vCPU EPYC under
PVM, shared and noisy: compare within one run), in us of CPU per request::

    part                                          before   now
    pop_batch: avail ring, walk of 3 descriptors    2.1    2.0
    _parse: header, status byte, data views, checks 7.4    4.2
    backend.execute around preadv / pwritev         3.0    1.7
    the system call itself                          2.7    2.6
    collect the results, status bytes, used ring    2.3    1.7
    wake-up, EVENT_IDX, interrupt (per turn)       <0.1   <0.1
    total                                          ~18    ~12

The wake-up (select, ``eventfd_read``, ``transport.queue_notify``: ~5 us),
the notification steps (~0.9 us) and the interrupt (~1.2 us) are per turn,
not per request, and turns are rarer than batches: in a 16,384-request
``blk-load`` run under KVM the loop went round ~65 times (blocking in select
5-14 times), the batches held 32 requests and the polling guest took one
interrupt.  "before" is the first version (a generic byte-range walk over
views, enum lookups per request, a dataclass without slots).

Threads: as vsock (:mod:`pyvmm.vsock.device`): all state belongs to the I/O
thread; ``activate``/``reset`` wait for it (bounded), ``queue_notify`` hands
it the work.  ``backend.execute`` runs on the I/O thread and blocks it for the
duration of the batch (a raw file: ``preadv``/``pwritev``/``fdatasync``).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import ConfigError
from ..memory import GuestMemory
from ..virtio.device import VIRTIO_ID_BLOCK, VIRTIO_MMIO_INT_VRING, VirtioDevice, VirtioFeature, feature_mask
from ..virtio.queue import DescriptorChain, GuestErrorLog, Queue
from .backend import BlockBackend, BlockOp, BlockRequest
from .wire import (SECTOR_SHIFT, SECTOR_SIZE, VIRTIO_BLK_CONFIG, VIRTIO_BLK_DISCARD_WRITE_ZEROES,
                   VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_OUTHDR, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                   VirtioBlkFeature, VirtioBlkStatus, VirtioBlkType, config_bytes)

__all__ = ["BATCH", "BlkDevice", "DISCARD_SECTOR_ALIGNMENT", "MAX_DISCARD_SECTORS", "MAX_DISCARD_SEG",
           "MAX_WRITE_ZEROES_SECTORS", "MAX_WRITE_ZEROES_SEG", "QUEUE_SIZE", "SEG_MAX", "SIZE_MAX",
           "METRIC_NAMES"]

logger = logging.getLogger("pyvmm.blk")

# --- every limit the device advertises or enforces, in one place --------------------------

#: QueueSizeMax of the request queue
QUEUE_SIZE = 256
#: chains handled per turn (one pop_batch, one backend.execute); the rest is rescheduled
BATCH = 256
#: seg_max: data segments in one IN / OUT request (the header and the status need the
#: other two descriptors of a chain as long as the queue, or of an indirect table)
SEG_MAX = QUEUE_SIZE - 2
#: size_max: bytes in one data segment
SIZE_MAX = 1 << 20
#: blk_size: the logical block size the guest uses
BLK_SIZE = SECTOR_SIZE
#: max_discard_sectors: sectors in one DISCARD segment (2 GiB; a hole punch costs the same
#: whatever its length)
MAX_DISCARD_SECTORS = 1 << 22
#: max_discard_seg: segments in one DISCARD request
MAX_DISCARD_SEG = 32
#: discard_sector_alignment: the granularity the guest should discard in (4 KiB; advice,
#: not checked: a hole punched into part of a block reads back as zeroes anyway)
DISCARD_SECTOR_ALIGNMENT = 8
#: max_write_zeroes_sectors: sectors in one WRITE_ZEROES segment (32 MiB: where the backend
#: must write the zeroes, one segment is at most that much I/O)
MAX_WRITE_ZEROES_SECTORS = 1 << 16
#: max_write_zeroes_seg: segments in one WRITE_ZEROES request
MAX_WRITE_ZEROES_SEG = 32

#: the device's counters (``counters()``), besides the errors by reason
METRIC_NAMES = (
    "requests_in", "requests_out", "requests_flush", "requests_get_id", "requests_discard",
    "requests_write_zeroes", "requests_unsupported", "bytes_read", "bytes_written",
    "status_ok", "status_ioerr", "status_unsupp", "chains_unanswered", "read_only_refusals",
    "backend_calls", "backend_requests", "backend_errors", "write_through_flushes",
    "batches", "interrupts", "device_resets",
)

_T = VirtioBlkType
_S_OK = int(VirtioBlkStatus.VIRTIO_BLK_S_OK)
_S_IOERR = int(VirtioBlkStatus.VIRTIO_BLK_S_IOERR)
_S_UNSUPP = int(VirtioBlkStatus.VIRTIO_BLK_S_UNSUPP)
_F = VirtioBlkFeature
_HDR_LEN = VIRTIO_BLK_OUTHDR.size
_SEG_LEN = VIRTIO_BLK_DISCARD_WRITE_ZEROES.size
_WRITES = (BlockOp.WRITE, BlockOp.DISCARD, BlockOp.WRITE_ZEROES)
# the per-request path compares plain ints and the BlockOp members held here: looking a
# member up on its enum class costs ~0.1 us, and a request would do it several times
_T_IN, _T_OUT = int(_T.VIRTIO_BLK_T_IN), int(_T.VIRTIO_BLK_T_OUT)
_READ, _WRITE = BlockOp.READ, BlockOp.WRITE
_F_FLUSH = int(_F.VIRTIO_BLK_F_FLUSH)


@dataclass(slots=True)
class _Pending:
    """One chain on its way through a batch."""
    chain: DescriptorChain
    status_view: memoryview | None      # the chain's last writable byte (None: none)
    status: int = _S_OK
    used_len: int = 0                   # on success; 1 (the status) otherwise
    first: int = 0                      # its requests in the batch: [first, first + count)
    count: int = 0
    ops: Sequence[BlockRequest] = ()
    moved: tuple[str, int] | None = None    # (counter, bytes) to add if it succeeds


class BlkDevice(VirtioDevice):
    """virtio-blk: see the module docstring for the contract and the checks."""

    device_id = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)
    config_size = VIRTIO_BLK_CONFIG.itemsize

    def __init__(self, backend: BlockBackend, serial: str | None = None) -> None:
        if serial is not None:
            raw = serial.encode("ascii", "replace")
            if len(raw) > VIRTIO_BLK_ID_BYTES or not serial.isascii() or not serial.isprintable():
                raise ConfigError(f"disk serial {serial!r}: at most {VIRTIO_BLK_ID_BYTES} "
                                  "printable ASCII characters")
        self.backend = backend
        self.serial = serial
        #: the GET_ID answer: the serial NUL-padded to 20 bytes (no NUL if exactly 20)
        self.device_id_bytes = (serial or "").encode("ascii").ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.capacity = backend.size >> SECTOR_SHIFT        # sectors
        self.read_only = bool(backend.read_only)
        self.discard = bool(backend.supports_discard) and not self.read_only
        self.write_zeroes = bool(backend.supports_write_zeroes) and not self.read_only
        bits = [VirtioFeature.VIRTIO_F_VERSION_1, VirtioFeature.VIRTIO_F_EVENT_IDX,
                VirtioFeature.VIRTIO_F_INDIRECT_DESC, _F.VIRTIO_BLK_F_SIZE_MAX, _F.VIRTIO_BLK_F_SEG_MAX,
                _F.VIRTIO_BLK_F_BLK_SIZE, _F.VIRTIO_BLK_F_FLUSH]
        if self.read_only:
            bits.append(_F.VIRTIO_BLK_F_RO)
        if self.discard:
            bits.append(_F.VIRTIO_BLK_F_DISCARD)
        if self.write_zeroes:
            bits.append(_F.VIRTIO_BLK_F_WRITE_ZEROES)
        self.device_features = feature_mask(*bits)
        self._config = config_bytes(
            capacity=self.capacity, size_max=SIZE_MAX, seg_max=SEG_MAX, blk_size=BLK_SIZE,
            writeback=1, num_queues=1,
            max_discard_sectors=MAX_DISCARD_SECTORS if self.discard else 0,
            max_discard_seg=MAX_DISCARD_SEG if self.discard else 0,
            discard_sector_alignment=DISCARD_SECTOR_ALIGNMENT if self.discard else 0,
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS if self.write_zeroes else 0,
            max_write_zeroes_seg=MAX_WRITE_ZEROES_SEG if self.write_zeroes else 0,
            write_zeroes_may_unmap=1 if self.write_zeroes else 0)
        self.metrics = dict.fromkeys(METRIC_NAMES, 0)
        self.errors = GuestErrorLog("virtio-blk (guest)", logger)
        self.host_errors = GuestErrorLog("virtio-blk (image)", logger)
        self._queue: Queue | None = None
        self._interrupt: Callable[[int], None] | None = None
        self._scheduled = False
        self._closed = False

    # -- the machine's side ------------------------------------------------------------
    def close(self) -> None:
        """Close the backend (after the loop thread stopped); idempotent."""
        if not self._closed:
            self._closed = True
            self._queue = self._interrupt = None
            self.backend.close()

    def counters(self) -> dict:
        out = dict(self.metrics)
        out["capacity_sectors"] = self.capacity
        out["read_only"] = self.read_only
        out["guest_errors_by_reason"] = dict(self.errors.counts)
        out["host_errors_by_reason"] = dict(self.host_errors.counts)
        return out

    # -- VirtioDevice --------------------------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        data = self._config[offset:offset + size]
        return data + bytes(size - len(data))

    def activate(self, memory: GuestMemory, queues: list[Queue],
                 interrupt: Callable[[int], None]) -> None:
        self.loop.run_in_loop(self._do_activate, queues[0], interrupt, wait=True)

    def queue_notify(self, index: int) -> None:
        self.loop.run_in_loop(self._process, wait=False)

    def reset(self) -> None:
        self.loop.run_in_loop(self._do_reset, wait=True)

    # -- on the I/O thread ---------------------------------------------------------------
    def _do_activate(self, queue: Queue, interrupt: Callable[[int], None]) -> None:
        self._queue, self._interrupt = queue, interrupt
        self._process()

    def _do_reset(self) -> None:
        if self._queue is not None:
            self.metrics["device_resets"] += 1
        self._queue = self._interrupt = None
        self.acked_features = 0

    def _again(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._process_scheduled)

    def _process_scheduled(self) -> None:
        self._scheduled = False
        self._process()

    def _process(self) -> None:
        """Serve the request queue: batches of up to :data:`BATCH` chains, then one
        interrupt if the driver wants it; beyond :data:`BATCH` chains in this turn
        the rest is rescheduled (notifications stay off meanwhile)."""
        queue = self._queue
        if queue is None:
            return
        budget = BATCH
        while True:
            queue.disable_notification()
            chains = queue.pop_batch(budget)
            if chains:
                self._handle_batch(queue, chains)
                budget -= len(chains)
                if budget == 0:
                    self._again()
                    break
            if not queue.enable_notification():
                break
        if queue.needs_notification():
            self.metrics["interrupts"] += 1
            self._interrupt(VIRTIO_MMIO_INT_VRING)

    def _handle_batch(self, queue: Queue, chains: list[DescriptorChain]) -> None:
        """Check every chain, run the good requests as one backend batch, answer all."""
        self.metrics["batches"] += 1
        pending = [self._parse(chain) for chain in chains]
        batch: list[BlockRequest] = []
        for p in pending:
            p.first = len(batch)
            p.count = len(p.ops)
            batch.extend(p.ops)
            p.ops = ()
        write_through = None
        if not self.acked_features >> _F_FLUSH & 1 and \
                any(r.op in _WRITES for r in batch):
            write_through = len(batch)      # §5.2.6.2 case 1: stable before completion
            batch.append(BlockRequest(BlockOp.FLUSH))
            self.metrics["write_through_flushes"] += 1
        results = self._execute(batch) if batch else []
        failed = any(results)               # the common case: nothing to sort out
        used = []
        for p in pending:
            if failed and p.status == _S_OK and p.count:
                errs = list(filter(None, results[p.first:p.first + p.count]))
                if write_through is not None and results[write_through] and \
                        any(r.op in _WRITES for r in batch[p.first:p.first + p.count]):
                    errs.append(results[write_through])
                if errs:
                    p.status = _S_IOERR
                    self.metrics["backend_errors"] += 1
                    self.host_errors.report("image I/O failed", f"{errno.errorcode.get(errs[0], errs[0])}"
                                            f" ({os.strerror(errs[0])})")
            if p.status == _S_OK and p.moved is not None:
                self.metrics[p.moved[0]] += p.moved[1]
            if p.status_view is None:
                used.append((p.chain.head, 0))
                continue
            p.status_view[0] = p.status
            self.metrics[("status_ok", "status_ioerr", "status_unsupp")[p.status]] += 1
            used.append((p.chain.head, p.used_len if p.status == _S_OK else 1))
        queue.add_used_batch(used)

    def _execute(self, batch: list[BlockRequest]) -> list[int]:
        """``backend.execute`` once; a backend that raises or answers the wrong number of
        results fails the whole batch (EIO) instead of the I/O loop."""
        self.metrics["backend_calls"] += 1
        self.metrics["backend_requests"] += len(batch)
        try:
            results = list(self.backend.execute(batch))
        except Exception as e:          # a backend bug: the guest gets IOERR, the loop goes on
            self.host_errors.report("backend raised", repr(e))
            return [errno.EIO] * len(batch)
        if len(results) != len(batch):
            self.host_errors.report("backend answered a different number of results",
                                    f"{len(results)} for {len(batch)}")
            results = (results + [errno.EIO] * len(batch))[:len(batch)]
        return [r if isinstance(r, int) and r >= 0 else errno.EIO for r in results]

    # -- one chain -------------------------------------------------------------------------
    def _parse(self, chain: DescriptorChain) -> _Pending:
        """Check one chain (see the module docstring's table); the requests it needs go
        in ``ops``, or ``status`` says the answer already."""
        wlen = chain.writable_len
        status_view = chain.writable_views(wlen - 1, wlen)[0] if wlen else None
        p = _Pending(chain, status_view)
        if status_view is None:
            self.metrics["chains_unanswered"] += 1
            return self._bad(p, "request without a device-writable status byte (returned unanswered)",
                             chain)
        rlen = chain.readable_len
        if rlen < _HDR_LEN:
            return self._bad(p, "request header shorter than 16 bytes", chain)
        rtype, _ioprio, sector = VIRTIO_BLK_OUTHDR.unpack(chain.read_readable(_HDR_LEN))   # one copy
        out_len = rlen - _HDR_LEN           # device-readable data after the header
        in_len = wlen - 1                   # device-writable data before the status
        if rtype == _T_IN:
            self.metrics["requests_in"] += 1
            if out_len:
                return self._bad(p, "IN request with device-readable data", chain)
            return self._rw(p, _READ, sector, chain.writable_views(0, in_len), in_len)
        if rtype == _T_OUT:
            self.metrics["requests_out"] += 1
            if self.read_only:
                return self._read_only(p)
            if in_len:
                return self._bad(p, "OUT request with device-writable data besides the status", chain)
            return self._rw(p, _WRITE, sector, chain.readable_views(_HDR_LEN, rlen), out_len)
        if rtype == _T.VIRTIO_BLK_T_FLUSH:
            self.metrics["requests_flush"] += 1
            if out_len or in_len:
                return self._bad(p, "FLUSH request with data", chain)
            p.ops = [BlockRequest(BlockOp.FLUSH)]
            p.used_len = 1
            return p
        if rtype == _T.VIRTIO_BLK_T_GET_ID:
            self.metrics["requests_get_id"] += 1
            if out_len:
                return self._bad(p, "GET_ID request with device-readable data", chain)
            if in_len < VIRTIO_BLK_ID_BYTES:
                return self._bad(p, "GET_ID buffer shorter than 20 bytes", chain)
            chain.write_writable(self.device_id_bytes)
            p.used_len = VIRTIO_BLK_ID_BYTES + 1
            return p
        if rtype in (_T.VIRTIO_BLK_T_DISCARD, _T.VIRTIO_BLK_T_WRITE_ZEROES):
            discard = rtype == _T.VIRTIO_BLK_T_DISCARD
            self.metrics["requests_discard" if discard else "requests_write_zeroes"] += 1
            if self.read_only:
                return self._read_only(p)
            return self._segments(p, discard, chain, out_len, in_len)
        self.metrics["requests_unsupported"] += 1
        p.status = _S_UNSUPP
        self.errors.report("unsupported request type (VIRTIO_BLK_S_UNSUPP)", f"type {rtype}")
        return p

    def _bad(self, p: _Pending, reason: str, chain: DescriptorChain, detail: str = "") -> _Pending:
        p.status = _S_IOERR
        self.errors.report(reason, detail or repr(chain))
        return p

    def _read_only(self, p: _Pending) -> _Pending:
        self.metrics["read_only_refusals"] += 1
        p.status = _S_IOERR
        self.errors.report("write request to a read-only disk (VIRTIO_BLK_S_IOERR)")
        return p

    def _in_disk(self, sector: int, sectors: int) -> bool:
        return sector + sectors <= self.capacity        # Python ints: no u64 wrap

    def _rw(self, p: _Pending, op: BlockOp, sector: int, views: list[memoryview],
            length: int) -> _Pending:
        chain = p.chain
        if length == 0 or length % SECTOR_SIZE:
            return self._bad(p, "IN/OUT data empty or not a multiple of 512 bytes", chain,
                             f"{length} bytes")
        if len(views) > SEG_MAX:
            return self._bad(p, f"IN/OUT with more than seg_max ({SEG_MAX}) data segments", chain,
                             f"{len(views)} segments")
        if max(map(len, views)) > SIZE_MAX:        # views: not empty, as length is not 0
            return self._bad(p, f"IN/OUT data segment larger than size_max ({SIZE_MAX})", chain)
        if not self._in_disk(sector, length >> SECTOR_SHIFT):
            return self._bad(p, "sector range beyond the end of the disk", chain,
                             f"sector {sector} + {length >> SECTOR_SHIFT} > capacity {self.capacity}")
        p.ops = [BlockRequest(op, sector << SECTOR_SHIFT, length, views)]
        if op is _READ:
            p.used_len = length + 1
            p.moved = ("bytes_read", length)
        else:
            p.used_len = 1
            p.moved = ("bytes_written", length)
        return p

    def _segments(self, p: _Pending, discard: bool, chain: DescriptorChain, out_len: int,
                  in_len: int) -> _Pending:
        """DISCARD / WRITE_ZEROES: ``struct virtio_blk_discard_write_zeroes[n]`` after the header."""
        name = "DISCARD" if discard else "WRITE_ZEROES"
        if not (self.discard if discard else self.write_zeroes) or \
                not self.acked_features >> (_F.VIRTIO_BLK_F_DISCARD if discard
                                            else _F.VIRTIO_BLK_F_WRITE_ZEROES) & 1:
            p.status = _S_UNSUPP
            self.errors.report(f"{name} without its feature (VIRTIO_BLK_S_UNSUPP)")
            return p
        if in_len:
            return self._bad(p, f"{name} with device-writable data besides the status", chain)
        max_seg = MAX_DISCARD_SEG if discard else MAX_WRITE_ZEROES_SEG
        max_sectors = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        n, rest = divmod(out_len, _SEG_LEN)
        if n == 0 or rest:
            return self._bad(p, f"{name} payload is not whole 16-byte segments", chain,
                             f"{out_len} bytes")
        if n > max_seg:
            return self._bad(p, f"{name} with more segments than advertised", chain,
                             f"{n} > {max_seg}")
        payload = chain.read_readable(_HDR_LEN + n * _SEG_LEN)[_HDR_LEN:]     # one copy
        segs = [VIRTIO_BLK_DISCARD_WRITE_ZEROES.unpack_from(payload, i * _SEG_LEN) for i in range(n)]
        for _sector, _num, flags in segs:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                p.status = _S_UNSUPP
                self.errors.report(f"{name} segment with an unknown or forbidden flag "
                                   "(VIRTIO_BLK_S_UNSUPP)", f"flags {flags:#x}")
                return p
        ops = []
        for sector, num, flags in segs:
            if num > max_sectors:
                return self._bad(p, f"{name} segment longer than advertised", chain,
                                 f"{num} > {max_sectors} sectors")
            if not self._in_disk(sector, num):
                return self._bad(p, "sector range beyond the end of the disk", chain,
                                 f"{name} sector {sector} + {num} > capacity {self.capacity}")
            if num:
                ops.append(BlockRequest(BlockOp.DISCARD if discard else BlockOp.WRITE_ZEROES,
                                        sector << SECTOR_SHIFT, num << SECTOR_SHIFT,
                                        unmap=bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)))
        p.ops = ops
        p.used_len = 1
        return p
