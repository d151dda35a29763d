"""KVM level: hostile host peers against a running guest (the freestanding guest's echo server
and bulk sender), through the Unix host ends PATH, PATH.seqpacket and PATH_<port>, and the
Python API.

What a host peer may do and what pyvmm answers is in SECURITY.md ("local host peers"): these
tests check it where a unit test cannot, with the real device, the real I/O thread and the
guest's driver on the other side.  Bad CONNECT lines, a silent peer, a peer that never reads
and one that dies mid-transfer are in test_freestanding_vsock.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
import socket
import threading
import time

import pytest

import teststream
from harness import LiveGuest, connect_unix, listen_unix, recv_all
from pyvmm import images
from pyvmm.machine import VsockConfig
from pyvmm.vsock.connection import SEQPACKET_MAX_MSG
from pyvmm.vsock.unix import UNIX_RECORD_MAX
from pyvmm.vsock.wire import VirtioVsockType

pytestmark = pytest.mark.kvm

PREFIX = "pyvmm-test-guest: "
SEQPACKET = VirtioVsockType.VIRTIO_VSOCK_TYPE_SEQPACKET
#: the echo server's window (guest/freestanding/vsock_scenarios.c ECHO_RING)
ECHO_BUF_ALLOC = 32768


@pytest.fixture
def uds(tmp_path):
    return str(tmp_path / "v.sock")


def guest(uds, scenario, timeout=120, **vsock):
    return LiveGuest(images.freestanding_guest(), cmdline=scenario, timeout=timeout,
                     vsock=dataclasses.replace(VsockConfig(3, uds), **vsock))


def on_io_thread(g: LiveGuest, fn):
    """``fn()`` run on the machine's I/O thread (which owns the device's tables)."""
    result: concurrent.futures.Future = concurrent.futures.Future()
    g.vm.io_loop.call_soon_threadsafe(lambda: result.set_result(fn()))
    return result.result(10)


def tables(g: LiveGuest) -> tuple[int, int]:
    """(connections in the muxer's table, Unix peers in the CONNECT handshake)."""
    device = g.vm.vsock_device
    return on_io_thread(g, lambda: (len(device.muxer.connections), len(device.backends[-1]._handshakes)))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def wait_until(what: str, predicate, timeout: float = 60.0):
    """Poll ``predicate`` until it returns something true (or fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        pause.wait(0.02)
    return value


def echo_round(s: socket.socket, size: int) -> None:
    """One echo round trip of ``size`` bytes on a connection to the echo server."""
    msg = os.urandom(size)
    s.sendall(msg)
    got = bytearray()
    while len(got) < size:
        chunk = s.recv(size - len(got))
        assert chunk, "the echo connection ended"
        got += chunk
    assert bytes(got) == msg


# --- 10,000 connects in a burst ------------------------------------------------------------

BURST = 10_000
#: what each short-lived peer of the burst does, in turn (STREAM bytes, or one SEQPACKET record)
BURST_PEERS = ("close at once", "garbage", "CONNECT to a port nobody listens on")


def _short_peer(path: str, kind: int, which: str) -> None:
    s = socket.socket(socket.AF_UNIX, kind)
    try:
        s.connect(path)             # blocking: a full backlog waits for pyvmm's accept (with a
        s.settimeout(30)            # timeout AF_UNIX would fail at once with EAGAIN instead)
        if which == "garbage":
            s.send(b"\x00GET / HTTP/1.1\r\n" + b"X" * 48)
        elif which != "close at once":
            s.send(b"CONNECT 4321\n")
    finally:
        s.close()


@pytest.mark.parametrize("end", ["PATH", "PATH.seqpacket"])
def test_a_burst_of_ten_thousand_connects_leaks_nothing_and_a_client_is_served_throughout(
        uds, end, record_property):
    """10,000 short connections in a burst to one host end, each closing at once, sending
    garbage, or sending CONNECT to a guest port nobody listens on, without waiting for an
    answer: a well-behaved client on the same end gets its echo after every 1,000 of them and
    afterwards, a new connection is served, each short one is accepted and counted exactly
    once (a handshake error or a connection to the guest), and once they are gone the
    connection table, the handshakes and the process's open fds are back where they were,
    with RSS growth bounded."""
    kind, path = ((socket.SOCK_STREAM, uds) if end == "PATH" else
                  (socket.SOCK_SEQPACKET, uds + ".seqpacket"))
    with guest(uds, "vsock-echo-server port=1234 conns=2") as g:
        g.wait_for(PREFIX + "vsock listening 1234")
        good = connect_unix(path, 1234, kind, timeout=30)
        echo_round(good, 1000)
        before = g.vsock.counters()
        base_tables, base_fds, base_rss = tables(g), open_fds(), rss_kib()
        assert base_tables == (1, 0), base_tables
        t0 = time.monotonic()
        for i in range(BURST):
            _short_peer(path, kind, BURST_PEERS[i % len(BURST_PEERS)])
            if i % 1000 == 999:
                echo_round(good, 1000)                  # served in the middle of the burst
        burst_seconds = time.monotonic() - t0
        after_tables = wait_until("the burst's connections gone",
                                  lambda: (t := tables(g)) == base_tables and t)
        drained_seconds = time.monotonic() - t0
        fds = wait_until("the process's fds back", lambda: open_fds() <= base_fds and open_fds())
        rss = rss_kib()
        echo_round(good, 1000)
        good.close()
        with connect_unix(path, 1234, kind, timeout=30) as new:
            echo_round(new, 1000)
        counters = g.vsock.counters()
        run = g.finish(60)
    delta = {k: counters[k] - before.get(k, 0)
             for k in ("unix_accepted", "unix_handshake_errors", "host_connects")}
    record_property("burst_seconds", round(burst_seconds, 2))
    record_property("drained_after_seconds", round(drained_seconds, 2))
    record_property("rss_growth_kib", rss - base_rss)
    print(f"{end}: {BURST} connects in {burst_seconds:.2f} s, drained after {drained_seconds:.2f} s, "
          f"fds {base_fds} -> {fds}, RSS {base_rss} -> {rss} KiB, {delta}")
    # fewer fds is fine: the suite's other garbage (sockets, pipes) may be collected meanwhile
    assert after_tables == base_tables and fds <= base_fds
    assert rss - base_rss < 16 << 10, (base_rss, rss)
    assert delta["unix_accepted"] == BURST + 1                    # and the new connection
    assert delta["unix_handshake_errors"] + delta["host_connects"] == BURST + 1, delta
    assert delta["unix_handshake_errors"] >= BURST * 2 // 3, delta  # the silent and the garbage
    assert "vsock echo done 2" in run.console, run.explain()
    assert run.vsock["guest_errors"] == 0, run.vsock


# --- SEQPACKET records larger than allowed -------------------------------------------------

def test_host_seqpacket_records_the_guest_cannot_take_reset_the_connection_and_are_counted(
        uds, caplog):
    """A host record larger than the guest's buf_alloc (the echo server's 32 KiB) or than
    SEQPACKET_MAX_MSG (64 KiB) could never reach the guest whole (Linux's receiver waits
    for EOM forever): pyvmm resets that connection (RST to the guest, the host peer sees its
    socket closed), counts a host error and logs the reason once; through PATH.seqpacket and
    the Python API alike.  A record of exactly the guest's buf_alloc still echoes."""
    caplog.set_level(logging.WARNING, logger="pyvmm")
    with guest(uds, "vsock-echo-server port=1234 conns=4") as g:
        g.wait_for(PREFIX + "vsock listening 1234")
        peers = [connect_unix(uds + ".seqpacket", 1234, socket.SOCK_SEQPACKET, timeout=30),
                 connect_unix(uds + ".seqpacket", 1234, socket.SOCK_SEQPACKET, timeout=30),
                 g.vsock.connect(1234, SEQPACKET)]
        for s, size in zip(peers, (ECHO_BUF_ALLOC + 1, SEQPACKET_MAX_MSG + 1, 100_000)):
            s.settimeout(30)
            s.send(b"r" * 16)
            assert s.recv(64) == b"r" * 16              # established and echoing
            s.send(b"R" * size)                         # one record, too large
            try:
                assert s.recv(1 << 20) == b"", size     # closed, nothing of it echoed
            except ConnectionResetError:
                pass
            s.close()
        with connect_unix(uds + ".seqpacket", 1234, socket.SOCK_SEQPACKET, timeout=30) as ok:
            ok.send(b"k" * ECHO_BUF_ALLOC)
            assert ok.recv(1 << 20) == b"k" * ECHO_BUF_ALLOC
        run = g.finish(60)
    reason = "host SEQPACKET record larger than 64 KiB or the guest's buf_alloc"
    assert run.vsock["host_errors_by_reason"] == {reason: 3}, run.vsock
    assert run.vsock["guest_errors"] == 0, run.vsock
    assert len([r for r in caplog.records if reason in r.getMessage()]) == 1, caplog.text
    assert run.console.count("ended: reset by peer (RST)") == 3, run.explain()
    assert "vsock echo done 4" in run.console, run.explain()


def test_a_guest_seqpacket_message_as_large_as_its_window_reaches_the_host_as_one_record(uds):
    """The guest sends one SEQPACKET message as large as the window pyvmm advertised: it
    reaches the host listener (PATH_<port>) as one record, byte for byte.  Before, a
    250,000-byte message (the window is 256 KiB) was reset: the host socket's default send
    buffer takes at most 212,960 bytes per record (EMSGSIZE)."""
    size = 250_000
    listener = listen_unix(f"{uds}_2004", socket.SOCK_SEQPACKET)
    got = {}

    def sink():
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            got["records"] = [conn.recv(1 << 20)]
            while record := conn.recv(1 << 20):
                got["records"].append(record)

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    with guest(uds, f"vsock-bulk-send port=2004 bytes={size} chunk=65536 type=seqpacket") as g:
        run = g.finish(60)
    t.join(30)
    assert re.search(rf"vsock bulk sent {size} bytes fnv [0-9a-f]+", run.console), run.explain()
    assert [len(r) for r in got["records"]] == [size]
    assert got["records"][0] == teststream.stream(size)
    assert run.vsock["host_errors"] == 0 and run.vsock["conns_killed"] == 0, run.vsock


def test_a_window_larger_than_a_host_record_is_capped_so_the_guest_refuses_larger_messages(uds):
    """With an 8 MiB window (buf=8M) the host socket cannot take a record that large (at
    most UNIX_RECORD_MAX, and its send buffer allows): the SEQPACKET connection advertises
    the smaller buf_alloc, so the guest refuses an 8 MiB message itself (EMSGSIZE, as Linux
    does) instead of being reset half-way."""
    listener = listen_unix(f"{uds}_2004", socket.SOCK_SEQPACKET)
    threading.Thread(target=lambda: recv_all(listener.accept()[0]), daemon=True).start()
    with guest(uds, f"vsock-bulk-send port=2004 bytes={8 << 20} chunk=65536 type=seqpacket",
               conn_buf_size=8 << 20) as g:
        run = g.finish(60)
    m = re.search(r"a (\d+)-byte message exceeds the peer's buf_alloc (\d+) \(EMSGSIZE\)", run.console)
    assert m, run.explain()
    with open("/proc/sys/net/core/wmem_max") as f:
        wmem_max = int(f.read())
    assert int(m.group(2)) <= min(UNIX_RECORD_MAX, 2 * wmem_max - 32), m.group(0)
    assert run.vsock["conns_killed"] == 0, run.vsock
