"""The I/O thread and one vsock device: the blocking Python API, and resets
from a vCPU-like thread while the I/O thread runs (no deadlock).  The loop
thread itself, and devices sharing it: test_io_loop.py.

The test thread plays the vCPU (MMIO writes through the transport) and the
guest driver; it waits for the device's interrupt, never sleeps.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading

import pytest

from vsock_guest import Guest, Op


@pytest.fixture
def guest(tmp_path):
    g = Guest(str(tmp_path / "v.sock"))
    g.loop.start_thread()
    yield g
    g.close()


def test_blocking_connect(guest):
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(guest.api.connect, 80)
        (req, _), = guest.wait_packets()
        assert req.op == Op.VIRTIO_VSOCK_OP_REQUEST and req.dst_port == 80
        guest.send(Op.VIRTIO_VSOCK_OP_RESPONSE, 80, req.src_port)
        sock = fut.result(5)
    sock.sendall(b"over the thread")
    got = b""
    while len(got) < 15:
        got += b"".join(p for _, p in guest.wait_packets())
    assert got == b"over the thread"


def test_blocking_connect_refused(guest):
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(guest.api.connect, 81)
        (req, _), = guest.wait_packets()
        guest.send(Op.VIRTIO_VSOCK_OP_RST, 81, req.src_port)
        with pytest.raises(ConnectionRefusedError):
            fut.result(5)


def test_listener_accept_blocks_until_guest_connects(guest):
    with guest.api.listen(700) as lst:
        guest.send(Op.VIRTIO_VSOCK_OP_REQUEST, 6000, 700)
        sock, peer = lst.accept(timeout=5)
        assert peer[1] == 6000
        assert [h.op for h, _ in guest.wait_packets()] == [Op.VIRTIO_VSOCK_OP_RESPONSE]
        with pytest.raises(TimeoutError):
            lst.accept(timeout=0.05)


def test_reset_from_vcpu_thread_while_busy(guest, tmp_path):
    """The transport calls reset() under its lock; the I/O thread must finish
    and go quiet without ever needing that lock."""
    uds = str(tmp_path / "v.sock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(f"{uds}_1234")
    lst.listen()
    guest.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 1234)
    assert [h.op for h, _ in guest.wait_packets()] == [Op.VIRTIO_VSOCK_OP_RESPONSE]
    conn, _ = lst.accept()
    conn.setblocking(False)
    try:                                    # keep the I/O thread busy with host data
        while True:
            conn.send(b"x" * 65536)
    except BlockingIOError:
        pass
    done = threading.Event()
    t = threading.Thread(target=lambda: (guest.drv.reset(), done.set()))
    t.start()
    assert done.wait(10), "reset() deadlocked"
    t.join()
    assert guest.dev.counters()["connections"] == 0
    conn.settimeout(5)
    try:                                    # EOF, or ECONNRESET if our bytes were unread
        while conn.recv(65536):
            pass
    except ConnectionResetError:
        pass


def test_transport_reset_from_other_thread(guest):
    with guest.api.listen(9):
        guest.send(Op.VIRTIO_VSOCK_OP_REQUEST, 6000, 9)
        guest.wait_packets()
        guest.api.transport_reset()
    assert guest.events() == [0]
    assert guest.dev.counters()["connections"] == 0
