"""What every workload shares: the guest under a VMM, statistics, the test stream, CPU time.

* :class:`GuestProcess` -- a VMM (pyvmm or QEMU) as a subprocess running the
  freestanding test guest; its serial console is read by a thread so that a
  workload *waits for a console line* (never sleeps) and the VMM's CPU time can
  be read per thread from ``/proc/<pid>/task``.
* :func:`pyvmm_argv` / :func:`qemu_argv` -- the two command lines, side by side.
* :class:`NotAvailable` -- raised by a workload that cannot run here (no QEMU, a
  guest scenario that does not exist yet); the runner reports the reason.
* :func:`teststream` -- the guest's xorshift64 test stream (guest/freestanding/
  teststream.h), generated with numpy, because ``vsock-bulk-recv`` checks every
  byte it receives against it.
* :func:`percentiles`, :func:`gbit` -- the units the table uses.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PREFIX = "pyvmm-test-guest: "
GUEST_CID = 3
#: how long any single wait (a console line, a socket) may take before the
#: workload fails with a message: generous, because a slow host is a result,
#: not an error, but a hang must not stall the suite
WAIT = 60.0


class NotAvailable(Exception):
    """This workload cannot run here; the message says why (shown in the table)."""


class WorkloadFailed(Exception):
    """The workload ran but something went wrong (the guest failed, bytes were lost)."""


# --------------------------------------------------------------------------
# the guest under a VMM
# --------------------------------------------------------------------------

def pyvmm_argv(elf: Path, scenario: str, uds: Path, *, metrics: Path | None = None,
               timeout: float = 300.0) -> list[str]:
    """``pyvmm run`` with the freestanding guest and a vsock device (CID 3) on ``uds``."""
    argv = [sys.executable, "-m", "pyvmm", "-q", "run", "--kernel", str(elf),
            "--cmdline", scenario, "--vsock", f"{GUEST_CID},uds={uds}",
            "--timeout", f"{timeout:g}"]
    if metrics is not None:
        argv += ["--metrics", str(metrics)]
    return argv


def qemu_argv(elf: Path, scenario: str, chardev: Path, *, qemu: str = "qemu-system-x86_64",
              port: int = 1) -> list[str]:
    """QEMU microvm with the same guest and a virtio-serial port on a Unix socket.

    The chardev is a Unix-socket *client*: the benchmark listens on ``chardev``
    first and QEMU connects at start-up.  ``virtserialport nr=1`` (not
    ``virtconsole``): QEMU flow-controls only non-console ports, so no byte is
    dropped when the socket is slower than the guest (guest/freestanding/README.md).
    Always ``-nic none`` and no vsock device.
    """
    return [qemu, "-M", "microvm", "-accel", "kvm", "-m", "64M", "-smp", "1",
            "-nodefaults", "-no-reboot", "-nographic", "-nic", "none", "-serial", "stdio",
            "-global", "virtio-mmio.force-legacy=false",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=c0,path={chardev}",
            "-device", f"virtserialport,chardev=c0,nr={port}",
            "-kernel", str(elf), "-append", scenario]


@dataclass
class ThreadCpu:
    comm: str
    user: float        # seconds, including guest time (Linux counts guest time as user time)
    system: float
    guest: float       # seconds spent running guest code (KVM_RUN) on this thread


class GuestProcess:
    """A VMM running the test guest as a subprocess, with its console watched.

    ``with GuestProcess(argv, "pyvmm") as g: g.wait_for(r"vsock listening (\\d+)")``
    """

    def __init__(self, argv: list[str], name: str, *, stderr_path: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.spawned = time.monotonic()
        self._stderr_path = stderr_path
        err = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=err)
        finally:
            if stderr_path:
                err.close()
        self.lines: list[tuple[float, str]] = []     # (monotonic time, line without prefix)
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name=f"{name}-console", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                self.lines.append((time.monotonic(), line.removeprefix(PREFIX)))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match:
        """The first console line matching ``pattern`` (searched from the start)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for _, line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise WorkloadFailed(
                        f"{self.name}: no console line matching {pattern!r} "
                        f"({'the VMM exited' if self._eof else f'after {timeout:g} s'})"
                        + self.tail())
                self._cond.wait(left)

    def line_time(self, pattern: str) -> float | None:
        """When the first line matching ``pattern`` was read (monotonic), if it was."""
        rx = re.compile(pattern)
        with self._cond:
            for t, line in self.lines:
                if rx.search(line):
                    return t
        return None

    def first_line_time(self, timeout: float = WAIT) -> float:
        self.wait_for(".", timeout)
        return self.lines[0][0]

    def tail(self, n: int = 12) -> str:
        with self._cond:
            text = "\n    ".join(line for _, line in self.lines[-n:])
        err = ""
        if self._stderr_path and self._stderr_path.exists():
            err = "\n    ".join(self._stderr_path.read_text("utf-8", "replace").splitlines()[-6:])
        return f"\n  console:\n    {text}" + (f"\n  stderr:\n    {err}" if err else "")

    def finish(self, timeout: float = WAIT) -> int:
        """Wait for the VMM to exit by itself; its exit status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise WorkloadFailed(f"{self.name} did not exit within {timeout:g} s" + self.tail())

    def expect_exit0(self, timeout: float = WAIT) -> None:
        """The guest's own verdict: it printed ``exit 0``.  (pyvmm exits 0 on the
        guest's reset; QEMU microvm ends on the guest's triple fault, also 0.)"""
        self.finish(timeout)
        self._reader.join(5)
        if not any(line == "exit 0" for _, line in self.lines):
            raise WorkloadFailed(f"{self.name}: the guest did not print 'exit 0'" + self.tail())

    def cpu(self) -> dict[int, ThreadCpu]:
        """Per-thread CPU time of the VMM now (``/proc/<pid>/task/*/stat``)."""
        return thread_cpu(self.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)

    def __enter__(self) -> "GuestProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, ThreadCpu]:
    """utime, stime and guest_time (fields 14, 15, 43 of proc(5)) of every thread."""
    out = {}
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{base}/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rpartition(")")[2].split()           # fields[0] is field 3
        out[int(tid)] = ThreadCpu(comm, int(fields[11]) / _TICK, int(fields[12]) / _TICK,
                                  int(fields[40]) / _TICK)
    return out


def cpu_delta(before: dict[int, ThreadCpu], after: dict[int, ThreadCpu]) -> dict[str, float]:
    """VMM CPU seconds between two :func:`thread_cpu` snapshots.

    ``vmm`` excludes guest time: the freestanding guest busy-polls its
    virtqueues, so its vCPU thread is always 100 % busy running *guest* code;
    that is the guest's cost, not the VMM's.  ``total`` includes it."""
    user = system = guest = 0.0
    for tid, a in after.items():
        b = before.get(tid, ThreadCpu(a.comm, 0.0, 0.0, 0.0))
        user += a.user - b.user
        system += a.system - b.system
        guest += a.guest - b.guest
    return {"vmm": max(0.0, user - guest) + system, "total": user + system, "guest": guest,
            "system": system}


# --------------------------------------------------------------------------
# sockets
# --------------------------------------------------------------------------

def unix_listener(path: Path, backlog: int = 64) -> socket.socket:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(backlog)
    return s


def accept(listener: socket.socket, guest: GuestProcess, timeout: float = WAIT) -> socket.socket:
    """Accept one connection, failing early if the VMM exits first."""
    deadline = time.monotonic() + timeout
    listener.settimeout(0.2)
    while True:
        try:
            conn, _ = listener.accept()
            conn.settimeout(None)
            return conn
        except socket.timeout:
            if guest.proc.poll() is not None:
                raise WorkloadFailed(f"{guest.name} exited before connecting" + guest.tail())
            if time.monotonic() > deadline:
                raise WorkloadFailed(f"no connection from {guest.name} in {timeout:g} s"
                                     + guest.tail())


def firecracker_connect(uds: Path, port: int, timeout: float = WAIT) -> socket.socket:
    """Host -> guest through the Firecracker host end: ``CONNECT <port>\\n`` -> ``OK <n>\\n``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(uds))
    s.sendall(b"CONNECT %d\n" % port)
    reply = read_line(s)
    if not reply.startswith(b"OK "):
        s.close()
        raise WorkloadFailed(f"CONNECT {port}: got {reply!r}")
    s.settimeout(None)
    return s


def read_line(s: socket.socket) -> bytes:
    """One ``\\n``-terminated line, byte by byte (nothing after it is consumed)."""
    line = bytearray()
    while not line.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            return bytes(line)
        line += b
    return bytes(line)


def recv_exact(s: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = s.recv_into(view[got:])
        if not k:
            raise WorkloadFailed(f"peer closed after {got} of {n} bytes")
        got += k


# --------------------------------------------------------------------------
# the guest's test stream
# --------------------------------------------------------------------------

_SEED = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1
_BLOCK = 4096                          # xorshift states computed directly; the rest by jumps
_stream_cache: dict[int, memoryview] = {}


def _step(x: int) -> int:
    x ^= (x << 13) & _M64
    x ^= x >> 7
    x ^= (x << 17) & _M64
    return x


def _jump_tables(k: int) -> np.ndarray:
    """T^k, T the xorshift step (linear over GF(2)), as eight 256-entry byte tables."""
    cols = np.array([1 << j for j in range(64)], dtype=np.uint64)
    for _ in range(k):                       # apply T k times to the 64 basis vectors
        cols ^= cols << np.uint64(13)
        cols ^= cols >> np.uint64(7)
        cols ^= cols << np.uint64(17)
    tables = np.zeros((8, 256), dtype=np.uint64)
    values = np.arange(256)
    for b in range(8):
        for i in range(8):
            tables[b][(values >> i) & 1 == 1] ^= cols[8 * b + i]
    return tables


def teststream(n: int) -> memoryview:
    """The first ``n`` bytes of the guest's test stream (xorshift64 13/7/17 from
    0x9E3779B97F4A7C15, 8 little-endian bytes per step)."""
    for size, view in _stream_cache.items():
        if size >= n:
            return view[:n]
    words = -(-n // 8)
    out = np.empty(max(words, _BLOCK), dtype="<u8")
    x = _SEED
    for i in range(_BLOCK):
        x = _step(x)
        out[i] = x
    tables = _jump_tables(_BLOCK)
    for start in range(_BLOCK, len(out), _BLOCK):
        prev = out[start - _BLOCK:start]
        block = tables[0][prev & np.uint64(0xFF)]
        for b in range(1, 8):
            block ^= tables[b][(prev >> np.uint64(8 * b)) & np.uint64(0xFF)]
        end = min(start + _BLOCK, len(out))
        out[start:end] = block[:end - start]
    view = memoryview(out.view(np.uint8))[:n]
    _stream_cache[n] = view
    return view


# --------------------------------------------------------------------------
# numbers
# --------------------------------------------------------------------------

def gbit(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e9


def percentiles(samples_ns: np.ndarray) -> dict[str, float]:
    """p50 / p99 / p99.9 in microseconds."""
    us = samples_ns / 1e3
    p50, p99, p999 = np.percentile(us, [50, 99, 99.9])
    return {"p50": float(p50), "p99": float(p99), "p999": float(p999)}


def size_name(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}m"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}k"
    return str(n)


def size_label(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"


@dataclass
class Context:
    """What the runner hands every workload."""
    quick: bool
    tmp: Path
    elf: Path | None                 # the freestanding guest (resolved once per run)
    elf_problem: str = ""            # why there is none
    qemu: str | None = None          # qemu-system-x86_64, if installed
    log: object = print
    info: dict = field(default_factory=dict)   # extra facts a workload wants in the JSON

    def need_elf(self) -> Path:
        if self.elf is None:
            raise NotAvailable(self.elf_problem or "no freestanding guest")
        return self.elf

    def need_qemu(self) -> str:
        if self.qemu is None:
            raise NotAvailable("qemu-system-x86_64 is not installed "
                               "(apt-get install qemu-system-x86)")
        return self.qemu

    def path(self, name: str) -> Path:
        """A fresh path in the run's temporary directory (Unix sockets, metrics)."""
        p = self.tmp / name
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        return p

    def stderr(self, name: str) -> Path:
        return self.tmp / f"{name}.stderr"


def guest_has(elf: Path, scenario: str) -> bool:
    """Whether the guest ELF knows ``scenario`` (its name is a string in the image)."""
    return scenario.encode() + b"\0" in elf.read_bytes()
