"""The 2013 draft mode (proto=rfc2013): device ID 13, controlq + N rx/tx pairs, the 39-byte
header, the 4-way handshake, u64 credit without CREDIT_REQUEST, datagrams, and what a
hostile draft guest gets.  The guest is the mock driver playing pyvmm's draft driver
(vsock_guest.Guest with wire=RFC2013); the host ends are the real Python API and Unix backend."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from pyvmm.errors import ConfigError
from pyvmm.vsock import VsockDevice
from pyvmm.vsock.connection import CONN_REQUEST_TIMEOUT, CONN_TX_BUF_SIZE, Connection, ConnState
from pyvmm.vsock.muxer import DGRAM_MAX_QUEUED, HOST_PORT_FIRST
from pyvmm.vsock.packet import RxBuffer
from pyvmm.vsock.wire import (DGRAM, DGRAM_MAX_PAYLOAD, OP_ATTACH, OP_CREDIT_UPDATE, OP_NEGOTIATE,
                              OP_OFFER, OP_REQUEST, OP_RST, OP_RW, OP_SHUTDOWN, RFC2013, RFC2013_HDR, STREAM,
                              UNKNOWN, VIRTIO, VsockHeader)
from test_vsock_connection import kw
from vsock_guest import GUEST_CID, FakeChain, FakeStream, Guest

PAIRS = 4


@pytest.fixture
def draft(uds):
    g = Guest(uds, wire=RFC2013, pairs=PAIRS, controlq=True)
    yield g
    g.close()


def ops(pkts):
    return [p[-2].op for p in pkts]


def lane(a, b, n=PAIRS):
    return (a ^ b) % n


# -- the wire format ----------------------------------------------------------------------
def test_the_draft_header_is_39_packed_bytes_in_the_seeds_order():
    h = VsockHeader(3, 2, 1000, 80, 5, STREAM, OP_OFFER, 0, 0x1_0000_0000, 0x2_0000_0000)
    raw = RFC2013.encode(h)
    assert len(raw) == RFC2013_HDR.size == 39
    # u32 src_cid, src_port, dst_cid, dst_port, len; u8 type, op, shut; u64 fwd_cnt, buf_alloc
    assert raw == (struct.pack("<IIIII", 3, 1000, 2, 80, 5) + bytes([1, 3, 0])
                   + struct.pack("<QQ", 0x2_0000_0000, 0x1_0000_0000))
    assert RFC2013.unpack(raw) == h


@pytest.mark.parametrize("number, canonical", [(1, OP_REQUEST), (2, OP_NEGOTIATE), (3, OP_OFFER),
                                               (4, OP_ATTACH), (5, OP_RW), (6, OP_CREDIT_UPDATE),
                                               (7, OP_RST), (8, OP_SHUTDOWN), (9, UNKNOWN | 9),
                                               (255, UNKNOWN | 255)])
def test_draft_op_numbers_map_to_canonical_ops(number, canonical):
    raw = bytearray(RFC2013.encode(VsockHeader(3, 2, 1, 2, 0, STREAM, OP_RW, 0, 0, 0)))
    raw[21] = number
    assert RFC2013.unpack(raw).op == canonical


def test_no_standard_header_can_carry_a_draft_only_op_or_type():
    for value in (OP_NEGOTIATE, OP_OFFER, OP_ATTACH, DGRAM):
        assert value > 0xFFFF                       # the standard's op/type are u16


# -- the device -------------------------------------------------------------------------
def test_device_13_with_a_controlq_and_n_pairs(draft):
    dev = draft.dev
    assert dev.device_id == 13 and len(dev.queue_max_sizes) == 1 + 2 * PAIRS
    assert (draft.cid_read, draft.pairs_read) == (GUEST_CID, PAIRS)
    assert dev.device_features >> 32 == 1 and dev.device_features & 0xFFFF_FFFF == (1 << 28) | (1 << 29)
    assert dev.lanes == PAIRS


@pytest.mark.parametrize("pairs", [0, 17])
def test_pairs_out_of_range_is_a_config_error(pairs):
    with pytest.raises(ConfigError, match="1 .. 16"):
        VsockDevice(3, wire=RFC2013, pairs=pairs)


def test_the_standard_takes_no_pairs():
    with pytest.raises(ConfigError, match="pairs"):
        VsockDevice(3, wire=VIRTIO, pairs=2)


def test_a_driver_may_use_fewer_pairs_and_routing_follows(uds):
    g = Guest(uds, wire=RFC2013, pairs=PAIRS, use_pairs=2)
    try:
        assert g.dev.lanes == 2
        listener = g.api.listen(80)
        g.send(OP_REQUEST, 1001, 80)                # lane (1001 ^ 80) % 2 = 1
        assert [(ln, h.op) for ln, h, _ in g.take(with_lane=True)] == [(1, OP_NEGOTIATE)]
        listener.close()
    finally:
        g.close()


def test_controlq_buffers_come_back_empty_and_counted(draft):
    draft.controlq.add_chain(readable=[RFC2013.encode(VsockHeader(3, 2, 5, 80, 0, STREAM, OP_REQUEST, 0, 0, 0))])
    draft.controlq.add_chain(writable=[64])
    draft.controlq.kick(force=True)
    draft.pump()
    assert [u.len for u in draft.controlq.used()] == [0, 0]
    assert draft.dev.counters()["controlq_buffers"] == 2
    assert draft.dev.counters()["conns_added"] == 0   # the REQUEST on the controlq was not read


# -- the handshake, both ways ---------------------------------------------------------------
def test_guest_initiated_four_way_handshake_and_echo(draft):
    listener = draft.api.listen(80)
    draft.send(OP_REQUEST, 1000, 80, buf_alloc=8192)
    (ln, neg, _), = draft.take(with_lane=True)
    assert (ln, neg.op, neg.src_port, neg.dst_port) == (lane(1000, 80), OP_NEGOTIATE, 80, 1000)
    assert neg.buf_alloc == CONN_TX_BUF_SIZE                  # the listener's credit rides in NEGOTIATE
    draft.send(OP_OFFER, 1000, 80, buf_alloc=8192)
    assert ops(draft.take()) == [OP_ATTACH]
    sock, peer = listener.accept(timeout=0)
    assert peer == (GUEST_CID, 1000)
    draft.send(OP_RW, 1000, 80, b"ping")
    draft.pump()
    assert sock.recv(10) == b"ping"
    sock.sendall(b"pong")
    draft.pump()
    (h, data), = draft.recv()
    assert (h.op, data, h.fwd_cnt) == (OP_RW, b"pong", 4)
    sock.close()
    listener.close()


def test_host_initiated_four_way_handshake(draft):
    stream = FakeStream()
    outcome = []
    conn = draft.dev.muxer.connect_host(1234, STREAM, stream, on_connect=outcome.append)
    (ln, req, _), = draft.take(with_lane=True)
    assert (ln, req.op, req.dst_port, req.src_port) == (lane(HOST_PORT_FIRST, 1234), OP_REQUEST, 1234,
                                                        HOST_PORT_FIRST)
    draft.send(OP_NEGOTIATE, 1234, req.src_port, buf_alloc=4096)
    assert ops(draft.take()) == [OP_OFFER]
    assert outcome == []                                      # not connected before ATTACH
    draft.send(OP_ATTACH, 1234, req.src_port, buf_alloc=4096)
    draft.pump()
    assert outcome == [True] and conn.state.name == "ESTABLISHED"


@pytest.mark.parametrize("wrong", [OP_OFFER, OP_ATTACH, OP_RW, OP_CREDIT_UPDATE, OP_REQUEST])
def test_an_out_of_order_answer_to_our_request_is_reset(draft, wrong):
    outcome = []
    draft.dev.muxer.connect_host(1234, STREAM, FakeStream(), on_connect=outcome.append)
    (req, _), = draft.take()
    draft.send(wrong, 1234, req.src_port)
    assert ops(draft.take()) == [OP_RST]
    assert outcome == [False]
    assert "guest packet out of order in the handshake" in draft.dev.counters()["guest_errors_by_reason"]


@pytest.mark.parametrize("wrong", [OP_RW, OP_ATTACH, OP_NEGOTIATE, OP_REQUEST])
def test_guest_skipping_its_offer_is_reset(draft, wrong):
    listener = draft.api.listen(80)
    draft.send(OP_REQUEST, 1000, 80)
    assert ops(draft.take()) == [OP_NEGOTIATE]
    draft.send(wrong, 1000, 80)
    assert ops(draft.take()) == [OP_RST]
    listener.close()


@pytest.mark.parametrize("op", [OP_ATTACH, OP_OFFER, OP_NEGOTIATE])
def test_a_handshake_op_out_of_the_blue_is_reset(draft, op):
    draft.send(op, 1000, 80)
    assert ops(draft.take()) == [OP_RST]


def test_a_request_nobody_listens_to_is_reset(draft):
    draft.send(OP_REQUEST, 1000, 81)
    assert ops(draft.take()) == [OP_RST]


def test_a_guest_that_never_offers_is_reset_after_the_timeout(draft):
    listener = draft.api.listen(80)
    draft.send(OP_REQUEST, 1000, 80)
    assert ops(draft.take()) == [OP_NEGOTIATE]
    draft.advance(CONN_REQUEST_TIMEOUT - 0.1)
    assert draft.recv() == []
    draft.advance(0.2)
    assert ops(draft.recv()) == [OP_RST]
    assert draft.dev.counters()["conns_timed_out"] == 1
    listener.close()


def test_the_initiator_gives_up_after_two_seconds(draft):
    outcome = []
    draft.dev.muxer.connect_host(1234, STREAM, FakeStream(), on_connect=outcome.append)
    (req, _), = draft.take()
    draft.send(OP_NEGOTIATE, 1234, req.src_port)
    assert ops(draft.take()) == [OP_OFFER]
    draft.advance(CONN_REQUEST_TIMEOUT + 0.1)                 # no ATTACH: from the REQUEST on
    assert ops(draft.recv()) == [OP_RST] and outcome == [False]


# -- credit ---------------------------------------------------------------------------------
def established(draft, guest_buf=4096):
    listener = draft.api.listen(80)
    draft.send(OP_REQUEST, 1000, 80, buf_alloc=guest_buf)
    draft.take()
    draft.send(OP_OFFER, 1000, 80, buf_alloc=guest_buf)
    draft.take()
    sock, _ = listener.accept(timeout=0)
    listener.close()
    return sock


def test_no_credit_request_a_shut_window_waits_for_the_guests_credit(draft):
    sock = established(draft, guest_buf=4096)
    sock.sendall(os.urandom(10_000))
    draft.pump()
    pkts = draft.recv()
    assert [h.op for h, _ in pkts] == [OP_RW] and sum(h.len for h, _ in pkts) == 4096
    draft.pump()
    assert draft.recv() == []                                 # waits: the draft has no CREDIT_REQUEST
    assert draft.dev.counters()["credit_requests_sent"] == 0
    draft.send(OP_CREDIT_UPDATE, 1000, 80, buf_alloc=4096, fwd_cnt=4096)
    draft.pump()
    assert sum(h.len for h, _ in draft.recv()) == 4096
    sock.close()


def test_a_guest_beyond_its_credit_is_reset(draft):
    sock = established(draft)
    for _ in range(5):                                        # 300,000 > 256 KiB advertised
        draft.send(OP_RW, 1000, 80, bytes(60_000), kick=False)
    draft.txqs[lane(1000, 80)].kick(force=True)
    draft.pump()
    assert OP_RST in ops(draft.recv())
    assert draft.dev.counters()["credit_violations"] == 1
    sock.close()


def test_credit_counters_are_64_bit():
    hdr = VsockHeader(3, 2, 1000, 80, 0, STREAM, OP_REQUEST, 0, 1 << 20, 0)
    conn = Connection.peer_init(hdr, FakeStream(), wire=RFC2013, **kw())
    assert conn.fill_rx(draft_rx(), 0).op == OP_NEGOTIATE
    conn.on_guest_packet(hdr._replace(op=OP_OFFER), [], 0.0)
    assert conn.fill_rx(draft_rx(), 0).op == OP_ATTACH
    assert conn.state is ConnState.ESTABLISHED
    conn.tx_cnt = conn.peer_fwd_cnt = (1 << 32) - 10          # 4 GiB sent: a u32 would wrap here
    assert conn.peer_credit() == 1 << 20
    conn.tx_cnt += 100
    assert conn.peer_credit() == (1 << 20) - 100
    conn.on_guest_packet(hdr._replace(op=OP_CREDIT_UPDATE, fwd_cnt=(1 << 32) + 90), [], 0.0)
    assert conn.peer_credit() == 1 << 20


def draft_rx():
    return RxBuffer(FakeChain(writable=[RFC2013.hdr_len, 4096]), RFC2013)


# -- pairs ------------------------------------------------------------------------------------
def test_a_connection_hopping_pairs_is_reset_on_its_own_pair(draft):
    sock = established(draft)
    right = lane(1000, 80)
    draft.send(OP_RW, 1000, 80, b"x", lane=(right + 1) % PAIRS)
    draft.pump()
    assert [(ln, h.op) for ln, h, _ in draft.recv(with_lane=True)] == [(right, OP_RST)]
    c = draft.dev.counters()
    assert c["wrong_lane"] == 1 and "guest packet on the wrong queue pair" in c["guest_errors_by_reason"]
    sock.close()


def test_connections_spread_over_the_pairs_and_stay_on_theirs(draft):
    listener = draft.api.listen(80)
    for port in range(2000, 2008):
        draft.send(OP_REQUEST, port, 80)
    draft.pump()
    got = {(h.dst_port, ln) for ln, h, _ in draft.recv(with_lane=True)}
    assert got == {(port, lane(port, 80)) for port in range(2000, 2008)}
    assert {ln for _, ln in got} == set(range(PAIRS))
    listener.close()


# -- datagrams ----------------------------------------------------------------------------------
def test_guest_datagrams_reach_a_python_receiver_and_back(draft):
    with draft.api.dgram(7000) as d:
        draft.send(OP_RW, 4000, 7000, b"hello", type=DGRAM, buf_alloc=0)
        draft.pump()
        assert d.recvfrom(timeout=0) == (b"hello", (GUEST_CID, 4000))
        d.sendto(b"world", 4000)
        draft.pump()
        (ln, h, data), = draft.recv(with_lane=True)
        assert (ln, h.type, h.op, h.src_port, h.dst_port, data) == (lane(7000, 4000), DGRAM, OP_RW, 7000,
                                                                    4000, b"world")
    c = draft.dev.counters()
    assert (c["dgram_tx"], c["dgram_rx"], c["dgram_dropped"], c["connections"]) == (1, 1, 0, 0)


def test_undeliverable_and_oversize_guest_datagrams_are_dropped_and_counted(draft):
    draft.send(OP_RW, 4000, 7001, b"nobody", type=DGRAM)
    draft.send(OP_RW, 4000, 7001, bytes(5000), type=DGRAM)
    draft.pump()
    assert draft.recv() == []                                 # no RST for datagrams
    c = draft.dev.counters()
    assert c["dgram_dropped"] == 2
    assert "guest datagram larger than 4096 bytes or not RW (dropped)" in c["guest_errors_by_reason"]


def test_host_datagrams_wait_for_rx_buffers_in_a_bounded_queue(uds):
    g = Guest(uds, wire=RFC2013, pairs=1, rx_buffers=0)
    try:
        with g.api.dgram(7000) as d:
            for i in range(DGRAM_MAX_QUEUED + 10):
                d.sendto(b"%d" % i, 4000)
            g.pump()
            assert g.dev.counters()["dgram_dropped"] == 10
            for _ in range(4):
                g.add_rx()
            g.rxq.kick(force=True)
            g.pump()
            assert [data for _, data in g.recv(refill=False)] == [b"0", b"1", b"2", b"3"]
    finally:
        g.close()


def test_datagrams_through_the_unix_end(draft, uds, tmp_path):
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(f"{uds}_7000.dgram")
    receiver.settimeout(5)
    draft.send(OP_RW, 4000, 7000, b"to the host", type=DGRAM)
    draft.pump()
    data, source = receiver.recvfrom(8192)
    assert (data, source) == (b"4000\nto the host", f"{uds}.dgram")
    receiver.sendto(b"4000\nand back", source)               # from <uds>_7000.dgram: src_port 7000
    anonymous = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    anonymous.sendto(b"4000\nanonymous", f"{uds}.dgram")
    anonymous.sendto(b"no port line", f"{uds}.dgram")
    draft.pump()
    got = [(h.src_port, data) for h, data in draft.recv()]
    assert got == [(7000, b"and back"), (0xFFFF_FFFF, b"anonymous")]
    assert draft.dev.counters()["dgram_dropped"] == 1
    receiver.close()
    anonymous.close()


@pytest.mark.parametrize("datagram", [
    b"4000\n" + b"d" * (DGRAM_MAX_PAYLOAD + 1),          # one byte too many, not truncated
    b"4000\n" + b"d" * (64 << 10),                        # truncated by the read
    b"4294967296\nbeyond a u32",
    b"\xff\xfe\nnot a number",
], ids=["4097-bytes", "64KiB", "port-beyond-u32", "garbage-line"])
def test_bad_host_datagrams_on_the_unix_end_are_dropped_counted_and_logged_once(draft, uds, datagram, caplog):
    """PATH.dgram: a datagram whose payload exceeds DGRAM_MAX_PAYLOAD or whose port line is
    not a u32 never reaches the guest; each is counted in dgram_dropped, the reason logged
    once; a good one after them still goes through."""
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 18)
    for _ in range(2):
        sender.sendto(datagram, f"{uds}.dgram")
    sender.sendto(b"4000\nfine", f"{uds}.dgram")
    draft.pump()
    assert [data for _, data in draft.recv()] == [b"fine"]
    c = draft.dev.counters()
    assert c["dgram_dropped"] == 2
    reason = "host datagram without a '<port>\\n' line, or too large (dropped)"
    assert c["host_errors_by_reason"] == {reason: 2}, c["host_errors_by_reason"]
    assert len([r for r in caplog.records if reason in r.getMessage()]) == 1, caplog.text
    sender.close()


def test_the_standard_mode_has_no_datagram_socket_or_api(guest, uds):
    assert not os.path.exists(f"{uds}.dgram")
    with pytest.raises(OSError, match="proto=rfc2013"):
        guest.api.dgram(7000)


# -- the Firecracker host end works unchanged ---------------------------------------------------
def test_connect_line_echo_through_the_unix_end(draft, uds):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(uds)
    client.sendall(b"CONNECT 1234\n")
    draft.pump()
    (req, _), = draft.recv()
    assert (req.op, req.dst_port) == (OP_REQUEST, 1234)
    draft.send(OP_NEGOTIATE, 1234, req.src_port)
    draft.pump()
    (offer, _), = draft.recv()
    assert offer.op == OP_OFFER
    draft.send(OP_ATTACH, 1234, req.src_port)
    draft.pump()
    client.settimeout(5)
    assert client.recv(64) == f"OK {req.src_port}\n".encode()
    client.close()
