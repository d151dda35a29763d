"""The guest agent (guest/progs/pyvmm-agent.c) and its host client (pyvmm.agent), together.

The agent serves the same protocol on TCP (``--tcp``) as on vsock, so these tests build it with
the host's gcc, run it on 127.0.0.1 and talk to it with the real client (and, for hostile
frames, with raw sockets): this host's AF_VSOCK is never opened.  The commands run on the host,
as the agent's user.  Every wait is bounded by TIMEOUT; the agent runs with --io-timeout 1, so
its own frame and send bounds show up within seconds.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvmm.agent import Agent, AgentBusy, AgentError, AgentProtocolError
from pyvmm.agent import wire
from pyvmm.agent.wire import ErrorCode, FrameDecoder, FrameType

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "guest" / "progs" / "pyvmm-agent.c"
TIMEOUT = 30.0
IO_TIMEOUT_S = 1            # the agent's --io-timeout in these tests

pytestmark = pytest.mark.skipif(not shutil.which("gcc"), reason="gcc is not installed")


@pytest.fixture(scope="module")
def agent_exe(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("agent") / "pyvmm-agent"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{SOURCE.parent}", "-o",
                    str(exe), str(SOURCE)], check=True)
    return exe


class AgentProcess:
    """A running agent on 127.0.0.1:<port>; its stderr in a file."""

    def __init__(self, exe: Path, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            [str(exe), "--tcp", "127.0.0.1:0", "--io-timeout", str(IO_TIMEOUT_S)],
            stdout=subprocess.PIPE, stderr=open(stderr_path, "wb"), text=True)
        line = self.proc.stdout.readline().rstrip("\n")
        m = re.fullmatch(r"pyvmm-agent: listening tcp:127\.0\.0\.1:(\d+)", line)
        assert m, line
        self.port = int(m.group(1))

    def socket(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)

    def client(self) -> Agent:
        return Agent(self.socket(), io_timeout=TIMEOUT)

    def sessions(self) -> int:
        """Session processes the agent has not reaped yet."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return len(path.read_text().split())

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=TIMEOUT)
        return status, self.proc.stdout.read()


@pytest.fixture
def agent_proc(agent_exe, tmp_path):
    proc = AgentProcess(agent_exe, tmp_path / "agent.stderr")
    yield proc
    if proc.proc.poll() is None:
        proc.stop()


@pytest.fixture
def agent(agent_proc):
    with agent_proc.client() as a:
        yield a


def wait_until(condition, what: str, timeout: float = TIMEOUT) -> None:
    """Poll a condition the test cannot be told about (another process's state), bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """The process has ended (a zombie counts: it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# -- run -----------------------------------------------------------------------------------------
def test_run_returns_status_stdout_and_stderr(agent):
    r = agent.run("echo out; echo err >&2; exit 3")
    assert (r.status, r.stdout, r.stderr, r.ok) == (3, b"out\n", b"err\n", False)
    assert r.argv == ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]
    ok = agent.run(["true"])
    assert ok.ok and ok.status == 0 and ok.exit_code == 0 and ok.signal is None


def test_an_argv_is_not_split_by_a_shell_and_is_looked_up_in_path(agent):
    r = agent.run(["printf", "[%s]", "a b", "$HOME", "*"])
    assert r.stdout == b"[a b][$HOME][*]"


def test_a_command_that_cannot_be_run_exits_127_and_says_why(agent):
    missing = ["no-such-program-here"]   # (a name, not a list literal: test_install_list
    r = agent.run(missing)                 # would look this program up on the host)
    assert r.status == 127
    assert r.stderr == b"pyvmm-agent: exec no-such-program-here: No such file or directory\n"
    r = agent.run(["true"], cwd="/no/such/dir")
    assert r.status == 127 and b"chdir /no/such/dir" in r.stderr


def test_env_adds_to_the_agents_environment_and_cwd_is_used(agent, tmp_path):
    r = agent.run('echo "$PYVMM_A|$PYVMM_B|${PATH:+path}"; pwd', env={"PYVMM_A": "1 2", "PYVMM_B": ""},
                  cwd=str(tmp_path))
    assert r.stdout.decode() == f"1 2||path\n{tmp_path}\n"


def test_stdin_reaches_the_command_whole(agent):
    data = os.urandom(3 << 20)          # many DATA frames, more than any pipe holds
    r = agent.run(["cat"], stdin=data)
    assert r.ok and r.stdout == data


def test_a_command_that_does_not_read_its_stdin_ends_and_the_connection_goes_on(agent):
    r = agent.run(["true"], stdin=os.urandom(8 << 20))
    assert r.ok
    assert agent.run(["echo", "next"]).stdout == b"next\n"


def test_a_signal_is_reported_as_such(agent):
    r = agent.run("kill -TERM $$")
    assert (r.exit_code, r.signal, r.status, r.timed_out) == (None, signal.SIGTERM, 143, False)


def test_the_deadline_kills_the_whole_process_group(agent, tmp_path):
    pidfile = tmp_path / "bg.pid"
    t0 = time.monotonic()
    r = agent.run(f"sleep 60 & echo $! > {pidfile}; echo started; wait", timeout=0.5)
    assert time.monotonic() - t0 < TIMEOUT
    assert r.timed_out and r.signal == signal.SIGKILL and not r.ok
    assert r.stdout == b"started\n"      # what came before the kill is kept
    bg = int(pidfile.read_text())
    wait_until(lambda: gone(bg), f"the background sleep {bg} killed with its group")


def test_output_is_streamed_while_the_command_runs(agent, tmp_path):
    """The command prints, then waits for a file the host creates only once it has seen that
    print: without streaming it would wait until its deadline."""
    flag = tmp_path / "seen"
    seen = []

    def on_output(fd, data):
        seen.append((fd, data))
        if b"first" in data:
            flag.touch()

    r = agent.run(f"echo first; while [ ! -e {flag} ]; do sleep 0.01; done; echo second >&2",
                  timeout=TIMEOUT, on_output=on_output)
    assert r.ok and not r.timed_out
    assert seen == [(1, b"first\n"), (2, b"second\n")]
    assert r.stdout == r.stderr == b""   # given to on_output, not kept


def test_output_beyond_output_max_is_dropped_and_counted(agent):
    extra = 12345
    r = agent.run(f"head -c {wire.OUTPUT_MAX + extra} /dev/zero; echo tail >&2")
    assert r.ok
    assert len(r.stdout) == wire.OUTPUT_MAX and r.stdout_dropped == extra
    assert r.stderr == b"tail\n" and r.stderr_dropped == 0 and r.truncated


def test_the_host_bounds_what_it_keeps_too(agent_proc):
    a = agent_proc.client()
    with pytest.raises(AgentProtocolError) as e:
        a.run("head -c 5000 /dev/zero", max_output=1000)
    assert not e.value.by_agent and e.value.code == ErrorCode.BAD_LENGTH and a.closed


# -- put and get -----------------------------------------------------------------------------------
def test_put_and_get_round_trip_with_the_exact_mode(agent, tmp_path):
    data = os.urandom((1 << 20) + 3)
    path = tmp_path / "f"
    old = os.umask(0o077)
    try:
        assert agent.put(str(path), data, mode=0o751) == len(data)
    finally:
        os.umask(old)
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o7777 == 0o751
    assert agent.get(str(path)) == data
    agent.put(str(path), b"short")               # truncated, not overwritten in place
    assert agent.get(str(path)) == b"short"
    assert agent.put(str(tmp_path / "empty"), b"") == 0 and agent.get(str(tmp_path / "empty")) == b""


def test_get_reads_files_without_a_size(agent):
    assert b"Name:" in agent.get("/proc/self/status")


def test_put_and_get_errors_are_the_guests_errno_and_the_connection_goes_on(agent, tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 1001)
    cases = [
        (lambda: agent.put(str(tmp_path / "no" / "f"), b"x" * 200_000), errno.ENOENT),
        (lambda: agent.get(str(tmp_path / "missing")), errno.ENOENT),
        (lambda: agent.get(str(tmp_path)), errno.EISDIR),
        (lambda: agent.get("/dev/null"), errno.EINVAL),            # not a regular file
        (lambda: agent.get(str(tmp_path / "big"), max_size=1000), errno.EFBIG),
    ]
    for call, expected in cases:
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == expected
    assert agent.get(str(tmp_path / "big"), max_size=1001) == b"x" * 1001
    assert agent.run(["true"]).ok


# -- sessions ----------------------------------------------------------------------------------------
def test_connections_are_served_at_once(agent_proc, tmp_path):
    """Two commands that each wait for the other's file finish only if both run at once."""
    a, b = agent_proc.client(), agent_proc.client()
    results = {}

    def run(name, agent, mine, theirs):
        results[name] = agent.run(f"touch {mine}; while [ ! -e {theirs} ]; do sleep 0.01; done",
                                  timeout=TIMEOUT)

    threads = [threading.Thread(target=run, args=("a", a, tmp_path / "a", tmp_path / "b")),
               threading.Thread(target=run, args=("b", b, tmp_path / "b", tmp_path / "a"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert results["a"].ok and results["b"].ok
    a.close()
    b.close()


def test_at_most_max_sessions_at_once_the_next_is_told_busy(agent_proc):
    clients = [agent_proc.client() for _ in range(wire.MAX_SESSIONS)]
    with pytest.raises(AgentBusy):
        agent_proc.client()
    clients.pop().close()
    wait_until(lambda: agent_proc.sessions() < wire.MAX_SESSIONS, "the closed session reaped")
    with agent_proc.client() as again:
        assert again.run(["true"]).ok
    for c in clients:
        c.close()


def test_a_host_that_goes_away_mid_command_gets_the_command_killed(agent_proc, tmp_path):
    pidfile = tmp_path / "pid"
    sock = agent_proc.socket()
    expect_frames(sock, [FrameType.HELLO])
    sock.sendall(wire.encode_hello() + wire.encode_exec(wire.ExecRequest(
        (b"sh", b"-c", f"echo $$ > {pidfile}; exec sleep 60".encode()))) + wire.encode_data())
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), "the command started")
    pid = int(pidfile.read_text())
    sock.close()
    wait_until(lambda: gone(pid), "the command killed when its host left")


def test_a_host_that_stops_reading_is_given_up_and_its_command_killed(agent_proc, tmp_path):
    pidfile = tmp_path / "pid"
    sock = agent_proc.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    expect_frames(sock, [FrameType.HELLO])
    sock.sendall(wire.encode_hello() + wire.encode_exec(wire.ExecRequest(
        (b"sh", b"-c", f"echo $$ > {pidfile}; exec yes".encode()))) + wire.encode_data())
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), "the command started")
    pid = int(pidfile.read_text())
    wait_until(lambda: gone(pid), "the command killed when its host stopped reading")
    assert "the host took no frame in the --io-timeout s: closing" in agent_proc.stderr()
    sock.close()


def test_sigterm_ends_the_agent_its_sessions_and_their_commands(agent_proc, tmp_path):
    pidfile = tmp_path / "pid"
    a = agent_proc.client()
    outcome = []
    client = threading.Thread(target=lambda: outcome.append(
        catch(a.run, f"echo $$ > {pidfile}; exec sleep 60")), daemon=True)
    client.start()
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), "the command started")
    status, out = agent_proc.stop()
    assert status == 0 and out == "pyvmm-agent: done 1\n"
    wait_until(lambda: gone(int(pidfile.read_text())), "the command killed with its session")
    client.join(TIMEOUT)
    assert outcome and isinstance(outcome[0], AgentError), outcome   # the client saw the end


def catch(fn, *args):
    """fn's exception, or its result."""
    try:
        return fn(*args)
    except Exception as e:
        return e


# -- hostile frames to the agent ------------------------------------------------------------------
def read_frames(sock: socket.socket) -> list:
    """Every frame until the agent closes (bounded by the socket's timeout)."""
    dec, frames = FrameDecoder(), []
    while data := sock.recv(1 << 16):
        frames += dec.feed(data)
    assert not dec.mid_frame
    return frames


def expect_frames(sock: socket.socket, types: list) -> list:
    dec, frames = FrameDecoder(), []
    while len(frames) < len(types):
        data = sock.recv(1)              # byte by byte: leave what follows in the socket
        assert data, f"EOF after {frames}"
        frames += dec.feed(data)
    assert [f.type for f in frames] == types
    return frames


HELLO = wire.encode_hello()
EXEC_TRUE = wire.encode_exec(wire.ExecRequest((b"true",)))
HOSTILE = [
    ("oversized length", HELLO + struct.pack("<IB", wire.FRAME_MAX + 1, FrameType.DATA),
     ErrorCode.BAD_LENGTH),
    ("length 2^32-1 before HELLO", struct.pack("<IB", 0xFFFF_FFFF, FrameType.HELLO),
     ErrorCode.BAD_LENGTH),
    ("unknown type", HELLO + struct.pack("<IB", 0, 77), ErrorCode.BAD_TYPE),
    ("type 0", struct.pack("<IB", 0, 0), ErrorCode.BAD_TYPE),
    ("EXEC before HELLO", EXEC_TRUE, ErrorCode.BAD_ORDER),
    ("HELLO bad magic", wire.encode_frame(FrameType.HELLO, b"XXXX\x01\0\0\0"), ErrorCode.BAD_PAYLOAD),
    ("HELLO short", wire.encode_frame(FrameType.HELLO, b"PVMA"), ErrorCode.BAD_PAYLOAD),
    ("HELLO version 2", wire.encode_hello(2), ErrorCode.BAD_VERSION),
    ("HELLO twice", HELLO + HELLO, ErrorCode.BAD_ORDER),
    ("DATA when idle", HELLO + wire.encode_data(b"x"), ErrorCode.BAD_ORDER),
    ("STDOUT from the host", HELLO + wire.encode_frame(FrameType.STDOUT, b"x"), ErrorCode.BAD_ORDER),
    ("EXIT from the host", HELLO + wire.encode_frame(FrameType.EXIT, b"\0" * 25), ErrorCode.BAD_ORDER),
    ("EXEC argc 0", HELLO + wire.encode_frame(FrameType.EXEC, struct.pack("<IHH", 0, 0, 0) + b"\0"),
     ErrorCode.BAD_PAYLOAD),
    ("EXEC missing NUL", HELLO + wire.encode_frame(FrameType.EXEC, struct.pack("<IHH", 0, 1, 0) + b"\0true"),
     ErrorCode.BAD_PAYLOAD),
    ("EXEC bytes left over", HELLO + wire.encode_frame(
        FrameType.EXEC, struct.pack("<IHH", 0, 1, 0) + b"\0true\0junk"), ErrorCode.BAD_PAYLOAD),
    ("EXEC env not NAME=VALUE", HELLO + wire.encode_frame(
        FrameType.EXEC, struct.pack("<IHH", 0, 1, 1) + b"\0true\0NOEQ\0"), ErrorCode.BAD_PAYLOAD),
    ("EXEC short", HELLO + wire.encode_frame(FrameType.EXEC, b"\0\0\0"), ErrorCode.BAD_PAYLOAD),
    ("EXEC argc over max", HELLO + wire.encode_frame(
        FrameType.EXEC, struct.pack("<IHH", 0, 4096, 1) + b"\0" * 100), ErrorCode.BAD_PAYLOAD),
    ("EXEC during EXEC", HELLO + wire.encode_exec(wire.ExecRequest((b"sleep", b"5"))) + EXEC_TRUE,
     ErrorCode.BAD_ORDER),
    ("PUT relative path", HELLO + wire.encode_frame(FrameType.PUT, struct.pack("<I", 0o644) + b"x"),
     ErrorCode.BAD_PAYLOAD),
    ("PUT mode 0o10000", HELLO + wire.encode_frame(FrameType.PUT, struct.pack("<I", 0o10000) + b"/x"),
     ErrorCode.BAD_PAYLOAD),
    ("PUT NUL in path", HELLO + wire.encode_frame(FrameType.PUT, struct.pack("<I", 0o644) + b"/a\0"),
     ErrorCode.BAD_PAYLOAD),
    ("GET during PUT", HELLO + wire.encode_put(b"/dev/null", 0o644) + wire.encode_get(b"/x", 1),
     ErrorCode.BAD_ORDER),
    ("GET path too long", HELLO + wire.encode_frame(FrameType.GET, struct.pack("<Q", 1) + b"/" * 4096),
     ErrorCode.BAD_PAYLOAD),
    ("half a header, then silence", HELLO + b"\x01\x00", ErrorCode.TIMEOUT),
    ("half a payload, then silence", HELLO + struct.pack("<IB", 100, FrameType.EXEC) + b"x" * 50,
     ErrorCode.TIMEOUT),
    ("no HELLO", b"", ErrorCode.TIMEOUT),
]


@pytest.mark.parametrize("data, code", [(d, c) for _, d, c in HOSTILE], ids=[n for n, _, _ in HOSTILE])
def test_hostile_frames_get_an_error_frame_and_the_connection_closes(agent_proc, data, code):
    with agent_proc.socket() as sock:
        expect_frames(sock, [FrameType.HELLO])
        sock.sendall(data)
        frames = read_frames(sock)       # ends: the agent closes (a hang: the socket's timeout)
    assert frames[-1].type is FrameType.ERROR, frames
    assert wire.parse_error(frames[-1].payload)[0] == code
    assert re.search(r"^pyvmm-agent: session 1: closing: ", agent_proc.stderr(), re.MULTILINE)
    with agent_proc.client() as again:           # the agent serves the next one
        assert again.run(["true"]).ok


def test_an_error_frame_from_the_host_ends_the_session_quietly(agent_proc):
    with agent_proc.socket() as sock:
        expect_frames(sock, [FrameType.HELLO])
        sock.sendall(HELLO + wire.encode_error(ErrorCode.BAD_ORDER, "bye"))
        assert read_frames(sock) == []
    assert agent_proc.stderr() == ""


@pytest.mark.parametrize("args", [
    ["--port", "x"], ["--port", "0x100000000"], ["--tcp", "localhost:1"], ["--tcp", "1.2.3.4"],
    ["--tcp", "127.0.0.1:70000"], ["--io-timeout", "0"], ["extra"],
])
def test_bad_usage_exits_2(agent_exe, args):
    done = subprocess.run([str(agent_exe), *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2 and "usage: pyvmm-agent" in done.stderr and done.stdout == ""


# -- pyvmm exec: the CLI, through a Unix socket speaking the vsock device's CONNECT protocol -------
class ConnectRelay:
    """A stand-in for the vsock device's Unix socket: takes ``CONNECT <port>\\n``, answers
    ``OK 1073741824\\n`` and relays the connection to the agent's TCP port."""

    def __init__(self, path: str, agent_port: int) -> None:
        self.lines: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(4)
        self.agent_port = agent_port
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            line = b""
            while not line.endswith(b"\n"):
                line += conn.recv(1)
            self.lines.append(line)
            up = socket.create_connection(("127.0.0.1", self.agent_port))
            conn.sendall(b"OK 1073741824\n")
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._copy, args=(a, b), daemon=True).start()

    @staticmethod
    def _copy(src, dst) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def pyvmm_exec(*args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyvmm", "exec", *args], input=stdin,
                          capture_output=True, timeout=TIMEOUT * 2)


def test_pyvmm_exec_prints_the_output_and_exits_with_the_commands_status(agent_proc, tmp_path):
    uds = str(tmp_path / "v.sock")
    relay = ConnectRelay(uds, agent_proc.port)
    done = pyvmm_exec("--uds", uds, "--env", "X=1", "--cwd", str(tmp_path), "-i", "--",
                      "sh", "-c", 'cat; echo "$X $(pwd)"; echo err >&2; exit 7', stdin=b"in\n")
    assert done.returncode == 7, done.stderr
    assert done.stdout == f"in\n1 {tmp_path}\n".encode()
    assert done.stderr == b"err\n"
    assert relay.lines == [f"CONNECT {wire.AGENT_PORT}\n".encode()]


def test_pyvmm_exec_timeout_is_124_and_an_unreachable_agent_255(agent_proc, tmp_path):
    uds = str(tmp_path / "v.sock")
    ConnectRelay(uds, agent_proc.port)
    done = pyvmm_exec("--uds", uds, "--timeout", "0.3", "--", "sleep", "30")
    assert done.returncode == 124
    assert b"killed after --timeout 0.3 s" in done.stderr
    missing = pyvmm_exec("--uds", str(tmp_path / "nothing.sock"), "--", "true")
    assert missing.returncode == 255 and missing.stderr.startswith(b"pyvmm exec: ")


def test_a_background_process_holding_the_output_does_not_hold_the_result(agent, tmp_path):
    """The shell exits at once; its background child keeps stdout open for 30 s. EXIT comes
    EXIT_DRAIN_MS after the shell's end, not when the pipe closes."""
    pidfile = tmp_path / "bg.pid"
    t0 = time.monotonic()
    r = agent.run(f"sleep 30 & echo $! > {pidfile}; echo started")
    assert r.ok and r.stdout == b"started\n"
    assert time.monotonic() - t0 < 20
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
