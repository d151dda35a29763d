"""VM-to-VM vsock (pyvmm.vsock.group): two or three devices in one group, no KVM.

Each member is a probed VsockDevice (vsock_guest.Guest: MockDriver plays Linux 6.1's
driver) with its own event loop, as if in its own pyvmm process; the crossings between them
are the real Unix sockets in the group directory.  The loops are pumped in turn on the test
thread until nothing moves.
"""

from __future__ import annotations

import socket

import pytest

from pyvmm.errors import ConfigError
from pyvmm.vsock import VsockGroup, group as group_mod
from pyvmm.vsock.wire import EOM, EOR, HDR
from vsock_guest import SEQPACKET, STREAM, Guest, Op, ops

A, B, C = 3, 4, 5


def pump(*guests, rounds: int = 400) -> None:
    for _ in range(rounds):
        if sum(g.loop.run_once(0) for g in guests) == 0:
            return


@pytest.fixture
def gdir(tmp_path):
    return tmp_path / "group"


@pytest.fixture
def pair(gdir):
    a = Guest(cid=A, group=VsockGroup(gdir))
    b = Guest(cid=B, group=VsockGroup(gdir))
    yield a, b
    for g in (a, b):
        g.close()


def connect(a, b, a_port=1000, b_port=2000, vtype=STREAM, buf_alloc=256 * 1024):
    """A's guest connects to B's; both see the other's handshake packet unchanged."""
    a.send(Op.VIRTIO_VSOCK_OP_REQUEST, a_port, b_port, dst_cid=B, type=vtype, buf_alloc=buf_alloc)
    pump(a, b)
    got = b.recv()
    assert [(h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port, h.buf_alloc)
            for h, _ in got] == [(Op.VIRTIO_VSOCK_OP_REQUEST, A, B, a_port, b_port, buf_alloc)]
    b.send(Op.VIRTIO_VSOCK_OP_RESPONSE, b_port, a_port, dst_cid=A, type=vtype, buf_alloc=123456,
           fwd_cnt=7)
    pump(a, b)
    got = a.recv()
    assert [(h.op, h.src_cid, h.buf_alloc, h.fwd_cnt) for h, _ in got] == [
        (Op.VIRTIO_VSOCK_OP_RESPONSE, B, 123456, 7)]


def test_packets_cross_unchanged_and_data_is_split_to_the_receivers_buffers(pair):
    a, b = pair
    connect(a, b)
    data = bytes(range(256)) * 256                                 # 64 KiB: 16 rx buffers
    a.send(Op.VIRTIO_VSOCK_OP_RW, 1000, 2000, data, dst_cid=B, buf_alloc=99999, fwd_cnt=4242)
    pump(a, b)
    got = b.recv()
    assert len(got) == 16 and b"".join(p for _, p in got) == data
    assert {(h.op, h.src_cid, h.dst_cid, h.buf_alloc, h.fwd_cnt, h.flags) for h, _ in got} == {
        (Op.VIRTIO_VSOCK_OP_RW, A, B, 99999, 4242, 0)}                # credit unchanged
    counters = a.dev.counters()
    assert counters["tx_bytes"] == len(data) and counters["group"]["flows"] == 1
    assert b.dev.counters()["rx_bytes"] == len(data)


def test_a_seqpacket_message_keeps_its_end_on_the_last_piece_only(pair):
    a, b = pair
    connect(a, b, vtype=SEQPACKET)
    a.send(Op.VIRTIO_VSOCK_OP_RW, 1000, 2000, b"m" * 10000, dst_cid=B, type=SEQPACKET,
           flags=EOM | EOR)
    pump(a, b)
    got = b.recv()
    assert [(h.len, h.flags) for h, _ in got] == [(4096, 0), (4096, 0), (1808, EOM | EOR)]


def test_a_cid_no_member_has_gets_an_rst_from_that_cid(pair):
    a, b = pair
    a.send(Op.VIRTIO_VSOCK_OP_REQUEST, 1000, 77, dst_cid=9, type=SEQPACKET)
    a.send(Op.VIRTIO_VSOCK_OP_RST, 1001, 77, dst_cid=9)           # an RST gets no answer
    pump(a, b)
    got = a.recv()
    assert [(h.op, h.src_cid, h.src_port, h.dst_port, h.type) for h, _ in got] == [
        (Op.VIRTIO_VSOCK_OP_RST, 9, 77, 1000, SEQPACKET)]
    assert a.dev.counters()["group_no_member"] == 2
    assert b.recv() == []


def test_the_host_end_works_beside_the_group(pair):
    a, b = pair
    a.send(Op.VIRTIO_VSOCK_OP_REQUEST, 1000, 5555)               # CID 2: nobody listens
    pump(a, b)
    got = a.recv()
    assert [(h.op, h.src_cid) for h, _ in got] == [(Op.VIRTIO_VSOCK_OP_RST, 2)]
    assert a.dev.counters()["group_no_member"] == 0


def test_a_second_member_with_a_taken_cid_is_refused(pair, gdir):
    with pytest.raises(ConfigError, match=r"CID 3 is already a member \(pid \d+\)"):
        Guest(cid=A, group=VsockGroup(gdir))


def test_a_dead_members_socket_is_taken_over(gdir):
    """A member that died leaves <cid>.sock behind; the next one with that CID replaces it,
    and before that a packet to it gets an RST (connect: ECONNREFUSED)."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    gdir.mkdir()
    stale.bind(str(gdir / f"{B}.sock"))
    stale.close()                                                 # the file stays
    a = Guest(cid=A, group=VsockGroup(gdir))
    try:
        a.send(Op.VIRTIO_VSOCK_OP_REQUEST, 1000, 2000, dst_cid=B)
        pump(a)
        assert ops(a.recv()) == [Op.VIRTIO_VSOCK_OP_RST]
        b = Guest(cid=B, group=VsockGroup(gdir))
        try:
            connect(a, b)
        finally:
            b.close()
    finally:
        a.close()


def test_a_member_leaving_resets_every_connection_with_it(gdir):
    a, b, c = (Guest(cid=cid, group=VsockGroup(gdir)) for cid in (A, B, C))
    try:
        for port in range(1000, 1005):
            connect(a, b, a_port=port)
        c.send(Op.VIRTIO_VSOCK_OP_REQUEST, 3000, 4000, dst_cid=A)        # C-A survives B
        pump(a, c)
        assert ops(a.recv()) == [Op.VIRTIO_VSOCK_OP_REQUEST]
        a.send(Op.VIRTIO_VSOCK_OP_RESPONSE, 4000, 3000, dst_cid=C)
        pump(a, c)
        c.recv()
        b.close()                                                 # its sockets close
        pump(a, c)
        got = a.recv()
        assert sorted((h.op, h.src_cid, h.src_port, h.dst_port) for h, _ in got) == [
            (Op.VIRTIO_VSOCK_OP_RST, B, 2000, port) for port in range(1000, 1005)]
        counters = a.dev.counters()
        assert counters["group_peers_left"] >= 1 and counters["group_leave_rsts"] == 5
        assert counters["group"]["flows"] == 1                    # A-C only
    finally:
        for g in (a, c):
            g.close()


def test_a_device_reset_resets_the_peers_connections(pair):
    a, b = pair
    connect(a, b)
    connect(a, b, a_port=1001)
    a.drv.reset()
    pump(a, b)
    got = b.recv()
    assert sorted((h.op, h.src_cid, h.src_port) for h, _ in got) == [
        (Op.VIRTIO_VSOCK_OP_RST, A, 1000), (Op.VIRTIO_VSOCK_OP_RST, A, 1001)]
    # and with no driver, A answers B's packets with an RST, as if nobody listened
    b.send(Op.VIRTIO_VSOCK_OP_REQUEST, 2000, 1000, dst_cid=A)
    pump(a, b)
    assert [(h.op, h.src_cid) for h, _ in b.recv()] == [(Op.VIRTIO_VSOCK_OP_RST, A)]


def test_a_hostile_member_is_cut_off_and_counted(pair, gdir):
    """A local process says hello as CID 9 and sends a packet claiming to come from CID 10:
    dropped, counted, and its crossing closed; the members go on."""
    a, b = pair
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(gdir / f"{A}.sock"))
    s.send(group_mod.HELLO.pack(group_mod.HELLO_MAGIC, group_mod.HELLO_VERSION, 9))
    s.send(HDR.pack(10, A, 1, 2, 0, STREAM, Op.VIRTIO_VSOCK_OP_REQUEST, 0, 4096, 0))
    pump(a, b)
    assert a.recv() == []
    assert a.dev.counters()["group_bad_packets"] == 1
    assert s.recv(1) == b""                                        # closed on it
    s.close()
    for bad in (b"short", group_mod.HELLO.pack(b"nonsense", 1, 9),
                group_mod.HELLO.pack(group_mod.HELLO_MAGIC, 1, A)):         # our own CID
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(str(gdir / f"{A}.sock"))
        s.send(bad)
        pump(a, b)
        assert s.recv(1) == b""
        s.close()
    assert a.dev.counters()["group_bad_packets"] == 4
    connect(a, b)                                                  # the group still works


@pytest.mark.parametrize("bad", [
    dict(length=65537), dict(type=3), dict(op=0), dict(op=8), dict(dst_cid=B),
    dict(op=Op.VIRTIO_VSOCK_OP_REQUEST, length=10), dict(length=100, truncate=True)])
def test_a_members_bad_packets_are_refused(pair, gdir, bad):
    a, b = pair
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(gdir / f"{A}.sock"))
    s.send(group_mod.HELLO.pack(group_mod.HELLO_MAGIC, group_mod.HELLO_VERSION, 9))
    h = dict(src_cid=9, dst_cid=A, length=0, type=STREAM, op=Op.VIRTIO_VSOCK_OP_RW)
    truncate = bad.pop("truncate", False)
    h.update(bad)
    payload = b"x" * (0 if truncate else min(h["length"], 70000))
    s.send(HDR.pack(h["src_cid"], h["dst_cid"], 1, 2, h["length"], h["type"], h["op"], 0, 0, 0)
           + payload)
    pump(a, b)
    assert a.recv() == [] and a.dev.counters()["group_bad_packets"] == 1
    s.close()


def test_a_slow_receiver_throttles_the_sender_and_nothing_is_lost(gdir, monkeypatch):
    """B's guest posts no rx buffers and A's ignores credit: B stops reading at its limit,
    A keeps at most its limit and then leaves its guest's tx chains alone; once B's guest
    posts buffers, every byte arrives, in order."""
    monkeypatch.setattr(group_mod, "GROUP_RX_MAX_BYTES", 256 * 1024)
    monkeypatch.setattr(group_mod, "GROUP_TX_MAX_BYTES", 256 * 1024)
    a = Guest(cid=A, group=VsockGroup(gdir))
    b = Guest(cid=B, group=VsockGroup(gdir), rx_buffers=0)
    try:
        chunk = 65536
        stream = bytes((i * 7 + 3) & 0xFF for i in range(chunk * 80))      # 5 MiB
        for i in range(64):                                       # one batch crosses the limit
            a.send(Op.VIRTIO_VSOCK_OP_RW, 1000, 2000, stream[i * chunk:(i + 1) * chunk],
                   dst_cid=B, kick=False)
        a.txq.kick(force=True)
        pump(a, b)
        ga, gb = a.dev.group, b.dev.group
        assert ga.tx_blocked and a.dev.counters()["group_tx_throttled"] == 1
        assert b.dev.counters()["group_rx_paused"] == 1
        assert gb.counters()["rx_waiting_bytes"] <= 256 * 1024 + group_mod.GROUP_MSG_MAX
        # past the limit by at most the one tx batch that crossed it (here all 64 chains)
        assert ga.counters()["tx_waiting_bytes"] <= 256 * 1024 + 64 * (chunk + 44)
        assert len(a.tx_done()) == 64
        for i in range(64, 80):                                   # these wait in the ring
            a.send(Op.VIRTIO_VSOCK_OP_RW, 1000, 2000, stream[i * chunk:(i + 1) * chunk],
                   dst_cid=B, kick=False)
        a.txq.kick(force=True)
        pump(a, b)
        assert a.tx_done() == []
        received = bytearray()
        for _ in range(2000):
            for _ in range(64):
                b.add_rx()
            b.rxq.kick(force=True)
            pump(a, b)
            received += b"".join(p for _, p in b.recv(refill=False))
            if len(received) >= len(stream):
                break
        assert bytes(received) == stream
        assert not ga.tx_blocked and a.dev.counters()["tx_bytes"] == len(stream)
    finally:
        a.close()
        b.close()


def test_a_group_needs_the_standard_device(gdir):
    from pyvmm.vsock.wire import RFC2013
    with pytest.raises(ConfigError, match="standard device only"):
        Guest(cid=A, group=VsockGroup(gdir), wire=RFC2013)


def test_cli_group_option():
    from pyvmm.cli import parse_vsock
    cfg = parse_vsock("5,group=/tmp/g,uds=/tmp/v.sock")
    assert (cfg.guest_cid, cfg.group, cfg.uds_path) == (5, "/tmp/g", "/tmp/v.sock")
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="group= needs proto=virtio"):
        parse_vsock("5,group=/tmp/g,proto=rfc2013")


def test_leaving_the_group_removes_our_socket_and_frees_the_cid(gdir):
    g = Guest(cid=A, group=VsockGroup(gdir))
    assert (gdir / f"{A}.sock").exists()
    g.close()
    assert not (gdir / f"{A}.sock").exists()
    Guest(cid=A, group=VsockGroup(gdir)).close()                  # the CID is free again
