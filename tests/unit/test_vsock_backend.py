"""The seam between VsockDevice and its host ends (pyvmm.vsock.backend), with no Unix sockets.

A ``FakeBackend`` stands where the Unix socket and the Python API stand in a
machine: the device is given it, attaches it to its ``VsockHost``, starts and
stops it, and asks it for guest-initiated connections; the backend starts
host-initiated connections through that host alone.  Host ends are
``FakeStream`` objects, so every byte is visible.  The loop is pumped on the
test thread (vsock_guest.Guest).
"""

from __future__ import annotations

import pytest

from pyvmm.errors import ConfigError
from pyvmm.virtio.device import VirtioFeature, feature_mask
from pyvmm.vsock import VsockApi
from pyvmm.vsock.muxer import HOST_PORT_FIRST
from vsock_guest import SEQPACKET, STREAM, FakeStream, Guest, Op, ops


class FakeBackend:
    """A scripted VsockBackend: ``answer`` is what connect_guest does
    ("refuse", "decline" = not mine, or "accept" with a new FakeStream)."""

    def __init__(self, answer: str = "decline", *, fail_attach: bool = False) -> None:
        self.answer = answer
        self.fail_attach = fail_attach
        self.calls: list = []
        self.streams: list[FakeStream] = []
        self.host = None

    def attach(self, host) -> None:
        self.calls.append("attach")
        self.host = host
        if self.fail_attach:
            raise ConfigError("fake backend: resource busy")

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> None:
        self.calls.append("stop")

    def connect_guest(self, port, vtype, peer):
        self.calls.append(("connect_guest", port, vtype, peer))
        if self.answer == "refuse":
            raise ConnectionRefusedError("fake backend refuses")
        if self.answer == "decline":
            return None
        stream = FakeStream(seqpacket=vtype == SEQPACKET)
        self.streams.append(stream)
        return stream


def guest_with(*backends, **kw) -> Guest:
    return Guest(backends=list(backends), **kw)


def test_device_drives_the_backend_life_cycle():
    b = FakeBackend()
    g = guest_with(b)
    assert b.calls == ["attach", "start"]         # attach_loop, then start (Guest does both)
    g.dev.start()
    assert b.calls == ["attach", "start"], "start() is idempotent"
    g.dev.stop()
    g.close()
    assert b.calls == ["attach", "start", "stop", "stop"]    # stop(), then close() -> stop()


def test_a_backend_failing_to_attach_fails_the_device_and_the_others_are_stopped():
    first, second = FakeBackend(), FakeBackend(fail_attach=True)
    with pytest.raises(ConfigError, match="resource busy"):
        guest_with(first, second)
    assert first.calls == ["attach", "stop"]
    assert second.calls == ["attach", "stop"]     # stop() is safe after a failed attach


def test_backends_are_asked_in_order_until_one_takes_the_connection():
    declines, accepts, never = FakeBackend("decline"), FakeBackend("accept"), FakeBackend("refuse")
    g = guest_with(declines, accepts, never)
    g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 700)
    assert ops(g.take()) == [Op.VIRTIO_VSOCK_OP_RESPONSE]
    peer = (g.dev.guest_cid, 5000)
    assert declines.calls[-1] == ("connect_guest", 700, STREAM, peer)
    assert accepts.calls[-1] == ("connect_guest", 700, STREAM, peer)
    assert ("connect_guest", 700, STREAM, peer) not in never.calls
    g.send(Op.VIRTIO_VSOCK_OP_RW, 5000, 700, b"to the backend's stream")
    g.pump()
    (stream,) = accepts.streams
    assert bytes(stream.out) == b"to the backend's stream"
    g.close()


def test_a_refusing_backend_gets_the_guest_an_rst_and_later_backends_are_not_asked():
    refuses, accepts = FakeBackend("refuse"), FakeBackend("accept")
    g = guest_with(refuses, accepts)
    g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 701)
    assert ops(g.take()) == [Op.VIRTIO_VSOCK_OP_RST]
    assert not accepts.streams and not any(isinstance(c, tuple) for c in accepts.calls)
    assert g.dev.counters()["conns_refused"] == 1
    g.close()


def test_no_backend_taking_it_is_an_rst():
    g = guest_with(FakeBackend("decline"))
    g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 702)
    assert ops(g.take()) == [Op.VIRTIO_VSOCK_OP_RST]
    g.close()


def test_backend_starts_a_host_connection_through_the_host():
    b = FakeBackend()
    g = guest_with(b)
    stream = FakeStream()
    outcome = []
    assert b.host.connect_host(1234, STREAM, stream, preamble=lambda p: f"hello {p}\n".encode(),
                               on_connect=outcome.append)
    (req, _), = g.take()
    assert (req.op, req.dst_port, req.src_port) == (Op.VIRTIO_VSOCK_OP_REQUEST, 1234, HOST_PORT_FIRST)
    assert outcome == [] and not stream.out                  # nothing before the guest answers
    g.send(Op.VIRTIO_VSOCK_OP_RESPONSE, 1234, req.src_port)
    g.pump()
    assert outcome == [True]
    assert bytes(stream.out) == f"hello {HOST_PORT_FIRST}\n".encode()
    assert b.host.counters()["host_connects"] == 1
    g.close()


def test_host_connect_that_cannot_start_says_so():
    """SEQPACKET the driver did not negotiate: False, and the stream stays the caller's."""
    b = FakeBackend()
    g = guest_with(b, features=feature_mask(VirtioFeature.VIRTIO_F_VERSION_1))
    stream = FakeStream(seqpacket=True)
    assert not b.host.connect_host(1234, SEQPACKET, stream)
    assert g.take() == [] and not stream.closed
    g.close()


def test_host_loop_calls_run_on_the_loop_with_its_clock():
    b = FakeBackend()
    g = guest_with(b)
    fired = []
    b.host.call_later(2.0, fired.append, "timer")
    b.host.call_soon_threadsafe(fired.append, "soon")
    g.pump()
    assert fired == ["soon"]
    g.advance(2.0)
    assert fired == ["soon", "timer"]
    assert not b.host.may_block()          # no loop thread: waiting for the loop would hang
    g.close()


def test_host_transport_reset_reaches_the_guest():
    b = FakeBackend("accept")
    g = guest_with(b)
    g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 703)
    g.take()
    b.host.transport_reset()
    assert g.events() == [0]
    assert b.host.counters()["connections"] == 0 and b.streams[0].closed
    g.close()


def test_api_not_given_to_a_device_says_so():
    api = VsockApi()
    with pytest.raises(RuntimeError, match="not attached"):
        api.connect_async(1234)
    with pytest.raises(RuntimeError, match="not attached"):
        api.counters()
