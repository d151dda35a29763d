"""KVM level: TCP forwarding (``--forward``) against the freestanding guest's CPL3 vsock driver.

The same guest as tests/kvm/test_freestanding_vsock.py, with no Unix host end at all
(``uds=`` not given): the host ends are TCP sockets on 127.0.0.1 through the machine's
TCP forwarding backend, so this runs a real guest driver through it on any /dev/kvm,
PVM included (Linux guest programs through it: tests/e2e/test_forward.py, in the lab).
"""

from __future__ import annotations

import re
import socket
import threading

import pytest

import teststream
from harness import LiveGuest, recv_all
from pyvmm import images
from pyvmm.machine import ExitStatus, VsockConfig
from pyvmm.vsock.tcp import TcpToVsock, VsockToTcp

pytestmark = pytest.mark.kvm

PREFIX = "pyvmm-test-guest: "
BULK = 16 << 20


def test_a_tcp_client_reaches_the_guests_echo_server_through_a_forward():
    payload = teststream.stream(300_000)
    vsock = VsockConfig(3, forwards=[TcpToVsock("127.0.0.1", 0, 1234)])
    with LiveGuest(images.freestanding_guest(), cmdline="vsock-echo-server port=1234 conns=1",
                   timeout=120, vsock=vsock) as g:
        (_forward, addr), = g.vm.vsock_forward.listening
        g.wait_for(PREFIX + "vsock listening 1234")
        with socket.create_connection(addr, timeout=60) as s:
            threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)),
                             daemon=True).start()
            echoed = recv_all(s)
        run = g.finish(60)
    assert echoed == payload
    assert f"vsock echo done 1 {len(payload)}" in run.console, run.explain()
    assert run.result.status == ExitStatus.GUEST_RESET
    assert run.vsock["tcp_accepted"] == 1 and run.vsock["host_errors"] == 0, run.vsock


def test_a_guest_bulk_send_reaches_a_host_tcp_server_through_a_forward():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(60)
    got = {}

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(120)
            got["data"] = recv_all(conn, BULK + 1)

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    vsock = VsockConfig(3, forwards=[VsockToTcp(2001, "127.0.0.1", server.getsockname()[1])])
    try:
        with LiveGuest(images.freestanding_guest(), timeout=300, vsock=vsock,
                       cmdline=f"vsock-bulk-send port=2001 bytes={BULK} chunk=65536") as g:
            run = g.finish(300)
        t.join(60)
    finally:
        server.close()
    assert re.search(rf"vsock bulk sent {BULK} bytes fnv [0-9a-f]+", run.console), run.explain()
    assert got["data"] == teststream.stream(BULK), "guest->host bytes differ from the stream"
    assert (run.vsock["tcp_connects"], run.vsock["tcp_connect_failed"]) == (1, 0), run.vsock


def test_a_guest_connect_to_a_refused_tcp_address_is_reset():
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))                # bound, never listening: the connect is refused
    vsock = VsockConfig(3, forwards=[VsockToTcp(2002, "127.0.0.1", closed.getsockname()[1])])
    try:
        with LiveGuest(images.freestanding_guest(), timeout=120, vsock=vsock,
                       cmdline="vsock-echo-client port=2002 size=64 count=1") as g:
            run = g.finish(120)
    finally:
        closed.close()
    assert re.search(PREFIX + r"vsock connect to 2:2002 failed", run.console), run.explain()
    assert run.vsock["tcp_connect_failed"] == 1 and run.vsock["conns_refused"] == 1, run.vsock
