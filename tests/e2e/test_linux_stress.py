"""The seed's stress test with a Linux guest: 64 connections each way, all at once, nothing lost.

tests/stress.py does it against the freestanding guest on the host; here the guest is Linux
(in the lab on hosts without hardware KVM, where it is slow, so the sizes are small) and the
traffic goes both ways at the same time:

* host -> guest -> host: 64 host connections (the Firecracker host end, ``CONNECT``) to the
  guest's ``vsock-echo-server``, each writing ``HOST_BYTES`` while reading the echo back;
  the host checks the SHA-256 and the length of what came back against what it sent
  (``stress.echo_streams``);
* guest -> host -> guest: meanwhile the guest's ``vsock-echo-client`` runs 64 connections to a
  host echo server (``<uds>_<port>``), each writing ``GUEST_MESSAGES`` messages of
  ``GUEST_SIZE`` bytes; the guest checks every byte it gets back against the pattern it sent
  (stricter than a digest: the first wrong byte is named).
"""

from __future__ import annotations

import pytest

import stress
from harness import UnixServer, echo_stream

pytestmark = pytest.mark.e2e

CONNS = 64                         # each way
HOST_BYTES = 64 << 10              # per host connection, each way
GUEST_SIZE, GUEST_MESSAGES = 16 << 10, 4          # per guest connection: 64 KiB each way
GUEST_PORT, HOST_PORT = 1401, 2401


def test_64_connections_each_way_at_once_nothing_lost(linux, record_property):
    server = linux.start_server(f"vsock-echo-server --port {GUEST_PORT} --count {CONNS}",
                                rf"listening stream {GUEST_PORT}")
    with UnixServer(f"{linux.uds}_{HOST_PORT}", echo_stream) as host_echo:
        client = linux.start(f"vsock-echo-client --cid 2 --port {HOST_PORT} --size {GUEST_SIZE} "
                             f"--count {GUEST_MESSAGES} --conns {CONNS} --timeout 300")
        try:
            result = stress.echo_streams(linux.uds, CONNS, HOST_BYTES, port=GUEST_PORT)
        except ConnectionRefusedError as e:         # what the device saw of it, in the failure
            c = linux.vm.vsock_device.counters()
            pytest.fail(f"{e}; the device: " + ", ".join(
                f"{k} {c[k]}" for k in ("connections", "host_connects", "conns_timed_out",
                                        "conns_refused", "rst_received", "rx_starved")))
        assert client.wait(600) == 0, client.explain()
        assert server.wait(120) == 0, server.explain()
    assert result["errors"] == [] and result["bytes_lost"] == 0, result["errors"]
    assert result["bytes_each_way"] == CONNS * HOST_BYTES
    assert f"vsock-echo-server: done {CONNS} {CONNS * HOST_BYTES}" in server.output, \
        server.explain()
    guest_bytes = CONNS * GUEST_MESSAGES * GUEST_SIZE
    assert f"vsock-echo-client: ok {CONNS} {guest_bytes}" in client.output, client.explain()
    assert host_echo.errors == [], host_echo.errors
