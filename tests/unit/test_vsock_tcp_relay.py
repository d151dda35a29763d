"""guest/progs/vsock-tcp-relay.c on the host, TCP to TCP: the copying, the half-close, the bound.

In the guests the relay joins vsock_test's TCP control connection across AF_VSOCK
(guest/vsock_test/README.md). Its copying loop does not depend on the address family, and it
also runs TCP to TCP, so these tests build it with the host's gcc and check it with 127.0.0.1
sockets only: this host's AF_VSOCK is never opened. Every wait is bounded by TIMEOUT.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "guest" / "progs" / "vsock-tcp-relay.c"
TIMEOUT = 30.0
MAX_PAIRS = 16          # the relay's MAX_PAIRS

pytestmark = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed")


def test_max_pairs_matches_the_source():
    assert re.search(rf"^#define MAX_PAIRS {MAX_PAIRS}\b", SOURCE.read_text(), re.MULTILINE)


@pytest.fixture(scope="module")
def relay_exe(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("relay") / "vsock-tcp-relay"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{SOURCE.parent}", "-o", str(exe),
                    str(SOURCE)], check=True)
    return exe


class Relay:
    """A running relay; ``port`` is where it listens, ``lines`` its stdout."""

    def __init__(self, exe: Path, to_port: int, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            [str(exe), "--from-tcp", "127.0.0.1:0", "--to-tcp", f"127.0.0.1:{to_port}"],
            stdout=subprocess.PIPE, stderr=open(stderr_path, "wb"), text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.line()
        m = re.fullmatch(rf"vsock-tcp-relay: listening tcp:127\.0\.0\.1:(\d+) -> "
                         rf"tcp:127\.0\.0\.1:{to_port}", ready)
        assert m, ready
        self.port = int(m.group(1))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("<EOF>")

    def line(self) -> str:
        return self.lines.get(timeout=TIMEOUT)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> tuple[int, str]:
        """SIGTERM; (exit status, the `done` line)."""
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=TIMEOUT)
        return status, self.line()


class Server:
    """The --to end: a 127.0.0.1 listener whose connections ``handler(conn)`` serves, one
    thread each; accepted connections are counted in ``accepted``, handlers that returned in
    ``finished`` (semaphores: a test waits on them with a timeout)."""

    def __init__(self, handler, listen: bool = True) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.errors: list[str] = []
        self.accepted = threading.Semaphore(0)
        self.finished = threading.Semaphore(0)
        if listen:
            self.listen()

    def listen(self) -> None:
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(TIMEOUT)
            self.accepted.release()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        with conn:
            try:
                self.handler(conn)
            except Exception as e:          # recorded, checked by the test
                self.errors.append(repr(e))
        self.finished.release()

    def close(self) -> None:
        self.sock.close()


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(1 << 16):
        out += chunk
    return bytes(out)


@pytest.fixture
def start(relay_exe, tmp_path):
    """start(handler) -> (relay, server); both are stopped at the end of the test."""
    made = []

    def _start(handler, listen: bool = True):
        server = Server(handler, listen)
        relay = Relay(relay_exe, server.port, tmp_path / f"relay{len(made)}.stderr")
        made.append((relay, server))
        return relay, server

    yield _start
    for relay, server in made:
        if relay.proc.poll() is None:
            relay.proc.kill()
            relay.proc.wait()
        server.close()


def echo_until_eof(conn) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def test_copies_both_ways_and_passes_a_half_close_on(start):
    """Client sends 1 MiB and shuts down its write side; the server sees exactly those bytes
    then EOF, and can still answer (a half-close, not a close); the answer and the server's
    close reach the client."""
    forward, back = os.urandom(1 << 20), os.urandom(3 << 18)
    seen = {}

    def handler(conn):
        seen["forward"] = recv_all(conn)      # ends at the relayed EOF
        conn.sendall(back)
        conn.shutdown(socket.SHUT_WR)

    relay, server = start(handler)
    with relay.connect() as c:
        sender = threading.Thread(target=lambda: (c.sendall(forward), c.shutdown(socket.SHUT_WR)))
        sender.start()
        got = recv_all(c)
        sender.join(TIMEOUT)
    assert server.finished.acquire(timeout=TIMEOUT)
    assert seen["forward"] == forward
    assert got == back
    assert not server.errors
    status, done = relay.stop()
    assert status == 0
    assert done == f"vsock-tcp-relay: done 1 {len(forward)} {len(back)}"
    assert relay.stderr() == ""


def test_a_half_close_from_the_far_end_leaves_the_other_direction_open(start):
    """The server says all it has and shuts down its write side first; the client reads EOF,
    then sends, and the server still receives all of it."""
    late = os.urandom(200_000)
    seen = {}

    def handler(conn):
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        seen["late"] = recv_all(conn)

    relay, server = start(handler)
    with relay.connect() as c:
        assert recv_all(c) == b"hello"
        c.sendall(late)
        c.shutdown(socket.SHUT_WR)
        assert c.recv(1) == b""                 # the pair ends: the relay closes our end
    assert server.finished.acquire(timeout=TIMEOUT)
    assert seen["late"] == late
    assert not server.errors


def test_several_connections_at_once_keep_their_own_bytes(start):
    relay, server = start(echo_until_eof)
    conns = [relay.connect() for _ in range(8)]
    payloads = [os.urandom(50_000 + i) for i in range(len(conns))]
    for rnd in range(5):                        # interleaved: every connection open throughout
        for c, data in zip(conns, payloads):
            c.sendall(data[rnd * 10_000:(rnd + 1) * 10_000] if rnd < 4 else data[40_000:])
    for c in conns:
        c.shutdown(socket.SHUT_WR)
    for c, data in zip(conns, payloads):
        assert recv_all(c) == data
        c.close()
    assert not server.errors


def test_at_most_max_pairs_at_once_the_next_waits_for_a_free_one(start):
    release = threading.Event()

    def hold(conn):                              # echo one byte, then wait for the test
        conn.sendall(conn.recv(1))
        release.wait(TIMEOUT)

    relay, server = start(hold)
    first = []
    for i in range(MAX_PAIRS):
        c = relay.connect()
        c.sendall(b"x")
        assert c.recv(1) == b"x"                 # relayed: the pair exists
        first.append(c)
    extra = relay.connect()                      # accepted by the kernel into the backlog only
    extra.sendall(b"y")
    for _ in range(MAX_PAIRS):
        assert server.accepted.acquire(timeout=TIMEOUT)
    # The relay does not serve its listener while full; the 17th connection reaches the server
    # only after a pair ends. (A wrong bound shows up here as a 17th accept.)
    assert not server.accepted.acquire(timeout=1.0)
    first[0].close()
    release.set()                                # the held pairs end: the server closes them
    assert server.accepted.acquire(timeout=TIMEOUT)
    assert extra.recv(1) == b"y"
    for c in first[1:] + [extra]:
        c.close()


def test_a_refused_connect_is_reported_and_the_relay_goes_on(start):
    relay, server = start(echo_until_eof, listen=False)   # bound, not listening: refused
    # The accepted side is reset, as "refused" would: seen by recv, or already by connect
    # when the reset arrives before this thread returns from it.
    with pytest.raises(ConnectionResetError):
        with relay.connect() as c:
            c.recv(1)
    assert re.search(rf"^vsock-tcp-relay: pair 0: connect to tcp:127\.0\.0\.1:{server.port}: "
                     r"Connection refused$", relay.stderr(), re.MULTILINE)
    server.listen()
    with relay.connect() as c:
        c.sendall(b"again")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"again"
    assert relay.proc.poll() is None


def test_a_reset_ends_the_pair_passes_the_reset_on_and_says_why(start):
    def reset(conn):
        conn.recv(1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # l_onoff=1, 0 s
        conn.close()                             # RST instead of FIN

    relay, server = start(reset)
    with relay.connect() as c:
        c.sendall(b"x")
        with pytest.raises(ConnectionResetError):   # passed on as a reset, not as an EOF
            c.recv(1)
    assert re.search(r"^vsock-tcp-relay: pair 0: (read from|write to) tcp:127\.0\.0\.1:\d+: "
                     r"Connection reset by peer$", relay.stderr(), re.MULTILINE), relay.stderr()


@pytest.mark.parametrize("args", [
    [],
    ["--from-tcp", "127.0.0.1:0"],
    ["--from-tcp", "localhost:1", "--to-tcp", "127.0.0.1:1"],     # numeric IPv4 only
    ["--from-tcp", "127.0.0.1:70000", "--to-tcp", "127.0.0.1:1"],
    ["--from-vsock", "1:9999", "--to-tcp", "127.0.0.1:1"],        # from-vsock takes PORT only
    ["--from-vsock", "9999", "--to-vsock", "9999"],               # to-vsock needs CID:PORT
    ["--from-tcp", "127.0.0.1:0", "--to-tcp", "127.0.0.1:1", "--to-tcp", "127.0.0.1:2"],
    ["--from-tcp", "127.0.0.1:0", "--to-tcp", "127.0.0.1:1", "extra"],
])
def test_bad_usage_exits_2_before_opening_anything(relay_exe, args):
    done = subprocess.run([str(relay_exe), *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2
    assert "usage: vsock-tcp-relay" in done.stderr
    assert done.stdout == ""
