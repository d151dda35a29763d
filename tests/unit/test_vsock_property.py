"""Property tests: random interleavings of guest and host events, random chain
shapes.  Invariants: no byte lost, duplicated or reordered (STREAM), no message
merged or split (SEQPACKET), and the device never sends the guest more RW
payload than the guest's advertised window allows."""

from __future__ import annotations

import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm.vsock.wire import VirtioVsockSeqFlag
from vsock_guest import SEQPACKET, STREAM, Guest, Op, hdr

EOM = VirtioVsockSeqFlag.VIRTIO_VSOCK_SEQ_EOM
PORT, GPORT = 52, 7000
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def pattern(start: int, n: int) -> bytes:
    """Bytes that differ by position, so reordering or duplication shows."""
    return bytes((start + i) * 31 % 251 for i in range(n))


class Model:
    """The guest side of one connection, keeping the books a Linux guest keeps."""

    def __init__(self, g: Guest, vtype: int, guest_buf: int) -> None:
        self.g, self.vtype, self.guest_buf = g, vtype, guest_buf
        self.got = bytearray()              # RW payload received from the device
        self.consumed = 0                   # what the guest application read
        self.advertised = 0                 # fwd_cnt in the guest's latest packet
        self.dev_buf_alloc = self.dev_fwd = 0
        self.tx_cnt = 0                     # payload the guest sent
        self.messages: list[bytes] = []     # SEQPACKET: complete messages received
        self.partial = bytearray()

    def send(self, op, payload=b"", parts=None, flags=0):
        self.advertised = self.consumed
        self.g.send(op, GPORT, PORT, payload, parts=parts, type=self.vtype, flags=flags,
                    buf_alloc=self.guest_buf, fwd_cnt=self.consumed & 0xFFFF_FFFF)
        self.g.tx_done()

    def credit(self) -> int:
        return self.dev_buf_alloc - (self.tx_cnt - self.dev_fwd)

    def absorb(self) -> None:
        self.g.pump()
        for h, p in self.g.recv(refill=False):
            assert (h.src_port, h.dst_port, h.type) == (PORT, GPORT, self.vtype)
            assert h.op != Op.VIRTIO_VSOCK_OP_RST, "connection reset"
            self.dev_buf_alloc, self.dev_fwd = h.buf_alloc, h.fwd_cnt
            if h.op == Op.VIRTIO_VSOCK_OP_RW:
                # the credit rule, from the guest's books
                assert len(self.got) + h.len - self.advertised <= self.guest_buf
                self.got += p
                if self.vtype == SEQPACKET:
                    self.partial += p
                    if h.flags & EOM:
                        self.messages.append(bytes(self.partial))
                        self.partial.clear()
            elif h.op == Op.VIRTIO_VSOCK_OP_CREDIT_REQUEST:
                self.send(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE)

    def consume_all(self) -> None:
        if self.consumed != len(self.got):
            self.consumed = len(self.got)
            self.send(Op.VIRTIO_VSOCK_OP_CREDIT_UPDATE)


def open_connection(vtype: int, guest_buf: int):
    g = Guest(None, rx_buffers=0)
    lst = g.api.listen(PORT, vtype)
    m = Model(g, vtype, guest_buf)
    g.add_rx()
    m.send(Op.VIRTIO_VSOCK_OP_REQUEST)
    m.absorb()
    sock, _ = lst.accept(0)
    sock.setblocking(False)
    if vtype == STREAM:     # a small host socket buffer: guest bytes really wait in the device
        (conn,) = g.dev.muxer.connections.values()
        conn.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return g, m, sock


@SETTINGS
@given(st.data())
def test_stream_random_interleavings(data):
    guest_buf = data.draw(st.integers(1024, 70000), label="guest buf_alloc")
    g, m, sock = open_connection(STREAM, guest_buf)
    host_sent, host_got, guest_sent = bytearray(), bytearray(), bytearray()
    try:
        for _ in range(data.draw(st.integers(1, 30), label="steps")):
            action = data.draw(st.sampled_from(["host_send", "host_recv", "guest_send", "rx",
                                                "consume", "pump"]))
            if action == "host_send":
                chunk = pattern(len(host_sent), data.draw(st.integers(1, 4000)))
                try:
                    host_sent += chunk[:sock.send(chunk)]
                except BlockingIOError:
                    pass
            elif action == "host_recv":
                try:
                    host_got += sock.recv(1 << 20)
                except BlockingIOError:
                    pass
            elif action == "guest_send" and m.credit() > 0:
                n = data.draw(st.integers(1, min(m.credit(), 9000)))
                payload = pattern(len(guest_sent) + 100, n)
                raw_cuts = data.draw(st.lists(st.integers(1, 43), max_size=2))
                pay_cuts = data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3))
                raw = hdr(Op.VIRTIO_VSOCK_OP_RW, GPORT, PORT, length=n, buf_alloc=guest_buf,
                          fwd_cnt=m.consumed)
                whole = raw + payload
                cuts = sorted({*raw_cuts, *(44 + c for c in pay_cuts if c < n)})
                parts = [whole[a:b] for a, b in zip([0] + cuts, cuts + [len(whole)]) if b > a]
                m.advertised = m.consumed
                g.send_raw(parts)
                g.tx_done()
                m.tx_cnt += n
                guest_sent += payload
            elif action == "rx":
                layout = data.draw(st.sampled_from(["split", "single", "scattered"]))
                size = data.draw(st.integers(1, 8192))
                g.add_rx(layout, size)
                g.rxq.kick(force=True)
            elif action == "consume":
                m.consume_all()
            m.absorb()
        # drain: the guest keeps reading and refilling, the host keeps reading
        for _ in range(2000):
            if len(m.got) == len(host_sent) and len(host_got) == len(guest_sent):
                break
            for _ in range(4):
                g.add_rx("single", 4096)
            g.rxq.kick(force=True)
            m.absorb()
            m.consume_all()
            try:
                host_got += sock.recv(1 << 20)
            except BlockingIOError:
                pass
            m.absorb()
        assert bytes(m.got) == bytes(host_sent)
        assert bytes(host_got) == bytes(guest_sent)
        assert g.dev.counters()["credit_violations"] == 0
    finally:
        sock.close()
        g.close()


@SETTINGS
@given(st.data())
def test_seqpacket_random_messages(data):
    g, m, sock = open_connection(SEQPACKET, 256 * 1024)
    host_msgs, host_got, guest_msgs = [], [], []
    try:
        for _ in range(data.draw(st.integers(1, 12), label="steps")):
            action = data.draw(st.sampled_from(["host_send", "guest_send", "rx"]))
            if action == "host_send":
                msg = pattern(len(host_msgs), data.draw(st.integers(0, 9000)))
                try:
                    sock.send(msg)
                    host_msgs.append(msg)
                except BlockingIOError:
                    pass
            elif action == "guest_send":
                size = data.draw(st.integers(0, 20000))
                msg = pattern(len(guest_msgs) + 50, size)
                cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, size - 1)), max_size=3))))
                pieces = [msg[a:b] for a, b in zip([0] + cuts, cuts + [size]) if b > a] or [b""]
                for i, piece in enumerate(pieces):
                    m.send(Op.VIRTIO_VSOCK_OP_RW, piece, flags=EOM if i == len(pieces) - 1 else 0)
                    m.tx_cnt += len(piece)
                guest_msgs.append(msg)
            else:
                g.add_rx(data.draw(st.sampled_from(["split", "single", "scattered"])),
                         data.draw(st.integers(1, 5000)))
                g.rxq.kick(force=True)
            m.absorb()
            m.consume_all()
        for _ in range(500):
            if len(m.messages) == len(host_msgs):
                break
            g.add_rx("single", 4096)
            g.rxq.kick(force=True)
            m.absorb()
            m.consume_all()
        while True:
            try:
                host_got.append(sock.recv(1 << 17))
            except BlockingIOError:
                break
        assert m.messages == host_msgs
        assert host_got == guest_msgs
    finally:
        sock.close()
        g.close()


def test_pattern_detects_reordering():
    assert pattern(0, 300) != pattern(1, 300)
