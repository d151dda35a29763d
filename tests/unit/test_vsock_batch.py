"""The vsock device's queue loops in batches: one used.idx store per batch.

The mock guest queues several buffers before one kick; the device must take
them in one pass (the muxer sees every packet before any is returned), keep
their order, answer bad ones as before, and return the whole batch at once.
"""

from __future__ import annotations

import socket

import pytest

from pyvmm.vsock.device import EVENTQ, RXQ, TXQ
from test_virtio_queue_batch import add_bad, count_used_idx_stores
from vsock_guest import Guest, Op, hdr


class QueueOf:
    """What add_bad() needs of a test_virtio_queue.Pair, for one of the guest's queues."""

    def __init__(self, g: Guest, mq) -> None:
        self.mq, self.driver, self.memory = mq, g.drv, g.memory

    def scratch(self, data: bytes) -> int:
        gpa = self.driver.allocator.alloc(max(len(data), 1))
        self.memory.write(gpa, data)
        return gpa


@pytest.fixture
def stores(guest):
    """used.idx stores per queue index (0 rx, 1 tx, 2 event)."""
    counters = [count_used_idx_stores(q) for q in guest.dev._queues]

    class Stores:
        def clear(self):
            for c in counters:
                c.stores = 0

        def __getitem__(self, index):
            return counters[index].stores

    return Stores()


def connect(g: Guest, uds: str, port: int = 1234, guest_port: int = 5000):
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"{uds}_{port}")
    lst.listen()
    g.send(Op.VIRTIO_VSOCK_OP_REQUEST, guest_port, port)
    assert [h.op for h, _ in g.take()] == [Op.VIRTIO_VSOCK_OP_RESPONSE]
    conn, _ = lst.accept()
    conn.settimeout(2)
    return lst, conn


def test_tx_batch_is_seen_whole_then_returned_once(guest, uds, stores):
    lst, conn = connect(guest, uds)
    guest.tx_done()
    seen = []
    real = guest.dev.muxer.on_guest_packets
    guest.dev.muxer.on_guest_packets = lambda pkts, lane: (
        seen.extend([int(guest.txq.used_idx_view[0])] * len(pkts)), real(pkts, lane))
    before = int(guest.txq.used_idx_view[0])
    stores.clear()
    for i in range(10):
        guest.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 1234, bytes([65 + i]) * 100, kick=False)
    guest.txq.kick(force=True)
    guest.pump()
    assert seen == [before] * 10               # no chain returned while the batch was handled
    assert stores[TXQ] == 1
    assert [u.len for u in guest.tx_done()] == [0] * 10
    got = b""
    while len(got) < 1000:
        got += conn.recv(4096)
    assert got == b"".join(bytes([65 + i]) * 100 for i in range(10))


def test_tx_batch_with_bad_chains_serves_the_good_ones_in_order(guest, uds, stores):
    lst, conn = connect(guest, uds)
    guest.tx_done()
    stores.clear()
    good = [bytes([97 + i]) * 50 for i in range(5)]
    q = guest.txq
    guest.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 1234, good[0], kick=False)
    add_bad(QueueOf(guest, q), "outside")                                   # the queue drops it
    guest.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 1234, good[1], kick=False)
    q.add_chain(readable=[b"short header"])                     # < 44 bytes
    guest.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 1234, good[2], kick=False)
    # write-only where read-only is needed: the payload in a device-writable descriptor
    q.add_chain(readable=[hdr(Op.VIRTIO_VSOCK_OP_RW, 6000, 1234, length=8)], writable=[8])
    guest.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 1234, good[3], kick=False)
    q.add_chain(readable=[hdr(Op.VIRTIO_VSOCK_OP_RW, 6000, 1234, length=100), b"x" * 10])  # len > buffer
    add_bad(QueueOf(guest, q), "indirect-bad-len")                          # the queue drops it
    guest.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 1234, good[4], kick=False)
    q.kick(force=True)
    guest.pump()
    got = b""
    while len(got) < 250:
        got += conn.recv(4096)
    assert got == b"".join(good)
    used = guest.tx_done()
    assert len(used) == 10 and all(u.len == 0 for u in used)
    assert stores[TXQ] == 2                     # the two drops, then the batch
    c = guest.dev.counters()
    assert c["tx_bad_chains"] == 3
    reasons = c["guest_errors_by_reason"]
    assert reasons["tx chain shorter than the header"] == 1
    assert reasons["tx chain with device-writable descriptors (ignored)"] == 1
    assert reasons["tx hdr.len larger than the buffer"] == 2
    tx_errors = guest.dev._queues[TXQ].errors.counts
    assert tx_errors == {"descriptor buffer outside guest memory": 1,
                         "indirect table length is 0 or not a multiple of 16": 1}


def test_rx_batch_returned_once(uds):
    g = Guest(uds, rx_payload=1000)
    try:
        lst, conn = connect(g, uds)
        count = count_used_idx_stores(g.dev._queues[RXQ])
        seen = []
        fill = g.dev.muxer.fill_rx_burst
        g.dev.muxer.fill_rx_burst = lambda bufs, lane: (seen.append(int(g.rxq.used_idx_view[0])),
                                                         fill(bufs, lane))[1]
        before = int(g.rxq.used_idx_view[0])
        conn.sendall(bytes(range(250)) * 20)         # 5000 bytes: 5 packets of 1000
        g.pump()
        assert count.stores == 1
        assert seen and set(seen) == {before}          # no used.idx store while filling
        pkts = g.recv()
        assert [h.len for h, _ in pkts] == [1000] * 5
        assert b"".join(p for _, p in pkts) == bytes(range(250)) * 20
    finally:
        g.close()


def test_rx_bad_buffers_inside_a_batch(uds):
    g = Guest(uds, rx_buffers=0)
    try:
        lst, conn = connect_without_rx(g, uds)
        good1 = g.add_rx()
        small = g.rxq.add_chain(writable=[20])           # shorter than the header
        bad = add_bad(QueueOf(g, g.rxq), "outside")                      # dropped by the queue
        good2 = g.add_rx()
        g.rxq.kick(force=True)
        conn.sendall(b"a" * 5000)                        # two packets of 4096 + 904
        g.pump()
        used = g.rxq.used()
        assert [(u.head, u.len) for u in used] == [(bad, 0), (good1, 44 + 4096), (small, 0),
                                                   (good2, 44 + 904)]
        assert g.dev.counters()["rx_bad_buffers"] == 1
        assert g.dev._queues[RXQ].errors.counts == {"descriptor buffer outside guest memory": 1}
    finally:
        g.close()


def connect_without_rx(g: Guest, uds: str):
    """connect() for a guest that posted no rx buffers: one buffer for the
    RESPONSE, collected without a refill, so the rx ring is empty afterwards."""
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"{uds}_1234")
    lst.listen()
    g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 1234)
    g.add_rx()
    g.rxq.kick(force=True)
    g.pump()
    assert [h.op for h, _ in g.recv(refill=False)] == [Op.VIRTIO_VSOCK_OP_RESPONSE]
    conn, _ = lst.accept()
    conn.settimeout(2)
    return lst, conn


def test_rx_chains_popped_ahead_are_kept_for_later(uds):
    """A lone reply pops a small batch; the rest stay with the device and are
    used, in ring order, for the next packets."""
    g = Guest(uds)
    try:
        lst, conn = connect(g, uds)
        for i in range(3):
            conn.sendall(bytes([48 + i]) * 10)
            pkts = g.take()
            assert [p for _, p in pkts] == [bytes([48 + i]) * 10]
        assert len(g.dev._rx_stock[0]) > 0
        assert g.dev._queues[RXQ].in_flight == len(g.dev._rx_stock[0]) + len(g.dev._rx_held[0])
        g.drv.reset()                                   # a reset forgets them
        assert len(g.dev._rx_stock[0]) == 0
    finally:
        g.close()


def test_event_short_buffers_in_a_batch_returned_once(uds):
    g = Guest(uds)
    try:
        for _ in range(8):                              # use up the 8 buffers Guest posted
            g.dev.transport_reset()
        assert g.events() == [0] * 8
        short1 = g.evq.add_chain(writable=[2])
        short2 = g.evq.add_chain(writable=[3])
        ok = g.evq.add_chain(writable=[4])
        count = count_used_idx_stores(g.dev._queues[EVENTQ])
        g.dev.transport_reset()
        assert count.stores == 1
        used = g.evq.used()
        assert [(u.head, u.len, u.data) for u in used] == [(short1, 0, b""), (short2, 0, b""),
                                                           (ok, 4, b"\0\0\0\0")]
        c = g.dev.counters()
        assert c["guest_errors_by_reason"]["event buffer shorter than 4 bytes"] == 2
        assert c["events_sent"] == 9
    finally:
        g.close()


def test_a_run_of_data_for_one_connection_is_one_host_write(guest, uds):
    """Consecutive RW packets of one STREAM connection in a tx batch leave in one
    sendmsg; a packet of another kind in between splits the run, order kept."""
    lst, conn = connect(guest, uds)
    stream = guest.dev.muxer.connections[(1234, 5000)].stream
    writes = []
    real = stream.send_views
    stream.send_views = lambda views: (writes.append(len(views)), real(views))[1]
    for i in range(8):
        guest.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 1234, bytes([65 + i]) * 512, kick=False)
    guest.send(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE, 5000, 1234, kick=False)
    for i in range(8, 12):
        guest.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 1234, bytes([65 + i]) * 512, kick=False)
    guest.txq.kick(force=True)
    guest.pump()
    assert writes == [8, 4]
    got = b""
    while len(got) < 12 * 512:
        got += conn.recv(8192)
    assert got == b"".join(bytes([65 + i]) * 512 for i in range(12))
    c = guest.dev.counters()
    assert c["tx_packets"] == 1 + 13 and c["tx_bytes"] == 12 * 512   # REQUEST + this batch


def test_a_run_beyond_the_credit_forwards_what_fits_then_resets(uds):
    """The credit rule inside a run: the packets within the advertised window reach
    the host, the one beyond it resets the connection, as packet by packet."""
    from pyvmm.vsock.connection import CONN_TX_BUF_SIZE_MIN
    g = Guest(uds, conn_buf_size=CONN_TX_BUF_SIZE_MIN)
    try:
        lst, conn = connect(g, uds)
        for _ in range(CONN_TX_BUF_SIZE_MIN // 4096):
            g.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 1234, b"q" * 4096, kick=False)
        g.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 1234, b"!", kick=False)
        g.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 1234, b"?")
        pkts = g.take()
        c = g.dev.counters()
    finally:
        g.close()
    assert [h.op for h, _ in pkts] == [Op.VIRTIO_VSOCK_OP_RST]
    assert c["credit_violations"] == 1 and c["connections"] == 0
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
    assert got == b"q" * CONN_TX_BUF_SIZE_MIN
