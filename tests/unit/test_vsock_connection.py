"""pyvmm.vsock.connection: one connection's state machine against a scripted host.

Narrated like Firecracker's ``csm/connection.rs`` tests: a Connection, a
FakeStream for the host end (scripted would-block, EOF, hang-up, errors),
rx buffers from FakeChain, and a number for "now".
"""

from __future__ import annotations

import collections

import pytest

from pyvmm.virtio.queue import GuestErrorLog
from pyvmm.vsock.connection import (CONN_REQUEST_TIMEOUT, CONN_SHUTDOWN_TIMEOUT, CONN_TX_BUF_SIZE,
                                    SEQPACKET_MAX_QUEUED, Connection, ConnState, PendingRx)
from pyvmm.vsock.muxer import new_metrics
from pyvmm.vsock.packet import RxBuffer
from pyvmm.vsock.wire import VirtioVsockOp, VirtioVsockSeqFlag, VirtioVsockShutdown, VsockHeader
from vsock_guest import GUEST_CID, SEQPACKET, STREAM, FakeChain, FakeStream

Op = VirtioVsockOp
RCV = VirtioVsockShutdown.VIRTIO_VSOCK_SHUTDOWN_RCV
SEND = VirtioVsockShutdown.VIRTIO_VSOCK_SHUTDOWN_SEND
EOM = VirtioVsockSeqFlag.VIRTIO_VSOCK_SEQ_EOM
EOR = VirtioVsockSeqFlag.VIRTIO_VSOCK_SEQ_EOR
LP, PP = 52, 1000


def G(op, *, length=0, flags=0, buf_alloc=256 * 1024, fwd_cnt=0, type=STREAM):
    """A guest header for this connection."""
    return VsockHeader(GUEST_CID, 2, PP, LP, length, type, op, flags, buf_alloc, fwd_cnt)


def kw():
    return dict(metrics=new_metrics(), errors=GuestErrorLog("t"), host_errors=GuestErrorLog("th"))


def established(stream=None, *, type=STREAM, buf_alloc=256 * 1024):
    stream = stream or FakeStream(seqpacket=type == SEQPACKET)
    c = Connection.peer_init(G(Op.VIRTIO_VSOCK_OP_REQUEST, type=type, buf_alloc=buf_alloc), stream, **kw())
    assert c.fill_rx(rx(), 0).op == Op.VIRTIO_VSOCK_OP_RESPONSE
    assert c.state is ConnState.ESTABLISHED
    return c, stream


def rx(size=4096):
    return RxBuffer(FakeChain(writable=[44, size]))


def rw(c, data, now=0.0, **k):
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_RW, length=len(data), **k), [memoryview(data)], now)


def drain(c, now=0.0, size=4096):
    """Every packet the connection owes, as (header, payload)."""
    out = []
    while c.has_pending_rx():
        buf = rx(size)
        h = c.fill_rx(buf, now)
        if h is None:
            break
        out.append((h, buf.chain.written(44 + h.len)[44:]))
    return out


def test_response_carries_credit_and_ports():
    s = FakeStream()
    c = Connection.peer_init(G(Op.VIRTIO_VSOCK_OP_REQUEST), s, **kw())
    h = c.fill_rx(rx(), 0)
    assert (h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (2, GUEST_CID, LP, PP)
    assert (h.op, h.buf_alloc, h.fwd_cnt) == (Op.VIRTIO_VSOCK_OP_RESPONSE, CONN_TX_BUF_SIZE, 0)


def test_slow_host_is_buffered_and_credit_stops():
    c, s = established(FakeStream(room=1000))
    for _ in range(CONN_TX_BUF_SIZE // 4096):
        rw(c, b"x" * 4096)
    assert bytes(s.out) == b"x" * 1000                 # what the host took
    assert c._unforwarded() == CONN_TX_BUF_SIZE - 1000  # held for it, bounded by buf_alloc
    assert c.fwd_cnt == 1000
    # the guest's view: the whole window sent, fwd_cnt 0 seen: the window is exactly used up
    rw(c, b"y")                                        # one byte more is a violation
    assert c.pending == PendingRx.RST and c.metrics["credit_violations"] == 1
    assert not c.want_write() and len(c._tx_buf) == 0  # nothing retained for a reset connection


def test_flush_on_writable_then_credit_update():
    c, s = established(FakeStream(room=0))
    for _ in range(CONN_TX_BUF_SIZE // 4096):
        rw(c, b"x" * 4096)
    assert c.want_write() and not s.out
    assert not c.has_pending_rx()
    s.room = 1 << 30
    c.on_host_writable(0)
    assert len(s.out) == CONN_TX_BUF_SIZE and not c.want_write()
    (h, _), = drain(c)
    assert (h.op, h.fwd_cnt) == (Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE, CONN_TX_BUF_SIZE)


def test_host_write_error_resets():
    c, s = established()
    s.fail = BrokenPipeError()
    rw(c, b"data")
    assert c.state is ConnState.KILLED and c.metrics["host_errors"] == 1
    assert [h.op for h, _ in drain(c)] == [Op.VIRTIO_VSOCK_OP_RST]
    assert c.done


def test_never_exceeds_guest_window_and_requests_credit_once():
    c, s = established(buf_alloc=5000)
    s.inbox += b"a" * 20000
    c.on_host_readable()
    pkts = drain(c)
    assert sum(h.len for h, _ in pkts) == 5000
    assert [h.op for h, _ in pkts][-1] == Op.VIRTIO_VSOCK_OP_CREDIT_REQUEST
    assert not c.want_read()                           # no spinning on a shut window
    # a credit update that does not open the window changes nothing
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=5000, fwd_cnt=0), [], 0)
    assert not c.want_read()
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=5000, fwd_cnt=1234), [], 0)
    assert c.want_read()
    c.on_host_readable()
    assert sum(h.len for h, _ in drain(c)) == 1234


def test_guest_shrinking_window_below_in_flight_means_zero_credit():
    c, s = established(buf_alloc=5000)
    s.inbox += b"a" * 4000
    c.on_host_readable()
    drain(c)
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=1000, fwd_cnt=0), [], 0)
    assert c.peer_credit() == 0                        # not a wrapped-around 4 GiB


def test_credit_request_answered():
    c, s = established()
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_CREDIT_REQUEST), [], 0)
    assert [(h.op, h.buf_alloc) for h, _ in drain(c)] == [(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE,
                                                           CONN_TX_BUF_SIZE)]


def test_local_request_timeout_and_response():
    s = FakeStream()
    results = []
    c = Connection.local_init(peer_cid=GUEST_CID, local_port=LP, peer_port=PP, vtype=STREAM,
                              stream=s, now=0.0, preamble=b"OK 52\n", on_connect=results.append, **kw())
    h = c.fill_rx(rx(), 10.0)
    assert h.op == Op.VIRTIO_VSOCK_OP_REQUEST and h.buf_alloc > 0
    assert c.expiry == 10.0 + CONN_REQUEST_TIMEOUT
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_RESPONSE), [], 11.0)
    assert c.state is ConnState.ESTABLISHED and results == [True] and c.expiry is None
    assert bytes(s.out) == b"OK 52\n"
    rw(c, b"after ok")
    assert bytes(s.out) == b"OK 52\nafter ok"


def test_local_request_expires():
    results = []
    c = Connection.local_init(peer_cid=GUEST_CID, local_port=LP, peer_port=PP, vtype=STREAM,
                              stream=FakeStream(), now=0.0, on_connect=results.append, **kw())
    c.fill_rx(rx(), 0.0)
    c.on_timeout(CONN_REQUEST_TIMEOUT - 0.01)
    assert c.state is ConnState.LOCAL_INIT
    c.on_timeout(CONN_REQUEST_TIMEOUT)
    assert results == [False] and [h.op for h, _ in drain(c)] == [Op.VIRTIO_VSOCK_OP_RST]


def test_local_request_never_sent_expires_silently():
    results = []
    c = Connection.local_init(peer_cid=GUEST_CID, local_port=LP, peer_port=PP, vtype=STREAM,
                              stream=FakeStream(), now=0.0, on_connect=results.append, **kw())
    c.on_timeout(CONN_REQUEST_TIMEOUT)
    assert results == [False] and c.done and not c.has_pending_rx()


@pytest.mark.parametrize("op", [Op.VIRTIO_VSOCK_OP_RW, Op.VIRTIO_VSOCK_OP_REQUEST,
                                Op.VIRTIO_VSOCK_OP_SHUTDOWN, 99])
def test_local_init_answered_wrongly_resets(op):
    results = []
    c = Connection.local_init(peer_cid=GUEST_CID, local_port=LP, peer_port=PP, vtype=STREAM,
                              stream=FakeStream(), now=0.0, on_connect=results.append, **kw())
    c.fill_rx(rx(), 0)
    c.on_guest_packet(G(op), [], 0)
    assert results == [False] and [h.op for h, _ in drain(c)] == [Op.VIRTIO_VSOCK_OP_RST]


@pytest.mark.parametrize("op", [Op.VIRTIO_VSOCK_OP_REQUEST, Op.VIRTIO_VSOCK_OP_RESPONSE,
                                Op.VIRTIO_VSOCK_OP_INVALID, 8, 0xFFFF])
def test_bad_ops_on_established_reset(op):
    c, s = established()
    c.on_guest_packet(G(op), [], 0)
    assert [h.op for h, _ in drain(c)] == [Op.VIRTIO_VSOCK_OP_RST]
    assert c.metrics["guest_errors"] == 1


def test_rst_is_never_answered():
    c, s = established()
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_RST), [], 0)
    assert c.done and drain(c) == []


def test_shutdown_bits_are_sticky_and_rst_waits_for_drain():
    c, s = established(FakeStream(room=3))
    rw(c, b"abcdef")
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_SHUTDOWN, flags=RCV), [], 0)
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_SHUTDOWN, flags=SEND), [], 1.0)
    assert c.peer_shutdown == RCV | SEND
    assert drain(c) == [] and c.expiry == 1.0 + CONN_SHUTDOWN_TIMEOUT   # waits for the host
    s.room = 100
    c.on_host_writable(1.5)
    assert bytes(s.out) == b"abcdef"
    assert [h.op for h, _ in drain(c)] == [Op.VIRTIO_VSOCK_OP_RST]


def test_shutdown_drain_timeout():
    c, s = established(FakeStream(room=0))
    rw(c, b"stuck")
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_SHUTDOWN, flags=RCV | SEND), [], 0)
    c.on_timeout(CONN_SHUTDOWN_TIMEOUT)
    assert [h.op for h, _ in drain(c)] == [Op.VIRTIO_VSOCK_OP_RST]
    assert c.metrics["conns_timed_out"] == 1


def test_rw_after_guest_send_shutdown_is_violation():
    c, s = established()
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_SHUTDOWN, flags=SEND), [], 0)
    assert s.shut_wr
    rw(c, b"more")
    assert [h.op for h, _ in drain(c)] == [Op.VIRTIO_VSOCK_OP_RST]


def test_host_eof_then_guest_rw_race_is_dropped():
    c, s = established()
    s.eof = s.hup = True
    c.on_host_readable()
    assert [(h.op, h.flags) for h, _ in drain(c)] == [(Op.VIRTIO_VSOCK_OP_SHUTDOWN, RCV | SEND)]
    rw(c, b"in flight")                                # sent before the guest saw SHUTDOWN
    assert c.metrics["tx_dropped_bytes"] == 9 and not c.has_pending_rx()
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_SHUTDOWN, flags=RCV | SEND), [], 0)
    assert [h.op for h, _ in drain(c)] == [Op.VIRTIO_VSOCK_OP_RST]


def test_header_only_rx_buffer_gets_no_data_but_control():
    c, s = established()
    s.inbox += b"data"
    c.on_host_readable()
    assert c.fill_rx(RxBuffer(FakeChain(writable=[44])), 0) is None
    assert c.pending & PendingRx.RW                     # still owed
    assert [bytes(p) for _, p in drain(c)] == [b"data"]


# -- SEQPACKET ---------------------------------------------------------------------------------

def test_seqpacket_guest_message_gathered_into_one_record():
    c, s = established(type=SEQPACKET)
    rw(c, b"one-", type=SEQPACKET)
    rw(c, b"two-", type=SEQPACKET)
    assert s.records == []
    rw(c, b"three", type=SEQPACKET, flags=EOM | EOR)
    rw(c, b"", type=SEQPACKET, flags=EOM)             # an empty message is a message
    assert s.records == [b"one-two-three", b""]
    assert c.metrics["seq_eor_rx"] == 1 and c.fwd_cnt == 13


def test_seqpacket_record_waits_when_host_full():
    c, s = established(FakeStream(seqpacket=True, room=5), type=SEQPACKET)
    rw(c, b"0123456789", type=SEQPACKET, flags=EOM)
    assert s.records == [] and c.want_write()
    s.room = 100
    c.on_host_writable(0)
    assert s.records == [b"0123456789"]


def test_seqpacket_empty_message_flood_is_bounded():
    c, s = established(FakeStream(seqpacket=True, room=0), type=SEQPACKET)
    for _ in range(SEQPACKET_MAX_QUEUED):
        rw(c, b"", type=SEQPACKET, flags=EOM)          # free in credit, but not in memory
    assert c.state is ConnState.ESTABLISHED
    rw(c, b"", type=SEQPACKET, flags=EOM)
    assert [h.op for h, _ in drain(c)] == [Op.VIRTIO_VSOCK_OP_RST]
    assert not c._tx_msgs


def test_seqpacket_host_record_split_with_eom_on_last():
    c, s = established(type=SEQPACKET)
    s.messages += [b"m" * 9000, b"short"]
    c.on_host_readable()
    pkts = drain(c)
    assert [(h.len, h.flags) for h, _ in pkts] == [(4096, 0), (4096, 0), (808, EOM | EOR),
                                                   (5, EOM | EOR)]


def test_seqpacket_host_record_respects_guest_window():
    c, s = established(type=SEQPACKET, buf_alloc=6000)
    s.messages += [b"m" * 5000, b"n" * 5000]
    c.on_host_readable()
    pkts = drain(c)
    assert sum(h.len for h, _ in pkts if h.op == Op.VIRTIO_VSOCK_OP_RW) == 6000
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE, type=SEQPACKET, buf_alloc=6000,
                        fwd_cnt=6000), [], 0)
    c.on_host_readable()
    pkts = drain(c)
    assert [(h.len, h.flags) for h, _ in pkts if h.op == Op.VIRTIO_VSOCK_OP_RW] == [(4000, EOM | EOR)]


def test_seqpacket_oversized_host_record_resets():
    c, s = established(type=SEQPACKET, buf_alloc=1000)
    s.messages.append(b"m" * 1001)                    # larger than the guest can ever take
    c.on_host_readable()
    assert [h.op for h, _ in drain(c)] == [Op.VIRTIO_VSOCK_OP_RST]
    assert c.metrics["host_errors"] == 1


def test_seqpacket_window_is_capped_to_the_largest_record_the_host_socket_takes():
    """A guest message goes to the host as one record, so a SEQPACKET connection never
    advertises more than the host socket takes as one (AF_UNIX: its send buffer less 32
    bytes): a message of exactly that size goes through whole, a larger one is beyond the
    guest's credit (Linux refuses it with EMSGSIZE before sending) and is reset, counted
    against the guest.  A STREAM connection keeps its window."""
    s = FakeStream(seqpacket=True, max_record=100_000)
    c = Connection.peer_init(G(Op.VIRTIO_VSOCK_OP_REQUEST, type=SEQPACKET), s, **kw())
    (resp, _), = drain(c)
    assert (resp.op, resp.buf_alloc) == (Op.VIRTIO_VSOCK_OP_RESPONSE, 100_000)
    message = bytes(range(250)) * 400                 # 100,000 bytes in two packets
    rw(c, message[:60_000], type=SEQPACKET)
    rw(c, message[60_000:], type=SEQPACKET, flags=EOM)
    assert s.records == [message]
    c, s = established(FakeStream(seqpacket=True, max_record=100_000), type=SEQPACKET)
    rw(c, b"x" * 60_000, type=SEQPACKET)
    rw(c, b"x" * 40_001, type=SEQPACKET, flags=EOM)  # 100,001: one byte beyond the credit
    assert [h.op for h, _ in drain(c)] == [Op.VIRTIO_VSOCK_OP_RST]
    assert s.records == [] and c.metrics["credit_violations"] == 1
    c, _ = established(FakeStream(max_record=100_000))
    assert c.buf_alloc == CONN_TX_BUF_SIZE


def test_metrics_counter_type():
    assert isinstance(new_metrics(), collections.Counter)


def test_seqpacket_staged_record_resumes_on_credit_alone():
    """The rest of a host record that waited for guest credit goes out when the
    guest's CREDIT_UPDATE arrives, though the host socket has nothing more to
    read (an echo peer waits for its reply; found with the freestanding
    guest's echo server)."""
    c, s = established(type=SEQPACKET, buf_alloc=32768)
    s.messages += [b"m" * 100]
    c.on_host_readable()
    assert [(h.len, h.flags) for h, _ in drain(c)] == [(100, EOM | EOR)]
    s.messages += [b"n" * 32768]                   # the guest has not reported consuming 100
    c.on_host_readable()
    first = [h for h, _ in drain(c) if h.op == Op.VIRTIO_VSOCK_OP_RW]
    assert sum(h.len for h in first) == 32668 and not first[-1].flags
    c.on_guest_packet(G(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE, type=SEQPACKET, buf_alloc=32768,
                        fwd_cnt=32768), [], 0)
    rest = drain(c)                                # and no on_host_readable()
    assert [(h.len, h.flags) for h, _ in rest if h.op == Op.VIRTIO_VSOCK_OP_RW] == \
        [(100, EOM | EOR)]
