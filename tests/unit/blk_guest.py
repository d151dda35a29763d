"""Test helpers for pyvmm.blk: a raw image, a recording backend, and a Linux-like guest driver.

:class:`BlkGuest` builds a :class:`~pyvmm.blk.device.BlkDevice` behind a real
:class:`~pyvmm.virtio.mmio.MmioTransport` on an
:class:`~pyvmm.virtio.eventloop.EventLoop` that is never started (every call runs
inline on the test thread, as the loop allows before its thread starts), and
probes it with :class:`~pyvmm.virtio.mock.MockDriver` as Linux does.  Requests
are laid out as Linux's ``virtblk_add_req`` lays them out: the 16-byte header in
a descriptor of its own, one descriptor per data segment, the status byte in a
descriptor of its own; tests that want other framings pass the descriptors
themselves (:meth:`BlkGuest.submit`).
"""

from __future__ import annotations

import hashlib

from pyvmm.blk.backend import BlockOp
from pyvmm.blk.device import BlkDevice
from pyvmm.blk.raw import RawBackend
from pyvmm.blk.wire import VIRTIO_BLK_DISCARD_WRITE_ZEROES, VIRTIO_BLK_OUTHDR, VirtioBlkType
from pyvmm.memory import GuestMemory
from pyvmm.virtio.eventloop import EventLoop
from pyvmm.virtio.mmio import MmioTransport
from pyvmm.virtio.mock import MockDriver

T = VirtioBlkType
IMAGE_SIZE = 1 << 20        # 2048 sectors


def make_image(path, size: int = IMAGE_SIZE, seed: int = 1) -> bytes:
    """A raw image of ``size`` pseudo-random bytes; returns its contents."""
    data = bytes((i * 131 + seed * 7 + (i >> 9)) & 0xFF for i in range(size))
    path.write_bytes(data)
    return data


def file_hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hdr(rtype: int, sector: int = 0, ioprio: int = 0) -> bytes:
    return VIRTIO_BLK_OUTHDR.pack(rtype, ioprio, sector)


def segment(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    return VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(sector, num_sectors, flags)


class RecordingBackend:
    """A backend that passes everything to ``inner`` and records every batch."""

    def __init__(self, inner, fail: dict | None = None, raise_exc: Exception | None = None) -> None:
        self.inner = inner
        self.batches: list[list[tuple[BlockOp, int, int, bool]]] = []
        self.fail = fail or {}              # BlockOp -> errno answered instead of doing it
        self.raise_exc = raise_exc
        self.closed = 0
        for name in ("size", "read_only", "supports_discard", "supports_write_zeroes"):
            setattr(self, name, getattr(inner, name))

    def open(self) -> None:
        self.inner.open()

    def execute(self, batch):
        self.batches.append([(r.op, r.offset, r.length, r.unmap) for r in batch])
        if self.raise_exc is not None:
            raise self.raise_exc
        results = self.inner.execute([r for r in batch if r.op not in self.fail])
        it = iter(results)
        return [self.fail[r.op] if r.op in self.fail else next(it) for r in batch]

    def close(self) -> None:
        self.closed += 1
        self.inner.close()

    @property
    def ops(self) -> list[BlockOp]:
        return [op for batch in self.batches for op, *_ in batch]


class BlkGuest:
    """One guest with a probed virtio-blk device over ``backend``."""

    def __init__(self, backend, *, serial: str | None = None, features: int | None = None,
                 mem_mib: int = 64) -> None:
        self.backend = backend
        self.loop = EventLoop()
        self.memory = GuestMemory(mem_mib << 20)
        self.dev = BlkDevice(backend, serial=serial)
        self.dev.attach_loop(self.loop)
        self.irqs = 0
        self._writable: dict[int, list[tuple[int, int]]] = {}
        self.transport = MmioTransport(self.dev, self.memory, self._irq)
        self.drv = MockDriver(self.memory, self.transport)
        if not self.drv.probe(1, features=features):
            raise AssertionError("virtio-blk probe failed")
        self.q = self.drv.queues[0]

    def _irq(self) -> None:
        self.irqs += 1

    def config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.drv.read_config(offset, size), "little")

    def submit(self, readable=(), writable=(), *, kick: bool = True, indirect: bool = False) -> int:
        head = self.q.add_chain(readable=list(readable), writable=list(writable), indirect=indirect)
        self._writable[head] = list(self.q.chains[head][1])
        if kick:
            self.q.kick(force=True)
        return head

    def used(self):
        return self.q.used()

    def answers(self):
        """Every used buffer since the last call: ``(status, used.len, writable bytes)``,
        where status is the chain's last writable byte as the device left it (0xEE, the
        mock's poison, if it did not write it; None if the chain had no writable byte)."""
        out = []
        for u in self.used():
            writable = self._writable.pop(u.head)
            data = b"".join(self.memory.read(gpa, size) for gpa, size in writable)
            out.append((data[-1] if data else None, u.len, data))
        return out

    def one(self):
        """The one used buffer since the last call (:meth:`answers`)."""
        answers = self.answers()
        if len(answers) != 1:
            raise AssertionError(f"expected one used buffer, got {answers}")
        return answers[0]

    # -- Linux-like requests ------------------------------------------------------------
    def read(self, sector: int, nbytes: int, segments: int = 1, **kw):
        """IN: header, ``segments`` data descriptors, status; returns (status, used.len, data)."""
        size = nbytes // segments
        sizes = [size] * (segments - 1) + [nbytes - size * (segments - 1)]
        self.submit([hdr(T.VIRTIO_BLK_T_IN, sector)], sizes + [1], **kw)
        status, length, data = self.one()
        return status, length, data[:nbytes]

    def write(self, sector: int, data: bytes, segments: int = 1, **kw):
        size = len(data) // segments
        parts = [data[i * size:(i + 1) * size] for i in range(segments - 1)] + \
                [data[size * (segments - 1):]]
        self.submit([hdr(T.VIRTIO_BLK_T_OUT, sector)] + parts, [1], **kw)
        return self.one()[:2]

    def request(self, rtype: int, payload: bytes = b"", sector: int = 0, in_bytes: int = 0):
        parts = [hdr(rtype, sector)] + ([payload] if payload else [])
        self.submit(parts, ([in_bytes] if in_bytes else []) + [1])
        return self.one()

    def close(self) -> None:
        self.dev.close()
        self.loop.close()
        self.memory.close()


def raw_guest(path, *, read_only: bool = False, cache: str = "writeback", record: bool = True,
              **kw) -> BlkGuest:
    backend = RawBackend(str(path), read_only=read_only, cache=cache)
    backend.open()
    return BlkGuest(RecordingBackend(backend) if record else backend, **kw)
