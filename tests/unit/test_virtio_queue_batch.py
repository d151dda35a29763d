"""Batched split-virtqueue paths (Queue.pop_batch, Queue.add_used_batch), driven by the mock driver.

The batch must be exactly as strict as the single pop: every hostile chain
of test_virtio_queue.py is also tested here in the middle of a batch of good
ones, on both read paths (struct for small batches, numpy for large ones;
``_NUMPY_MIN_BATCH`` is forced either way), and a property test checks that
any sequence of good and bad buffers gives the same chains, reports and
used ring as repeated single pops.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.memory import GuestMemory
from pyvmm.virtio import queue as queue_mod
from pyvmm.virtio.mock import MockDriver, MockQueue
from pyvmm.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                vring_need_event)
from test_virtio_queue import EVENT_IDX, INDIRECT, MEM_SIZE, Pair

NEXT, WRITE, IND = int(VIRTQ_DESC_F_NEXT), int(VIRTQ_DESC_F_WRITE), int(VIRTQ_DESC_F_INDIRECT)
PATHS = {"struct": 1 << 30, "numpy": 1}


@pytest.fixture(params=sorted(PATHS))
def path(request, monkeypatch):
    """Run the test with the struct read path, then with the numpy one."""
    monkeypatch.setattr(queue_mod, "_NUMPY_MIN_BATCH", PATHS[request.param])
    return request.param


# --- hand-written bad chains ---------------------------------------------------------------

#: kind -> the reason Queue reports (a substring)
BAD = {
    "outside": "descriptor buffer outside guest memory",
    "past-end": "descriptor buffer outside guest memory",
    "wraps-address-space": "descriptor buffer outside guest memory",
    "loop": "loops or is longer than its table",
    "self-loop": "loops or is longer than its table",
    "next-range": "descriptor next index out of range",
    "readable-after-writable": "device-readable descriptor after a device-writable one",
    "indirect-nested": "VIRTQ_DESC_F_INDIRECT inside an indirect table",
    "indirect-with-next": "VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT",
    "indirect-bad-len": "indirect table length is 0 or not a multiple of 16",
    "indirect-zero-len": "indirect table length is 0 or not a multiple of 16",
    "indirect-too-long": "indirect table longer than the queue size",
    "indirect-outside": "indirect table outside guest memory",
    "indirect-loop": "loops or is longer than its table",
    "indirect-next-range": "descriptor next index out of range",
}


def add_bad(p: Pair, kind: str) -> int:
    """Publish one malformed chain of ``kind``; returns its head."""
    mq, size, end = p.mq, p.mq.size, p.memory.end
    buf = p.scratch(b"bad!")
    if kind in ("loop", "readable-after-writable"):
        a, b = mq.reserve(2)
        if kind == "loop":
            mq.write_descriptor(a, buf, 4, NEXT, b)
            mq.write_descriptor(b, buf, 4, NEXT, a)
        else:
            mq.write_descriptor(a, buf, 4, WRITE | NEXT, b)
            mq.write_descriptor(b, buf, 4, 0)
        mq.publish(a)
        return a
    (head,) = mq.reserve(1)
    if kind == "outside":
        mq.write_descriptor(head, end, 1, 0)
    elif kind == "past-end":
        mq.write_descriptor(head, end - 4, 8, 0)
    elif kind == "wraps-address-space":
        mq.write_descriptor(head, (1 << 64) - 1, 2, 0)
    elif kind == "self-loop":
        mq.write_descriptor(head, buf, 4, NEXT, head)
    elif kind == "next-range":
        mq.write_descriptor(head, buf, 4, NEXT, size)
    else:                                               # indirect tables
        table = p.driver.allocator.alloc(16 * (size + 1), 16)
        view = p.memory.ndarray(table, queue_mod.VIRTQ_DESC, size + 1)
        view[0] = (buf, 4, 0, 0)
        length, flags, addr = 16, IND, table
        if kind == "indirect-nested":
            view[0] = (table, 16, IND, 0)
        elif kind == "indirect-with-next":
            flags |= NEXT
        elif kind == "indirect-bad-len":
            length = 24
        elif kind == "indirect-zero-len":
            length = 0
        elif kind == "indirect-too-long":
            length = 16 * (size + 1)
        elif kind == "indirect-outside":
            addr = end - 8
        elif kind == "indirect-loop":
            view[0] = (buf, 4, NEXT, 1)
            view[1] = (buf, 4, NEXT, 0)
            length = 32
        elif kind == "indirect-next-range":
            view[0] = (buf, 4, NEXT, 2)
            length = 32
        mq.write_descriptor(head, addr, length, flags, 0)
    mq.publish(head)
    return head


def used_ring(p: Pair) -> list[tuple[int, int]]:
    """Every used element published so far (used.idx counts them), oldest first."""
    n = int(p.mq.used_idx_view[0])
    return [tuple(p.mq.used_ring[i % p.mq.size].item()) for i in range(n)]


# --- mixed batches ---------------------------------------------------------------------------

def test_every_bad_chain_is_dropped_in_a_batch_and_the_good_ones_are_served(path):
    p = Pair(64)
    expected_good, expected_drops = [], []
    for i, kind in enumerate(BAD):
        expected_good.append(p.mq.add_chain([bytes([i]) * 3], [5], indirect=i % 2 == 1))
        expected_drops.append(add_bad(p, kind))
    expected_good.append(p.mq.add_chain([b"last"]))
    published = 2 * len(BAD) + 1

    chains = p.q.pop_batch(64)

    assert [c.head for c in chains] == expected_good
    assert [c.read_readable() for c in chains[:-1]] == [bytes([i]) * 3 for i in range(len(BAD))]
    assert all(c.error is None and c.writable_len == 5 for c in chains[:-1])
    assert used_ring(p) == [(h, 0) for h in expected_drops]     # dropped with used.len 0, in order
    for kind, reason in BAD.items():
        assert any(reason in r for r in p.q.errors.counts), (kind, p.q.errors.counts)
    assert p.q.errors.total() == len(BAD)
    assert p.q.last_avail_idx == published and p.q.in_flight == len(expected_good)
    assert not p.broken and p.q.pop_batch(64) == []


def test_drop_bad_false_returns_the_bad_chains_in_place(path):
    p = Pair(16)
    g0 = p.mq.add_chain([b"a"])
    bad = add_bad(p, "loop")
    g1 = p.mq.add_chain([b"b"])
    chains = p.q.pop_batch(16, drop_bad=False)
    assert [(c.head, c.error is None) for c in chains] == [(g0, True), (bad, False), (g1, True)]
    assert "loop" in chains[1].error and len(chains[1]) == 16      # ttl = queue size
    assert used_ring(p) == []                                       # nothing dropped for us


def test_chain_over_4gib_between_good_ones():
    p = Pair(8192)
    g0 = p.mq.add_chain([b"x"])
    head = p.mq.reserve(1)[0]
    n = 4097                                         # 4097 x 1 MiB > 2**32 bytes
    table = p.driver.allocator.alloc(16 * n, 16)
    view = p.memory.ndarray(table, queue_mod.VIRTQ_DESC, n)
    view[:] = [(0, MEM_SIZE, NEXT, i + 1) for i in range(n)]
    p.mq.write_descriptor(head, table, 16 * n, IND)
    p.mq.publish(head)
    g1 = p.mq.add_chain([b"y"])
    assert [c.head for c in p.q.pop_batch(8)] == [g0, g1]
    assert p.q.errors.counts == {"descriptor chain longer than 2**32 bytes": 1}
    assert used_ring(p) == [(head, 0)]


def test_bad_head_ends_the_batch_after_the_chains_before_it(path):
    p = Pair(8)
    heads = [p.mq.add_chain([bytes([i])]) for i in range(3)]
    p.mq.publish(8)                                  # a head index >= QueueSize
    p.mq.add_chain([b"never"])
    chains = p.q.pop_batch(8)
    assert [c.head for c in chains] == heads
    assert p.broken == ["available ring entry (chain head) >= QueueSize"]
    assert p.q.last_avail_idx == 4 and p.q.in_flight == 3
    assert p.q.pop_batch(8) == [] and p.q.pop() is None


def test_avail_idx_jump_breaks_the_queue_and_pops_nothing(path):
    p = Pair(8)
    p.mq.add_chain([b"a"])
    p.mq.set_avail_idx(p.mq.avail_idx + 8)           # 9 ahead of a size-8 queue
    assert p.q.pop_batch(8) == []
    assert p.broken == ["avail.idx moved more than QueueSize entries ahead"]
    assert p.q.last_avail_idx == 0 and p.q.in_flight == 0


# --- shape of a batch --------------------------------------------------------------------------

@pytest.mark.parametrize("start", [65530, 65535, 0, 13])
def test_batch_across_the_16bit_wrap_and_the_ring_end(path, start):
    p = Pair(16)
    p.mq.set_avail_idx(start)
    p.mq.last_used_idx = p.mq.last_kick_idx = start
    p.mq.used_idx_view[0] = start
    p.q.last_avail_idx = p.q.next_used_idx = start
    for round_ in range(3):
        heads = [p.mq.add_chain([bytes([round_, i])], [2], indirect=i % 3 == 0) for i in range(8)]
        chains = p.q.pop_batch(16)
        assert [c.head for c in chains] == heads
        assert [c.read_readable() for c in chains] == [bytes([round_, i]) for i in range(8)]
        for c in chains:
            c.write_writable(bytes([c.head, round_]))
        p.q.add_used_batch([(c.head, 2) for c in chains])
        assert [(u.head, u.data) for u in p.mq.used()] == [(h, bytes([h, round_])) for h in heads]
    assert p.q.last_avail_idx == p.q.next_used_idx == (start + 24) & 0xFFFF
    assert not p.broken and p.q.errors.total() == 0


def test_indirect_chains_in_a_batch(path):
    p = Pair(16)
    shapes = [([b"h" * 44, b"p" * 100], [], True), ([], [44, 4096], True), ([b"r"], [1, 2, 3], True),
              ([b"plain"], [], False), ([b"x" * 7] * 5, [9] * 4, True)]
    heads = [p.mq.add_chain(r, w, indirect=ind) for r, w, ind in shapes]
    chains = p.q.pop_batch(16)
    assert [c.head for c in chains] == heads
    for c, (r, w, _) in zip(chains, shapes):
        assert [bytes(v) for v in c.readable_views()] == r
        assert [d.len for d in c.writable] == w
        assert all(d.writable for d in c.writable) and not any(d.writable for d in c.readable)
        assert [d.addr for d in c] == [d.addr for d in c.readable + c.writable]


def test_batch_bounded_by_max_chains_and_drops_do_not_count(path):
    p = Pair(16)
    heads = [p.mq.add_chain([bytes([i])]) for i in range(10)]
    assert [c.head for c in p.q.pop_batch(4)] == heads[:4]
    assert [c.head for c in p.q.pop_batch(4)] == heads[4:8]
    assert [c.head for c in p.q.pop_batch(4)] == heads[8:]
    assert p.q.pop_batch(4) == []
    # two bad chains in front: they are dropped and the batch still holds 2 good ones
    bad = [add_bad(p, "outside"), add_bad(p, "next-range")]
    good = [p.mq.add_chain([bytes([i])]) for i in range(3)]
    assert [c.head for c in p.q.pop_batch(2)] == good[:2]
    assert used_ring(p)[-2:] == [(h, 0) for h in bad]
    assert p.q.last_avail_idx == 14 and p.q.has_available()
    assert p.q.pop_batch(0) == [] and p.q.last_avail_idx == 14
    assert [c.head for c in p.q.pop_batch(2)] == good[2:]


# --- the used side -----------------------------------------------------------------------------

class CountingStores:
    """Stands in for a queue's numpy view of used.idx and counts the stores."""

    def __init__(self, view) -> None:
        self.view, self.stores = view, 0

    def __setitem__(self, index, value) -> None:
        self.stores += 1
        self.view[index] = value

    def __getitem__(self, index):
        return self.view[index]


def count_used_idx_stores(q: queue_mod.Queue) -> CountingStores:
    q._used_idx_np = counter = CountingStores(q._used_idx_np)
    return counter


def test_used_idx_published_once_per_batch(path):
    p = Pair(16, features=INDIRECT | EVENT_IDX)
    counter = count_used_idx_stores(p.q)
    heads = [p.mq.add_chain([b"x"], [4]) for _ in range(6)]
    chains = p.q.pop_batch(16)
    assert int(p.mq.used_idx_view[0]) == 0 and counter.stores == 0     # popping publishes nothing
    p.q.add_used_batch([(c.head, 4) for c in chains])
    assert counter.stores == 1
    assert [(u.head, u.len) for u in p.mq.used()] == [(h, 4) for h in heads]
    # three drops among good chains: one store for the drops, one for the batch
    bad = [add_bad(p, "loop"), add_bad(p, "outside"), add_bad(p, "indirect-bad-len")]
    p.mq.add_chain([b"y"])
    chains = p.q.pop_batch(16)
    assert counter.stores == 2 and int(p.mq.used_idx_view[0]) == 9
    p.q.add_used_batch([(c.head, 0) for c in chains])
    assert counter.stores == 3 and int(p.mq.used_idx_view[0]) == 10
    assert [u.head for u in p.mq.used()] == bad + [chains[0].head]
    p.q.add_used_batch([])                                            # nothing: no store
    assert counter.stores == 3


@pytest.mark.parametrize("start", [0, 5, 65533])
def test_add_used_batch_wraps_the_ring_and_the_index(start):
    p = Pair(8)
    p.mq.set_avail_idx(start)
    p.mq.last_used_idx = p.mq.last_kick_idx = start
    p.mq.used_idx_view[0] = start
    p.q.last_avail_idx = p.q.next_used_idx = start
    heads = [p.mq.add_chain([], [8]) for _ in range(8)]
    chains = p.q.pop_batch(8)
    p.q.add_used_batch([(c.head, i) for i, c in enumerate(chains)])
    assert int(p.mq.used_idx_view[0]) == (start + 8) & 0xFFFF
    assert [(u.head, u.len) for u in p.mq.used()] == [(h, i) for i, h in enumerate(heads)]


def test_add_used_batch_of_a_device_bug_writes_nothing():
    p = Pair(8)
    for _ in range(3):
        p.mq.add_chain([b"x"])
    chains = p.q.pop_batch(8)
    for bad in ([(chains[0].head, 0), (8, 0)],                  # head out of range
                [(chains[0].head, 1 << 32)],                     # len does not fit le32
                [(c.head, 0) for c in chains] * 2):              # more than in flight
        with pytest.raises(ValueError):
            p.q.add_used_batch(bad)
    assert int(p.mq.used_idx_view[0]) == 0 and p.q.in_flight == 3
    p.q.add_used_batch([(c.head, 0) for c in chains])
    assert len(p.mq.used()) == 3 and p.q.in_flight == 0


def test_stopped_queue_drops_a_used_batch():
    p = Pair(8)
    p.mq.add_chain([b"x"])
    chains = p.q.pop_batch(8)
    p.q.stop()
    p.q.add_used_batch([(c.head, 1) for c in chains])
    assert int(p.mq.used_idx_view[0]) == 0 and not p.q.needs_notification()
    assert p.q.pop_batch(8) == []


# --- notification decision over a batch ----------------------------------------------------------

def _event_idx_pair_at(start: int) -> Pair:
    p = Pair(8, features=EVENT_IDX)
    p.mq.set_avail_idx(start)
    p.mq.last_used_idx = p.mq.last_kick_idx = start
    p.mq.used_idx_view[0] = start
    p.q.last_avail_idx = p.q.next_used_idx = start
    p.q._signalled_used = start
    p.q._signalled_used_valid = True            # as if a decision had been made at `start`
    return p


@pytest.mark.parametrize("start", [100, 65534])
@pytest.mark.parametrize("offset,expected", [(-1, False), (0, True), (1, True), (3, True), (4, False),
                                             (7, False)])
def test_event_idx_decision_once_for_the_whole_batch(start, offset, expected):
    """A batch of 4 moves used.idx from start to start + 4: the driver asked for
    an interrupt iff its used_event lies in [start, start + 4), wrapping at 2**16
    (start 65534: used.idx goes 65534 -> 2, vring_need_event's wrap case)."""
    p = _event_idx_pair_at(start)
    for _ in range(4):
        p.mq.add_chain([b"x"])
    chains = p.q.pop_batch(8)
    event = (start + offset) & 0xFFFF
    p.mq.set_used_event(event)
    p.q.add_used_batch([(c.head, 0) for c in chains])
    new = (start + 4) & 0xFFFF
    assert vring_need_event(event, new, start) == expected          # the reference itself
    assert p.q.needs_notification() == expected
    assert not p.q.needs_notification()                             # decided: nothing new since


def test_event_idx_decision_covers_several_batches_since_the_last_one():
    p = _event_idx_pair_at(65532)
    for _ in range(6):
        p.mq.add_chain([b"x"])
    chains = p.q.pop_batch(8)
    p.mq.set_used_event(65535)
    p.q.add_used_batch([(c.head, 0) for c in chains[:2]])          # 65532, 65533
    p.q.add_used_batch([(c.head, 0) for c in chains[2:]])          # 65534 .. 1: passes 65535
    assert p.q.needs_notification()


# --- property: the batch is the same as that many single pops --------------------------------------

item = st.one_of(
    st.tuples(st.just("good"), st.lists(st.binary(min_size=1, max_size=16), max_size=3),
              st.lists(st.integers(1, 32), max_size=3), st.booleans()).filter(lambda t: t[1] or t[2]),
    st.tuples(st.just("bad"), st.sampled_from(sorted(BAD))),
    st.tuples(st.just("bad-head"), st.integers(16, 0xFFFF)),
)


def descriptors_needed(entry) -> int:
    if entry[0] == "good":
        return 1 if entry[3] else len(entry[1]) + len(entry[2])
    if entry[0] == "bad":
        return 2 if entry[1] in ("loop", "readable-after-writable") else 1
    return 0


def build(spec, start: int) -> tuple[Pair, list]:
    """A queue of 16 at free-running index ``start``, and ``spec`` cut into
    rounds that fit its descriptor table (the device returns everything each
    round, so the mock driver can reuse the descriptors)."""
    p = Pair(16, features=INDIRECT | EVENT_IDX)
    p.mq.set_avail_idx(start)
    p.mq.last_used_idx = p.mq.last_kick_idx = start
    p.mq.used_idx_view[0] = start
    p.q.last_avail_idx = p.q.next_used_idx = start
    rounds, current, used = [], [], 0
    for entry in spec:
        need = descriptors_needed(entry)
        if used + need > 16:
            rounds.append(current)
            current, used = [], 0
        current.append(entry)
        used += need
    rounds.append(current)
    return p, rounds


def publish(p: Pair, entries) -> None:
    for entry in entries:
        if entry[0] == "good":
            _, readable, writable, indirect = entry
            p.mq.add_chain(readable, writable, indirect=indirect)
        elif entry[0] == "bad":
            add_bad(p, entry[1])
        else:
            p.mq.publish(entry[1])


def outcome(p: Pair, popped) -> tuple:
    raw = p.memory.read(p.mq.used_gpa, 6 + 8 * 16)                  # the whole used ring
    chains = [(c.head, c.error, list(c), c.readable_len, c.writable_len) for c in popped]
    return chains, dict(p.q.errors.counts), raw, p.q.last_avail_idx, p.q.next_used_idx, \
        p.q.in_flight, p.broken


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(item, min_size=1, max_size=24), st.lists(st.integers(1, 10), min_size=1, max_size=8),
       st.sampled_from([0, 65530, 65535]), st.sampled_from(sorted(PATHS)))
def test_batches_equal_repeated_single_pops(spec, batch_sizes, start, read_path):
    saved = queue_mod._NUMPY_MIN_BATCH
    queue_mod._NUMPY_MIN_BATCH = PATHS[read_path]
    try:
        batched, rounds = build(spec, start)
        single, _ = build(spec, start)
        got_b, got_s = [], []
        for entries in rounds:
            if batched.broken:
                break                   # nothing comes back any more: no descriptors to reuse
            publish(batched, entries)
            publish(single, entries)
            for i in range(2 * len(entries) + 1):
                k = batch_sizes[i % len(batch_sizes)]
                chains = batched.q.pop_batch(k)
                batched.q.add_used_batch([(c.head, c.writable_len) for c in chains])
                got_b += chains
                ones = [c for _ in range(k) if (c := single.q.pop()) is not None]
                for c in ones:
                    single.q.add_used(c.head, c.writable_len)
                got_s += ones
                assert len(chains) == len(ones)
            assert outcome(batched, got_b) == outcome(single, got_s)
            batched.mq.used()
            single.mq.used()
            assert batched.q.needs_notification() == single.q.needs_notification()
        assert outcome(batched, got_b) == outcome(single, got_s)
    finally:
        queue_mod._NUMPY_MIN_BATCH = saved


@pytest.mark.parametrize("second,ok", [(0x0001_0000, True), (0x0001_0001, False)])
def test_two_descriptors_over_4gib_in_total(path, second, ok):
    """The 2**32-byte limit on two plain descriptors (the numpy path checks the
    sum itself): exactly 2**32 is allowed, one byte more is not (§2.7.5)."""
    memory = GuestMemory(5 << 30)                     # untouched pages cost nothing
    drv = MockDriver(memory, transport=None)
    drv.features = INDIRECT
    mq = MockQueue(drv, 0, 4)
    q = queue_mod.Queue(memory, 4, mq.desc_gpa, mq.avail_gpa, mq.used_gpa, indirect_desc=True)
    a, b = mq.reserve(2)
    mq.write_descriptor(a, 1 << 28, 0xFFFF_0000, NEXT, b)
    mq.write_descriptor(b, 1 << 32, second, WRITE)
    mq.publish(a)
    chains = q.pop_batch(4)
    if ok:
        assert [(c.head, c.readable_len, c.writable_len) for c in chains] == [(a, 0xFFFF_0000, second)]
    else:
        assert chains == [] and q.errors.counts == {"descriptor chain longer than 2**32 bytes": 1}


class SpyStruct:
    """A struct.Struct that records the byte ranges its pack_into writes."""

    def __init__(self, real, writes: list) -> None:
        self.real, self.writes = real, writes
        self.unpack_from, self.size = real.unpack_from, real.size

    def pack_into(self, buf, offset, *values):
        self.writes.append((offset, offset + self.real.size))
        return self.real.pack_into(buf, offset, *values)


def test_struct_pack_into_zero_fills_so_published_fields_never_use_it(monkeypatch):
    """CPython's struct.pack_into clears its destination before writing the
    value, so a concurrent reader can see 0 in between: used.idx, used.flags
    and avail_event (what the driver polls) must be stored some other way."""
    buf = bytearray(b"\xff" * 4)
    struct_mod = __import__("struct")
    struct_mod.pack_into("<HxB", buf, 0, 5, 7)
    assert buf == b"\x05\x00\x00\x07"                # the pad byte was written: zero-filled
    writes: list = []
    monkeypatch.setattr(queue_mod, "_LE16", SpyStruct(queue_mod._LE16, writes))
    real_u32s = queue_mod._u32s
    monkeypatch.setattr(queue_mod, "_u32s", lambda n: SpyStruct(real_u32s(n), writes))
    for features in (INDIRECT, INDIRECT | EVENT_IDX):
        p = Pair(8, features=features)
        p.q.disable_notification()
        for _ in range(20):                         # wraps the used ring twice
            p.mq.add_chain([b"x"], [1])
            p.q.add_used_batch([(c.head, 1) for c in p.q.pop_batch(8)])
            p.q.needs_notification()
            p.q.enable_notification()
            p.mq.used()
        used = p.q.used_ring - p.memory.base
        published = [(used, used + 4), (used + 4 + 8 * 8, used + 6 + 8 * 8)]
        assert writes and all(w_end <= lo or hi <= w_start
                              for w_start, w_end in writes for lo, hi in published)
        assert int(p.mq.used_idx_view[0]) == 20
