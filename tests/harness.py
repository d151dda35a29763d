"""Running a guest from a test: boot it with pyvmm's Python API, capture its console.

Used by the KVM-level, Linux-boot and end-to-end tests.  A run is bounded by
a timeout (pyvmm's own watchdog), so a hung guest fails its test instead of
hanging the suite.  :func:`run_guest` boots and waits for the end;
:class:`LiveGuest` boots in the background so a test can talk to the guest
(vsock) while it runs, waiting for console lines rather than sleeping.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyvmm import images
from pyvmm.machine import ExitStatus, Machine, MachineConfig, RunResult, VsockConfig
from pyvmm.testing import Console

#: e2e test ids this session hands to the lab, and the lab run's summary line
LAB_NODEIDS = pytest.StashKey[list]()
LAB_SUMMARY = pytest.StashKey[str]()
#: measured figures of e2e tests, for the run's summary (the lab proxy prints them)
FIGURES = Path(__file__).resolve().parents[1] / ".pytest-figures.json"


def record_figure(name: str, value: str) -> None:
    """Keep a measured figure for the run's summary (the lab proxy prints them)."""
    data = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    data[name] = value
    FIGURES.write_text(json.dumps(data, indent=1))


@dataclass
class GuestRun:
    result: RunResult
    console: str
    cmdline: str
    boot_phases: tuple = ()       # (code, seconds) written to the boot-timer port
    virtio: list = field(default_factory=list)     # transport snapshots at the end
    vsock: dict | None = None                      # vsock counters at the end
    blk: list = field(default_factory=list)        # each disk's counters at the end
    vcpus: tuple = ()             # where each vCPU was, if the run timed out (a hang's report)

    @property
    def lines(self) -> list[str]:
        return self.console.splitlines()

    def explain(self) -> str:
        """Everything a failing assertion should show."""
        tail = "\n".join(self.lines[-40:])
        where = "".join(f"{line}\n" for line in self.vcpus)
        return (f"status {self.result.status}: {self.result.reason}\n{where}cmdline: {self.cmdline}\n"
                f"--- console (last 40 lines) ---\n{tail}")


def _named_rips(states: list[str], kernel: str) -> tuple[str, ...]:
    """``Machine.vcpu_states()`` lines, each RIP named from the kernel's symbols when it
    is an ELF with them (tests/lab/kvm_trace.py's symbolizer: ``nm``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "lab"))
    from kvm_trace import symbolizer
    name = symbolizer(Path(kernel))
    return tuple(re.sub(r"RIP (0x[0-9a-f]+)", lambda m: f"{m[0]} {name(int(m[1], 16))}".rstrip(),
                        line) for line in states)


class LiveGuest:
    """A guest running in the background: ``with LiveGuest(...) as g: g.wait_for(...)``."""

    def __init__(self, kernel, *, cmdline: str = "", initrd=None, cpus: int = 1,
                 mem: int = 64 << 20, timeout: float = 60.0, vsock: VsockConfig | None = None,
                 default_cmdline: bool = True, stdin=None, disks=()) -> None:
        """``stdin``: a file the guest's serial port reads, or "pipe": one that
        :meth:`type` writes to.  ``disks``: DiskConfigs, the guest's vda, vdb, ..."""
        self.console = Console()
        self._typed = None
        if stdin == "pipe":
            r, w = os.pipe()
            stdin, self._typed = os.fdopen(r, "rb", buffering=0), os.fdopen(w, "wb", buffering=0)
        self._stdin = stdin
        self.config = MachineConfig(kernel=str(kernel), initrd=str(initrd) if initrd else None,
                                    cmdline=cmdline, mem=mem, cpus=cpus, timeout=timeout,
                                    serial_out=self.console, default_cmdline=default_cmdline,
                                    vsock=vsock, stdin=stdin, disks=list(disks))
        self.vm: Machine | None = None
        self._ended = threading.Event()
        self._result: RunResult | None = None
        self._waiter: threading.Thread | None = None

    def __enter__(self) -> "LiveGuest":
        self.vm = Machine(self.config)
        self.vm.start()
        self._waiter = threading.Thread(target=self._wait, name="guest-wait", daemon=True)
        self._waiter.start()
        return self

    def _wait(self) -> None:
        self._result = self.vm.wait()
        self._ended.set()

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        try:
            return self.console.wait_for(pattern, timeout, self._ended)
        except AssertionError as e:
            if self._result is None:
                raise
            raise AssertionError(f"{e}\n--- the guest ended: status {self._result.status}: "
                                 f"{self._result.reason}") from None

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    @property
    def result(self) -> RunResult | None:
        """How the run ended, once it has (else None)."""
        return self._result

    @property
    def vsock(self):
        return self.vm.vsock

    def finish(self, timeout: float | None = None) -> GuestRun:
        """Wait for the guest to end by itself (within the machine's timeout)."""
        self._waiter.join(timeout)
        if self._waiter.is_alive():
            self.vm.stop(124, f"the test stopped waiting after {timeout} s")
            self._waiter.join()
        return self._collect()

    def _collect(self) -> GuestRun:
        vm = self.vm
        return GuestRun(self._result, self.console.text(), str(vm.cmdline),
                        tuple((r.code, r.seconds) for r in vm.boot_timer.records),
                        [slot.transport.snapshot() for slot in vm.virtio_slots],
                        vm.vsock_device.counters() if vm.vsock_device is not None else None,
                        [dev.counters() for dev in vm.blk_devices],
                        _named_rips(vm.vcpu_states(), self.config.kernel)
                        if self._result.status == ExitStatus.TIMEOUT else ())

    def type(self, data: bytes) -> None:
        """Send ``data`` to the guest's serial port (``stdin="pipe"``)."""
        self._typed.write(data)

    def __exit__(self, *exc) -> None:
        if self._waiter is not None and self._waiter.is_alive():
            self.vm.stop(130, "test finished")
            self._waiter.join()
        self.vm.close()
        if self._typed is not None:     # EOF ends pyvmm's stdin thread, then its end closes
            self._typed.close()
            self._stdin.close()


class ShellGuest(LiveGuest):
    """A Linux guest (the default initramfs) that runs the commands a test types on its console.

    Its ``pyvmm.run`` is a loop reading console lines and running each (:data:`LOOP`).  Every
    command is started in the background with its output tagged by a token of its own, and
    ends with a line giving its exit status, so tests that share the guest never read each
    other's lines and one command's hang does not block the next::

        with ShellGuest(kernel, initrd=...) as g:
            g.wait_ready()
            cmd = g.run("pyvmm-hello a b")          # cmd.status, cmd.output
            srv = g.start("vsock-echo-server --port 1234 --count 1")
            srv.wait_for(r"listening stream 1234"); ...; srv.wait(60)
    """

    #: the guest's command loop: console echo off (typed text stays off the console), no
    #: pathname expansion (``eval`` then sees each line as typed), one ``eval`` per line
    LOOP = "stty -echo; set -f; while read -r line; do eval $line; done"

    def __init__(self, kernel, *, cmdline: str = "", **kw) -> None:
        self._keyboard_lock = threading.Lock()
        self._tokens = itertools.count(1)
        super().__init__(kernel, cmdline=f'pyvmm.run="{self.LOOP}" {cmdline}'.strip(),
                         stdin="pipe", **kw)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait for /init's ready line and for the loop to answer a first command."""
        self.wait_for(r"^pyvmm-guest: ready$", timeout)
        first = self.run("true", timeout=60)
        if first.status != 0:
            raise AssertionError(f"the guest's command loop answered {first.status}")

    def type_line(self, line: str) -> None:
        """Type one line on the guest's console (the loop runs it)."""
        if "\n" in line:
            raise ValueError("one line at a time")
        with self._keyboard_lock:
            self.type(line.encode() + b"\n")

    def start(self, command: str) -> "GuestCommand":
        """Start ``command`` (a shell command line) in the guest; returns at once."""
        token = f"c{next(self._tokens)}"
        self.type_line(f'{{ {command}; echo "{GuestCommand.END} $?"; }} 2>&1 | '
                  f'while read -r x; do echo "{token}|$x"; done &')
        return GuestCommand(self, token, command)

    def start_server(self, command: str, listening: str, timeout: float = 120.0) -> "GuestCommand":
        """Start a guest-side server and wait for its line matching ``listening``."""
        server = self.start(command)
        server.wait_for(listening, timeout)
        return server

    def run(self, command: str, timeout: float = 120.0) -> "GuestCommand":
        """Run ``command`` in the guest and wait for it to end; see :class:`GuestCommand`."""
        cmd = self.start(command)
        cmd.wait(timeout)
        return cmd

    def start_with_pid(self, command: str) -> tuple["GuestCommand", int]:
        """Start a long-running guest command in the background; returns it and its pid."""
        cmd = self.start(f'{command} & echo "pid $!"; wait $!')
        return cmd, int(cmd.wait_for(r"pid (\d+)", 60).group(1))

    def start_relayed_httpd(self, root: str, httpd_port: int, vsock_port: int) -> tuple:
        """busybox httpd serving ``root`` on guest TCP 127.0.0.1:``httpd_port``, behind
        ``vsock-tcp-relay --from-vsock vsock_port``; both listen when this returns (if they
        do not, both are killed).  Returns (the relay's GuestCommand, its pid, httpd's pid)."""
        _httpd, httpd_pid = self.start_with_pid(
            f"busybox httpd -f -p 127.0.0.1:{httpd_port} -h {root}")
        relay, relay_pid = self.start_with_pid(
            f"vsock-tcp-relay --from-vsock {vsock_port} --to-tcp 127.0.0.1:{httpd_port}")
        try:
            relay.wait_for(r"vsock-tcp-relay: listening", 60)
            self.wait_tcp_listening(httpd_port)
        except BaseException:
            self.run(f"kill {relay_pid} {httpd_pid}")
            raise
        return relay, relay_pid, httpd_pid

    def wait_ended(self, cmd: "GuestCommand", pid: int) -> int:
        """Wait for a killed guest command to end; if it does not, say what state its
        process is in."""
        try:
            return cmd.wait(60)
        except AssertionError as e:
            state = self.run(f"grep -E '^(State|SigPnd|ShdPnd|SigBlk|SigCgt)' /proc/{pid}/status; "
                             f"echo wchan $(cat /proc/{pid}/wchan); cat /proc/{pid}/stack; "
                             f"ls -l /proc/{pid}/fd; ps")
            raise AssertionError(f"{e}\n--- process {pid} ---\n{state.output}") from None

    def wait_tcp_listening(self, port: int) -> None:
        """Wait (bounded) until a guest TCP socket listens on 127.0.0.1 ``port``:
        /proc/net/tcp has it in state 0A (LISTEN).  busybox httpd prints nothing when ready."""
        entry = f" 0100007F:{port:04X} 00000000:0000 0A "
        wait = self.run(f"until grep -q '{entry}' /proc/net/tcp; do usleep 20000; done", timeout=60)
        if wait.status != 0:
            raise AssertionError(wait.explain())

    def __exit__(self, *exc) -> None:
        if self._waiter is not None and self._waiter.is_alive():
            self.type_line("exit")     # the loop ends, /init reports and resets the guest
            self._waiter.join(30)
        super().__exit__(*exc)


class GuestCommand:
    """One command started by :meth:`ShellGuest.start`: its own console lines and status."""

    END = "@@end"

    def __init__(self, guest: ShellGuest, token: str, command: str) -> None:
        self.guest, self.token, self.command = guest, token, command
        self.status: int | None = None

    @property
    def output(self) -> str:
        """What the command printed so far (stdout and stderr), without the status line."""
        prefix = f"{self.token}|"
        return "\n".join(line[len(prefix):] for line in self.guest.console.text().splitlines()
                         if line.startswith(prefix) and not line.startswith(prefix + self.END))

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Wait for a line of this command's output matching ``pattern`` (a search)."""
        return self.guest.wait_for(rf"^{re.escape(self.token)}\|.*?(?:{pattern})", timeout)

    def wait(self, timeout: float = 120.0) -> int:
        """Wait for the command to end; returns (and keeps in ``status``) its exit status."""
        try:
            m = self.guest.wait_for(rf"^{re.escape(self.token)}\|{self.END} (\d+)$", timeout)
        except AssertionError as e:
            raise AssertionError(f"guest command {self.command!r} did not end: {e}\n"
                                 f"--- its output ---\n{self.output}") from None
        self.status = int(m.group(1))
        return self.status

    def explain(self) -> str:
        return f"guest command {self.command!r} -> status {self.status}\n{self.output}"


def run_guest(kernel, *, timeout: float = 60.0, **kw) -> GuestRun:
    """Boot ``kernel`` and wait for the run to end; returns what it printed and how it ended."""
    with LiveGuest(kernel, timeout=timeout, **kw) as guest:
        return guest.finish()


def freestanding(scenario: str, **kw) -> GuestRun:
    """Boot the freestanding test guest with ``scenario`` as its command line."""
    return run_guest(images.freestanding_guest(), cmdline=scenario, **kw)


# --- the Firecracker-style Unix host end, as a host program uses it ---------------------------
def connect_unix(uds: str, port: int, kind=socket.SOCK_STREAM, timeout: float = 60) -> socket.socket:
    """Host-initiated vsock connection: ``CONNECT <port>\\n`` on ``uds``, expect
    ``OK <host_port>\\n`` (one record each on a SOCK_SEQPACKET socket)."""
    s = socket.socket(socket.AF_UNIX, kind)
    s.settimeout(timeout)
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    if kind == socket.SOCK_SEQPACKET:
        reply = s.recv(64)
    else:
        reply = b""
        while not reply.endswith(b"\n"):
            c = s.recv(1)              # byte by byte: what follows the line is payload
            if not c:
                break
            reply += c
    if not re.fullmatch(rb"OK \d+\n", reply):
        s.close()
        raise ConnectionRefusedError(f"CONNECT {port}: got {reply!r}")
    return s


def listen_unix(path: str, kind=socket.SOCK_STREAM, timeout: float = 60) -> socket.socket:
    """A listener where guest-initiated connections to that port arrive (``<uds>_<port>``)."""
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(path)
    s.listen(128)
    s.settimeout(timeout)
    return s


def host_processes() -> list[tuple[int, str, int, int]]:
    """``(pid, comm, ppid, session)`` of every process on the host, from /proc (no psutil);
    comm is the kernel's, cut at 15 characters."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:                                  # gone meanwhile
            continue
        comm_end = stat.rindex(")")                      # comm may hold spaces and parentheses
        fields = stat[comm_end + 2:].split()             # state, ppid, pgrp, session, ...
        out.append((int(entry), stat[:comm_end].split("(", 1)[1], int(fields[1]), int(fields[3])))
    return out


def recv_all(s: socket.socket, limit: int = 1 << 30) -> bytes:
    """Read until EOF (or ``limit`` bytes)."""
    out = bytearray()
    while len(out) < limit and (chunk := s.recv(min(1 << 16, limit - len(out)))):
        out += chunk
    return bytes(out)


# --- host-side servers for guest-initiated connections (``<uds>_<port>``) -------------------
class UnixServer:
    """A Unix listener at ``path`` whose connections ``handler(conn)`` serves, one thread each;
    a context manager that closes the listener.  A handler's exception is kept in ``errors``
    for the test to check."""

    def __init__(self, path: str, handler, kind=socket.SOCK_STREAM) -> None:
        self.sock = socket.socket(socket.AF_UNIX, kind)
        self.sock.bind(path)
        self.sock.listen(128)
        self.handler = handler
        self.errors: list[str] = []
        self.served = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        with conn:
            try:
                self.handler(conn)
                self.served += 1
            except Exception as e:          # recorded, checked by the test
                self.errors.append(repr(e))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "UnixServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def echo_stream(conn) -> None:
    """A UnixServer handler: echo a stream until EOF."""
    while data := conn.recv(65536):
        conn.sendall(data)


def echo_records(conn) -> None:
    """A UnixServer handler: echo each SOCK_SEQPACKET record as one record."""
    while data := conn.recv(1 << 20):
        conn.send(data)
