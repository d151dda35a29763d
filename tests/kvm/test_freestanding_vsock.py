"""KVM level: pyvmm's vsock device against the freestanding guest's CPL3 virtio driver.

The guest (guest/freestanding: virtio_mmio.c, virtqueue.c, vsock.c) drives
the device from CPL3, so these tests run at native speed on PVM hosts too.
Each test boots its own guest (well under a second) with one scenario on its
command line, and talks to it through the Firecracker-compatible Unix socket
(plain Python sockets, and socat).  Bulk data is the guest's xorshift test
stream: the receiving end checks every byte against it (the host with
``tests/teststream.py``, the guest with ``teststream_check``) and the guest
prints the stream's FNV-1a checksum.

Also here: the same guest in virtio-console mode under QEMU, the peer the
benchmarks compare against.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

import teststream
from harness import LiveGuest, connect_unix, listen_unix, recv_all
from pyvmm import images
from pyvmm.kvm.host import detect
from pyvmm.machine import ExitStatus, VsockConfig

pytestmark = pytest.mark.kvm

BIG = 64 << 20
PREFIX = "pyvmm-test-guest: "


@pytest.fixture
def uds(tmp_path):
    return str(tmp_path / "v.sock")


#: every scenario runs against both protocols: the standard Socket Device, and the 2013 draft
#: (device ID 13) with 4 queue pairs, which the guest's driver spreads its connections over
MODES = {"virtio": VsockConfig(3, None), "rfc2013-4pairs": VsockConfig(3, None, proto="rfc2013", pairs=4)}


@pytest.fixture(params=sorted(MODES))
def mode(request):
    return MODES[request.param]


def guest(uds, mode, scenario, timeout=120):
    return LiveGuest(images.freestanding_guest(), cmdline=scenario, timeout=timeout,
                     vsock=dataclasses.replace(mode, uds_path=uds))


def needs_seqpacket(mode):
    if mode.proto != "virtio":
        pytest.skip("the 2013 draft has no SEQPACKET (docs/vsock-draft-vs-spec.md)")


def echo_one(listener, records=False):
    conn, _ = listener.accept()
    with conn:
        while data := conn.recv(1 << 20):
            (conn.send if records else conn.sendall)(data)


def test_virtio_probe_sees_the_vsock_device(uds, mode):
    with guest(uds, mode, "virtio-probe") as g:
        run = g.finish(60)
    if mode.proto == "virtio":
        assert re.search(r"virtio device 0 at 0xd0000000 irq 5 id 19", run.console), run.explain()
        assert "virtio device 0 vsock guest_cid 3" in run.console, run.explain()
    else:                               # the probe sets up pair 0 only: the driver may use fewer
        assert re.search(r"virtio device 0 at 0xd0000000 irq 5 id 13", run.console), run.explain()
        assert "virtio device 0 vsock draft guest_cid 3 pairs 1/4" in run.console, run.explain()
    assert re.search(r"virtio device 0 driver ok features 0x[0-9a-f]+", run.console), run.explain()
    (vsock,) = run.virtio
    assert vsock["guest_errors"] == 0 and vsock["notifies_before_driver_ok"] == 0, vsock


def test_host_to_guest_echo_with_python_sockets(uds, mode):
    payload = os.urandom(300_000)
    with guest(uds, mode, "vsock-echo-server port=1234 conns=1") as g:
        g.wait_for(PREFIX + "vsock listening 1234")
        with connect_unix(uds, 1234) as s:
            threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)),
                             daemon=True).start()
            echoed = recv_all(s)
        run = g.finish(60)
    assert echoed == payload
    assert f"vsock echo done 1 {len(payload)}" in run.console, run.explain()
    assert run.result.status == ExitStatus.GUEST_RESET


def test_one_io_thread_serves_both_host_ends(uds, mode):
    """The machine runs its virtio devices on one I/O thread, "pyvmm-io" (also
    its kernel name): the Unix backend and the Python API backend both go
    through it, and it ends with the machine."""
    with guest(uds, mode, "vsock-echo-server port=1234 conns=2") as g:
        g.wait_for(PREFIX + "vsock listening 1234")
        io = g.vm.io_loop.thread
        assert io.name == "pyvmm-io" and io.is_alive()
        assert [t for t in threading.enumerate() if t.name == "pyvmm-io"] == [io]
        with open(f"/proc/self/task/{io.native_id}/comm") as f:
            assert f.read().strip() == "pyvmm-io"        # the kernel's name too (top -H, ps -L)
        for connect in (lambda: connect_unix(uds, 1234), lambda: g.vsock.connect(1234)):
            with connect() as s:
                s.settimeout(60)
                s.sendall(b"ping")
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s) == b"ping"
        run = g.finish(60)
    assert "vsock echo done 2 8" in run.console, run.explain()
    assert not io.is_alive()


@pytest.mark.skipif(not shutil.which("socat"), reason="socat is not installed")
def test_host_to_guest_echo_with_socat(uds, mode):
    with guest(uds, mode, "vsock-echo-server port=1234 conns=1") as g:
        g.wait_for(PREFIX + "vsock listening 1234")
        out = subprocess.run(["socat", "-t", "10", "-", f"UNIX-CONNECT:{uds}"],
                             input=b"CONNECT 1234\nhello from socat\n", capture_output=True,
                             timeout=60)
        run = g.finish(60)
    assert re.fullmatch(rb"OK \d+\nhello from socat\n", out.stdout), out
    assert "vsock echo done 1 17" in run.console, run.explain()


def test_guest_to_host_echo(uds, mode):
    listener = listen_unix(f"{uds}_2000")
    server = threading.Thread(target=echo_one, args=(listener,), daemon=True)
    server.start()
    with guest(uds, mode, "vsock-echo-client port=2000 size=4096 count=200") as g:
        run = g.finish(120)
    assert f"vsock echo ok {4096 * 200}" in run.console, run.explain()


def test_64_concurrent_connections(uds, mode):
    results = {}

    def one(i):
        data = bytes([i]) * (5000 + 131 * i)
        try:
            with connect_unix(uds, 1234) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                results[i] = recv_all(s) == data
        except OSError as e:
            results[i] = repr(e)

    with guest(uds, mode, "vsock-echo-server port=1234 conns=64") as g:
        g.wait_for(PREFIX + "vsock listening 1234")
        threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        run = g.finish(120)
    assert results == {i: True for i in range(64)}
    assert re.search(r"vsock echo done 64 \d+", run.console), run.explain()


def test_64mib_guest_to_host(uds, mode, record_property):
    listener = listen_unix(f"{uds}_2001")
    got = {}

    def sink():
        conn, _ = listener.accept()
        with conn:
            t0 = time.monotonic()
            got["data"] = recv_all(conn, BIG + 1)
            got["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    with guest(uds, mode, f"vsock-bulk-send port=2001 bytes={BIG} chunk=65536") as g:
        run = g.finish(300)
    t.join(60)
    m = re.search(rf"vsock bulk sent {BIG} bytes fnv ([0-9a-f]+)", run.console)
    assert m, run.explain()
    assert got["data"] == teststream.stream(BIG), "guest->host bytes differ from the stream"
    # >1000 queue notifies, yet no MMIO exit to Python beyond the probe's register writes:
    # QueueNotify is a KVM ioeventfd that wakes the I/O thread directly
    assert run.vsock["tx_packets"] > 1000
    assert run.result.exit_counts["MmioWrite"] < 100, run.result.exit_counts
    record_property("guest_to_host_MBps", round(BIG / got["seconds"] / 1e6, 1))


def test_64mib_host_to_guest(uds, mode, record_property):
    data = teststream.stream(BIG)
    with guest(uds, mode, f"vsock-bulk-recv port=1237 bytes={BIG} listen=1", timeout=600) as g:
        g.wait_for(PREFIX + "vsock listening 1237")
        with connect_unix(uds, 1237) as s:
            t0 = time.monotonic()
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            recv_all(s)                          # until the guest closes
            seconds = time.monotonic() - t0
        run = g.finish(120)
    assert re.search(rf"vsock bulk received {BIG} bytes fnv [0-9a-f]+", run.console), run.explain()
    assert "FAILED" not in run.console
    record_property("host_to_guest_MBps", round(BIG / seconds / 1e6, 1))


def test_seqpacket_boundaries_both_ways(uds, mode):
    needs_seqpacket(mode)
    listener = listen_unix(f"{uds}_2003", socket.SOCK_SEQPACKET)
    threading.Thread(target=echo_one, args=(listener, True), daemon=True).start()
    with guest(uds, mode, "vsock-echo-client port=2003 size=3000 count=20 type=seqpacket") as g:
        run = g.finish(60)
    assert "vsock echo ok 60000" in run.console, run.explain()

    with guest(uds, mode, "vsock-echo-server port=1235 conns=1") as g:
        g.wait_for(PREFIX + "vsock listening 1235")
        with connect_unix(uds + ".seqpacket", 1235, socket.SOCK_SEQPACKET) as s:
            for size in (1, 100, 4096, 4097, 20000, 32768):
                msg = bytes([size % 251]) * size
                s.send(msg)
                assert s.recv(1 << 20) == msg, f"{size}-byte message"
        run = g.finish(60)
    assert "vsock echo done 1" in run.console, run.explain()


def test_resets(uds, mode):
    # guest -> host, nobody at <uds>_2999: the guest's connect is reset
    with guest(uds, mode, "vsock-echo-client port=2999 size=1 count=1") as g:
        run = g.finish(60)
    assert re.search(r"connect .*failed", run.console), run.explain()
    assert run.vsock["rst_sent"] >= 1
    # host -> guest, nobody on guest port 4321: the Unix connection is closed
    with guest(uds, mode, "vsock-echo-server port=1234 conns=1") as g:
        g.wait_for(PREFIX + "vsock listening 1234")
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(uds)
        s.sendall(b"CONNECT 4321\n")
        assert s.recv(64) == b""
        s.close()
        with connect_unix(uds, 1234) as ok:       # let the guest's server finish
            ok.sendall(b"x")
            ok.shutdown(socket.SHUT_WR)
            assert recv_all(ok) == b"x"
        run = g.finish(60)
    assert run.vsock["rst_received"] >= 1


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="QEMU is not installed")
def test_console_mode_under_qemu(tmp_path):
    """The same guest drives QEMU's virtio-serial port (the benchmark peer)."""
    n = 1 << 20
    sock = str(tmp_path / "console.sock")
    srv = listen_unix(sock)
    accel = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) and detect() else "tcg"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "microvm", "-accel", accel, "-nodefaults", "-no-reboot",
         "-nographic", "-nic", "none", "-m", "64", "-serial", "stdio",
         "-global", "virtio-mmio.force-legacy=false",
         "-kernel", str(images.freestanding_guest()),
         "-append", f"console-bulk-send bytes={n} port=1",
         "-device", "virtio-serial-device", "-chardev", f"socket,id=c0,path={sock}",
         "-device", "virtserialport,chardev=c0,nr=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        conn, _ = srv.accept()
        conn.settimeout(60)
        data = recv_all(conn, n)
        out, _ = qemu.communicate(timeout=60)
    finally:
        qemu.kill()
    text = out.decode(errors="replace")
    assert data == teststream.stream(n), text[-2000:]
    assert re.search(rf"console bulk sent {n} bytes fnv ([0-9a-f]+)", text), text[-2000:]


HOSTILE_CONNECT_LINES = [
    b"HELLO 1234\n",                              # not CONNECT
    b"CONNECT\n",                                 # no port
    b"CONNECT 99999999999\n",                     # beyond a u32
    b"CONNECT -5\n",
    b"CONNECT " + b"1" * 40 + b"\n",              # longer than Firecracker's 32 bytes
    b"\xff\xfe\x00CONNECT 1234\n",                # not UTF-8
]


def test_hostile_connect_lines_are_closed_and_the_guest_is_still_served(uds, mode):
    """Bad CONNECT lines, a half line and a silent peer on the Unix end: each bad one
    is closed by pyvmm (counted), none reaches the guest, and a good connection made
    while the silent one is pending echoes as usual (both protocols)."""
    with guest(uds, mode, "vsock-echo-server port=1234 conns=1") as g:
        g.wait_for(PREFIX + "vsock listening 1234")
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(uds)                       # says nothing: must not block the others
        for line in HOSTILE_CONNECT_LINES:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(uds)
                s.sendall(line)
                try:
                    answer = s.recv(64)
                except ConnectionResetError:      # closed with our bytes unread
                    answer = b""
                assert answer == b"", line        # closed, no OK
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(uds)
            s.sendall(b"CONNECT 12")              # half a line, then gone
        payload = b"odd-sized \x00\xff payload"
        with connect_unix(uds, 1234) as ok:
            ok.sendall(payload)
            ok.shutdown(socket.SHUT_WR)
            assert recv_all(ok) == payload
        silent.close()
        run = g.finish(60)
    assert f"vsock echo done 1 {len(payload)}" in run.console, run.explain()
    assert run.vsock["unix_handshake_errors"] >= len(HOSTILE_CONNECT_LINES), run.vsock
    assert run.vsock["host_connects"] == 1 and run.vsock["guest_errors"] == 0, run.vsock


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_host_peer_that_never_reads_throttles_the_guest_and_rss_stays_flat(tmp_path, mode,
                                                                              record_property):
    """The guest sends 1 GiB to a host peer that accepts and never reads: credit throttles
    the guest (pyvmm holds at most the connection's window), so pyvmm's RSS stays flat."""
    uds = str(tmp_path / "v.sock")
    listener = listen_unix(f"{uds}_2001")
    vsock = f"3,uds={uds}" + ("" if mode.proto == "virtio" else f",proto={mode.proto},pairs={mode.pairs}")
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "-q", "run", "--kernel",
                             str(images.freestanding_guest()), "--vsock", vsock, "--timeout", "120",
                             "--cmdline", f"vsock-bulk-send port=2001 bytes={1 << 30} chunk=65536"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        listener.settimeout(60)
        conn, _ = listener.accept()                     # ...and never read from it
        samples = []
        for _ in range(15):                             # sampling interval, not synchronisation
            time.sleep(0.2)
            samples.append(_rss_kib(proc.pid))
        queued = struct.unpack("i", fcntl.ioctl(conn, termios.FIONREAD, b"\0" * 4))[0]
        assert queued > 0, "the guest sent nothing: nothing was throttled"
        assert proc.poll() is None, proc.stderr.read().decode()   # still running, throttled
        conn.close()
    finally:
        proc.terminate()
        proc.wait(10)
        listener.close()
    growth = max(samples[5:]) - min(samples[5:])
    record_property("pyvmm_rss_peak_kib", max(samples))
    print(f"never-reading peer ({mode.proto}): pyvmm RSS {min(samples)}..{max(samples)} KiB, "
          f"growth over the last 2 s {growth} KiB, {queued} bytes waiting in the peer's socket")
    assert growth < 4096, samples                       # flat: less than 4 MiB of drift


def test_transport_reset_during_traffic_ends_connections_and_new_ones_work(uds):
    """VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (standard mode: the draft has no event queue) in
    the middle of a conversation: the host peer sees its connection end, the guest drops
    its side, and a new connection echoes as usual."""
    with guest(uds, MODES["virtio"], "vsock-echo-server port=1234 conns=2") as g:
        g.wait_for(PREFIX + "vsock listening 1234")
        first = connect_unix(uds, 1234)
        first.settimeout(30)
        first.sendall(b"before the reset")
        assert first.recv(64) == b"before the reset"
        g.vsock.transport_reset()
        try:
            end = first.recv(64)
        except ConnectionResetError:
            end = b""
        assert end == b""                                 # the host peer sees the end
        first.close()
        g.wait_for(PREFIX + "vsock transport reset")    # the guest took the event: a connection
        with connect_unix(uds, 1234) as second:         # made before that would be dropped too
            second.sendall(b"after the reset")
            second.shutdown(socket.SHUT_WR)
            assert recv_all(second) == b"after the reset"
        run = g.finish(60)
    assert run.vsock["transport_resets"] == 1 and run.vsock["events_sent"] == 1, run.vsock
    assert "ended: transport reset" in run.console and "vsock echo done 2" in run.console, run.explain()
    assert run.result.status == ExitStatus.GUEST_RESET, run.explain()


def test_a_host_peer_dying_mid_transfer_resets_the_guests_side(uds, mode):
    """The host peer of a guest-initiated connection closes in the middle of the transfer:
    the guest gets SHUTDOWN and then RST (Firecracker's order, CONN_SHUTDOWN_TIMEOUT), its
    side ends as reset by the peer, and pyvmm counts nothing against the guest."""
    listener = listen_unix(f"{uds}_2000")
    with guest(uds, mode, "vsock-echo-client port=2000 size=4096 count=100000") as g:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.close()                                      # the peer dies
        run = g.finish(60)
    assert re.search(r"vsock echo client: connection ended after \d+ of \d+ echoed bytes: reset by peer",
                     run.console), run.explain()
    assert run.vsock["rst_sent"] >= 1 and run.vsock["guest_errors"] == 0, run.vsock
    assert run.vsock["connections"] == 0


def _stream_until_the_end(s: socket.socket, ended: dict, key: str, send: bool = True) -> None:
    """Traffic on ``s`` (4 KiB out and what comes back in, or only in) until the connection
    ends; ``ended[key]`` is then the monotonic time the end was seen."""
    try:
        while (not send or s.send(b"x" * 4096)) and s.recv(1 << 16):
            pass
    except OSError:                                     # EPIPE, ECONNRESET
        pass
    ended[key] = time.monotonic()


@pytest.mark.parametrize("how, status", [("triple-fault", ExitStatus.GUEST_CRASH),
                                         ("reset", ExitStatus.GUEST_RESET)])
@pytest.mark.parametrize("initiated", ["host", "guest"])
def test_a_guest_dying_mid_transfer_ends_every_kind_of_host_peer(uds, how, status, initiated,
                                                                  record_property):
    """The guest triple-faults or resets in the middle of transfers: host-initiated peers on
    PATH, PATH.seqpacket and the Python API, or a guest-initiated one on PATH_<port>, each
    see EOF or a reset within 1 s; the run ends with the status for it, and the machine's
    threads (vCPU, pyvmm-io) are gone once it is closed.  Before, a program using the
    Python API (not the CLI, which exits) left every peer hanging until it closed the
    machine: the run's end did not end the host connections."""
    after = 1 << 20
    peers: dict[str, socket.socket] = {}
    ended: dict[str, float] = {}
    listener = None
    if initiated == "host":
        scenario = f"vsock-echo-server port=1234 conns=4 die={how} after={after}"
    else:
        scenario = f"vsock-bulk-send port=2001 bytes={1 << 30} chunk=65536 die={how} after={after}"
        listener = listen_unix(f"{uds}_2001")
    with guest(uds, MODES["virtio"], scenario) as g:
        if initiated == "host":
            g.wait_for(PREFIX + "vsock listening 1234")
            peers = {"PATH": connect_unix(uds, 1234),
                     "PATH.seqpacket": connect_unix(uds + ".seqpacket", 1234, socket.SOCK_SEQPACKET),
                     "Python API": g.vsock.connect(1234)}
        else:
            peers = {"PATH_2001": listener.accept()[0]}
        streams = []
        for name, s in peers.items():
            s.settimeout(30)
            streams.append(threading.Thread(target=_stream_until_the_end,
                                            args=(s, ended, name, initiated == "host")))
            streams[-1].start()
        line = g.wait_for(PREFIX + r".*: dying by .*, (\d+) connections open", 60)
        died = time.monotonic()
        for t in streams:
            t.join(10)
        run = g.finish(60)
        threads = [*g.vm._threads, g.vm.io_loop.thread]
    for s in [*peers.values(), *([listener] if listener else [])]:
        s.close()
    assert int(line.group(1)) == len(peers), line.group(0)
    lags = {name: round(t - died, 3) for name, t in ended.items()}
    record_property("peer_end_after_guest_death_s", lags)
    assert set(lags) == set(peers) and all(lag < 1.0 for lag in lags.values()), lags
    assert run.result.status == status, run.explain()
    assert not [t.name for t in threads if t.is_alive()]
