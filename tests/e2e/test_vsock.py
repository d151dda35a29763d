"""End to end: host programs and a Linux guest's programs talk over pyvmm's vsock device.

The tests share one guest (tests/e2e/conftest.py: CID 3, the Firecracker-style
Unix socket ``linux.uds``), but nothing else: each starts the guest-side program
it needs on the guest's console, on a port of its own, and reads back only that
program's output and exit status; host-side listeners are made by the test that
uses them.  Any one of them runs alone, and in any order.

    host-initiated (CONNECT <port> on the Unix socket, or the Python API):
      1301 STREAM echo, 64 concurrent Unix connections   1302 socat   1303 vm.vsock.connect
      1304 SEQPACKET echo over <uds>.seqpacket, message boundaries checked
      1305 16 MiB host -> guest, SHA-256 on both ends
      4444 no listener: the Unix connection is closed; the API raises
    guest-initiated (to CID 2: <uds>_<port>, or a Python listener):
      2000 STREAM echo, 64 concurrent      2003 SEQPACKET echo (SOCK_SEQPACKET)
      2004 vm.vsock.listen echo            2001 16 MiB guest -> host, SHA-256
      2999 nobody: the guest gets a reset

After each test the device's counters must show no protocol violation by this
well-behaved guest (the ``no_protocol_violations`` fixture).
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from harness import UnixServer, connect_unix, echo_records, echo_stream, record_figure, recv_all

pytestmark = pytest.mark.e2e

BULK = 16 << 20
ECHO_CONNS = 64
SEQ_SIZES = [1, 100, 4096, 4097, 30000, 65536]

class Sink:
    """Reads one connection to EOF, hashing what arrives."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.n = 0
        self.done = threading.Event()

    def __call__(self, conn) -> None:
        buf = bytearray(1 << 16)
        t0 = time.monotonic()
        while n := conn.recv_into(buf):
            self.sha.update(memoryview(buf)[:n])
            self.n += n
        self.seconds = time.monotonic() - t0
        self.done.set()


#: packets a guest may still send for a connection after our timeout closed it: its SHUTDOWN,
#: its RST, a credit update and the data it had queued (one 64 KiB RW at most, by credit)
LATE_PER_TIMEOUT = 4
#: ... and without a timeout: packets in flight when pyvmm reset a connection
LATE_ANY = 4


@pytest.fixture(autouse=True)
def no_protocol_violations(linux):
    """The device sees no protocol violation from this well-behaved guest during the test.

    A packet for a connection pyvmm already closed is not one: on a slow host (the lab under
    load) our 2 s close timeout can fire before the guest's own SHUTDOWN/RST, and its late
    packets are then answered with an RST, as the spec says (seen in a CI run under load, and
    17 of them in one test on a host loaded three times over).  A packet in flight when pyvmm
    resets a connection is another (a few, :data:`LATE_ANY`); beyond those, late packets are
    allowed only after timeouts during the test, :data:`LATE_PER_TIMEOUT` per timeout."""
    device = linux.vm.vsock_device
    before = device.counters()
    yield
    after = device.counters()
    errors = {k: n - before["guest_errors_by_reason"].get(k, 0)
              for k, n in after["guest_errors_by_reason"].items()}
    late = errors.pop("guest packet for an unknown connection", 0)
    assert after["credit_violations"] == before["credit_violations"], after
    timeouts = after["conns_timed_out"] - before["conns_timed_out"]
    assert not {k: n for k, n in errors.items() if n}, after
    assert late <= LATE_ANY + LATE_PER_TIMEOUT * timeouts, (late, timeouts, after)


# --- host-initiated ---------------------------------------------------------------------
def test_64_concurrent_host_connections_echo(linux):
    server = linux.start_server(f"vsock-echo-server --port 1301 --count {ECHO_CONNS}",
                          r"listening stream 1301")
    results = [None] * ECHO_CONNS
    sizes = [20000 + 97 * i for i in range(ECHO_CONNS)]

    def one(i: int) -> None:
        payload = np.random.default_rng(i).bytes(sizes[i])
        try:
            with connect_unix(linux.uds, 1301) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                results[i] = recv_all(s, len(payload) + 1) == payload
        except OSError as e:
            results[i] = repr(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(ECHO_CONNS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == [True] * ECHO_CONNS
    assert server.wait(120) == 0, server.explain()
    assert f"vsock-echo-server: done {ECHO_CONNS} {sum(sizes)}" in server.output, server.explain()


def test_socat_talks_to_the_guest_through_the_unix_socket(linux):
    server = linux.start_server("vsock-echo-server --port 1302 --count 1",
                          r"listening stream 1302")
    out = subprocess.run(["socat", "-t", "30", "-", f"UNIX-CONNECT:{linux.uds}"],
                         input=b"CONNECT 1302\nhello from socat\n", capture_output=True,
                         timeout=120)
    assert re.fullmatch(rb"OK \d+\nhello from socat\n", out.stdout), out
    assert server.wait(120) == 0, server.explain()


def test_python_api_connect(linux):
    server = linux.start_server("vsock-echo-server --port 1303 --count 1",
                          r"listening stream 1303")
    with linux.vsock.connect(1303) as s:
        s.settimeout(60)
        s.sendall(b"api" * 5000)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s, 15001) == b"api" * 5000
    assert server.wait(120) == 0, server.explain()
    assert "vsock-echo-server: done 1 15000" in server.output, server.explain()


def test_seqpacket_host_to_guest_keeps_message_boundaries(linux):
    server = linux.start_server("vsock-echo-server --type seqpacket --port 1304 --count 1",
                          r"listening seqpacket 1304")
    with connect_unix(linux.uds + ".seqpacket", 1304, socket.SOCK_SEQPACKET) as s:
        for size in SEQ_SIZES:
            msg = bytes([size % 251]) * size
            s.send(msg)
            assert s.recv(1 << 20) == msg, f"message of {size} bytes"
    assert server.wait(120) == 0, server.explain()
    assert f"vsock-echo-server: done 1 {sum(SEQ_SIZES)}" in server.output, server.explain()


def test_16mib_host_to_guest(linux):
    receiver = linux.start_server("vsock-bulk recv --port 1305", r"listening stream 1305")
    data = np.random.default_rng(1305).bytes(BULK)
    with connect_unix(linux.uds, 1305) as s:
        t0 = time.monotonic()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""              # the guest closes once it has it all
        seconds = time.monotonic() - t0
    assert receiver.wait(120) == 0, receiver.explain()
    m = re.search(r"vsock-bulk: received (\d+) bytes sha256 ([0-9a-f]{64}) in ([\d.]+) s",
                  receiver.output)
    assert m and int(m.group(1)) == BULK, receiver.explain()
    assert m.group(2) == hashlib.sha256(data).hexdigest(), "host->guest SHA-256 differs"
    record_figure("vsock 16 MiB host->guest (host clock)",
                  f"{BULK / seconds / 1e6:.1f} MB/s in {seconds:.2f} s")
    record_figure("vsock 16 MiB host->guest (guest clock)",
                  f"{BULK / float(m.group(3)) / 1e6:.1f} MB/s in {m.group(3)} s")


def test_no_guest_listener_closes_the_unix_connection(linux):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(linux.uds)
    s.sendall(b"CONNECT 4444\n")
    assert s.recv(64) == b""
    s.close()
    with pytest.raises(ConnectionRefusedError):
        linux.vsock.connect(4444)


# --- guest-initiated ----------------------------------------------------------------------
def test_64_concurrent_guest_connections_echo(linux):
    with UnixServer(f"{linux.uds}_2000", echo_stream) as server:
        client = linux.run(f"vsock-echo-client --cid 2 --port 2000 --size 1000 --count 8 "
                           f"--conns {ECHO_CONNS}", timeout=300)
        assert client.status == 0, client.explain()
        assert f"vsock-echo-client: ok {ECHO_CONNS} {ECHO_CONNS * 8 * 1000}" in client.output
        assert server.errors == []


def test_seqpacket_guest_to_host_keeps_message_boundaries(linux):
    with UnixServer(f"{linux.uds}_2003", echo_records, socket.SOCK_SEQPACKET) as server:
        client = linux.run("vsock-echo-client --type seqpacket --cid 2 --port 2003 --size 3000 "
                           "--count 8 --conns 4", timeout=300)
        assert client.status == 0, client.explain()
        assert "vsock-echo-client: ok 4 96000" in client.output, client.explain()
        assert server.errors == []


def test_python_api_listen(linux):
    listener = linux.vsock.listen(2004)
    try:
        echo = threading.Thread(target=lambda: echo_stream(listener.accept(120)[0]), daemon=True)
        echo.start()
        client = linux.run("vsock-echo-client --cid 2 --port 2004 --size 100 --count 4 --conns 1")
        assert client.status == 0, client.explain()
        assert "vsock-echo-client: ok 1 400" in client.output, client.explain()
    finally:
        listener.close()


def test_16mib_guest_to_host(linux):
    sink = Sink()
    with UnixServer(f"{linux.uds}_2001", sink) as server:
        sender = linux.run(f"vsock-bulk send --cid 2 --port 2001 --bytes {BULK}", timeout=300)
        assert sender.status == 0, sender.explain()
        assert sink.done.wait(60) and server.errors == [], server.errors
    m = re.search(r"vsock-bulk: sent (\d+) bytes sha256 ([0-9a-f]{64}) in ([\d.]+) s", sender.output)
    assert m and int(m.group(1)) == BULK, sender.explain()
    assert sink.n == BULK and sink.sha.hexdigest() == m.group(2), "guest->host SHA-256 differs"
    record_figure("vsock 16 MiB guest->host (guest clock)",
                  f"{BULK / float(m.group(3)) / 1e6:.1f} MB/s in {m.group(3)} s")


def test_guest_connect_to_nobody_is_reset(linux):
    client = linux.run("vsock-echo-client --cid 2 --port 2999 --count 1 --timeout 5")
    assert client.status == 1, client.explain()
    assert re.search(r"FAIL conn 0: connect 2:2999: Connection reset by peer", client.output), \
        client.explain()
