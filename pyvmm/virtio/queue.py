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
3. The device calls :meth:`Queue.pop_batch` (or :meth:`Queue.pop`, the
   batch of one).  ``avail.idx`` is read once, the ring entries of the
   whole batch in one read, and each new head is walked **once** into a
   :class:`DescriptorChain`: every descriptor is copied out of guest RAM,
   checked, and split into the device-readable and device-writable parts.
4. When done with a batch the device calls :meth:`Queue.add_used_batch`
   (or :meth:`Queue.add_used`, the batch of one), which writes
   ``used.ring[used.idx % size] = (head, bytes written)`` for each chain
   and then publishes the new ``used.idx`` once.
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
``avail.idx`` more than ``size`` ahead of what we consumed  queue *broken*: ``pop_batch`` returns
a head index ``>= size`` in the available ring              nothing more (the chains before a
                                                            bad head still), ``on_broken(reason)``
                                                            (transport sets DEVICE_NEEDS_RESET)
a bad chain: buffer outside RAM, ``next`` out of range,     that chain is *dropped*: returned to
loop / longer than the queue (ttl), readable after         the driver with ``used.len = 0``
writable, INDIRECT not negotiated / nested / with NEXT /    (as Firecracker does); the batch
bad table length, more than 2**32 bytes in total            goes on with the next one
=========================================================  ===================================

Each reason is logged once per queue (:class:`GuestErrorLog`) and counted;
nothing a guest writes can raise out of this module or loop forever.

Memory ordering.  pyvmm runs on x86-64, whose TSO model keeps stores in
order with stores and loads in order with loads; the one reordering it
allows is a *later load passing an earlier store* (store buffer).  The rings
are read with ``struct`` on one memoryview of guest RAM (and, for large
batches, numpy slices and gathers); an aligned ``le16``/``le32`` field is
copied with one aligned move (no tearing), and each Python statement is a
separate C call, so the compiler cannot move them across each other.  The
used elements are written with ``struct.pack_into``, but the three fields
the driver polls (``used.idx``, ``used.flags``, ``avail_event``) are stored
with a numpy scalar assignment, one aligned 16-bit store: ``pack_into``
zero-fills its destination before writing the value (CPython's
``s_pack_internal``), and a driver that saw ``used.idx`` go to 0 for a
moment would take stale used elements for new ones (the freestanding guest
did: "device returned id 0, which is not an outstanding chain head").  A
used element is not read by the driver before ``used.idx`` covers it, so
the zero-fill is harmless there.  Hence:

* pop_batch: read ``avail.idx``, then the ring entries, then the
  descriptors: load->load, ordered by TSO (the driver wrote them in the
  opposite order).
* add_used_batch: write the used elements, then ``used.idx``: store->store,
  ordered by TSO (§2.7.8: "The device MUST set len prior to updating the
  used idx"); a :func:`memory_barrier` sits there too (Linux's
  ``virtio_wmb()`` spot), at ~0.1 us once per batch.
* needs_notification: store ``used.idx``, then load ``used_event``/flags;
  enable_notification: store ``avail_event``/flags, then load ``avail.idx``.
  Both are store->load and need a full barrier, exactly where Linux uses
  ``virtio_mb()`` and QEMU ``smp_mb()``: see :func:`memory_barrier`.
  Without it the device could miss the driver's update and both sides
  would sleep on each other (a lost wake-up).

Batches, and struct versus numpy.  The walk of a chain is plain Python on
plain ints (a precompiled ``struct.Struct('<QIHH')`` per descriptor; no
IntFlag or NamedTuple per descriptor).  A batch of fewer than
``_NUMPY_MIN_BATCH`` entries reads the ring entries with one
``struct.unpack_from('<nH')`` and walks every chain.  A larger batch copies
the ring slice with numpy and pre-checks the common chains all at once
(:meth:`Queue._prewalk`: one or two plain descriptors, gathered out of the
table and checked elementwise with the walk's own rules); everything else,
including every chain that breaks a rule, is walked one by one, so errors
and reports are the walk's.  numpy costs some tens of us per batch
whatever its size and saves about a microsecond per pre-checked chain, so
it pays only for large batches; an indirect-table workload never gains
(its chains are all walked).  Measured with ``python bench/micro_queue.py``
(us per chain for pop_batch + add_used_batch + needs_notification, minimum
over 4 runs of 300 rounds of 256 chains; 2-vCPU EPYC under PVM, shared and
noisy: single runs move by up to 50%, so compare minima; "before" is
``pop()`` + ``add_used()`` per chain as they were before batching)::

    batch   tx: 44 + 4096 B, 2 descriptors   tx, one INDIRECT table of 2   rx: 2 writable
            before  struct  numpy            before  struct  numpy         before  struct  numpy
        1    18.2    6.9    60.1              23.6    7.3    35.3           18.3    6.8    63.3
        4    17.4    3.0    15.9              22.5    3.4    10.7           17.0    3.0    16.2
       16    17.1    2.0     4.6              22.1    2.4     4.1           17.1    2.0     4.8
       64    16.9    1.8     1.9              21.8    2.2     2.7           16.9    1.7     1.9
      128    16.9    1.8     1.5              21.9    2.1     2.4           16.8    1.7     1.5
      256    17.0    1.7     1.2              22.2    2.1     2.3           17.3    1.7     1.2

So numpy from 128 entries on (``_NUMPY_MIN_BATCH``): the crossover for
plain chains lies between 64 and 128; indirect chains pay 0.15-0.3 us per
chain for it at 128 and 256.

Threads.  A queue is used by one device thread at a time (it is not
locked).  ``stop()`` may be called from another thread (the transport on
reset); afterwards the queue no longer touches guest memory.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import struct
import threading
from enum import IntFlag
from typing import Callable, Iterator, NamedTuple, Sequence

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
# the hot path uses plain ints, not the IntFlag members (an IntFlag ``&`` builds an object)
_F_NEXT = int(VIRTQ_DESC_F_NEXT)
_F_WRITE = int(VIRTQ_DESC_F_WRITE)
_F_INDIRECT = int(VIRTQ_DESC_F_INDIRECT)
_USED_F_NO_NOTIFY = int(VIRTQ_USED_F_NO_NOTIFY)
#: ``struct virtq_desc`` for struct: one call copies a descriptor out as four ints
_DESC = struct.Struct("<QIHH")
_DESC_UNPACK = _DESC.unpack_from
_new = object.__new__
_LE16 = struct.Struct("<H")
_flatten = itertools.chain.from_iterable
#: batches of at least this many available-ring entries are read with numpy
#: (ring slice, and Queue._prewalk of the plain chains); smaller ones with
#: struct.  Measured with bench/micro_queue.py: see the module docstring.
_NUMPY_MIN_BATCH = 128


@functools.lru_cache(maxsize=256)
def _u16s(n: int) -> struct.Struct:
    """``le16[n]`` (available-ring entries)."""
    return struct.Struct(f"<{n}H")


@functools.lru_cache(maxsize=256)
def _u32s(n: int) -> struct.Struct:
    """``le32[n]`` (used-ring elements, two per element)."""
    return struct.Struct(f"<{n}I")
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
    """One checked descriptor: ``[addr, addr + len)`` lies inside guest RAM.

    The public face of a descriptor (iteration, :attr:`DescriptorChain.readable`
    and :attr:`~DescriptorChain.writable`).  The walk itself keeps plain
    ``(addr, len, flags)`` tuples; these are built only when asked for.
    """
    addr: int
    len: int
    flags: int

    @property
    def writable(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


_DESC_TUPLE = Descriptor._make


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

    Chains are built by :class:`Queue` (:meth:`Queue.pop_batch`), not by
    device code.  Internally the descriptors are plain ``(addr, len, flags)``
    tuples in chain order, readable ones first (anything else is an error,
    §2.7.4.2), so the split is one index, :attr:`n_readable`.
    """

    __slots__ = ("memory", "head", "error", "_descs", "n_readable", "readable_len",
                 "writable_len", "_ram", "_base")

    def __init__(self, memory: GuestMemory, ram: memoryview, head: int, table_off: int,
                 limit: int, indirect_desc: bool, max_indirect: int) -> None:
        self.memory = memory
        self._ram = ram
        self._base = memory.base
        #: the index of the first descriptor: what add_used() gives back
        self.head = head
        self._descs: list[tuple[int, int, int]] = []
        #: None, or the fixed reason string of the first rule the chain broke
        self.error: str | None = self._walk(table_off, limit, head, indirect_desc, max_indirect)

    @classmethod
    def _checked(cls, memory: GuestMemory, ram: memoryview, head: int,
                 descs: list[tuple[int, int, int]], n_readable: int, readable_len: int,
                 writable_len: int) -> DescriptorChain:
        """A chain :meth:`Queue._prewalk` already read and checked (no walk)."""
        chain = _new(cls)
        chain.memory, chain._ram, chain._base, chain.head, chain.error = memory, ram, memory.base, head, None
        chain._descs, chain.n_readable = descs, n_readable
        chain.readable_len, chain.writable_len = readable_len, writable_len
        return chain

    def _walk(self, table_off: int, limit: int, index: int, indirect_desc: bool,
              max_indirect: int) -> str | None:
        """Walk the chain from ``index`` in the table at RAM offset ``table_off``.

        §2.7.5 (chaining, ``VIRTQ_DESC_F_NEXT``), §2.7.5.3 (indirect tables),
        §2.7.4.2 (readable before writable).  Every descriptor is copied out
        of guest RAM exactly once (one ``struct.unpack_from`` of 16 bytes)
        and checked as plain ints before anything uses it.
        """
        ram, descs, append = self._ram, self._descs, self._descs.append
        base = self._base
        end = base + self.memory.size
        unpack = _DESC_UNPACK
        ttl = limit
        in_indirect = seen_writable = False
        nr = rlen = wlen = 0
        error = None
        while True:
            if ttl == 0:
                error = "descriptor chain loops or is longer than its table (ttl)"
                break
            ttl -= 1
            addr, length, flags, nxt = unpack(ram, table_off + 16 * index)   # one copy: no TOCTOU
            if flags & _F_INDIRECT:
                if not indirect_desc:
                    error = "VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC"
                    break
                if in_indirect:
                    error = "VIRTQ_DESC_F_INDIRECT inside an indirect table"
                    break
                if flags & _F_NEXT:
                    error = "VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT"
                    break
                count, rest = divmod(length, 16)
                if count == 0 or rest:
                    error = "indirect table length is 0 or not a multiple of 16"
                    break
                if count > max_indirect:
                    error = "indirect table longer than the queue size"
                    break
                if addr < base or addr + length > end:
                    error = "indirect table outside guest memory"
                    break
                # §2.7.5.3: the device ignores VIRTQ_DESC_F_WRITE on this descriptor
                table_off = addr - base
                limit = ttl = count
                index, in_indirect = 0, True
                continue
            if addr < base or addr + length > end:
                error = "descriptor buffer outside guest memory"
                break
            if flags & _F_WRITE:
                seen_writable = True
                wlen += length
            elif seen_writable:
                error = "device-readable descriptor after a device-writable one"
                break
            else:
                rlen += length
                nr += 1
            if rlen + wlen > _MAX_CHAIN_BYTES:
                error = "descriptor chain longer than 2**32 bytes"
                break
            append((addr, length, flags))
            if not flags & _F_NEXT:
                break
            if nxt >= limit:
                error = "descriptor next index out of range"
                break
            index = nxt
        self.n_readable, self.readable_len, self.writable_len = nr, rlen, wlen
        return error

    @property
    def descriptors(self) -> list[Descriptor]:
        """Every descriptor read, in chain order (readable ones first)."""
        return [_DESC_TUPLE(d) for d in self._descs]

    @property
    def readable(self) -> tuple[Descriptor, ...]:
        """The device-readable part (§2.7.4.2), in chain order."""
        return tuple(_DESC_TUPLE(d) for d in self._descs[:self.n_readable])

    @property
    def writable(self) -> tuple[Descriptor, ...]:
        """The device-writable part (``VIRTQ_DESC_F_WRITE``), in chain order."""
        if len(self._descs) == self.n_readable:
            return ()
        return tuple(_DESC_TUPLE(d) for d in self._descs[self.n_readable:])

    def __iter__(self) -> Iterator[Descriptor]:
        return iter(self.descriptors)

    def __len__(self) -> int:
        return len(self._descs)

    def readable_views(self, start: int = 0, end: int | None = None) -> list[memoryview]:
        """Zero-copy views of the device-readable buffers, in chain order.

        With ``start``/``end``: views of the bytes ``[start, end)`` of the readable
        part taken as one byte string, whatever the descriptor boundaries (§2.6.4;
        empty pieces left out).
        """
        descs = self._descs[:self.n_readable]
        if end is None and start == 0:
            ram, base = self._ram, self._base
            return [ram[a - base:a - base + n] for a, n, _ in descs]
        return self._range_views(descs, start, self.readable_len if end is None else end)

    def writable_views(self, start: int = 0, end: int | None = None) -> list[memoryview]:
        """Zero-copy views of the device-writable buffers, in chain order
        (``start``/``end``: a byte range of the writable part, as :meth:`readable_views`)."""
        descs = self._descs[self.n_readable:]
        if end is None and start == 0:
            ram, base = self._ram, self._base
            return [ram[a - base:a - base + n] for a, n, _ in descs]
        return self._range_views(descs, start, self.writable_len if end is None else end)

    def _range_views(self, descs: list[tuple[int, int, int]], start: int, end: int) -> list[memoryview]:
        """Views of the bytes ``[start, end)`` of ``descs`` taken end to end."""
        ram, base = self._ram, self._base
        out = []
        pos = 0                                 # where the current descriptor starts
        for addr, n, _ in descs:
            stop = pos + n
            if stop > start:                    # ends after start: it may hold some
                lo = start - pos if start > pos else 0
                hi = end - pos if end < stop else n
                if lo < hi:
                    off = addr - base
                    out.append(ram[off + lo:off + hi])
            if stop >= end:
                break
            pos = stop
        return out

    def read_readable(self, limit: int | None = None) -> bytes:
        """Copy the readable part out as one byte string (at most ``limit`` bytes)."""
        want = self.readable_len if limit is None else min(limit, self.readable_len)
        if self.n_readable and self._descs[0][1] >= want:  # the common case: one descriptor has it
            off = self._descs[0][0] - self._base
            return bytes(self._ram[off:off + want])
        out = bytearray()
        for view in self.readable_views():
            if len(out) >= want:
                break
            out += view[:want - len(out)]
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
        nw = len(self._descs) - self.n_readable
        return (f"DescriptorChain(head={self.head}, {self.n_readable}r/{nw}w, "
                f"{self.readable_len}+{self.writable_len} bytes, {state})")


# --- the queue -------------------------------------------------------------

class Queue:
    """The device side of one split virtqueue in guest memory.

    Built by the transport from the driver's QueueSize/QueueDesc/QueueDriver/
    QueueDevice registers; raises :class:`QueueError` if they are unusable.
    ``on_broken(reason)`` is called (once) when the driver corrupts the
    available ring beyond repair; the transport answers with
    DEVICE_NEEDS_RESET.

    Batches: :meth:`pop_batch` takes up to ``max_chains`` chains off the
    available ring in one pass and :meth:`add_used_batch` returns any number
    in one pass, publishing ``used.idx`` once.  :meth:`pop` and
    :meth:`add_used` are the batch-of-one cases.
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

        # Reads of the rings, and the used elements (not visible to the driver
        # until used.idx covers them), go through one memoryview of guest RAM
        # at offsets checked once above (_check_layout), as struct reads and
        # writes of plain ints.  The three fields the driver may be reading
        # while we store them (used.idx, used.flags, avail_event) are stored
        # through numpy views instead: struct.pack_into zero-fills its
        # destination before it writes the value (CPython s_pack_internal),
        # so a driver polling used.idx on another CPU would see it drop to 0
        # for a moment and read stale used elements as new.  The memoryview
        # is taken over a numpy view (which holds no buffer export of the
        # mmap), so GuestMemory.close() still unmaps RAM as it did before.
        self._ram = memoryview(memory.ndarray(memory.base, np.uint8, memory.size))
        base = memory.base
        self._desc_off = desc_table - base
        self._avail_idx_off = avail_ring - base + 2
        self._avail_ring_off = avail_ring - base + 4
        self._used_event_off = avail_ring - base + 4 + 2 * size
        self._used_ring_off = used_ring - base + 4
        self._desc = memory.ndarray(desc_table, VIRTQ_DESC, size)
        self._avail_ring_np = memory.ndarray(avail_ring + 4, "<u2", size)
        self._np_base, self._np_end = np.uint64(memory.base), np.uint64(memory.end)
        self._used_flags_np = memory.ndarray(used_ring, "<u2", 1)
        self._used_idx_np = memory.ndarray(used_ring + 2, "<u2", 1)
        self._avail_event_np = memory.ndarray(used_ring + 4 + 8 * size, "<u2", 1)

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

    def _avail_idx(self) -> int:
        return _LE16.unpack_from(self._ram, self._avail_idx_off)[0]

    def avail_idx(self) -> int:
        """The driver's ``avail.idx`` as it stands now (it moves on each buffer it adds)."""
        return self._avail_idx()

    def snapshot(self) -> dict:
        """Counters of the rings as they stand now, for metrics and tests."""
        return {"size": self.size, "avail_idx": self._avail_idx(),
                "last_avail_idx": self.last_avail_idx, "used_idx": self.next_used_idx,
                "in_flight": self.in_flight, "broken": self.broken,
                "errors": dict(self.errors.counts)}

    # -- the available ring -------------------------------------------------
    def has_available(self) -> bool:
        """True if the driver published entries the device has not popped."""
        if self._stopped or self.broken:
            return False
        return self._avail_idx() != self.last_avail_idx

    def _take_heads(self, want: int) -> tuple[list[int], np.ndarray | None, int | None]:
        """Consume up to ``want`` available-ring entries (§2.7.6) in one read.

        Returns ``(heads, array, bad_head)``: the chain heads in ring order
        (a list; with numpy also as an array, for :meth:`_prewalk`, else
        None), and a head ``>= size`` that ended the batch (the caller breaks
        the queue *after* walking the heads before it, as a sequence of
        single pops would).  ``avail.idx`` is read once; a jump of more than
        ``size`` breaks the queue here.
        """
        if self._stopped or self.broken:
            return [], None, None
        avail_idx = self._avail_idx()
        last = self.last_avail_idx
        pending = (avail_idx - last) & _U16
        if pending == 0:
            return [], None, None
        size = self.size
        if pending > size:
            self._break("avail.idx moved more than QueueSize entries ahead",
                        f"avail.idx={avail_idx} last_avail_idx={last}")
            return [], None, None
        n = pending if pending < want else want
        start = last & (size - 1)
        first = size - start                 # entries before the ring wraps
        bad = h = None
        if n >= _NUMPY_MIN_BATCH:
            ring = self._avail_ring_np
            h = ring[start:start + n].copy() if n <= first else \
                np.concatenate((ring[start:], ring[:n - first]))       # one copy: no TOCTOU
            over = h >= size
            if over.any():
                i = int(over.argmax())
                bad, h = int(h[i]), h[:i]
            heads = h.tolist()
        else:
            ring, off = self._ram, self._avail_ring_off
            if n <= first:
                heads = list(_u16s(n).unpack_from(ring, off + 2 * start))
            else:
                heads = list(_u16s(first).unpack_from(ring, off + 2 * start))
                heads += _u16s(n - first).unpack_from(ring, off)
            if max(heads) >= size:
                i = next(i for i, h in enumerate(heads) if h >= size)
                bad, heads = heads[i], heads[:i]
        taken = len(heads) + (bad is not None)
        self.last_avail_idx = (last + taken) & _U16
        self.in_flight += len(heads)
        return heads, h, bad

    def _prewalk(self, heads: list[int], h: np.ndarray) -> list[DescriptorChain | None]:
        """Check the common chains of a large batch with numpy, all at once.

        The chains this recognises are the ones that dominate a vsock queue:
        one descriptor, or two chained by VIRTQ_DESC_F_NEXT, no INDIRECT.
        Their descriptors are gathered out of the table (one copy each) and
        checked elementwise with exactly the rules of the walk (§2.7.5:
        buffer inside RAM, ``next < size``, readable before writable, at most
        2**32 bytes; a 2-descriptor chain also needs ``size >= 2`` for the
        ttl); a chain passing them is built from the copies without a walk.
        Anything else (indirect tables, longer chains, and every chain that
        breaks a rule) gets ``None``: the caller walks it from scratch with
        :class:`DescriptorChain`, so errors and reports stay the walk's own.
        """
        d0 = self._desc[h]                                   # gather: one copy
        size, base, end = self.size, self._np_base, self._np_end
        a0, l0, f0, n0 = d0["addr"], d0["len"], d0["flags"], d0["next"]
        kind0 = f0 & (_F_NEXT | _F_INDIRECT)
        # addr + len may wrap u64: compare len with end - addr (only read where addr <= end)
        in0 = (a0 >= base) & (a0 <= end) & (l0 <= end - np.minimum(a0, end))
        one = in0 & (kind0 == 0)
        w0 = (f0 & _F_WRITE) != 0
        two = in0 & (kind0 == _F_NEXT) & (n0 < size) if size >= 2 else np.zeros_like(one)
        if two.any():
            d1 = self._desc[np.where(two, n0, 0)]            # gather: one copy
            a1, l1, f1 = d1["addr"], d1["len"], d1["flags"]
            w1 = (f1 & _F_WRITE) != 0
            two &= ((a1 >= base) & (a1 <= end) & (l1 <= end - np.minimum(a1, end))
                    & ((f1 & (_F_NEXT | _F_INDIRECT)) == 0) & ~(w0 & ~w1)
                    & (l0.astype(np.uint64) + l1 <= _MAX_CHAIN_BYTES))
            A1, L1, F1 = a1.tolist(), l1.tolist(), f1.tolist()
            R1 = (~w1).tolist()
        elif not one.any():
            return [None] * len(heads)
        else:
            A1 = L1 = F1 = R1 = None
        kinds = (one + 2 * two).tolist()
        A0, L0, F0, R0 = a0.tolist(), l0.tolist(), f0.tolist(), (~w0).tolist()
        memory, ram, checked = self.memory, self._ram, DescriptorChain._checked
        out: list[DescriptorChain | None] = []
        for i, head in enumerate(heads):
            k = kinds[i]
            if k == 0:
                out.append(None)
            elif k == 1:
                n = L0[i]
                out.append(checked(memory, ram, head, [(A0[i], n, F0[i])],
                                   1, n, 0) if R0[i] else
                           checked(memory, ram, head, [(A0[i], n, F0[i])], 0, 0, n))
            else:
                n, m = L0[i], L1[i]
                descs = [(A0[i], n, F0[i]), (A1[i], m, F1[i])]
                if R0[i]:
                    out.append(checked(memory, ram, head, descs, 2, n + m, 0) if R1[i] else
                               checked(memory, ram, head, descs, 1, n, m))
                else:
                    out.append(checked(memory, ram, head, descs, 0, 0, n + m))
        return out

    def pop_batch(self, max_chains: int, *, drop_bad: bool = True) -> list[DescriptorChain]:
        """Up to ``max_chains`` new, well-formed descriptor chains, in ring order.

        Exactly what ``max_chains`` calls of :meth:`pop` would return, with
        the same checks, reports and used-ring contents, but the available
        ring is read in one pass: ``avail.idx`` once, the ring entries for
        the whole batch at once (``struct`` for small batches; numpy for
        large ones, which also pre-checks the plain one- and two-descriptor
        chains in bulk, :meth:`_prewalk`: see the module docstring), then
        every other chain walked with plain ints.  A malformed
        chain is reported, dropped (handed back with ``used.len = 0``, all
        drops of the call published with one ``used.idx`` store) and does
        not count against ``max_chains``: the chains after it are still
        served.  ``drop_bad=False`` returns bad chains instead, with
        :attr:`DescriptorChain.error` set (they do count).  A head index
        ``>= size`` or an ``avail.idx`` jump breaks the queue (§2.7.6 is
        violated beyond repair): the chains before it are still returned.
        """
        out: list[DescriptorChain] = []
        dropped: list[tuple[int, int]] = []
        memory, ram, desc_off, size = self.memory, self._ram, self._desc_off, self.size
        indirect = self.indirect_desc
        while len(out) < max_chains:
            heads, h, bad = self._take_heads(max_chains - len(out))
            pre = self._prewalk(heads, h) if h is not None and heads else None
            for i, head in enumerate(heads):
                chain = pre[i] if pre is not None else None
                if chain is None:
                    chain = DescriptorChain(memory, ram, head, desc_off, size, indirect, size)
                if chain.error is None:
                    out.append(chain)
                    continue
                self.errors.report(chain.error, f"chain head {head}")
                if drop_bad:
                    dropped.append((head, 0))
                else:
                    out.append(chain)
            if bad is not None:
                self._break("available ring entry (chain head) >= QueueSize", f"head={bad}")
            if not heads:
                break
        if dropped:
            self.add_used_batch(dropped)
        return out

    def pop(self, *, drop_bad: bool = True) -> DescriptorChain | None:
        """The next new, well-formed descriptor chain, or None if there is none.

        A malformed chain is logged, handed straight back to the driver with
        ``used.len = 0`` and skipped (``drop_bad=False`` returns it instead,
        with :attr:`DescriptorChain.error` set, for tests and diagnostics).
        A batch of one: see :meth:`pop_batch`.
        """
        chains = self.pop_batch(1, drop_bad=drop_bad)
        return chains[0] if chains else None

    def __iter__(self) -> Iterator[DescriptorChain]:
        """Pop chains until the available ring is empty."""
        while (chain := self.pop()) is not None:
            yield chain

    # -- the used ring ------------------------------------------------------
    def add_used_batch(self, elems: Sequence[tuple[int, int]]) -> None:
        """Return chains to the driver: ``elems`` is ``[(head, bytes written), ...]``.

        Writes every used element (``struct virtq_used_elem``, §2.7.8), then
        publishes ``used.idx`` once for the whole batch.  Does not interrupt:
        call :meth:`needs_notification` once after the batch (it compares the
        ``used.idx`` of the last decision with the new one, so one decision
        covers all the elements).  A head the device never popped, more
        elements than chains in flight, or a length that does not fit le32
        is a device bug: ValueError, and nothing is written.
        """
        if self._stopped:
            return
        n = len(elems)
        if n == 0:
            return
        size = self.size
        for head, length in elems:
            if not 0 <= head < size:
                raise ValueError(f"virtqueue {self.index}: add_used({head}) for a chain not in flight")
            if not 0 <= length <= _U32_MAX:
                raise ValueError(f"virtqueue {self.index}: used length {length} does not fit le32")
        if n > self.in_flight:
            raise ValueError(f"virtqueue {self.index}: {n} used elements for {self.in_flight} "
                             f"chains in flight")
        ram, off, mask = self._ram, self._used_ring_off, size - 1
        idx = self.next_used_idx
        for lo in range(0, n, size):        # more than size only if heads were re-published
            part = elems[lo:lo + size]
            flat = list(_flatten(part))
            start = (idx + lo) & mask
            first = size - start
            if len(part) <= first:
                _u32s(len(flat)).pack_into(ram, off + 8 * start, *flat)
            else:
                _u32s(2 * first).pack_into(ram, off + 8 * start, *flat[:2 * first])
                _u32s(len(flat) - 2 * first).pack_into(ram, off, *flat[2 * first:])
        new = (idx + n) & _U16
        # §2.7.8 "The device MUST set len prior to updating the used idx":
        # the elements' stores before the idx store (Linux virtio_wmb()).
        # x86 TSO keeps store->store order anyway; once per batch the fence
        # costs ~0.1 us, so we make the ordering explicit.
        memory_barrier()
        self._used_idx_np[0] = new          # publish: one 16-bit store (never struct.pack_into)
        self.next_used_idx = new
        self.in_flight -= n
        self._used_since_decision += n

    def add_used(self, head: int, length: int) -> None:
        """Return chain ``head`` to the driver, ``length`` bytes written into it.

        A batch of one (:meth:`add_used_batch`): writes the used element,
        then publishes ``used.idx``.  Does not interrupt: call
        :meth:`needs_notification` once after a batch.  A head the device
        never popped is a device bug and raises ValueError.
        """
        self.add_used_batch(((head, length),))

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was added since the last call.

        Call once per batch of :meth:`add_used` / :meth:`add_used_batch` (at
        least once every ``size`` entries).  With VIRTIO_F_EVENT_IDX:
        interrupt iff ``used.idx`` passed ``used_event`` since the last
        decision, i.e. ``vring_need_event(used_event, new, old)`` with the
        ``used.idx`` of the last decision as ``old`` (§2.7.7, as Linux vhost
        ``vhost_notify``); without: iff the driver did not set
        VIRTQ_AVAIL_F_NO_INTERRUPT.  Nothing added: False.
        """
        if self._stopped or self._used_since_decision == 0:
            return False
        self._used_since_decision = 0
        memory_barrier()        # our used.idx store before the driver's used_event/flags load
        new, old = self.next_used_idx, self._signalled_used
        self._signalled_used = new
        ram = self._ram
        if self.event_idx:
            valid, self._signalled_used_valid = self._signalled_used_valid, True
            return not valid or vring_need_event(_LE16.unpack_from(ram, self._used_event_off)[0],
                                                 new, old)
        return not _LE16.unpack_from(ram, self._avail_idx_off - 2)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- available-buffer notification suppression (§2.7.10) -----------------
    def disable_notification(self) -> None:
        """Ask the driver not to notify (kick) while the device is busy anyway.

        Without EVENT_IDX: set VIRTQ_USED_F_NO_NOTIFY.  With EVENT_IDX there
        is nothing to do: the driver kicks only when its ``avail.idx`` passes
        ``avail_event``, and once it has passed, it stays quiet until
        :meth:`enable_notification` moves ``avail_event`` again.
        """
        if not self._stopped and not self.event_idx:
            self._used_flags_np[0] = _USED_F_NO_NOTIFY

    def enable_notification(self) -> bool:
        """Ask for a kick on the next new buffer; True if buffers already arrived.

        The race-free device loop (as in vhost and rust-vmm)::

            while True:
                queue.disable_notification()
                while chains := queue.pop_batch(n):
                    ...process, add_used_batch...
                if not queue.enable_notification():
                    break           # empty, and the driver will kick us

        A True result means the driver may have published a buffer after we
        looked but before it could see our request, so it might never kick:
        go round again.
        """
        if self._stopped or self.broken:
            return False
        if self.event_idx:
            self._avail_event_np[0] = self.last_avail_idx
        else:
            self._used_flags_np[0] = 0
        memory_barrier()        # our avail_event/flags store before the avail.idx load
        return self.has_available()

    def __repr__(self) -> str:
        return (f"Queue(index={self.index}, size={self.size}, desc={self.desc_table:#x}, "
                f"avail={self.avail_ring:#x}, used={self.used_ring:#x}, "
                f"last_avail={self.last_avail_idx}, next_used={self.next_used_idx})")
