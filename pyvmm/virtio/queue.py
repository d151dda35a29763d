"""Split virtqueues, device side (virtio 1.2 §2.7 "Split Virtqueues").

This module owns the guest-visible layout of a split virtqueue and
everything the *device* does with it: taking descriptor chains off the
available ring, handing them back on the used ring, and deciding when
either side has to be told (notification suppression, §2.7.7 and §2.7.10,
with and without ``VIRTIO_F_EVENT_IDX``).  It knows nothing about transports
or feature registers: the transport builds a :class:`Queue` when the driver
writes ``QueueReady = 1`` and passes the two negotiated ring features in as
booleans (``event_idx``, ``indirect_desc``).  Compare rust-vmm
``virtio-queue`` (``Queue``, ``DescriptorChain``) and QEMU
``hw/virtio/virtio.c``.

The life of a queue, as a story:

1. The driver allocates three areas in guest RAM (table below), writes
   their addresses and ``QueueSize`` to the transport, and sets
   ``QueueReady``.  :class:`Queue` checks size, alignment and bounds, or
   raises :class:`QueueError` and the transport refuses the queue.
2. The driver writes descriptors, puts the index of a chain's first
   descriptor (its *head*) into ``avail.ring[avail.idx % size]``, then
   increments ``avail.idx`` and notifies the device.
3. The device calls :meth:`Queue.pop` (or iterates the queue).  Each new
   head is walked **once** into a :class:`DescriptorChain`: every
   descriptor is copied out of guest RAM, checked, and split into the
   device-readable and device-writable parts.
4. When done with a chain the device calls :meth:`Queue.add_used`, which
   writes ``used.ring[used.idx % size] = (head, bytes written)`` and then
   publishes the new ``used.idx``.
5. After a batch, :meth:`Queue.needs_notification` says whether the driver
   asked to be interrupted; the device then calls its ``interrupt``.

Layout (§2.7, all little-endian; sizes for Queue Size ``N``)::

    part              alignment  size         numpy dtype here
    descriptor table  16         16 * N       VIRTQ_DESC[N]
    available ring    2          6 + 2 * N    virtq_avail_dtype(N)
    used ring         4          6 + 8 * N    virtq_used_dtype(N)

    struct virtq_desc  { le64 addr; le32 len; le16 flags; le16 next; };
    struct virtq_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; };
    struct virtq_used_elem { le32 id; le32 len; };
    struct virtq_used  { le16 flags; le16 idx; struct virtq_used_elem ring[N];
                         le16 avail_event; };

The hostile driver.  Everything in these areas is written by the guest and
may change under our feet; every value is read once into a Python int and
checked before it is used.  What happens to a bad one:

=========================================================  ===================================
guest mistake                                              answer
=========================================================  ===================================
size 0 / not a power of two / > max, area misaligned,      :class:`QueueError` at QueueReady
area outside RAM, used ring overlapping another area       (the transport refuses the queue)
``avail.idx`` more than ``size`` ahead of what we consumed  queue *broken*: ``pop`` returns
a head index ``>= size`` in the available ring              None forever, ``on_broken(reason)``
                                                            (transport sets DEVICE_NEEDS_RESET)
a bad chain: buffer outside RAM, ``next`` out of range,     that chain is *dropped*: returned to
loop / longer than the queue (ttl), readable after         the driver with ``used.len = 0``
writable, INDIRECT not negotiated / nested / with NEXT /    (as Firecracker does); ``pop``
bad table length, more than 2**32 bytes in total            moves on to the next one
=========================================================  ===================================

Each reason is logged once per queue (:class:`GuestErrorLog`) and counted;
nothing a guest writes can raise out of this module or loop forever.

Memory ordering.  pyvmm runs on x86-64, whose TSO model keeps stores in
order with stores and loads in order with loads; the one reordering it
allows is a *later load passing an earlier store* (store buffer).  numpy
element assignments and reads of aligned ``<u2``/``<u4`` fields are single
plain stores/loads (native byte order on x86, so numpy's setitem/getitem
copy the value with one aligned move: no tearing), and each Python
statement is a separate C call, so the compiler cannot move them across
each other.  Hence:

* pop: read ``avail.idx``, then the ring entry, then the descriptors:
  load->load, ordered by TSO (the driver wrote them in the opposite order).
* add_used: write the used element, then ``used.idx``: store->store,
  ordered by TSO (§2.7.8: "The device MUST set len prior to updating the
  used idx").
* needs_notification: store ``used.idx``, then load ``used_event``/flags;
  enable_notification: store ``avail_event``/flags, then load ``avail.idx``.
  Both are store->load and need a full barrier, exactly where Linux uses
  ``virtio_mb()`` and QEMU ``smp_mb()``: see :func:`memory_barrier`.
  Without it the device could miss the driver's update and both sides
  would sleep on each other (a lost wake-up).

Threads.  A queue is used by one device thread at a time (it is not
locked).  ``stop()`` may be called from another thread (the transport on
reset); afterwards the queue no longer touches guest memory.
"""

from __future__ import annotations

import collections
import logging
import threading
from enum import IntFlag
from typing import Callable, Iterator, NamedTuple

import numpy as np

from ..errors import PyvmmError
from ..memory import GuestMemory

__all__ = [
    "Descriptor",
    "DescriptorChain",
    "GuestErrorLog",
    "Queue",
    "QueueError",
    "VIRTQ_AVAIL_ALIGN",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC",
    "VIRTQ_DESC_ALIGN",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_MAX_SIZE",
    "VIRTQ_USED_ALIGN",
    "VIRTQ_USED_ELEM",
    "VIRTQ_USED_F_NO_NOTIFY",
    "VirtqAvailFlag",
    "VirtqDescFlag",
    "VirtqUsedFlag",
    "memory_barrier",
    "virtq_avail_dtype",
    "virtq_used_dtype",
    "vring_need_event",
]

logger = logging.getLogger("pyvmm.virtio")


# --- constants (§2.7, §2.7.5, §2.7.6, §2.7.8) ---------------------------------

#: "The maximum Queue Size value is 32768" (§2.7)
VIRTQ_MAX_SIZE = 32768
VIRTQ_DESC_ALIGN = 16
VIRTQ_AVAIL_ALIGN = 2
VIRTQ_USED_ALIGN = 4


class VirtqDescFlag(IntFlag):
    """``virtq_desc.flags`` (§2.7.5)."""
    VIRTQ_DESC_F_NEXT = 1       # the chain continues via ``next``
    VIRTQ_DESC_F_WRITE = 2      # device-writable (otherwise device-readable)
    VIRTQ_DESC_F_INDIRECT = 4   # the buffer is a table of descriptors (§2.7.5.3)


class VirtqAvailFlag(IntFlag):
    """``virtq_avail.flags`` (§2.7.7): the driver's wish about interrupts."""
    VIRTQ_AVAIL_F_NO_INTERRUPT = 1


class VirtqUsedFlag(IntFlag):
    """``virtq_used.flags`` (§2.7.10): the device's wish about notifications."""
    VIRTQ_USED_F_NO_NOTIFY = 1


VIRTQ_DESC_F_NEXT = VirtqDescFlag.VIRTQ_DESC_F_NEXT
VIRTQ_DESC_F_WRITE = VirtqDescFlag.VIRTQ_DESC_F_WRITE
VIRTQ_DESC_F_INDIRECT = VirtqDescFlag.VIRTQ_DESC_F_INDIRECT
VIRTQ_AVAIL_F_NO_INTERRUPT = VirtqAvailFlag.VIRTQ_AVAIL_F_NO_INTERRUPT
VIRTQ_USED_F_NO_NOTIFY = VirtqUsedFlag.VIRTQ_USED_F_NO_NOTIFY

#: ``struct virtq_desc``: 16 bytes
VIRTQ_DESC = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
#: ``struct virtq_used_elem``: 8 bytes
VIRTQ_USED_ELEM = np.dtype([("id", "<u4"), ("len", "<u4")])

_U16 = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
#: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total" (§2.7.5)
_MAX_CHAIN_BYTES = 1 << 32


def virtq_avail_dtype(size: int) -> np.dtype:
    """``struct virtq_avail`` for a queue of ``size`` entries: 6 + 2 * size bytes."""
    return np.dtype([("flags", "<u2"), ("idx", "<u2"), ("ring", "<u2", (size,)),
                     ("used_event", "<u2")])


def virtq_used_dtype(size: int) -> np.dtype:
    """``struct virtq_used`` for a queue of ``size`` entries: 6 + 8 * size bytes."""
    return np.dtype([("flags", "<u2"), ("idx", "<u2"), ("ring", VIRTQ_USED_ELEM, (size,)),
                     ("avail_event", "<u2")])


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if moving an index from ``old_idx`` to ``new_idx`` passed ``event_idx``.

    The VIRTIO_F_EVENT_IDX test (§2.7.7, §2.7.10; Linux
    ``include/uapi/linux/virtio_ring.h``)::

        return (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old);

    i.e. ``event_idx`` lies in the half-open window ``[old_idx, new_idx)``,
    computed in wrapping u16 arithmetic so that it keeps working when the
    free-running indices wrap from 65535 to 0.
    """
    return ((new_idx - event_idx - 1) & _U16) < ((new_idx - old_idx) & _U16)


# --- the one full barrier we need ---------------------------------------------

_BARRIER_LOCK = threading.Lock()


def memory_barrier() -> None:
    """A full memory barrier (what ``mfence`` / Linux ``virtio_mb()`` give C).

    CPython has no fence primitive, but acquiring and releasing an
    uncontended :class:`threading.Lock` executes LOCK-prefixed
    read-modify-write instructions (on Linux, glibc ``sem_trywait``/
    ``sem_post``: ``lock cmpxchg``), and on x86 no load or store can be
    reordered across a locked instruction (Intel SDM vol. 3A §9.2.2).  Costs
    about 0.1 us.  Needed only for the two store->load sequences described
    in the module docstring.
    """
    with _BARRIER_LOCK:
        pass


# --- bounded, once-per-reason logging of guest mistakes -----------------------

class GuestErrorLog:
    """Guest mistakes counted by reason; the first of each reason is logged.

    ``reason`` must be a fixed string from the source (never formatted with
    guest values), so the table is bounded by the number of distinct reasons
    in pyvmm; the values of the first occurrence go in ``detail``.  Also used
    by the transport.  (Concurrent reports may, at worst, log a reason twice.)
    """

    def __init__(self, owner: str, log: logging.Logger = logger) -> None:
        self.owner = owner
        self.counts: collections.Counter[str] = collections.Counter()
        self._log = log

    def report(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if self.counts[reason] == 1:
            self._log.warning("%s: %s%s", self.owner, reason, f" ({detail})" if detail else "")

    def __getitem__(self, reason: str) -> int:
        return self.counts[reason]

    def total(self) -> int:
        return sum(self.counts.values())


class QueueError(PyvmmError):
    """The driver configured a virtqueue the device cannot use.

    ``reason`` is the fixed reason string (for :class:`GuestErrorLog`).
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason} ({detail})")


# --- descriptor chains (§2.7.5) --------------------------------------------

class Descriptor(NamedTuple):
    """One checked descriptor: ``[addr, addr + len)`` lies inside guest RAM."""
    addr: int
    len: int
    flags: int

    @property
    def writable(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


class DescriptorChain:
    """One descriptor chain, walked once, checked, and split in two parts.

    Iterating yields the :class:`Descriptor` objects in chain order (an
    indirect table is expanded in place of the descriptor that points to
    it).  :attr:`readable` / :attr:`writable` hold the device-readable and
    device-writable parts; :meth:`readable_views` / :meth:`writable_views`
    give zero-copy memoryviews of the guest buffers (hand them to
    ``socket.sendmsg`` / ``recv_into``).  The guest can still change buffer
    *contents* while the device reads them: copy a header out once
    (``bytes(view[:44])``) before trusting its fields.

    The walk is bounded by a *ttl*: at most ``size`` descriptors of the queue
    table, and at most ``count`` of an indirect table, so a loop ends the
    walk with :attr:`error` set instead of hanging.  A chain whose
    :attr:`error` is not None must not be used (``Queue.pop`` drops such
    chains for you); its descriptor lists hold what was read before the
    error, for diagnostics only.
    """

    __slots__ = ("memory", "head", "error", "descriptors", "readable", "writable",
                 "readable_len", "writable_len")

    def __init__(self, memory: GuestMemory, table: np.ndarray, head: int, *,
                 indirect_desc: bool = False, max_indirect: int | None = None) -> None:
        self.memory = memory
        #: the index of the first descriptor: what add_used() gives back
        self.head = head
        self.descriptors: list[Descriptor] = []
        self.readable_len = 0
        self.writable_len = 0
        #: None, or the fixed reason string of the first rule the chain broke
        self.error: str | None = self._walk(table, head, indirect_desc,
                                            len(table) if max_indirect is None else max_indirect)
        self.readable = tuple(d for d in self.descriptors if not d.writable)
        self.writable = tuple(d for d in self.descriptors if d.writable)

    def _walk(self, table: np.ndarray, index: int, indirect_desc: bool, max_indirect: int) -> str | None:
        memory = self.memory
        limit = ttl = len(table)
        in_indirect = seen_writable = False
        while True:
            if ttl == 0:
                return "descriptor chain loops or is longer than its table (ttl)"
            ttl -= 1
            addr, length, flags, nxt = table[index].item()   # one copy: no TOCTOU
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not indirect_desc:
                    return "VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC"
                if in_indirect:
                    return "VIRTQ_DESC_F_INDIRECT inside an indirect table"
                if flags & VIRTQ_DESC_F_NEXT:
                    return "VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT"
                count, rest = divmod(length, VIRTQ_DESC.itemsize)
                if count == 0 or rest:
                    return "indirect table length is 0 or not a multiple of 16"
                if count > max_indirect:
                    return "indirect table longer than the queue size"
                if not memory.contains(addr, length):
                    return "indirect table outside guest memory"
                # §2.7.5.3: the device ignores VIRTQ_DESC_F_WRITE on this descriptor
                table = memory.ndarray(addr, VIRTQ_DESC, count)
                limit = ttl = count
                index, in_indirect = 0, True
                continue
            if not memory.contains(addr, length):
                return "descriptor buffer outside guest memory"
            if flags & VIRTQ_DESC_F_WRITE:
                seen_writable = True
                self.writable_len += length
            elif seen_writable:
                return "device-readable descriptor after a device-writable one"
            else:
                self.readable_len += length
            if self.readable_len + self.writable_len > _MAX_CHAIN_BYTES:
                return "descriptor chain longer than 2**32 bytes"
            self.descriptors.append(Descriptor(addr, length, flags))
            if not flags & VIRTQ_DESC_F_NEXT:
                return None
            if nxt >= limit:
                return "descriptor next index out of range"
            index = nxt

    def __iter__(self) -> Iterator[Descriptor]:
        return iter(self.descriptors)

    def __len__(self) -> int:
        return len(self.descriptors)

    def readable_views(self) -> list[memoryview]:
        """Zero-copy views of the device-readable buffers, in chain order."""
        return [self.memory.view(d.addr, d.len) for d in self.readable]

    def writable_views(self) -> list[memoryview]:
        """Zero-copy views of the device-writable buffers, in chain order."""
        return [self.memory.view(d.addr, d.len) for d in self.writable]

    def read_readable(self, limit: int | None = None) -> bytes:
        """Copy the readable part out as one byte string (at most ``limit`` bytes)."""
        want = self.readable_len if limit is None else min(limit, self.readable_len)
        out = bytearray()
        for d in self.readable:
            if len(out) >= want:
                break
            out += self.memory.read(d.addr, min(d.len, want - len(out)))
        return bytes(out)

    def write_writable(self, data, offset: int = 0) -> int:
        """Scatter ``data`` into the writable part from byte ``offset`` on.

        Returns how many bytes fitted; the device reports ``offset`` plus that
        (or whatever total it wrote) to :meth:`Queue.add_used`.
        """
        src = memoryview(data).cast("B")
        done = 0
        for view in self.writable_views():
            if offset >= len(view):
                offset -= len(view)
                continue
            n = min(len(view) - offset, len(src) - done)
            view[offset:offset + n] = src[done:done + n]
            done += n
            offset = 0
            if done == len(src):
                break
        return done

    def __repr__(self) -> str:
        state = f"error={self.error!r}" if self.error else "ok"
        return (f"DescriptorChain(head={self.head}, {len(self.readable)}r/{len(self.writable)}w, "
                f"{self.readable_len}+{self.writable_len} bytes, {state})")


# --- the queue -------------------------------------------------------------

class Queue:
    """The device side of one split virtqueue in guest memory.

    Built by the transport from the driver's QueueSize/QueueDesc/QueueDriver/
    QueueDevice registers; raises :class:`QueueError` if they are unusable.
    ``on_broken(reason)`` is called (once) when the driver corrupts the
    available ring beyond repair; the transport answers with
    DEVICE_NEEDS_RESET.
    """

    def __init__(self, memory: GuestMemory, size: int, desc_table: int, avail_ring: int,
                 used_ring: int, *, max_size: int = VIRTQ_MAX_SIZE, event_idx: bool = False,
                 indirect_desc: bool = False, index: int = 0,
                 on_broken: Callable[[str], None] | None = None,
                 errors: GuestErrorLog | None = None) -> None:
        self.memory = memory
        self.index = index
        self.size = size
        self.desc_table, self.avail_ring, self.used_ring = desc_table, avail_ring, used_ring
        self.event_idx = event_idx
        self.indirect_desc = indirect_desc
        reason = self._check_layout(max_size)
        if reason is not None:      # the caller logs it: it knows how often this happens
            raise QueueError(reason, f"queue {index} size={size} desc={desc_table:#x} "
                                     f"avail={avail_ring:#x} used={used_ring:#x}")
        #: guest mistakes seen on this queue; the transport passes one log per
        #: queue index that survives resets, so a guest cannot re-arm the logging
        self.errors = errors if errors is not None else GuestErrorLog(f"virtqueue {index}")
        self._on_broken = on_broken

        self._desc = memory.ndarray(desc_table, VIRTQ_DESC, size)
        avail = memory.ndarray(avail_ring, virtq_avail_dtype(size), 1)
        used = memory.ndarray(used_ring, virtq_used_dtype(size), 1)
        # field views, each a numpy array living in guest RAM
        self._avail_flags, self._avail_idx = avail["flags"], avail["idx"]
        self._avail_ring, self._used_event = avail["ring"][0], avail["used_event"]
        self._used_flags, self._used_idx = used["flags"], used["idx"]
        self._used_ring, self._avail_event = used["ring"][0], used["avail_event"]

        #: free-running u16: the next available-ring entry the device will read
        self.last_avail_idx = 0
        #: free-running u16: the used.idx value the device last published
        self.next_used_idx = 0
        self.in_flight = 0                  # chains popped and not yet used
        self._signalled_used = 0            # next_used_idx at the last notification decision
        self._signalled_used_valid = False
        self._used_since_decision = 0
        #: None, or why the available ring can no longer be trusted
        self.broken: str | None = None
        self._stopped = False

    def _check_layout(self, max_size: int) -> str | None:
        size, mem = self.size, self.memory
        if size == 0 or size & (size - 1):
            return "QueueSize is not a power of two"
        if size > min(max_size, VIRTQ_MAX_SIZE):
            return "QueueSize exceeds QueueSizeMax"
        areas = ((self.desc_table, VIRTQ_DESC_ALIGN, 16 * size, "descriptor table"),
                 (self.avail_ring, VIRTQ_AVAIL_ALIGN, 6 + 2 * size, "available ring"),
                 (self.used_ring, VIRTQ_USED_ALIGN, 6 + 8 * size, "used ring"))
        for gpa, align, length, name in areas:
            if gpa % align:
                return f"{name} misaligned"
            if not mem.contains(gpa, length):
                return f"{name} outside guest memory"
        used_end = self.used_ring + 6 + 8 * size
        for gpa, _, length, _ in areas[:2]:
            if gpa < used_end and self.used_ring < gpa + length:
                return "used ring overlaps the descriptor table or available ring"
        return None

    # -- state --------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """False once the transport stopped the queue (reset, QueueReady=0)."""
        return not self._stopped

    def stop(self) -> None:
        """Stop touching guest memory: pop() finds nothing, add_used() is dropped."""
        self._stopped = True

    def _break(self, reason: str, detail: str) -> None:
        self.errors.report(reason, detail)
        if self.broken is None:
            self.broken = reason
            if self._on_broken is not None:
                self._on_broken(reason)

    def snapshot(self) -> dict:
        """Counters of the rings as they stand now, for metrics and tests."""
        return {"size": self.size, "avail_idx": int(self._avail_idx[0]),
                "last_avail_idx": self.last_avail_idx, "used_idx": self.next_used_idx,
                "in_flight": self.in_flight, "broken": self.broken,
                "errors": dict(self.errors.counts)}

    # -- the available ring -------------------------------------------------
    def has_available(self) -> bool:
        """True if the driver published entries the device has not popped."""
        if self._stopped or self.broken:
            return False
        return int(self._avail_idx[0]) != self.last_avail_idx

    def _next_head(self) -> int | None:
        if self._stopped or self.broken:
            return None
        avail_idx = int(self._avail_idx[0])
        pending = (avail_idx - self.last_avail_idx) & _U16
        if pending == 0:
            return None
        if pending > self.size:
            self._break("avail.idx moved more than QueueSize entries ahead",
                        f"avail.idx={avail_idx} last_avail_idx={self.last_avail_idx}")
            return None
        head = int(self._avail_ring[self.last_avail_idx & (self.size - 1)])
        self.last_avail_idx = (self.last_avail_idx + 1) & _U16
        if head >= self.size:
            self._break("available ring entry (chain head) >= QueueSize", f"head={head}")
            return None
        return head

    def pop(self, *, drop_bad: bool = True) -> DescriptorChain | None:
        """The next new, well-formed descriptor chain, or None if there is none.

        A malformed chain is logged, handed straight back to the driver with
        ``used.len = 0`` and skipped (``drop_bad=False`` returns it instead,
        with :attr:`DescriptorChain.error` set, for tests and diagnostics).
        """
        while (head := self._next_head()) is not None:
            self.in_flight += 1
            chain = DescriptorChain(self.memory, self._desc, head,
                                    indirect_desc=self.indirect_desc, max_indirect=self.size)
            if chain.error is None:
                return chain
            self.errors.report(chain.error, f"chain head {head}")
            if not drop_bad:
                return chain
            self.add_used(head, 0)
        return None

    def __iter__(self) -> Iterator[DescriptorChain]:
        """Pop chains until the available ring is empty."""
        while (chain := self.pop()) is not None:
            yield chain

    # -- the used ring ------------------------------------------------------
    def add_used(self, head: int, length: int) -> None:
        """Return chain ``head`` to the driver, ``length`` bytes written into it.

        Writes the used element, then publishes ``used.idx`` (store->store,
        ordered on x86).  Does not interrupt: call
        :meth:`needs_notification` once after a batch.  A head the device
        never popped is a device bug and raises ValueError.
        """
        if self._stopped:
            return
        if not 0 <= head < self.size or self.in_flight == 0:
            raise ValueError(f"virtqueue {self.index}: add_used({head}) for a chain not in flight")
        if not 0 <= length <= _U32_MAX:
            raise ValueError(f"virtqueue {self.index}: used length {length} does not fit le32")
        self._used_ring[self.next_used_idx & (self.size - 1)] = (head, length)
        self.next_used_idx = (self.next_used_idx + 1) & _U16
        self._used_idx[0] = self.next_used_idx          # publish
        self.in_flight -= 1
        self._used_since_decision += 1

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was added since the last call.

        Call once per batch of :meth:`add_used` (at least once every
        ``size`` entries).  With VIRTIO_F_EVENT_IDX: interrupt iff ``used.idx``
        passed ``used_event`` since the last decision (§2.7.7, as Linux
        vhost ``vhost_notify``); without: iff the driver did not set
        VIRTQ_AVAIL_F_NO_INTERRUPT.  Nothing added: False.
        """
        if self._stopped or self._used_since_decision == 0:
            return False
        self._used_since_decision = 0
        memory_barrier()        # our used.idx store before the driver's used_event/flags load
        new, old = self.next_used_idx, self._signalled_used
        self._signalled_used = new
        if self.event_idx:
            valid, self._signalled_used_valid = self._signalled_used_valid, True
            return not valid or vring_need_event(int(self._used_event[0]), new, old)
        return not int(self._avail_flags[0]) & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- available-buffer notification suppression (§2.7.10) -----------------
    def disable_notification(self) -> None:
        """Ask the driver not to notify (kick) while the device is busy anyway.

        Without EVENT_IDX: set VIRTQ_USED_F_NO_NOTIFY.  With EVENT_IDX there
        is nothing to do: the driver kicks only when its ``avail.idx`` passes
        ``avail_event``, and once it has passed, it stays quiet until
        :meth:`enable_notification` moves ``avail_event`` again.
        """
        if not self._stopped and not self.event_idx:
            self._used_flags[0] = VIRTQ_USED_F_NO_NOTIFY

    def enable_notification(self) -> bool:
        """Ask for a kick on the next new buffer; True if buffers already arrived.

        The race-free device loop (as in vhost and rust-vmm)::

            while True:
                queue.disable_notification()
                for chain in queue:
                    ...process, add_used...
                if not queue.enable_notification():
                    break           # empty, and the driver will kick us

        A True result means the driver may have published a buffer after we
        looked but before it could see our request, so it might never kick:
        go round again.
        """
        if self._stopped or self.broken:
            return False
        if self.event_idx:
            self._avail_event[0] = self.last_avail_idx
        else:
            self._used_flags[0] = 0
        memory_barrier()        # our avail_event/flags store before the avail.idx load
        return self.has_available()

    def __repr__(self) -> str:
        return (f"Queue(index={self.index}, size={self.size}, desc={self.desc_table:#x}, "
                f"avail={self.avail_ring:#x}, used={self.used_ring:#x}, "
                f"last_avail={self.last_avail_idx}, next_used={self.next_used_idx})")
