"""Split virtqueue, device side (pyvmm.virtio.queue), driven by the mock driver.

Each test lays out rings with ``MockQueue`` (the driver's half, as Linux
lays them out or as three separate areas), builds the device's ``Queue``
over the same guest memory, and checks what the device sees and what the
driver gets back.  Hostile cases write descriptors by hand.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.memory import GuestMemory
from pyvmm.virtio.device import VirtioFeature, feature_mask
from pyvmm.virtio.mock import MockDriver, MockQueue
from pyvmm.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                VIRTQ_USED_F_NO_NOTIFY, Queue, QueueError, vring_need_event)

MEM_SIZE = 1 << 20
EVENT_IDX = feature_mask(VirtioFeature.VIRTIO_F_EVENT_IDX)
INDIRECT = feature_mask(VirtioFeature.VIRTIO_F_INDIRECT_DESC)


class Pair:
    """A driver-side MockQueue and the device-side Queue over the same rings."""

    def __init__(self, size: int = 8, *, features: int = INDIRECT, layout: str = "linux") -> None:
        self.memory = GuestMemory(MEM_SIZE)
        self.kicked: list[tuple[int, bytes]] = []  # no transport here: record QueueNotify writes
        self.driver = MockDriver(self.memory, transport=self)
        self.driver.features = features
        self.mq = MockQueue(self.driver, 0, size, layout=layout)
        self.broken: list[str] = []
        self.q = Queue(self.memory, size, self.mq.desc_gpa, self.mq.avail_gpa, self.mq.used_gpa,
                       event_idx=bool(features & EVENT_IDX), indirect_desc=bool(features & INDIRECT),
                       on_broken=self.broken.append)

    def write(self, offset: int, data: bytes) -> None:
        self.kicked.append((offset, bytes(data)))

    def scratch(self, data: bytes) -> int:
        gpa = self.driver.allocator.alloc(max(len(data), 1))
        self.memory.write(gpa, data)
        return gpa


# --- well-formed chains ------------------------------------------------------

@pytest.mark.parametrize("layout", ["linux", "separate"])
@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("n_read,n_write", [(1, 0), (0, 1), (1, 1), (3, 2), (0, 5), (7, 1)])
def test_chain_parts_and_bytes(layout, indirect, n_read, n_write):
    p = Pair(8, layout=layout)
    readable = [bytes([i + 1]) * (10 + i) for i in range(n_read)]
    writable = [5 + i for i in range(n_write)]
    head = p.mq.add_chain(readable, writable, indirect=indirect)

    chain = p.q.pop()
    assert chain is not None and chain.error is None and chain.head == head
    assert len(chain) == n_read + n_write
    assert [bytes(v) for v in chain.readable_views()] == readable
    assert [len(v) for v in chain.writable_views()] == writable
    assert chain.read_readable() == b"".join(readable)
    assert (chain.readable_len, chain.writable_len) == (sum(map(len, readable)), sum(writable))
    assert p.q.pop() is None


def test_views_are_zero_copy_and_scatter_spans_buffers():
    p = Pair()
    p.mq.add_chain([b"hdr"], [2, 3, 4])
    chain = p.q.pop()
    chain.readable_views()[0][0:1] = b"H"          # a view aliases guest RAM
    assert chain.read_readable() == b"Hdr"
    assert chain.write_writable(b"abcdefg", offset=1) == 7
    p.q.add_used(chain.head, 8)
    (used,) = p.mq.used()
    assert used.data == b"\xeeabcdefg"             # byte 0 untouched (poison), then the scatter
    assert chain.read_readable(limit=2) == b"Hd"


@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5), data=st.data())
@settings(max_examples=200, deadline=None)
def test_range_views_are_the_byte_range_whatever_the_descriptor_boundaries(sizes, data):
    """§2.6.4: readable_views(start, end) / writable_views(start, end) are the bytes
    [start, end) of the part taken end to end (empty pieces left out), against slicing
    the joined bytes; zero-length descriptors included."""
    p = Pair(16)
    readable = [bytes(range(10 * i, 10 * i + n)) for i, n in enumerate(sizes)]
    p.mq.add_chain(readable, sizes)
    chain = p.q.pop()
    joined = b"".join(readable)
    start = data.draw(st.integers(0, len(joined)))
    end = data.draw(st.integers(start, len(joined)))
    views = chain.readable_views(start, end)
    assert b"".join(map(bytes, views)) == joined[start:end]
    assert all(len(v) for v in views)
    wviews = chain.writable_views(start, end)
    assert sum(map(len, wviews)) == end - start and all(len(v) for v in wviews)
    assert b"".join(map(bytes, chain.writable_views(start))) == b"\xee" * (len(joined) - start)
    assert chain.read_readable(limit=end) == joined[:end]


def test_write_writable_stops_at_the_end_of_the_chain():
    p = Pair()
    p.mq.add_chain([], [3])
    chain = p.q.pop()
    assert chain.write_writable(b"123456") == 3


def test_queue_iteration_yields_chains_in_avail_order():
    p = Pair(4)
    heads = [p.mq.add_chain([bytes([i])]) for i in range(4)]
    assert [c.head for c in p.q] == heads
    assert not p.q.has_available()


# --- used ring ---------------------------------------------------------------

def test_add_used_publishes_element_then_index():
    p = Pair(4)
    h0 = p.mq.add_chain([], [16])
    h1 = p.mq.add_chain([], [16])
    c0, c1 = p.q.pop(), p.q.pop()
    p.q.add_used(c1.head, 3)                       # out of order is allowed
    p.q.add_used(c0.head, 0)
    assert int(p.mq.used_idx_view[0]) == 2
    assert [(u.head, u.len) for u in p.mq.used()] == [(h1, 3), (h0, 0)]


def test_add_used_of_a_chain_not_in_flight_is_a_device_bug():
    p = Pair(4)
    with pytest.raises(ValueError):
        p.q.add_used(0, 0)
    p.mq.add_chain([b"x"])
    c = p.q.pop()
    with pytest.raises(ValueError):
        p.q.add_used(c.head, 1 << 32)
    with pytest.raises(ValueError):
        p.q.add_used(99, 0)


def test_indices_wrap_at_65536():
    p = Pair(4)
    start = 65534
    p.mq.set_avail_idx(start)
    p.mq.last_used_idx = p.mq.last_kick_idx = start
    p.mq.used_idx_view[0] = start
    p.q.last_avail_idx = p.q.next_used_idx = start
    for round_ in range(3):                        # 65534, 65535, 0, 1, ...
        heads = [p.mq.add_chain([bytes([round_, i])], [1]) for i in range(2)]
        chains = list(p.q)
        assert [c.read_readable() for c in chains] == [bytes([round_, i]) for i in range(2)]
        for c in chains:
            p.q.add_used(c.head, 1)
        assert [u.head for u in p.mq.used()] == heads
    assert p.q.last_avail_idx == p.q.next_used_idx == (start + 6) & 0xFFFF == 4
    assert not p.broken


# --- notification suppression ------------------------------------------------

def test_vring_need_event_examples_including_wrap():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(1, 1, 0)           # idx reaches event_idx only at the next entry
    assert vring_need_event(5, 10, 0)
    assert not vring_need_event(10, 10, 0)
    assert vring_need_event(65535, 0, 65535)       # the entry at 65535 crosses the wrap
    assert vring_need_event(65535, 3, 65530)
    assert vring_need_event(1, 2, 65535)
    assert not vring_need_event(2, 2, 65535)
    assert not vring_need_event(7, 7, 7)           # nothing new: never


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0x7FFF))
def test_vring_need_event_is_event_in_window(event, old, step):
    new = (old + step) & 0xFFFF
    window = {(old + i) & 0xFFFF for i in range(step)}   # indices passed: [old, new)
    assert vring_need_event(event, new, old) == (event in window)


def test_no_event_idx_honours_no_interrupt_and_batches():
    p = Pair(8, features=0)
    for _ in range(3):
        p.mq.add_chain([b"x"])
    for c in p.q:
        p.q.add_used(c.head, 0)
    assert p.q.needs_notification()                # one decision for a batch of three
    assert not p.q.needs_notification()            # nothing new since
    p.mq.set_no_interrupt(True)
    p.mq.add_chain([b"y"])
    p.q.add_used(p.q.pop().head, 0)
    assert not p.q.needs_notification()


def test_event_idx_interrupts_only_when_used_event_is_passed():
    p = Pair(8, features=EVENT_IDX)
    for _ in range(6):
        p.mq.add_chain([b"x"])
    chains = list(p.q)
    p.mq.set_no_interrupt(True)                    # must be ignored with EVENT_IDX
    p.mq.set_used_event(3)                         # "interrupt me when entry 3 is used"
    p.q.add_used(chains[0].head, 0)
    assert p.q.needs_notification()                # first decision is always yes (vhost)
    p.q.add_used(chains[1].head, 0)                # used.idx 2: entry 1
    assert not p.q.needs_notification()
    p.q.add_used(chains[2].head, 0)
    p.q.add_used(chains[3].head, 0)                # entries 2 and 3: passes 3
    assert p.q.needs_notification()
    p.q.add_used(chains[4].head, 0)
    assert not p.q.needs_notification()


def test_disable_enable_notification_without_event_idx():
    p = Pair(8, features=0)
    p.q.disable_notification()
    assert int(p.mq.used_flags[0]) == VIRTQ_USED_F_NO_NOTIFY
    p.mq.add_chain([b"a"])
    assert not p.mq.kick()                         # the driver suppresses its kick
    assert p.q.enable_notification()               # ...so the device must look again
    assert int(p.mq.used_flags[0]) == 0
    assert p.q.pop() is not None
    assert not p.q.enable_notification()
    p.mq.add_chain([b"b"])
    assert p.mq.kick()
    assert p.kicked == [(0x50, b"\0\0\0\0")]     # QueueNotify <- queue index 0


def test_enable_notification_with_event_idx_publishes_avail_event():
    p = Pair(8, features=EVENT_IDX)
    p.mq.add_chain([b"a"])
    assert p.mq.kick()                             # avail_event starts at 0: kick for entry 0
    p.q.pop()
    p.mq.add_chain([b"b"])
    assert not p.mq.kick()                         # device has not asked again
    assert p.q.enable_notification()               # entry 1 is there: go round again
    assert int(p.mq.avail_event[0]) == 1
    p.q.pop()
    assert not p.q.enable_notification()
    assert int(p.mq.avail_event[0]) == 2
    p.mq.add_chain([b"c"])
    assert p.mq.kick()


# --- hostile rings -----------------------------------------------------------

def _dropped(p: Pair, reason_part: str) -> None:
    """The chain was refused: pop() found nothing, the driver got it back with len 0."""
    assert p.q.pop() is None
    used = p.mq.used_ring[0].item()
    assert int(p.mq.used_idx_view[0]) == 1 and used[1] == 0
    assert any(reason_part in r for r in p.q.errors.counts), p.q.errors.counts
    assert not p.broken


def test_descriptor_loop_terminates():
    p = Pair(8)
    p.mq.write_descriptor(0, p.scratch(b"a"), 1, VIRTQ_DESC_F_NEXT, 1)
    p.mq.write_descriptor(1, p.scratch(b"b"), 1, VIRTQ_DESC_F_NEXT, 0)
    p.mq.publish(0)
    chain = p.q.pop(drop_bad=False)
    assert chain.error is not None and "loop" in chain.error
    assert len(chain) == 8                         # ttl = queue size, then stop


def test_self_loop_is_dropped():
    p = Pair(8)
    p.mq.write_descriptor(3, p.scratch(b"a"), 1, VIRTQ_DESC_F_NEXT, 3)
    p.mq.publish(3)
    _dropped(p, "loop")


def test_loop_inside_indirect_table_terminates():
    p = Pair(8)
    table = p.driver.allocator.alloc(32, 16)
    buf = p.scratch(b"zz")
    view = p.memory.ndarray(table, "<u8,<u4,<u2,<u2", 2)
    view[0] = (buf, 2, VIRTQ_DESC_F_NEXT, 1)
    view[1] = (buf, 2, VIRTQ_DESC_F_NEXT, 0)
    p.mq.write_descriptor(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    p.mq.publish(0)
    _dropped(p, "loop")


@pytest.mark.parametrize("addr,length", [
    (MEM_SIZE, 1),                 # starts past the end of RAM
    (MEM_SIZE - 4, 8),             # runs past the end
    (0x1000, 0xFFFF_FFFF),         # huge length
    ((1 << 64) - 1, 2),            # wraps the address space
])
def test_buffer_outside_memory_is_dropped(addr, length):
    p = Pair()
    p.mq.write_descriptor(0, addr, length, 0)
    p.mq.publish(0)
    _dropped(p, "outside guest memory")


def test_next_out_of_range_is_dropped():
    p = Pair(8)
    p.mq.write_descriptor(0, p.scratch(b"a"), 1, VIRTQ_DESC_F_NEXT, 8)
    p.mq.publish(0)
    _dropped(p, "next index out of range")


def test_readable_after_writable_is_dropped():
    p = Pair(8)
    p.mq.write_descriptor(0, p.scratch(b"a"), 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    p.mq.write_descriptor(1, p.scratch(b"b"), 1, 0)
    p.mq.publish(0)
    _dropped(p, "readable descriptor after a device-writable")


def test_indirect_without_the_feature_is_dropped():
    p = Pair(8, features=0)
    p.mq.add_chain([b"abc"], indirect=True)
    _dropped(p, "without VIRTIO_F_INDIRECT_DESC")


@pytest.mark.parametrize("case,reason", [
    ("nested", "inside an indirect table"),
    ("with_next", "together with VIRTQ_DESC_F_NEXT"),
    ("bad_len", "not a multiple of 16"),
    ("zero_len", "not a multiple of 16"),
    ("too_long", "longer than the queue size"),
    ("outside", "indirect table outside guest memory"),
])
def test_bad_indirect_tables_are_dropped(case, reason):
    p = Pair(8)
    table = p.driver.allocator.alloc(16 * 16, 16)
    view = p.memory.ndarray(table, "<u8,<u4,<u2,<u2", 16)
    view[0] = (p.scratch(b"x"), 1, 0, 0)
    length, flags, addr = 16, VIRTQ_DESC_F_INDIRECT, table
    if case == "nested":
        view[0] = (table, 16, VIRTQ_DESC_F_INDIRECT, 0)
    elif case == "with_next":
        flags |= VIRTQ_DESC_F_NEXT
    elif case == "bad_len":
        length = 24
    elif case == "zero_len":
        length = 0
    elif case == "too_long":
        length = 16 * 9                            # queue size is 8
    elif case == "outside":
        addr = MEM_SIZE - 8
    p.mq.write_descriptor(0, addr, length, flags, 1)
    p.mq.write_descriptor(1, p.scratch(b"y"), 1, 0)
    p.mq.publish(0)
    _dropped(p, reason)


def test_chain_longer_than_4gib_is_dropped():
    p = Pair(8192)
    n = 4097                                       # 4097 x 1 MiB > 2**32 bytes
    p.mq.desc[:n] = [(0, MEM_SIZE, VIRTQ_DESC_F_NEXT, i + 1) for i in range(n)]
    p.mq.publish(0)
    chain = p.q.pop(drop_bad=False)
    assert chain.error == "descriptor chain longer than 2**32 bytes"


def test_good_chain_after_a_bad_one_is_still_served():
    p = Pair(8)
    p.mq.write_descriptor(7, MEM_SIZE, 1, 0)
    p.mq.free.remove(7)
    p.mq.publish(7)
    head = p.mq.add_chain([b"fine"])
    chain = p.q.pop()
    assert chain.head == head and chain.read_readable() == b"fine"


def test_avail_idx_jump_breaks_the_queue():
    p = Pair(8)
    p.mq.add_chain([b"a"])
    p.mq.set_avail_idx(p.mq.avail_idx + 8)         # 9 entries ahead of a size-8 queue
    assert p.q.pop() is None
    assert p.broken == ["avail.idx moved more than QueueSize entries ahead"]
    assert not p.q.has_available() and not p.q.enable_notification()
    p.mq.set_avail_idx(1)
    assert p.q.pop() is None and len(p.broken) == 1


def test_head_out_of_range_breaks_the_queue():
    p = Pair(8)
    p.mq.publish(8)
    assert p.q.pop() is None
    assert p.broken == ["available ring entry (chain head) >= QueueSize"]


def test_stopped_queue_is_inert():
    p = Pair(8)
    p.mq.add_chain([b"a"])
    c = p.q.pop()
    p.mq.add_chain([b"b"])
    p.q.stop()
    assert not p.q.ready and p.q.pop() is None
    p.q.add_used(c.head, 1)                        # dropped: the queue is gone
    assert int(p.mq.used_idx_view[0]) == 0
    assert not p.q.needs_notification()


# --- layout checks at QueueReady ----------------------------------------------

@pytest.mark.parametrize("size,desc,avail,used,reason", [
    (0, 0x1000, 0x2000, 0x3000, "power of two"),
    (6, 0x1000, 0x2000, 0x3000, "power of two"),
    (512, 0x1000, 0x3000, 0x4000, "exceeds QueueSizeMax"),
    (8, 0x1008, 0x2000, 0x3000, "descriptor table misaligned"),
    (8, 0x1000, 0x2001, 0x3000, "available ring misaligned"),
    (8, 0x1000, 0x2000, 0x3002, "used ring misaligned"),
    (8, MEM_SIZE - 64, 0x2000, 0x3000, "descriptor table outside"),
    (8, 0x1000, MEM_SIZE - 4, 0x3000, "available ring outside"),
    (8, 0x1000, 0x2000, MEM_SIZE - 16, "used ring outside"),
    (8, 0x1000, 0x2000, 0x1040, "overlaps"),
    (8, 0x1000, 0x2000, 0x1FF0, "overlaps"),
])
def test_unusable_layouts_are_refused(size, desc, avail, used, reason):
    memory = GuestMemory(MEM_SIZE)
    with pytest.raises(QueueError) as e:
        Queue(memory, size, desc, avail, used, max_size=256)
    assert reason in e.value.reason


# --- property: whatever shape the driver builds, the device reads it exactly ---

chain_shape = st.tuples(
    st.lists(st.binary(min_size=0, max_size=64), min_size=0, max_size=4),
    st.lists(st.integers(0, 64), min_size=0, max_size=4),
    st.booleans(),
).filter(lambda s: s[0] or s[1])


@settings(max_examples=60, deadline=None)
@given(st.lists(chain_shape, min_size=1, max_size=12), st.sampled_from(["linux", "separate"]))
def test_device_sees_exactly_what_the_driver_wrote(shapes, layout):
    p = Pair(16, features=INDIRECT | EVENT_IDX, layout=layout)
    for readable, writable, indirect in shapes:
        head = p.mq.add_chain(readable, writable, indirect=indirect)
        chain = p.q.pop()
        assert chain.error is None and chain.head == head
        assert [bytes(v) for v in chain.readable_views()] == readable
        assert [d.len for d in chain.writable] == writable
        fill = bytes((head + i) & 0xFF for i in range(chain.writable_len))
        assert chain.write_writable(fill) == len(fill)
        p.q.add_used(head, len(fill))
        (used,) = p.mq.used()
        assert used.head == head and used.data == fill
    assert p.q.errors.total() == 0
