"""Bounds a hostile guest or host peer must not be able to break (issue: hostile guests,
hostile host peers and faults).  Each test is a regression test for a bug found by fuzzing
or by trying pyvmm as a new user would."""

from __future__ import annotations

import errno
import resource
import socket

import pytest

from fdlimit import descriptors_exhausted, run_in_child
from pyvmm.vsock.unix import ACCEPT_RETRY
from test_vsock_backend import FakeBackend, guest_with
from vsock_guest import Guest, Op


def test_request_rst_loop_without_rx_buffers_keeps_the_rx_line_bounded():
    """A guest looping REQUEST + RST to a host service while posting no rx buffers: every
    REQUEST makes the connection owe a RESPONSE (its key joins the rx line), the RST removes
    it before any rx buffer could be filled.  The line of keys must not grow with the loop."""
    g = guest_with(FakeBackend("accept"), rx_buffers=0)
    try:
        for _ in range(5000):
            g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 700)
            g.send(Op.VIRTIO_VSOCK_OP_RST, 5000, 700)
            g.tx_done()                                 # the driver takes its tx buffers back
        muxer = g.dev.muxer
        assert not muxer.connections
        assert sum(len(q) for q in muxer._rxq) <= 64, [len(q) for q in muxer._rxq]
    finally:
        g.close()


def test_host_port_allocation_never_reuses_a_guest_initiated_connections_key():
    """A guest connection to host port 2**30 (the first port host-initiated connections get)
    and a host connection to the same guest port must not share the key (2**30, port): the
    first would be replaced silently and its host socket leak, still registered."""
    from pyvmm.vsock.muxer import HOST_PORT_FIRST
    from vsock_guest import FakeStream, STREAM
    backend = FakeBackend("accept")
    g = guest_with(backend)
    try:
        g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 1234, HOST_PORT_FIRST)
        assert [h.op for h, _ in g.take()] == [Op.VIRTIO_VSOCK_OP_RESPONSE]
        guest_conn = g.dev.muxer.connections[(HOST_PORT_FIRST, 1234)]
        host_conn = g.dev.muxer.connect_host(1234, STREAM, FakeStream())
        assert host_conn is not None and host_conn.key != guest_conn.key
        assert g.dev.muxer.connections[guest_conn.key] is guest_conn
        assert g.dev.muxer.connections[host_conn.key] is host_conn
        (req, _), = g.take()
        assert (req.op, req.src_port) == (Op.VIRTIO_VSOCK_OP_REQUEST, host_conn.local_port)
    finally:
        g.close()


def test_header_only_rx_buffer_while_data_is_owed_does_not_spin(uds):
    """A connection owes the guest data and the only rx buffer posted is header-only
    (44 bytes): the device must go idle (waiting for a buffer with room), not
    reschedule its rx pass forever; a buffer with room then gets the data."""
    g = Guest(uds, rx_buffers=0)
    try:
        listener = g.api.listen(700)
        g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 700)
        g.add_rx(layout="single", payload=0)            # header only: room for the RESPONSE
        g.rxq.kick(force=True)
        g.pump()
        assert [h.op for h, _ in g.recv(refill=False)] == [Op.VIRTIO_VSOCK_OP_RESPONSE]
        sock, _ = listener.accept(timeout=0)
        sock.sendall(b"data the guest cannot take yet")
        g.add_rx(layout="single", payload=0)            # again header only, and nothing else
        g.rxq.kick(force=True)
        busy = [g.loop.run_once(0) for _ in range(50)]
        assert busy[-10:] == [0] * 10, busy              # idle, not spinning
        assert g.recv(refill=False) == []
        g.add_rx()                                      # a buffer with room: the data goes
        g.rxq.kick(force=True)
        g.pump()
        assert [(h.op, data) for h, data in g.recv(refill=False)] == [
            (Op.VIRTIO_VSOCK_OP_RW, b"data the guest cannot take yet")]
        sock.close()
        listener.close()
    finally:
        g.close()


class _OutOfFds(FakeBackend):
    def connect_guest(self, port, vtype, peer):
        raise OSError(errno.EMFILE, "Too many open files")


def test_a_host_end_out_of_fds_refuses_the_guest_and_the_device_keeps_working():
    """At the fd limit a host end cannot open the socket for a guest REQUEST: that is an
    RST for the guest and a counted host error, not an exception out of the tx path
    (which would leave the chain in flight and the device in DEVICE_NEEDS_RESET)."""
    g = guest_with(_OutOfFds())
    try:
        g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 700)
        assert [h.op for h, _ in g.take()] == [Op.VIRTIO_VSOCK_OP_RST]
        assert len(g.tx_done()) == 1                    # the chain came back
        c = g.dev.counters()
        assert c["host_errors"] == 1
        assert "host end could not take a guest connection" in c["host_errors_by_reason"]
        assert g.transport.device_errors == {} and not g.transport._needs_reset
    finally:
        g.close()


def test_accept_at_the_fd_limit_pauses_the_listener_instead_of_spinning(uds):
    """EMFILE on accept() leaves the peer pending and the listener readable: the listener
    pauses for ACCEPT_RETRY (the loop goes idle) and serves the peer once fds are free
    (in a child interpreter: tests/unit/fdlimit.py says why)."""
    run_in_child(accept_at_the_fd_limit, uds)


def accept_at_the_fd_limit(uds: str) -> None:
    g = Guest(uds)
    client = socket.socket(socket.AF_UNIX)
    try:
        with descriptors_exhausted() as free:
            client.connect(uds)                         # queued in the listener's backlog
            busy = [g.loop.run_once(0) for _ in range(30)]
            assert busy[-10:] == [0] * 10, busy          # paused, not spinning
            assert ("accept on the vsock uds listener failed"
                    in g.dev.counters()["host_errors_by_reason"])
            free()
            g.advance(ACCEPT_RETRY)                     # the listener resumes and accepts
            assert g.dev.counters()["unix_accepted"] == 1, g.dev.counters()
    finally:
        client.close()
        g.close()


def test_two_thousand_silent_peers_do_not_lock_out_a_well_behaved_client(uds):
    """2,000 Unix connections that never send their CONNECT line, held open: a client that
    does send it is still served at once (the oldest silent ones are closed to make room),
    and pyvmm never holds more than MAX_HANDSHAKES of them."""
    from pyvmm.vsock.unix import MAX_HANDSHAKES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2000 + MAX_HANDSHAKES + 256
    if soft < want:
        if hard < want:
            pytest.skip(f"needs {want} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    g = Guest(uds)
    silent = []
    try:
        for _ in range(2000):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(uds)
            except BlockingIOError:                     # the listen backlog is full: let pyvmm accept
                g.pump()
                s.setblocking(True)
                s.connect(uds)
            silent.append(s)
            if len(silent) % 64 == 0:
                g.pump()
        g.pump()
        assert len(g.unix._handshakes) <= MAX_HANDSHAKES
        good = socket.socket(socket.AF_UNIX)
        good.connect(uds)
        good.sendall(b"CONNECT 1234\n")
        g.pump()
        reqs = [h for h, _ in g.recv() if h.op == Op.VIRTIO_VSOCK_OP_REQUEST]
        assert [h.dst_port for h in reqs] == [1234]
        assert g.dev.counters()["unix_handshake_errors"] >= 2000 - MAX_HANDSHAKES
        good.close()
    finally:
        for s in silent:
            s.close()
        g.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_burst_of_ten_thousand_connects_stays_bounded_and_drains(uds):
    """10,000 host peers each send a CONNECT line and hang up at once, faster than the guest
    answers: pyvmm never holds more than MAX_CONNECTIONS connections or MAX_HANDSHAKES
    handshakes, what the guest never answered expires, and a well-behaved client afterwards
    is served as usual."""
    from pyvmm.vsock.connection import CONN_REQUEST_TIMEOUT
    from pyvmm.vsock.muxer import MAX_CONNECTIONS
    from pyvmm.vsock.unix import MAX_HANDSHAKES
    g = Guest(uds, rx_buffers=0)                        # the guest answers nothing for now
    peak = 0
    try:
        for i in range(10_000):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(uds)
                s.send(b"CONNECT 1234\n")
            except (BlockingIOError, ConnectionRefusedError):
                pass                                    # the listen backlog is full: that peer gives up
            s.close()
            if i % 100 == 99:
                g.pump()
                peak = max(peak, len(g.dev.muxer.connections))
                assert len(g.unix._handshakes) <= MAX_HANDSHAKES
        g.pump()
        assert peak <= MAX_CONNECTIONS
        g.advance(CONN_REQUEST_TIMEOUT + 0.1)           # the REQUESTs never went out: forgotten
        g.pump()
        assert len(g.dev.muxer.connections) == 0, len(g.dev.muxer.connections)
        for _ in range(8):
            g.add_rx()
        g.rxq.kick(force=True)
        good = socket.socket(socket.AF_UNIX)
        good.connect(uds)
        good.sendall(b"CONNECT 1234\n")
        g.pump()
        reqs = [h for h, _ in g.recv() if h.op == Op.VIRTIO_VSOCK_OP_REQUEST]
        assert [h.dst_port for h in reqs] == [1234]
        good.close()
    finally:
        g.close()
