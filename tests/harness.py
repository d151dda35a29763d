"""Running a guest from a test: boot it with pyvmm's Python API, capture its console.

Used by the KVM-level, Linux-boot and end-to-end tests.  A run is bounded by
a timeout (pyvmm's own watchdog), so a hung guest fails its test instead of
hanging the suite.  :func:`run_guest` boots and waits for the end;
:class:`LiveGuest` boots in the background so a test can talk to the guest
(vsock) while it runs, waiting for console lines rather than sleeping.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from pyvmm import images
from pyvmm.machine import Machine, MachineConfig, RunResult, VsockConfig

#: e2e test ids this session hands to the lab, and the lab run's summary line
LAB_NODEIDS = pytest.StashKey[list]()
LAB_SUMMARY = pytest.StashKey[str]()


@dataclass
class GuestRun:
    result: RunResult
    console: str
    cmdline: str
    boot_phases: tuple = ()       # (code, seconds) written to the boot-timer port
    virtio: list = field(default_factory=list)     # transport snapshots at the end
    vsock: dict | None = None                      # vsock counters at the end

    @property
    def lines(self) -> list[str]:
        return self.console.splitlines()

    def explain(self) -> str:
        """Everything a failing assertion should show."""
        tail = "\n".join(self.lines[-40:])
        return (f"status {self.result.status}: {self.result.reason}\ncmdline: {self.cmdline}\n"
                f"--- console (last 40 lines) ---\n{tail}")


class _Console:
    """The guest's serial output, kept whole and watchable for lines."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._cond = threading.Condition()

    def write(self, data: bytes) -> int:
        with self._cond:
            self._buf += data
            self._cond.notify_all()
        return len(data)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        with self._cond:
            data = bytes(self._buf)
        return data.decode("utf-8", "replace").replace("\r\n", "\n")

    def wait_for(self, pattern: str, timeout: float, done: threading.Event) -> re.Match:
        """Block until a console line matches ``pattern`` (or fail after ``timeout``)."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(bytes(self._buf).decode("utf-8", "replace").replace("\r\n", "\n"))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or done.is_set():
                    raise AssertionError(f"no console line matching {pattern!r} within "
                                         f"{timeout:g} s (guest {'ended' if done.is_set() else 'running'})"
                                         f"\n--- console tail ---\n"
                                         + "\n".join(self.text().splitlines()[-30:]))
                self._cond.wait(min(left, 1.0))


class LiveGuest:
    """A guest running in the background: ``with LiveGuest(...) as g: g.wait_for(...)``."""

    def __init__(self, kernel, *, cmdline: str = "", initrd=None, cpus: int = 1,
                 mem: int = 64 << 20, timeout: float = 60.0, vsock: VsockConfig | None = None,
                 default_cmdline: bool = True, stdin=None) -> None:
        """``stdin``: a file the guest's serial port reads, or "pipe": one that
        :meth:`type` writes to."""
        self.console = _Console()
        self._typed = None
        if stdin == "pipe":
            r, w = os.pipe()
            stdin, self._typed = os.fdopen(r, "rb", buffering=0), os.fdopen(w, "wb", buffering=0)
        self._stdin = stdin
        self.config = MachineConfig(kernel=str(kernel), initrd=str(initrd) if initrd else None,
                                    cmdline=cmdline, mem=mem, cpus=cpus, timeout=timeout,
                                    serial_out=self.console, default_cmdline=default_cmdline,
                                    vsock=vsock, stdin=stdin)
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
        return self.console.wait_for(pattern, timeout, self._ended)

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
                        vm.vsock_device.counters() if vm.vsock_device is not None else None)

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


def recv_all(s: socket.socket, limit: int = 1 << 30) -> bytes:
    """Read until EOF (or ``limit`` bytes)."""
    out = bytearray()
    while len(out) < limit and (chunk := s.recv(min(1 << 16, limit - len(out)))):
        out += chunk
    return bytes(out)
