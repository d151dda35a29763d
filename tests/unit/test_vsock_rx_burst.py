"""The host -> guest burst: many rx buffers of one connection from one host read.

Connection level (a counting FakeStream, FakeChain buffers): one
``recv_into_views`` per burst, trimmed to the guest's window, any rx layout,
a header-only buffer ends the run, end-of-file after a partial burst,
SEQPACKET still one record at a time.  Device level (MockDriver guest, Unix
host sockets): a header-only buffer in the stock neither stalls nor spins,
two bulk connections take turns of at most RX_TURN_BUFFERS buffers, and the
steady rx cycle costs no epoll_ctl (the reader is unregistered only on a
real stall, then registered again).
"""

from __future__ import annotations

import socket

from pyvmm.vsock.connection import RX_IOV_MAX, Connection, PendingRx
from pyvmm.vsock.muxer import RX_TURN_BUFFERS
from pyvmm.vsock.packet import RxBuffer
from pyvmm.vsock.wire import VirtioVsockSeqFlag, VirtioVsockShutdown, VsockHeader
from test_vsock_connection import G, established, kw, rx
from test_vsock_device import host_connect
from vsock_guest import SEQPACKET, FakeChain, FakeStream, Guest, Op

EOM = VirtioVsockSeqFlag.VIRTIO_VSOCK_SEQ_EOM
EOR = VirtioVsockSeqFlag.VIRTIO_VSOCK_SEQ_EOR
SEND = VirtioVsockShutdown.VIRTIO_VSOCK_SHUTDOWN_SEND


class CountingStream(FakeStream):
    """A FakeStream that records the payload room of every read."""

    def __init__(self, **k) -> None:
        super().__init__(**k)
        self.reads: list[list[int]] = []        # view lengths per recv_into_views call
        self.messages_read = 0

    def recv_into_views(self, views):
        self.reads.append([len(v) for v in views])
        return super().recv_into_views(views)

    def recv_message(self, buf):
        self.messages_read += 1
        return super().recv_message(buf)


def pattern(n: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


def written(buf: RxBuffer, hdr: VsockHeader) -> tuple[VsockHeader, bytes]:
    raw = buf.chain.written(44 + hdr.len)
    return VsockHeader.unpack(raw), raw[44:]


# -- connection level ----------------------------------------------------------------------

def test_burst_fills_many_buffers_with_one_read():
    c, s = established(CountingStream())
    data = pattern(20000)
    s.inbox += data
    c.on_host_readable()
    bufs = [rx() for _ in range(8)]
    before = dict(c.metrics)
    hdrs = c.fill_rx_burst(bufs, 0)
    assert len(s.reads) == 1 and sum(s.reads[0]) == 8 * 4096
    assert [h.len for h in hdrs] == [4096] * 4 + [20000 - 4 * 4096]
    assert all(h.op == Op.VIRTIO_VSOCK_OP_RW and h.fwd_cnt == c.fwd_cnt for h in hdrs)
    got = [written(b, h) for b, h in zip(bufs, hdrs)]
    assert [g[0] for g in got] == hdrs                  # the header really is in guest memory
    assert b"".join(p for _, p in got) == data
    assert c.tx_cnt == 20000
    assert c.metrics["rx_packets"] - before["rx_packets"] == 5
    assert c.metrics["rx_bytes"] - before["rx_bytes"] == 20000
    assert c.pending & PendingRx.RW                     # as before: owed until the host would block
    assert c.fill_rx_burst([rx() for _ in range(8)], 0) == []
    assert len(s.reads) == 2 and not c.pending & PendingRx.RW
    assert c.want_read()


def test_burst_is_trimmed_to_the_guest_window():
    c, s = established(CountingStream(), buf_alloc=10000)
    s.inbox += pattern(30000)
    c.on_host_readable()
    bufs = [rx() for _ in range(8)]
    hdrs = c.fill_rx_burst(bufs, 0)
    assert s.reads == [[4096, 4096, 10000 - 8192]]      # the last view cut at the window
    assert [h.len for h in hdrs] == [4096, 4096, 1808]
    assert c.peer_credit() == 0
    # window shut: one CREDIT_REQUEST, no read, then nothing until the guest's numbers move
    hdrs = c.fill_rx_burst([rx() for _ in range(8)], 0)
    assert [h.op for h in hdrs] == [Op.VIRTIO_VSOCK_OP_CREDIT_REQUEST]
    assert len(s.reads) == 1 and not c.want_read()
    assert c.fill_rx_burst([rx() for _ in range(8)], 0) == []
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=10000, fwd_cnt=6000), [], 0)
    assert c.want_read()
    c.on_host_readable()
    hdrs = c.fill_rx_burst([rx() for _ in range(8)], 0)
    assert [h.len for h in hdrs] == [4096, 6000 - 4096]
    assert c.peer_credit() == 0


def test_burst_over_mixed_layouts_and_sizes():
    c, s = established(CountingStream())
    chains = [FakeChain(writable=[44, 1000]),            # Linux <= 6.1
              FakeChain(writable=[44 + 700]),            # Linux 6.2+
              FakeChain(writable=[20, 24 + 300, 300]),   # the header itself split
              FakeChain(writable=[44, 10, 20, 30])]      # payload in pieces
    bufs = [RxBuffer(ch) for ch in chains]
    data = pattern(1000 + 700 + 600 + 45)
    s.inbox += data
    c.on_host_readable()
    hdrs = c.fill_rx_burst(bufs, 0)
    assert len(s.reads) == 1
    assert [h.len for h in hdrs] == [1000, 700, 600, 45]
    got = [written(b, h) for b, h in zip(bufs, hdrs)]
    assert [g[0] for g in got] == hdrs
    assert b"".join(p for _, p in got) == data


def test_header_only_buffer_ends_the_run():
    c, s = established(CountingStream())
    s.inbox += pattern(9000)
    c.on_host_readable()
    bufs = [rx(), RxBuffer(FakeChain(writable=[44])), rx()]
    hdrs = c.fill_rx_burst(bufs, 0)
    assert [h.len for h in hdrs] == [4096] and s.reads == [[4096]]
    assert c.fill_rx_burst(bufs[1:], 0) == []            # no data in a header-only buffer
    assert c.pending & PendingRx.RW                      # still owed (as before)
    assert [h.len for h in c.fill_rx_burst(bufs[2:], 0)] == [4096]


def test_iov_limit_bounds_one_read():
    c, s = established(CountingStream())
    s.inbox += pattern(200_000)
    c.on_host_readable()
    bufs = [RxBuffer(FakeChain(writable=[44] + [1] * 300)) for _ in range(5)]   # 300 views each
    hdrs = c.fill_rx_burst(bufs, 0)
    assert len(s.reads[0]) <= RX_IOV_MAX
    assert [h.len for h in hdrs] == [300] * (RX_IOV_MAX // 300)


def test_eof_after_a_partial_burst():
    c, s = established(CountingStream())
    s.inbox += pattern(5000)
    s.eof = True
    c.on_host_readable()
    bufs = [rx() for _ in range(4)]
    hdrs = c.fill_rx_burst(bufs, 0)
    assert [h.len for h in hdrs] == [4096, 904]
    hdrs = c.fill_rx_burst(bufs[2:], 0)
    assert [(h.op, h.flags) for h in hdrs] == [(Op.VIRTIO_VSOCK_OP_SHUTDOWN, SEND)]
    assert VsockHeader.unpack(bufs[2].chain.written(44)) == hdrs[0]
    assert not c.want_read() and not c.has_pending_rx()


def test_read_error_in_a_burst_resets():
    c, s = established(CountingStream())
    s.inbox += b"x"
    c.on_host_readable()
    s.fail = ConnectionResetError()
    hdrs = c.fill_rx_burst([rx() for _ in range(4)], 0)
    assert [h.op for h in hdrs] == [Op.VIRTIO_VSOCK_OP_RST]
    assert c.done and c.metrics["host_errors"] == 1 and c.metrics["rst_sent"] == 1


def test_control_packets_keep_their_place_before_data():
    c, s = established(CountingStream())
    s.inbox += pattern(100)
    c.on_host_readable()
    c.kill("test")                                      # RST owed: it goes first, alone
    hdrs = c.fill_rx_burst([rx() for _ in range(4)], 0)
    assert [h.op for h in hdrs] == [Op.VIRTIO_VSOCK_OP_RST] and s.reads == []
    # a local connection's REQUEST is one packet even when buffers are plenty
    c2 = Connection.local_init(peer_cid=3, local_port=7, peer_port=8, vtype=1,
                               stream=CountingStream(), now=0.0, **kw())
    assert [h.op for h in c2.fill_rx_burst([rx() for _ in range(4)], 0)] == [Op.VIRTIO_VSOCK_OP_REQUEST]


def test_seqpacket_keeps_its_per_record_path():
    c, s = established(CountingStream(seqpacket=True), type=SEQPACKET)
    s.messages += [pattern(5000), b"tail"]
    c.on_host_readable()
    out = []
    while c.has_pending_rx():
        bufs = [rx() for _ in range(8)]
        hdrs = c.fill_rx_burst(bufs, 0)
        if not hdrs:
            break
        assert len(hdrs) == 1                           # one packet per call, as before
        out.append(written(bufs[0], hdrs[0]))
    assert [(h.len, h.flags) for h, _ in out] == [(4096, 0), (904, EOM | EOR), (4, EOM | EOR)]
    assert b"".join(p for _, p in out[:2]) == pattern(5000)
    assert s.reads == [] and s.messages_read == 3       # the last read found nothing more


# -- device level --------------------------------------------------------------------------

def count_epoll(loop) -> dict:
    """Count the selector calls that are epoll_ctl (register, unregister, modify of events)."""
    sel = loop._selector
    counts = {"register": 0, "unregister": 0, "modify": 0}
    orig = {name: getattr(sel, name) for name in counts}

    def wrap(name):
        def call(fileobj, *a, **k):
            if name != "modify" or a[0] != sel.get_key(fileobj).events:
                counts[name] += 1
            return orig[name](fileobj, *a, **k)
        return call

    for name in counts:
        setattr(sel, name, wrap(name))
    return counts


def run_lengths(keys: list) -> list[int]:
    runs: list[int] = []
    for i, key in enumerate(keys):
        if i and key == keys[i - 1]:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


def test_header_only_buffer_in_the_stock_neither_stalls_nor_spins(uds):
    g = Guest(uds, rx_buffers=1)
    try:
        s, hp = host_connect(g, uds, 52)                # leaves one rx buffer posted
        g.add_rx()
        small = g.rxq.add_chain(writable=[44])          # header only, in the middle of the stock
        g.add_rx()
        g.add_rx()
        g.rxq.kick(force=True)
        data = pattern(3 * 4096 + 100)                  # four buffers' worth: one is behind it
        s.sendall(data)
        g.pump()
        assert g.loop.run_once(0) == 0                  # quiet: nothing rescheduled, no spin
        used = g.rxq.used()
        assert small not in [u.head for u in used]      # held for a control packet
        assert [u.len - 44 for u in used] == [4096, 4096, 4096, 100]
        assert b"".join(u.data[44:u.len] for u in used) == data      # the buffers behind it served
        g.send(Op.VIRTIO_VSOCK_OP_CREDIT_REQUEST, 52, hp)             # a CREDIT_UPDATE is owed
        g.pump()
        used = g.rxq.used()
        assert [(u.head, u.len) for u in used] == [(small, 44)]
        assert VsockHeader.unpack(used[0].data).op == Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE
    finally:
        g.close()


def test_two_bulk_connections_take_turns(uds):
    g = Guest(uds, rx_buffers=220, rx_payload=1024, rx_layout="single")
    try:
        a, pa = host_connect(g, uds, 52)
        b, pb = host_connect(g, uds, 53)
        g.recv()
        size = 100 * 1024
        a.sendall(pattern(size))
        b.sendall(pattern(size)[::-1])
        g.pump()
        pkts = [(h, p) for h, p in g.recv() if h.op == Op.VIRTIO_VSOCK_OP_RW]
        keys = [h.src_port for h, _ in pkts]
        runs = run_lengths(keys)
        assert max(runs) == RX_TURN_BUFFERS             # bursts, bounded
        first_b = keys.index(pb)
        assert first_b <= RX_TURN_BUFFERS and keys[first_b:].count(pa) > 0     # interleaved
        assert b"".join(p for h, p in pkts if h.src_port == pa) == pattern(size)
        assert b"".join(p for h, p in pkts if h.src_port == pb) == pattern(size)[::-1]
    finally:
        g.close()


def test_steady_rx_costs_no_epoll_ctl_and_a_stall_unregisters_once(uds):
    g = Guest(uds, rx_buffers=64, rx_payload=1024, rx_layout="single")
    try:
        s, hp = host_connect(g, uds, 52)
        g.recv()
        counts = count_epoll(g.loop)
        fd = g.dev.muxer.connections[(hp, 52)].stream.fileno()
        for i in range(10):                             # 10 bursts of 32 packets
            s.sendall(pattern(32 * 1024))
            pkts = g.take()
            assert len(pkts) == 32 and b"".join(p for _, p in pkts) == pattern(32 * 1024)
            g.send(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE, 52, hp, fwd_cnt=(i + 1) * 32 * 1024)
            g.pump()
        assert counts == {"register": 0, "unregister": 0, "modify": 0}
        # a real stall: 64 rx buffers for 128 KiB, the host socket stays readable
        s.sendall(pattern(128 * 1024))
        g.pump()
        assert len(g.recv(refill=False)) == 64
        assert g.loop.run_once(0) == 0                  # not spinning on the readable fd
        assert g.loop.watched(fd) == (False, False)
        assert sum(counts.values()) == 1
        for _ in range(64):
            g.add_rx()
        g.rxq.kick(force=True)
        g.pump()
        assert len(g.recv()) == 64 and g.loop.watched(fd) == (True, False)
        assert sum(counts.values()) == 2                # registered again: one more
    finally:
        g.close()


def test_host_half_close_after_a_partial_burst(uds):
    g = Guest(uds, rx_buffers=16)
    try:
        s, hp = host_connect(g, uds, 52)
        g.recv()
        data = pattern(5000)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        pkts = g.take()
        assert [(h.op, h.len, h.flags) for h, _ in pkts] == [
            (Op.VIRTIO_VSOCK_OP_RW, 4096, 0), (Op.VIRTIO_VSOCK_OP_RW, 904, 0),
            (Op.VIRTIO_VSOCK_OP_SHUTDOWN, 0, SEND)]
        assert b"".join(p for _, p in pkts) == data
        assert g.loop.run_once(0) == 0                  # end-of-file seen: no spin on the fd
    finally:
        g.close()
