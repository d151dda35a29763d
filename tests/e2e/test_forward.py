"""End to end: unmodified TCP programs on both sides, carried over vsock by ``--forward``.

The shared guest (tests/e2e/conftest.py) is built with three forwards (``linux.forward_ports``);
nothing else in the session uses their ports.  In the guest, busybox's TCP programs (httpd, wget) talk to
``vsock-tcp-relay``, which maps a vsock port to a guest TCP port and back (the issue's
"vsock-forward"); on the host, plain TCP sockets::

    host TCP client -> forward listener (tcp:127.0.0.1:0) -> vsock 1501 -> relay -> httpd :8501
    guest wget -> relay :8502 -> vsock CID 2 port 2501 -> forward -> host TCP server
    guest vsock connect to CID 2 port 2502 -> forward -> a refused TCP port -> guest RST

Each guest program is started and stopped by the test that needs it.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading

import pytest

from harness import recv_all

pytestmark = pytest.mark.e2e

#: bytes each transfer carries (the lab runs Python ~30x slower than a host: kept small)
BLOB = 2 << 20
#: guest TCP ports of this file's guest-side programs
GUEST_HTTPD_PORT = 8501
GUEST_RELAY_PORT = 8502


def test_a_host_tcp_client_downloads_from_the_guests_httpd(linux):
    lo = linux.run("ip link set lo up")
    assert lo.status == 0, lo.explain()
    (_forward, addr), = linux.vm.vsock_forward.listening
    # nobody listens on the guest's vsock port yet: the host TCP client is reset
    with pytest.raises(ConnectionResetError):       # at connect or at the first read: a race
        with socket.create_connection(addr, timeout=60) as s:
            s.recv(1)
    made = linux.run(f"mkdir -p /tmp/fwd-www && head -c {BLOB} /dev/urandom > /tmp/fwd-www/blob"
                     " && sha256sum /tmp/fwd-www/blob")
    assert made.status == 0, made.explain()
    want = made.output.split()[0]
    relay, relay_pid, httpd_pid = linux.start_relayed_httpd(
        "/tmp/fwd-www", GUEST_HTTPD_PORT, linux.forward_ports.to_guest)
    try:
        with socket.create_connection(addr, timeout=120) as s:
            s.sendall(b"GET /blob HTTP/1.0\r\nHost: guest\r\n\r\n")
            s.shutdown(socket.SHUT_WR)              # half-close: the answer still comes
            reply = recv_all(s, BLOB + 4096)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
        assert len(body) == BLOB and hashlib.sha256(body).hexdigest() == want
    finally:
        linux.run(f"kill {relay_pid} {httpd_pid}")
    linux.wait_ended(relay, relay_pid)
    m = re.search(r"vsock-tcp-relay: done (\d+) (\d+) (\d+)", relay.output)
    assert m and int(m.group(1)) == 1 and int(m.group(3)) >= BLOB, relay.explain()


def test_a_guest_wget_downloads_from_a_host_tcp_server(linux):
    lo = linux.run("ip link set lo up")
    assert lo.status == 0, lo.explain()
    body = hashlib.sha256(b"pyvmm forward").digest() * (BLOB // 32)
    seen = {}

    def serve() -> None:
        server = linux.forward_server
        server.settimeout(120)
        try:
            conn, _ = server.accept()
        except OSError as e:
            seen["error"] = repr(e)
            return
        with conn:
            conn.settimeout(120)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            seen["request"] = request
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    thread = threading.Thread(target=serve, name="forward-host-server", daemon=True)
    thread.start()
    relay, relay_pid = linux.start_with_pid(
        f"vsock-tcp-relay --from-tcp 127.0.0.1:{GUEST_RELAY_PORT} "
        f"--to-vsock 2:{linux.forward_ports.to_host}")
    try:
        relay.wait_for(r"vsock-tcp-relay: listening", 60)
        got = linux.run(f"wget -q -O - http://127.0.0.1:{GUEST_RELAY_PORT}/blob | sha256sum",
                        timeout=300)
    finally:
        linux.run(f"kill {relay_pid}")
    thread.join(130)
    assert "error" not in seen, seen
    assert seen["request"].startswith(b"GET /blob HTTP/1."), seen
    assert got.status == 0 and got.output.split()[0] == hashlib.sha256(body).hexdigest(), got.explain()
    assert linux.wait_ended(relay, relay_pid) == 0, relay.explain()


def test_a_guest_connect_to_a_refused_tcp_address_is_reset(linux):
    port = linux.forward_ports.refused
    before = linux.vm.vsock_device.counters()["tcp_connect_failed"]
    client = linux.run(f"vsock-echo-client --cid 2 --port {port} --count 1 --timeout 5")
    assert client.status == 1, client.explain()
    assert re.search(rf"FAIL conn 0: connect 2:{port}: Connection reset by peer",
                     client.output), client.explain()
    assert linux.vm.vsock_device.counters()["tcp_connect_failed"] == before + 1
