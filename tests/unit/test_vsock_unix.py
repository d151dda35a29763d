"""The Firecracker-compatible Unix host end, and what hostile guests and host
peers get: bad CONNECT lines, garbage, bad tx chains, unknown connections."""

from __future__ import annotations

import socket

import pytest

from pyvmm.vsock.unix import (CONNECT_LINE_MAX, CONNECT_TIMEOUT, UNIX_RECORD_MAX, UNIX_RECORD_OVERHEAD,
                              SocketStream, parse_connect_line)
from vsock_guest import GUEST_CID, SEQPACKET, STREAM, Guest, Op, hdr, ops


@pytest.mark.parametrize("line,port", [
    (b"CONNECT 52\n", 52),
    (b"connect 52\n", 52),
    (b"CoNnEcT 52\n", 52),
    (b"  CONNECT\t52  \n", 52),
    (b"CONNECT +52\n", 52),                  # Rust u32::from_str takes a leading '+'
    (b"CONNECT 52 extra words\n", 52),       # Firecracker ignores the rest
    (b"CONNECT 4294967295\n", 0xFFFF_FFFF),
    (b"CONNECT 4294967296\n", None),
    (b"CONNECT -1\n", None),
    (b"CONNECT 0x10\n", None),
    (b"CONNECT 1_000\n", None),              # Python int() would take it; Rust does not
    (b"CONNECT \xd9\xa3\n", None),           # a non-ASCII digit
    (b"CONNECT\n", None),
    (b"LISTEN 52\n", None),
    (b"\xff\xfe\n", None),
])
def test_parse_connect_line(line, port):
    assert parse_connect_line(line) == port


def connect(uds, kind=socket.SOCK_STREAM, suffix=""):
    s = socket.socket(socket.AF_UNIX, kind)
    s.connect(uds + suffix)
    s.settimeout(2)
    return s


def closed_without_reply(s):
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("payload", [
    b"HELLO 52\n",
    b"CONNECT nope\n",
    b"A" * (CONNECT_LINE_MAX + 10),          # no newline within 32 bytes
    b"CONNECT " + b"0" * 30 + b"52\n",       # too long, though well-formed
    bytes(range(256)) * 4096,                # 1 MiB of garbage
], ids=["not-connect", "bad-port", "no-newline", "too-long", "garbage-1MiB"])
def test_bad_connect_lines_close_and_count(guest, uds, payload):
    s = connect(uds)
    s.setblocking(False)
    try:
        s.send(payload)                      # as much as the socket takes
    except (BrokenPipeError, ConnectionResetError, BlockingIOError):
        pass
    s.settimeout(2)
    guest.pump()
    assert closed_without_reply(s)
    assert guest.dev.counters()["unix_handshake_errors"] == 1
    assert guest.recv() == []                # the guest never heard of it


def test_connect_line_in_pieces(guest, uds):
    s = connect(uds)
    for piece in (b"CON", b"NECT 5", b"2", b"\n"):
        s.sendall(piece)
        guest.pump()
    assert ops(guest.recv()) == [Op.VIRTIO_VSOCK_OP_REQUEST]


def test_connect_line_never_finished(guest, uds):
    s = connect(uds)
    s.sendall(b"CONNECT 5")
    guest.pump()                             # accepted now: the timer starts
    guest.advance(CONNECT_TIMEOUT - 0.1)
    assert guest.dev.counters()["unix_handshake_errors"] == 0
    guest.advance(0.2)
    assert closed_without_reply(s)
    assert guest.dev.counters()["unix_handshake_errors"] == 1


def test_connect_line_that_arrived_in_time_is_not_timed_out(guest, uds):
    """A loop turn that ran past the deadline (a busy or loaded host) reaches the
    CONNECT timer before the readable event of a line that arrived in time: the line
    is read then, and the connection goes ahead (the e2e test's 64 concurrent CONNECTs
    in the lab were refused this way)."""
    s = connect(uds)
    guest.pump()                             # accepted: the timer starts
    s.sendall(b"CONNECT 52\n")
    guest.clock.advance(CONNECT_TIMEOUT + 1)  # the loop was busy meanwhile
    (hs,) = guest.unix._handshakes.values()
    timer = hs.timer
    timer.cancel()                           # run it by hand, first, as that loop turn did
    timer.callback(*timer.args)
    guest.pump()
    assert ops(guest.recv()) == [Op.VIRTIO_VSOCK_OP_REQUEST]
    assert guest.dev.counters()["unix_handshake_errors"] == 0


def test_peer_closes_before_line(guest, uds):
    s = connect(uds)
    s.sendall(b"CONN")
    s.close()
    guest.pump()
    assert guest.dev.counters()["unix_handshake_errors"] == 1


def test_too_many_handshakes_closes_the_oldest(uds):
    from pyvmm.vsock import unix
    g = Guest(uds)
    g.unix.max_handshakes = 2
    try:
        socks = [connect(uds) for _ in range(3)]
        g.pump()
        assert closed_without_reply(socks[0])           # the oldest made room for the newest
        assert g.dev.counters()["unix_handshake_errors"] == 1
        socks[2].sendall(b"CONNECT 52\n")               # the newest is still being served
        g.pump()
        assert ops(g.recv()) == [Op.VIRTIO_VSOCK_OP_REQUEST]
    finally:
        g.close()
    assert unix.MAX_HANDSHAKES >= 2


def test_seqpacket_connect_record_rules(guest, uds):
    s = connect(uds, socket.SOCK_SEQPACKET, ".seqpacket")
    s.send(b"CONNECT 52")                     # a record without the newline
    guest.pump()
    assert closed_without_reply(s)
    s = connect(uds, socket.SOCK_SEQPACKET, ".seqpacket")
    s.send(b"CONNECT 52\n" + b" " * 40)       # a record longer than 32 bytes
    guest.pump()
    assert closed_without_reply(s)
    s = connect(uds, socket.SOCK_SEQPACKET, ".seqpacket")
    s.send(b"CONNECT " + b"5" * (100 << 10))  # an endless line: one huge record, read once
    guest.pump()
    assert closed_without_reply(s)
    s = connect(uds, socket.SOCK_SEQPACKET, ".seqpacket")
    guest.pump()                             # silent: accepted, the timer starts
    guest.advance(CONNECT_TIMEOUT + 0.1)
    assert closed_without_reply(s)
    assert guest.dev.counters()["unix_handshake_errors"] == 4
    assert guest.recv() == []                # the guest never heard of any of them


@pytest.mark.parametrize("want", [1000, 250_000, 1 << 20, 64 << 20])
def test_max_message_is_the_largest_record_a_unix_seqpacket_socket_takes(want):
    """SocketStream.max_message raises the send buffer for ``want``-byte records where
    net.core.wmem_max allows, and says how large a record one send then takes (the rule
    pyvmm caps a SEQPACKET connection's window by; the default send buffer takes 212,960
    bytes, less than the 256 KiB window): that size goes through, and below
    UNIX_RECORD_MAX one byte more is EMSGSIZE."""
    import errno
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        limit = SocketStream(ours).max_message(want)
        with open("/proc/sys/net/core/wmem_max") as f:
            wmem_max = int(f.read())
        assert min(want, 2 * wmem_max - UNIX_RECORD_OVERHEAD, UNIX_RECORD_MAX) <= limit <= UNIX_RECORD_MAX
        if limit > 1 << 20:
            return                  # a multi-MiB record needs a high-order allocation in the kernel
        ours.setblocking(True)
        ours.settimeout(5)
        assert ours.send(b"r" * limit) == limit
        assert len(theirs.recv(limit + 1)) == limit
        if limit < UNIX_RECORD_MAX:
            with pytest.raises(OSError) as e:
                ours.send(b"r" * (limit + 1))
            assert e.value.errno == errno.EMSGSIZE
    finally:
        ours.close()
        theirs.close()


def test_guest_seqpacket_to_stream_listener_gets_rst(guest, uds):
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"{uds}_1234")
    lst.listen()
    guest.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 1234, type=SEQPACKET)
    assert [(h.op, h.type) for h, _ in guest.take()] == [(Op.VIRTIO_VSOCK_OP_RST, SEQPACKET)]


def test_huge_stream_from_host_byte_exact(guest, uds):
    """1 MiB from a host peer through 4 KiB rx buffers and the guest's credit."""
    s = connect(uds)
    s.sendall(b"CONNECT 52\n")
    req = guest.take()[0][0]
    guest.send(Op.VIRTIO_VSOCK_OP_RESPONSE, 52, req.src_port, buf_alloc=64 * 1024)
    guest.pump()
    assert s.recv(100).startswith(b"OK")
    data = bytes(range(251)) * (4 * 1024 + 200)       # not a multiple of anything
    s.setblocking(False)
    sent, got, fwd = 0, bytearray(), 0
    for _ in range(10000):
        if sent < len(data):
            try:
                sent += s.send(data[sent:sent + 65536])
            except BlockingIOError:
                pass
        for h, p in guest.take():
            if h.op == Op.VIRTIO_VSOCK_OP_RW:
                assert len(got) + h.len - fwd <= 64 * 1024     # never beyond our window
                got += p
            elif h.op == Op.VIRTIO_VSOCK_OP_CREDIT_REQUEST:
                pass
        if len(got) > fwd:                             # the guest app read it all
            fwd = len(got)
            guest.send(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE, 52, req.src_port, buf_alloc=64 * 1024,
                       fwd_cnt=fwd & 0xFFFF_FFFF)
            guest.tx_done()
        if len(got) == len(data):
            break
    assert bytes(got) == data


# -- hostile guests ---------------------------------------------------------------------------

def test_short_header_dropped_and_counted(guest):
    guest.send_raw([hdr(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 52)[:40]])
    assert guest.take() == []
    assert [u.len for u in guest.tx_done()] == [0]
    c = guest.dev.counters()
    assert c["tx_bad_chains"] == 1
    assert c["guest_errors_by_reason"]["tx chain shorter than the header"] == 1


def test_len_disagreeing_with_buffer_rsts(guest):
    guest.send_raw([hdr(Op.VIRTIO_VSOCK_OP_RW, 5000, 52, length=100), b"only ten.."])
    pkts = guest.take()
    assert [(h.op, h.dst_port) for h, _ in pkts] == [(Op.VIRTIO_VSOCK_OP_RST, 5000)]
    assert guest.dev.counters()["tx_bad_chains"] == 1


def test_bad_length_kills_existing_connection(guest):
    with guest.api.listen(52) as lst:
        guest.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 52)
        guest.take()
        sock, _ = lst.accept(0)
        guest.send_raw([hdr(Op.VIRTIO_VSOCK_OP_RW, 5000, 52, length=70000), b"x" * 70000])
        assert ops(guest.take()) == [Op.VIRTIO_VSOCK_OP_RST]
        sock.settimeout(2)
        assert sock.recv(10) == b""


@pytest.mark.parametrize("type", [0, 3, 0xFFFF])
def test_unknown_type_rst(guest, type):
    guest.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 52, type=type)
    assert [(h.op, h.type) for h, _ in guest.take()] == [(Op.VIRTIO_VSOCK_OP_RST, type)]


@pytest.mark.parametrize("op", [Op.VIRTIO_VSOCK_OP_RW, Op.VIRTIO_VSOCK_OP_SHUTDOWN,
                                Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE, Op.VIRTIO_VSOCK_OP_RESPONSE,
                                Op.VIRTIO_VSOCK_OP_INVALID, 42])
def test_packets_for_unknown_connections_rst(guest, op):
    guest.send(op, 5000, 52)
    assert [(h.op, h.src_port, h.dst_port) for h, _ in guest.take()] == [
        (Op.VIRTIO_VSOCK_OP_RST, 52, 5000)]


def test_rst_for_unknown_connection_not_answered(guest):
    guest.send(Op.VIRTIO_VSOCK_OP_RST, 5000, 52)
    assert guest.take() == []


def test_wrong_cids_dropped(guest):
    guest.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 52, src_cid=GUEST_CID + 1)
    guest.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 52, dst_cid=7)
    assert guest.take() == []
    assert guest.dev.counters()["guest_errors"] == 2


def test_type_change_on_connection_resets(guest):
    with guest.api.listen(52):
        guest.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 52, type=STREAM)
        guest.take()
        guest.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 52, b"x", type=SEQPACKET)
        assert [(h.op, h.type) for h, _ in guest.take()] == [(Op.VIRTIO_VSOCK_OP_RST, STREAM)]


def test_short_rx_and_event_buffers_returned_empty(uds):
    g = Guest(uds, rx_buffers=0)
    try:
        g.rxq.add_chain(writable=[43])
        g.rxq.add_chain(writable=[44])
        g.rxq.kick(force=True)
        g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 52)
        used = g.rxq.used()
        assert [u.len for u in used] == [0, 44]
        assert g.dev.counters()["rx_bad_buffers"] == 1
    finally:
        g.close()


def test_python_listener_is_asked_before_the_unix_socket(guest, uds):
    """The machine's backends in their order: a guest connect to a port that
    both a Python listener and <uds>_<port> serve goes to Python; once that
    listener closes, to the Unix socket."""
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{uds}_80")
    lst.listen()
    lst.setblocking(False)
    with guest.api.listen(80) as py:
        guest.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 80)
        assert ops(guest.take()) == [Op.VIRTIO_VSOCK_OP_RESPONSE]
        sock, peer = py.accept(timeout=1)
        assert peer == (GUEST_CID, 5000)
    with pytest.raises(BlockingIOError):
        lst.accept()
    guest.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5001, 80)
    assert ops(guest.take()) == [Op.VIRTIO_VSOCK_OP_RESPONSE]
    conn, _ = lst.accept()
    for s in (sock, conn, lst):
        s.close()
