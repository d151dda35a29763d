"""TCP forwarding (pyvmm.vsock.tcp, ``pyvmm run --forward``) against the mock guest driver.

Real TCP sockets on 127.0.0.1 at one end, the vsock device played by
vsock_guest.Guest at the other: data both ways, half-close, the guest's refusal, a
refused or silent TCP address, the listener's pause at its limits, bind failures, the
option's syntax, and the order of the machine's backends.  The loop runs on the test
thread; where the kernel completes a TCP connect asynchronously, :func:`pump_until`
waits on the loop's own epoll (bounded), never a sleep.
"""

from __future__ import annotations

import socket
import time

import pytest

from fdlimit import descriptors_exhausted, run_in_child
from pyvmm import cli
from pyvmm.errors import ConfigError
from pyvmm.vsock import default_backends
from pyvmm.vsock.tcp import (FORWARD_CONNECT_TIMEOUT, TcpForwardBackend, TcpToVsock, VsockToTcp,
                             parse_forward)
from pyvmm.vsock.unix import ACCEPT_RETRY
from pyvmm.vsock.wire import RCV, SEND
from test_cli import assert_one_line_error, pyvmm
from vsock_guest import SEQPACKET, Guest, Op, ops


def forward_guest(*forwards, uds=None, **kw) -> tuple[Guest, TcpForwardBackend]:
    """A probed guest whose device has the machine's backends with these forwards."""
    api, backends = default_backends(uds, forwards)
    g = Guest(backends=backends, **kw)
    g.api = api
    fwd = next(b for b in backends if isinstance(b, TcpForwardBackend))
    return g, fwd


def pump_until(g: Guest, want, timeout: float = 5.0) -> list:
    """Run the loop (blocking in its epoll, at most ``timeout`` s in all) until the guest
    has received packets for which ``want(packets)`` is true; returns them all."""
    got = []
    deadline = time.monotonic() + timeout
    while not want(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not seen in {timeout} s; packets so far: "
                                 f"{[(h.op, h.src_port, h.dst_port) for h, _ in got]}")
        g.loop.run_once(min(left, 0.2))
        g.pump()
        got += g.recv()
    return got


def has_op(op):
    return lambda pkts: any(h.op == op for h, _ in pkts)


def client_to(fwd: TcpForwardBackend, index: int = 0) -> socket.socket:
    _forward, addr = fwd.listening[index]
    s = socket.create_connection(addr, timeout=5)
    return s


def tcp_server() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(5)
    return srv


# -- the option --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("tcp:8080=vsock:80", TcpToVsock("127.0.0.1", 8080, 80)),
    ("tcp:0=vsock:80", TcpToVsock("127.0.0.1", 0, 80)),
    ("tcp:0.0.0.0:22=vsock:22", TcpToVsock("0.0.0.0", 22, 22)),
    ("tcp:[::1]:8080=vsock:4294967294", TcpToVsock("::1", 8080, 0xFFFF_FFFE)),
    ("vsock:5000=tcp:127.0.0.1:80", VsockToTcp(5000, "127.0.0.1", 80)),
    ("vsock:5000=tcp:localhost:80", VsockToTcp(5000, "localhost", 80)),
    ("vsock:5000=tcp:[::1]:80", VsockToTcp(5000, "::1", 80)),
])
def test_parse_forward(text, want):
    assert parse_forward(text) == want
    assert parse_forward(str(want)) == want         # str() is the option again


@pytest.mark.parametrize("text,message", [
    ("tcp:8080", "expected tcp:"),
    ("udp:53=vsock:53", "expected tcp:"),
    ("tcp:8080=tcp:80", "expected tcp:"),
    ("tcp:65536=vsock:80", "TCP port '65536'"),
    ("tcp:8080=vsock:4294967295", "VMADDR_PORT_ANY"),
    ("tcp:8080=vsock:4294967296", "vsock port"),
    ("tcp:localhost:8080=vsock:80", "not an IP address"),
    ("tcp:::1:8080=vsock:80", "expected tcp:"),
    ("tcp:[127.0.0.1]:8080=vsock:80", "brackets are for IPv6"),
    ("vsock:5000=tcp:127.0.0.1", "expected tcp:"),
    ("vsock:5000=tcp:127.0.0.1:0", "TCP port 0 cannot be connected to"),
    ("vsock:-1=tcp:127.0.0.1:80", "vsock port"),
])
def test_bad_forwards_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError) as e:
        parse_forward(text)
    assert message in str(e.value)


@pytest.mark.parametrize("args,message", [
    (["--vsock", "3", "--forward", "tcp:8080"], "invalid --forward 'tcp:8080'"),
    (["--vsock", "3", "--forward", "tcp:99999=vsock:80"], "TCP port '99999'"),
    (["--forward", "tcp:8080=vsock:80"], "--forward needs a vsock device"),
])
def test_forward_option_errors_are_one_line_and_exit_2(args, message):
    proc = pyvmm("run", "--kernel", "/nonexistent", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr    # after argparse's usage


def test_forward_option_is_repeatable():
    args = cli.build_parser().parse_args(["run", "--vsock", "3", "--forward", "tcp:0=vsock:80",
                                          "--forward", "vsock:7=tcp:127.0.0.1:9"])
    assert args.forward == [TcpToVsock("127.0.0.1", 0, 80), VsockToTcp(7, "127.0.0.1", 9)]


def test_a_vsock_port_forwarded_twice_is_a_config_error():
    with pytest.raises(ConfigError, match="forwarded twice"):
        TcpForwardBackend([VsockToTcp(7, "127.0.0.1", 9), VsockToTcp(7, "127.0.0.1", 10)])


# -- binding ---------------------------------------------------------------------------------

def test_a_port_in_use_is_a_config_error_at_attach():
    other = tcp_server()
    try:
        port = other.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on TCP 127.0.0.1 port {port}"):
            forward_guest(TcpToVsock("127.0.0.1", port, 80))
        other.settimeout(0)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()     # still theirs
    finally:
        other.close()


def test_an_unresolvable_target_is_a_config_error_at_attach():
    with pytest.raises(ConfigError, match="cannot resolve"):
        forward_guest(VsockToTcp(7, "no-such-host.invalid", 80))


@pytest.mark.kvm
def test_a_port_in_use_is_one_line_and_exit_2_from_the_cli(tmp_path):
    from test_boot import make_elf
    elf = tmp_path / "guest.elf"
    elf.write_bytes(make_elf([(0x100000, b"\xf4", 1)], 0x100000, pvh_entry=0x100000))
    other = tcp_server()
    try:
        port = other.getsockname()[1]
        assert_one_line_error(pyvmm("run", "--kernel", str(elf), "--vsock", "3",
                                    "--forward", f"tcp:{port}=vsock:80"),
                              f"cannot listen on TCP 127.0.0.1 port {port}")
    finally:
        other.close()


def test_port_0_binds_a_free_port_and_says_which():
    g, fwd = forward_guest(TcpToVsock("127.0.0.1", 0, 80))
    try:
        (forward, (addr, port)), = fwd.listening
        assert addr == "127.0.0.1" and port > 0
    finally:
        g.close()


# -- host TCP client -> guest ------------------------------------------------------------------

def accept_in_guest(g: Guest, client: socket.socket, guest_port: int = 80):
    """The guest takes the REQUEST the client's connection made; returns its header."""
    pkts = pump_until(g, has_op(Op.VIRTIO_VSOCK_OP_REQUEST))
    (req,) = [h for h, _ in pkts if h.op == Op.VIRTIO_VSOCK_OP_REQUEST]
    assert req.dst_port == guest_port
    g.send(Op.VIRTIO_VSOCK_OP_RESPONSE, guest_port, req.src_port)
    g.pump()
    return req


def test_a_tcp_client_reaches_the_guest_port_both_ways_with_half_close():
    g, fwd = forward_guest(TcpToVsock("127.0.0.1", 0, 80))
    client = client_to(fwd)
    try:
        req = accept_in_guest(g, client)
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        pkts = pump_until(g, has_op(Op.VIRTIO_VSOCK_OP_RW))
        assert b"".join(p for h, p in pkts if h.op == Op.VIRTIO_VSOCK_OP_RW) == b"GET / HTTP/1.0\r\n\r\n"
        client.shutdown(socket.SHUT_WR)                     # the client is done sending
        pkts = pump_until(g, has_op(Op.VIRTIO_VSOCK_OP_SHUTDOWN))
        (shut,) = [h for h, _ in pkts if h.op == Op.VIRTIO_VSOCK_OP_SHUTDOWN]
        assert shut.flags & SEND
        body = b"HTTP/1.0 200 OK\r\n\r\n" + bytes(range(256)) * 64
        g.send(Op.VIRTIO_VSOCK_OP_RW, 80, req.src_port, body)   # the guest still answers
        g.send(Op.VIRTIO_VSOCK_OP_SHUTDOWN, 80, req.src_port, flags=RCV | SEND)
        g.pump()
        got = bytearray()
        while chunk := client.recv(65536):
            got += chunk
        assert bytes(got) == body
        assert g.dev.counters()["tcp_accepted"] == 1
    finally:
        client.close()
        g.close()


def test_a_guest_refusal_resets_the_tcp_client():
    g, fwd = forward_guest(TcpToVsock("127.0.0.1", 0, 81))
    client = client_to(fwd)
    try:
        pkts = pump_until(g, has_op(Op.VIRTIO_VSOCK_OP_REQUEST))
        req = pkts[0][0]
        g.send(Op.VIRTIO_VSOCK_OP_RST, 81, req.src_port)    # nobody listens on 81 in the guest
        g.pump()
        with pytest.raises(ConnectionResetError):
            client.recv(10)
        assert fwd.live == 0
    finally:
        client.close()
        g.close()


def test_the_listener_pauses_at_its_connection_limit_and_resumes_when_one_ends():
    g, fwd = forward_guest(TcpToVsock("127.0.0.1", 0, 80))
    fwd.max_connections = 2
    clients = []
    try:
        for _ in range(3):
            clients.append(client_to(fwd))               # the kernel completes all three
        pkts = pump_until(g, lambda p: len(ops(p)) >= 2)
        g.pump()
        pkts += g.recv()
        reqs = [h for h, _ in pkts if h.op == Op.VIRTIO_VSOCK_OP_REQUEST]
        assert len(reqs) == 2                            # the third waits in the backlog
        assert fwd.live == 2 and g.dev.counters()["tcp_listener_paused"] == 1
        busy = [g.loop.run_once(0) for _ in range(20)]
        assert busy[-10:] == [0] * 10, busy              # paused, not spinning
        g.send(Op.VIRTIO_VSOCK_OP_RST, 80, reqs[0].src_port)     # one ends
        pkts = pump_until(g, has_op(Op.VIRTIO_VSOCK_OP_REQUEST))
        assert len([h for h, _ in pkts if h.op == Op.VIRTIO_VSOCK_OP_REQUEST]) == 1
        assert g.dev.counters()["tcp_accepted"] == 3
    finally:
        for c in clients:
            c.close()
        g.close()


def test_a_full_connection_table_resets_the_client_and_pauses_the_listener():
    g, fwd = forward_guest(TcpToVsock("127.0.0.1", 0, 80), max_connections=1)
    first = client_to(fwd)
    second = client_to(fwd)
    try:
        pump_until(g, has_op(Op.VIRTIO_VSOCK_OP_REQUEST))
        with pytest.raises(ConnectionResetError):       # no room in the device's table
            second.recv(10)
        c = g.dev.counters()
        assert c["tcp_listener_paused"] == 1 and fwd.live == 1
        assert "--forward TCP client reset: the vsock connection table is full" in c["host_errors_by_reason"]
        third = client_to(fwd)
        g.pump()
        assert g.dev.counters()["tcp_accepted"] == 2     # paused: the third is not taken yet
        g.advance(ACCEPT_RETRY)                         # resumes; the table is still full
        assert g.dev.counters()["tcp_accepted"] == 3
        third.close()
    finally:
        first.close()
        second.close()
        g.close()


def test_tcp_accept_at_the_fd_limit_pauses_the_listener_instead_of_spinning():
    """EMFILE on accept() leaves the client queued and the listener readable: it pauses
    for ACCEPT_RETRY (the loop goes idle) and serves the client once fds are free (in a
    child interpreter: tests/unit/fdlimit.py says why)."""
    run_in_child(tcp_accept_at_the_fd_limit)


def tcp_accept_at_the_fd_limit() -> None:
    g, fwd = forward_guest(TcpToVsock("127.0.0.1", 0, 80))
    client = socket.socket()
    try:
        with descriptors_exhausted() as free:
            client.connect(fwd.listening[0][1])         # completed by the kernel, queued
            busy = [g.loop.run_once(0) for _ in range(30)]
            assert busy[-10:] == [0] * 10, busy          # paused, not spinning
            assert ("accept on a --forward TCP listener failed"
                    in g.dev.counters()["host_errors_by_reason"])
            free()
            g.advance(ACCEPT_RETRY)
            assert g.dev.counters()["tcp_accepted"] == 1, g.dev.counters()
    finally:
        client.close()
        g.close()


# -- guest -> host TCP server ------------------------------------------------------------------

def test_a_guest_connection_reaches_a_host_tcp_server_both_ways_with_half_close():
    srv = tcp_server()
    g, fwd = forward_guest(VsockToTcp(5000, "127.0.0.1", srv.getsockname()[1]))
    try:
        g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 1234, 5000)
        pkts = pump_until(g, has_op(Op.VIRTIO_VSOCK_OP_RESPONSE))
        assert ops(pkts) == [Op.VIRTIO_VSOCK_OP_RESPONSE]
        conn, _ = srv.accept()
        conn.settimeout(5)
        data = bytes(range(256)) * 200                   # 51,200 bytes: several guest packets
        for i in range(0, len(data), 4096):
            g.send(Op.VIRTIO_VSOCK_OP_RW, 1234, 5000, data[i:i + 4096])
        g.send(Op.VIRTIO_VSOCK_OP_SHUTDOWN, 1234, 5000, flags=SEND)   # the guest is done sending
        g.pump()
        got = bytearray()
        while chunk := conn.recv(65536):
            got += chunk
        assert bytes(got) == data                        # ... and the server saw the EOF
        conn.sendall(b"reply after the guest's half-close")
        pkts = pump_until(g, has_op(Op.VIRTIO_VSOCK_OP_RW))
        assert b"".join(p for h, p in pkts if h.op == Op.VIRTIO_VSOCK_OP_RW) == \
            b"reply after the guest's half-close"
        c = g.dev.counters()
        assert (c["tcp_connects"], c["tcp_connect_failed"]) == (1, 0)
        conn.close()
    finally:
        srv.close()
        g.close()


def test_a_refused_tcp_address_is_an_rst_for_the_guest():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))                        # bound, never listening: refused
    g, fwd = forward_guest(VsockToTcp(5000, "127.0.0.1", closed.getsockname()[1]))
    try:
        g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 1234, 5000)
        pkts = pump_until(g, has_op(Op.VIRTIO_VSOCK_OP_RST))
        assert [(h.op, h.src_port, h.dst_port) for h, _ in pkts] == [(Op.VIRTIO_VSOCK_OP_RST, 5000, 1234)]
        c = g.dev.counters()
        assert c["tcp_connect_failed"] == 1 and c["conns_refused"] == 1 and c["connections"] == 0
        assert "--forward connect to a host TCP address failed (guest RST)" in c["host_errors_by_reason"]
    finally:
        closed.close()
        g.close()


def test_a_silent_tcp_address_is_an_rst_after_the_connect_timeout():
    """A listener whose accept queue is full drops further SYNs: the connect stays in
    progress until FORWARD_CONNECT_TIMEOUT (the loop's fake clock), then the guest gets
    an RST and the half-open socket is gone."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname(), timeout=5)   # the queue's one place
    g, fwd = forward_guest(VsockToTcp(5000, "127.0.0.1", full.getsockname()[1]))
    try:
        g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 1234, 5000)
        g.pump()
        assert g.recv() == [] and g.dev.counters()["connections"] == 1     # the RESPONSE waits
        g.advance(FORWARD_CONNECT_TIMEOUT)
        assert ops(g.recv()) == [Op.VIRTIO_VSOCK_OP_RST]
        c = g.dev.counters()
        assert c["tcp_connect_failed"] == 1 and c["connections"] == 0 and not fwd._pending
    finally:
        filler.close()
        full.close()
        g.close()


def test_a_guest_giving_up_while_tcp_connects_leaves_nothing_behind():
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname(), timeout=5)
    g, fwd = forward_guest(VsockToTcp(5000, "127.0.0.1", full.getsockname()[1]))
    try:
        g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 1234, 5000)
        g.pump()
        assert fwd._pending
        g.send(Op.VIRTIO_VSOCK_OP_RST, 1234, 5000)         # the guest's connect timed out
        g.pump()
        assert not fwd._pending and g.dev.counters()["connections"] == 0
        g.advance(FORWARD_CONNECT_TIMEOUT)              # the timer was cancelled: nothing more
        assert g.recv() == [] and g.dev.counters()["tcp_connect_failed"] == 0
    finally:
        filler.close()
        full.close()
        g.close()


def test_seqpacket_to_a_forwarded_port_is_refused():
    srv = tcp_server()
    g, fwd = forward_guest(VsockToTcp(5000, "127.0.0.1", srv.getsockname()[1]))
    try:
        g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 1234, 5000, type=SEQPACKET)
        assert [(h.op, h.type) for h, _ in g.take()] == [(Op.VIRTIO_VSOCK_OP_RST, SEQPACKET)]
    finally:
        srv.close()
        g.close()


# -- the order of the machine's backends ---------------------------------------------------

def test_python_listeners_then_forwards_then_the_unix_convention(uds):
    """A guest connect to a port that all three serve goes to the Python listener; once it
    closes, to the forward; a port only <uds>_<port> serves still reaches it."""
    srv = tcp_server()
    g, fwd = forward_guest(VsockToTcp(80, "127.0.0.1", srv.getsockname()[1]), uds=uds)
    unix_80 = socket.socket(socket.AF_UNIX)
    unix_80.bind(f"{uds}_80")
    unix_80.listen()
    unix_80.setblocking(False)
    unix_81 = socket.socket(socket.AF_UNIX)
    unix_81.bind(f"{uds}_81")
    unix_81.listen()
    try:
        with g.api.listen(80) as py:
            g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 80)
            assert ops(g.take()) == [Op.VIRTIO_VSOCK_OP_RESPONSE]
            py.accept(timeout=1)[0].close()
        g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5001, 80)
        pkts = pump_until(g, has_op(Op.VIRTIO_VSOCK_OP_RESPONSE))
        assert [(h.op, h.dst_port) for h, _ in pkts if h.dst_port == 5001] == [
            (Op.VIRTIO_VSOCK_OP_RESPONSE, 5001)]         # (5000's SHUTDOWN may come too)
        srv.accept()[0].close()                          # the forward's server got it
        with pytest.raises(BlockingIOError):
            unix_80.accept()                             # not the Unix convention
        g.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5002, 81)
        assert [(h.op, h.src_port) for h, _ in g.take() if h.dst_port == 5002] == [
            (Op.VIRTIO_VSOCK_OP_RESPONSE, 81)]
        unix_81.accept()[0].close()
    finally:
        for s in (srv, unix_80, unix_81):
            s.close()
        g.close()
