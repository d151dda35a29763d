"""A driver-side fake: the guest's half of virtio-mmio and split virtqueues.

This module owns nothing the VMM runs; it exists so that devices, queues and
the transport can be tested without KVM or a guest kernel (compare rust-vmm
``virtio-queue/src/mock.rs``, which builds rings in a ``GuestMemory`` for
device tests).  :class:`MockDriver` talks to a transport only through its
bus interface (``read``/``write`` at register offsets), exactly as a vCPU
would, and replays what Linux 6.1 does (``drivers/virtio/virtio.c``,
``virtio_mmio.c``, ``virtio_ring.c``), as recorded in
docs/pvm.md ("status 0->1->3->0xB->0xF, VERSION_1 negotiated
via DeviceFeaturesSel=1, ... three 256-entry queues"):

1. ``negotiate()``: read MagicValue, Version, DeviceID, VendorID; write
   Status 0 (reset); ``virtio_add_status`` (read Status, write it back with
   one more bit) for ACKNOWLEDGE and DRIVER; DeviceFeaturesSel=1, read
   DeviceFeatures, DeviceFeaturesSel=0, read; DriverFeaturesSel=1, write
   the high half, DriverFeaturesSel=0, write the low half; add FEATURES_OK
   and read Status back (no FEATURES_OK: add FAILED and give up).
2. ``setup_queues()``: per queue, QueueSel, read QueueReady (must be 0),
   read QueueSizeMax (0: give up), lay out the vring (Linux layout: one
   allocation, descriptor table, available ring right after it, used ring
   at the next 4 KiB boundary, as ``vring_init(align=PAGE_SIZE)``), zero it,
   write QueueSize, Desc/Avail/Used Low then High, QueueReady=1.
3. ``driver_ok()``: add DRIVER_OK.

``probe()`` does all three.  Between steps 2 and 3 Linux's vsock driver
reads ``guest_cid`` with :meth:`MockDriver.read_config` (generation loop,
two 32-bit reads at 0x100/0x104).

Queue work (:class:`MockQueue`, one per queue): ``add_chain(readable=[bytes,
...], writable=[sizes...], indirect=False)`` fills buffers and descriptors
and publishes the head; ``kick()`` notifies unless the device suppressed it
(honouring VIRTQ_USED_F_NO_NOTIFY / ``avail_event``); ``used()`` collects
``(head, len, bytes written)``.  Raw helpers (``reserve``, ``write_descriptor``,
``publish``, ``set_avail_idx``, ...) corrupt things on purpose for hostile
tests.  Buffers come from a bump allocator and are never freed: use a fresh
GuestMemory per test.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from ..memory import GuestMemory
from .device import DeviceStatus, VirtioFeature, feature_mask
from .mmio import VIRTIO_MMIO_MAGIC, VIRTIO_MMIO_VERSION_2, MmioReg
from .queue import (VIRTQ_DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                    VIRTQ_USED_F_NO_NOTIFY, virtq_avail_dtype, virtq_used_dtype, vring_need_event)

__all__ = ["GpaAllocator", "MockDriver", "MockDriverError", "MockQueue", "UsedBuffer"]

R = MmioReg
S = DeviceStatus
PAGE_SIZE = 4096
#: what Linux's virtio_ring accepts besides device-specific bits (vring_transport_features)
LINUX_RING_FEATURES = feature_mask(VirtioFeature.VIRTIO_F_INDIRECT_DESC, VirtioFeature.VIRTIO_F_EVENT_IDX,
                                   VirtioFeature.VIRTIO_F_VERSION_1)


class MockDriverError(Exception):
    """The device (or the test) did something a real driver would reject."""


class UsedBuffer(NamedTuple):
    head: int
    len: int
    data: bytes         # the first ``len`` bytes of the chain's writable part


class GpaAllocator:
    """Hands out guest-physical ranges from ``[start, end)``; never frees."""

    def __init__(self, start: int, end: int) -> None:
        self.next, self.end = start, end

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = -(-self.next // align) * align
        if gpa + size > self.end:
            raise MockDriverError(f"mock allocator exhausted ({size:#x} bytes wanted)")
        self.next = gpa + size
        return gpa


class MockQueue:
    """The driver's side of one split virtqueue."""

    def __init__(self, driver: MockDriver, index: int, size: int, *, layout: str = "linux") -> None:
        self.driver, self.memory, self.index, self.size = driver, driver.memory, index, size
        alloc = driver.allocator.alloc
        if layout == "linux":           # vring_init(): one block, used ring page-aligned
            avail_off = 16 * size
            used_off = -(-(avail_off + 6 + 2 * size) // PAGE_SIZE) * PAGE_SIZE
            base = alloc(used_off + 6 + 8 * size, PAGE_SIZE)
            self.desc_gpa, self.avail_gpa, self.used_gpa = base, base + avail_off, base + used_off
        elif layout == "separate":      # three areas at minimal alignment, used ring first
            self.used_gpa = alloc(4 + 6 + 8 * size, 8) + 4      # 4-aligned, not 8-aligned
            self.avail_gpa = alloc(2 + 6 + 2 * size, 4) + 2     # 2-aligned, not 4-aligned
            self.desc_gpa = alloc(16 * size, 16)
        else:
            raise ValueError(f"unknown layout {layout!r}")
        for gpa, length in ((self.desc_gpa, 16 * size), (self.avail_gpa, 6 + 2 * size),
                            (self.used_gpa, 6 + 8 * size)):
            self.memory.fill(gpa, length, 0)
        self.desc = self.memory.ndarray(self.desc_gpa, VIRTQ_DESC, size)
        avail = self.memory.ndarray(self.avail_gpa, virtq_avail_dtype(size), 1)
        used = self.memory.ndarray(self.used_gpa, virtq_used_dtype(size), 1)
        self.avail_flags, self.avail_idx_view = avail["flags"], avail["idx"]
        self.avail_ring, self.used_event = avail["ring"][0], avail["used_event"]
        self.used_flags, self.used_idx_view = used["flags"], used["idx"]
        self.used_ring, self.avail_event = used["ring"][0], used["avail_event"]
        self.free = list(range(size))           # free descriptor indices, next to use at [0]
        self.avail_idx = 0                      # the driver's shadow of avail.idx
        self.last_used_idx = 0
        self.last_kick_idx = 0
        self.kicks = 0
        self.chains: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}

    @property
    def event_idx(self) -> bool:
        return bool(self.driver.features >> VirtioFeature.VIRTIO_F_EVENT_IDX & 1)

    # -- adding buffers -------------------------------------------------------
    def add_chain(self, readable: Sequence[bytes] = (), writable: Sequence[int] = (), *,
                  indirect: bool = False) -> int:
        """Fill buffers, chain descriptors (or an indirect table), publish; return the head."""
        alloc = self.driver.allocator.alloc
        entries = []
        for data in readable:
            gpa = alloc(len(data), 1)
            self.memory.write(gpa, data)
            entries.append((gpa, len(data), 0))
        out = []
        for size in writable:
            gpa = alloc(size, 1)
            self.memory.fill(gpa, size, 0xEE)   # poison: shows what the device did not write
            entries.append((gpa, size, int(VIRTQ_DESC_F_WRITE)))
            out.append((gpa, size))
        if not entries:
            raise MockDriverError("a chain needs at least one descriptor")
        if indirect:
            table = alloc(16 * len(entries), 16)
            view = self.memory.ndarray(table, VIRTQ_DESC, len(entries))
            for i, (gpa, length, flags) in enumerate(entries):
                more = i + 1 < len(entries)
                view[i] = (gpa, length, flags | (VIRTQ_DESC_F_NEXT if more else 0), i + 1 if more else 0)
            entries = [(table, 16 * len(entries), int(VIRTQ_DESC_F_INDIRECT))]
        if len(entries) > len(self.free):
            raise MockDriverError("not enough free descriptors")
        idxs = [self.free.pop(0) for _ in entries]
        for i, (gpa, length, flags) in enumerate(entries):
            more = i + 1 < len(idxs)
            self.write_descriptor(idxs[i], gpa, length, flags | (VIRTQ_DESC_F_NEXT if more else 0),
                                  idxs[i + 1] if more else 0)
        self.chains[idxs[0]] = (idxs, out)
        self.publish(idxs[0])
        return idxs[0]

    # -- raw helpers (for hostile tests too) ------------------------------------
    def reserve(self, count: int) -> list[int]:
        """Take ``count`` free descriptor indices for a hand-written chain.

        The first is the chain's head: once the device returns it (``used()``),
        all of them are free again.  Write them with :meth:`write_descriptor`
        and publish the head with :meth:`publish`.
        """
        if not 0 < count <= len(self.free):
            raise MockDriverError("not enough free descriptors")
        idxs = [self.free.pop(0) for _ in range(count)]
        self.chains[idxs[0]] = (idxs, [])
        return idxs

    def write_descriptor(self, index: int, addr: int, length: int, flags: int, next_: int = 0) -> None:
        self.desc[index] = (addr, length, flags, next_)

    def publish(self, head: int) -> None:
        """Put ``head`` in the next available-ring slot, then bump avail.idx."""
        self.avail_ring[self.avail_idx % self.size] = head
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.avail_idx_view[0] = self.avail_idx

    def set_no_interrupt(self, on: bool) -> None:
        """VIRTQ_AVAIL_F_NO_INTERRUPT (meaningful without EVENT_IDX)."""
        self.avail_flags[0] = 1 if on else 0

    def set_used_event(self, value: int) -> None:
        self.used_event[0] = value & 0xFFFF

    # -- notifications ----------------------------------------------------------
    def kick(self, *, force: bool = False) -> bool:
        """Notify the device if it asked for it (or ``force``); True if notified.

        Linux ``virtqueue_kick_prepare_split``: with EVENT_IDX, notify iff
        avail.idx passed ``avail_event`` since the last kick; without, iff
        VIRTQ_USED_F_NO_NOTIFY is clear.
        """
        new, old = self.avail_idx, self.last_kick_idx
        self.last_kick_idx = new
        if self.event_idx:
            needed = vring_need_event(int(self.avail_event[0]), new, old)
        else:
            needed = not int(self.used_flags[0]) & VIRTQ_USED_F_NO_NOTIFY
        if needed or force:
            self.kicks += 1
            self.driver.mmio_write(R.VIRTIO_MMIO_QUEUE_NOTIFY, self.index)
        return needed

    # -- collecting used buffers ------------------------------------------------
    def used(self) -> list[UsedBuffer]:
        """Every used entry the device published since the last call."""
        out = []
        used_idx = int(self.used_idx_view[0])
        while self.last_used_idx != used_idx:
            head, length = self.used_ring[self.last_used_idx % self.size].item()
            if head not in self.chains:
                raise MockDriverError(f"queue {self.index}: device used head {head} not in flight")
            idxs, writable = self.chains.pop(head)
            total = sum(size for _, size in writable)
            if length > total:
                raise MockDriverError(f"queue {self.index}: used len {length} > writable {total}")
            data = b"".join(self.memory.read(gpa, size) for gpa, size in writable)[:length]
            self.free.extend(idxs)
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            out.append(UsedBuffer(head, length, data))
        if self.event_idx:                  # virtqueue_enable_cb: interrupt me for the next one
            self.set_used_event(self.last_used_idx)
        return out


class MockDriver:
    """Drives one virtio-mmio transport through its registers, as Linux does."""

    def __init__(self, memory: GuestMemory, transport, *, alloc_start: int | None = None,
                 alloc_end: int | None = None) -> None:
        self.memory = memory
        self.transport = transport
        start = memory.base + 0x10000 if alloc_start is None else alloc_start
        self.allocator = GpaAllocator(start, memory.end if alloc_end is None else alloc_end)
        self.device_features = 0
        self.features = 0
        self.queues: list[MockQueue] = []

    # -- register access --------------------------------------------------------
    def mmio_read(self, offset: int) -> int:
        return int.from_bytes(self.transport.read(offset, 4), "little")

    def mmio_write(self, offset: int, value: int) -> None:
        self.transport.write(offset, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    def add_status(self, bit: int) -> None:
        """Linux ``virtio_add_status``: read Status, write it back with ``bit``."""
        self.mmio_write(R.VIRTIO_MMIO_STATUS, self.mmio_read(R.VIRTIO_MMIO_STATUS) | bit)

    @property
    def status(self) -> int:
        return self.mmio_read(R.VIRTIO_MMIO_STATUS)

    # -- the probe sequence -------------------------------------------------------
    def negotiate(self, features: int | None = None) -> bool:
        """Steps 1-6 of §3.1.1.  ``features``: what to ack, verbatim (default: like Linux)."""
        if self.mmio_read(R.VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC:
            raise MockDriverError("bad MagicValue")
        if self.mmio_read(R.VIRTIO_MMIO_VERSION) != VIRTIO_MMIO_VERSION_2:
            raise MockDriverError("not a version 2 device")
        if self.mmio_read(R.VIRTIO_MMIO_DEVICE_ID) == 0:
            return False
        self.mmio_read(R.VIRTIO_MMIO_VENDOR_ID)
        self.mmio_write(R.VIRTIO_MMIO_STATUS, 0)
        self.add_status(S.ACKNOWLEDGE)
        self.add_status(S.DRIVER)
        self.mmio_write(R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
        offered = self.mmio_read(R.VIRTIO_MMIO_DEVICE_FEATURES) << 32
        self.mmio_write(R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
        self.device_features = offered | self.mmio_read(R.VIRTIO_MMIO_DEVICE_FEATURES)
        if features is None:
            features = self.device_features & (LINUX_RING_FEATURES | (1 << 24) - 1)
        self.features = features
        self.mmio_write(R.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
        self.mmio_write(R.VIRTIO_MMIO_DRIVER_FEATURES, features >> 32)
        self.mmio_write(R.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
        self.mmio_write(R.VIRTIO_MMIO_DRIVER_FEATURES, features)
        self.add_status(S.FEATURES_OK)
        if not self.status & S.FEATURES_OK:
            self.add_status(S.FAILED)
            return False
        return True

    def setup_queue(self, index: int, size: int | None = None, *, layout: str = "linux") -> MockQueue | None:
        """Linux ``vm_setup_vq``; ``size`` defaults to QueueSizeMax (written verbatim)."""
        self.mmio_write(R.VIRTIO_MMIO_QUEUE_SEL, index)
        if self.mmio_read(R.VIRTIO_MMIO_QUEUE_READY):
            raise MockDriverError(f"queue {index} already set up")
        max_size = self.mmio_read(R.VIRTIO_MMIO_QUEUE_NUM_MAX)
        if max_size == 0:
            return None
        q = MockQueue(self, index, max_size if size is None else size, layout=layout)
        self.mmio_write(R.VIRTIO_MMIO_QUEUE_NUM, q.size)
        for low, gpa in ((R.VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc_gpa),
                         (R.VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail_gpa),
                         (R.VIRTIO_MMIO_QUEUE_USED_LOW, q.used_gpa)):
            self.mmio_write(low, gpa)
            self.mmio_write(low + 4, gpa >> 32)
        self.mmio_write(R.VIRTIO_MMIO_QUEUE_READY, 1)
        return q

    def setup_queues(self, count: int, sizes: Sequence[int | None] | None = None, *,
                     layout: str = "linux") -> bool:
        self.queues = []
        for i in range(count):
            q = self.setup_queue(i, None if sizes is None else sizes[i], layout=layout)
            if q is None:
                return False
            self.queues.append(q)
        return True

    def driver_ok(self) -> None:
        self.add_status(S.DRIVER_OK)

    def probe(self, num_queues: int, *, features: int | None = None,
              sizes: Sequence[int | None] | None = None, layout: str = "linux") -> bool:
        """The whole Linux probe; True if the device reads back DRIVER_OK without NEEDS_RESET."""
        if not self.negotiate(features) or not self.setup_queues(num_queues, sizes, layout=layout):
            return False
        self.driver_ok()
        return self.status & (S.DRIVER_OK | S.DEVICE_NEEDS_RESET) == S.DRIVER_OK

    # -- config space and interrupts --------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        """Linux ``__virtio_cread_many``: retry until ConfigGeneration is stable.

        Fields wider than 4 bytes are read as 32-bit halves (``vm_get``).
        """
        for _ in range(100):
            gen = self.mmio_read(R.VIRTIO_MMIO_CONFIG_GENERATION)
            step = size if size <= 4 else 4
            data = b"".join(self.transport.read(R.VIRTIO_MMIO_CONFIG + offset + i, step)
                            for i in range(0, size, step))
            if self.mmio_read(R.VIRTIO_MMIO_CONFIG_GENERATION) == gen:
                return data
        raise MockDriverError("ConfigGeneration never settled")

    def handle_interrupt(self) -> int:
        """Linux ``vm_interrupt``: read InterruptStatus, ACK the same bits, return them."""
        status = self.mmio_read(R.VIRTIO_MMIO_INTERRUPT_STATUS)
        self.mmio_write(R.VIRTIO_MMIO_INTERRUPT_ACK, status)
        return status

    def reset(self) -> None:
        self.mmio_write(R.VIRTIO_MMIO_STATUS, 0)
