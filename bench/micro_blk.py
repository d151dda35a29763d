"""The virtio-blk request path without KVM: Python CPU per request, and where it goes.

``python -m bench.micro_blk [--profile]`` drives pyvmm's :class:`BlkDevice` behind a real
:class:`MmioTransport` and a :class:`RawBackend` on a sparse raw image in a temporary
directory (the host page cache, as the ``pyvmm-blk`` workload's ``cache=writeback``), from
a lean driver written here that lays requests out as the freestanding guest's
``blk-load`` does (guest/freestanding/virtio_blk.c): three descriptors per request (the
16-byte header, one data descriptor, the status byte), request slot ``i`` owning
descriptors ``3i .. 3i+2`` and a buffer of its own, reused.  The machine's device I/O
loop runs on this thread (no I/O thread, no guest, no KVM), so what it measures is
pyvmm's own cost per request: the kick (the transport's QueueNotify, as the ioeventfd
handler calls it), the chain walk, the checks, the system call, the used ring and the
interrupt decision.

Each row is microseconds of CPU (``time.process_time``) spent inside pyvmm per request,
the minimum of three runs, for random 4 KiB reads and writes with ``batch`` requests
published per kick (the guest's ``blk-load`` keeps 32 in flight; how many a wake-up finds
depends on how fast each side is), and the rate that CPU alone would allow.  The system
call's own share is measured alone (``os.preadv`` / ``os.pwritev`` of 4 KiB at the same
offsets) for comparison.  ``--profile`` adds a cProfile of one run of each direction
(top functions by own time).  It is an instrument, never a pass/fail test.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import tempfile
import time

from pyvmm.blk.device import BlkDevice
from pyvmm.blk.raw import RawBackend
from pyvmm.blk.wire import VIRTIO_BLK_OUTHDR, VirtioBlkType
from pyvmm.memory import GuestMemory
from pyvmm.virtio.eventloop import EventLoop
from pyvmm.virtio.mmio import MmioTransport
from pyvmm.virtio.mock import MockDriver
from pyvmm.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

DISK_BYTES = 512 << 20          # the pyvmm-blk workload's image
BS = 4096
SLOTS = 64                      # request slots (3 descriptors each)


class LeanBlkGuest:
    """A virtio-blk guest driver that reuses its request slots (MockDriver allocates per chain)."""

    def __init__(self, image: str) -> None:
        self.memory = GuestMemory(64 << 20)
        self.loop = EventLoop()
        self.backend = RawBackend(image)
        self.backend.open()
        self.dev = BlkDevice(self.backend)
        self.dev.attach_loop(self.loop)
        self.irqs = 0
        self.transport = MmioTransport(self.dev, self.memory, self._irq)
        self.drv = MockDriver(self.memory, self.transport)
        if not self.drv.probe(1):
            raise RuntimeError("virtio-blk probe failed")
        self.q = self.drv.queues[0]
        alloc = self.drv.allocator.alloc
        self.hdr = [alloc(16, 16) for _ in range(SLOTS)]
        self.data = [alloc(BS, 4096) for _ in range(SLOTS)]
        self.status = [alloc(1, 1) for _ in range(SLOTS)]
        self.free = list(range(SLOTS))
        #: CPU seconds spent inside pyvmm (the kicks), not in this driver
        self.device_cpu = 0.0

    def _irq(self) -> None:
        self.irqs += 1

    def submit(self, rtype: int, sector: int) -> None:
        """Post one request the way blk_submit lays it out; no kick."""
        i = self.free.pop()
        q = self.q
        self.memory.write(self.hdr[i], VIRTIO_BLK_OUTHDR.pack(rtype, 0, sector))
        data_flags = VIRTQ_DESC_F_NEXT | (VIRTQ_DESC_F_WRITE if rtype == VirtioBlkType.VIRTIO_BLK_T_IN else 0)
        q.write_descriptor(3 * i, self.hdr[i], 16, VIRTQ_DESC_F_NEXT, 3 * i + 1)
        q.write_descriptor(3 * i + 1, self.data[i], BS, data_flags, 3 * i + 2)
        q.write_descriptor(3 * i + 2, self.status[i], 1, VIRTQ_DESC_F_WRITE)
        q.publish(3 * i)

    def kick(self) -> None:
        t = time.process_time()
        self.q.kick(force=True)     # the device serves the queue right here (no I/O thread)
        self.device_cpu += time.process_time() - t

    def reap(self) -> int:
        q, n = self.q, 0
        used_idx = int(q.used_idx_view[0])
        while q.last_used_idx != used_idx:
            head, _length = q.used_ring[q.last_used_idx % q.size].item()
            i = head // 3
            if self.memory.read(self.status[i], 1) != b"\0":
                raise RuntimeError(f"request in slot {i} failed")
            self.free.append(i)
            q.last_used_idx = (q.last_used_idx + 1) & 0xFFFF
            n += 1
        q.set_used_event(q.last_used_idx)
        return n

    def close(self) -> None:
        self.dev.close()
        self.loop.close()
        self.memory.close()


def _sectors(count: int) -> list[int]:
    rng = random.Random(1)
    return [rng.randrange(DISK_BYTES // BS) * (BS // 512) for _ in range(count)]


def run(image: str, rtype: int, batch: int, count: int) -> float:
    """CPU seconds inside pyvmm for ``count`` random 4 KiB requests, ``batch`` per kick."""
    g = LeanBlkGuest(image)
    try:
        sectors = iter(_sectors(count))
        done = sent = 0
        while done < count:
            for _ in range(min(batch, count - sent)):
                g.submit(rtype, next(sectors))
                sent += 1
            g.kick()
            done += g.reap()
        return g.device_cpu
    finally:
        g.close()


def syscall_only(image: str, write: bool, count: int) -> float:
    """CPU seconds for the same ``count`` 4 KiB ``preadv`` / ``pwritev`` calls alone."""
    fd = os.open(image, os.O_RDWR)
    buf = [memoryview(bytearray(BS))]
    call = os.pwritev if write else os.preadv
    try:
        t = time.process_time()
        for sector in _sectors(count):
            call(fd, buf, sector * 512)
        return time.process_time() - t
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_blk", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true", help="cProfile one run of each direction")
    parser.add_argument("--requests", type=int, default=20000, help="requests per row (default 20000)")
    args = parser.parse_args()
    n = args.requests
    with tempfile.TemporaryDirectory(prefix="pyvmm-micro-blk-") as tmp:
        image = os.path.join(tmp, "disk.raw")
        with open(image, "wb") as f:
            f.truncate(DISK_BYTES)
        run(image, VirtioBlkType.VIRTIO_BLK_T_OUT, 32, n)           # the written blocks, cached
        print(f"virtio-blk request path, no KVM: CPU us per 4 KiB request, min of 3 runs, {n} each")
        for name, rtype in (("randwrite", VirtioBlkType.VIRTIO_BLK_T_OUT),
                            ("randread ", VirtioBlkType.VIRTIO_BLK_T_IN)):
            alone = min(syscall_only(image, rtype == VirtioBlkType.VIRTIO_BLK_T_OUT, n) for _ in range(3))
            print(f"  {name} system call alone      : {alone / n * 1e6:6.1f} us/request")
            for batch in (1, 8, 32):
                best = min(run(image, rtype, batch, n) for _ in range(3))
                print(f"  {name} {batch:>2} requests per kick: {best / n * 1e6:6.1f} us/request"
                      f"  {n / best:9,.0f} IOPS of CPU")
        if args.profile:
            for label, rtype in (("randread, 32 per kick", VirtioBlkType.VIRTIO_BLK_T_IN),
                                 ("randwrite, 32 per kick", VirtioBlkType.VIRTIO_BLK_T_OUT)):
                prof = cProfile.Profile()
                prof.runcall(run, image, rtype, 32, n)
                print(f"\n--- profile: {label} (top 20 by own time)")
                pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
