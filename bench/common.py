"""What every workload shares: the guest under a VMM, statistics, the test stream, CPU time.

* :class:`GuestProcess` -- a VMM (pyvmm or QEMU) as a subprocess running the
  freestanding test guest; its serial console is read by a thread so that a
  workload *waits for a console line* (never sleeps) and the VMM's CPU time can
  be read per thread from ``/proc/<pid>/task``.
* :func:`pyvmm_argv` / :func:`qemu_argv` -- the two command lines, side by side
  (:func:`qemu_blk_argv`: QEMU with a virtio-blk disk instead of the serial port).
* :class:`Placement` -- which host CPUs the vCPU threads, the VMM's other
  threads and the benchmark's own client run on, applied the same way to both
  VMMs.
* :func:`thread_cpu` / :func:`cpu_delta` -- per-thread CPU time of a VMM and
  how it is attributed (vCPU threads apart from the rest; see bench/README.md).
* :class:`StreamCheck` -- the host's check of the bytes a guest sends back,
  every byte (``verify=full``) or a sample (``verify=word``), and
  :func:`whash`, the guest's word hash.
* :class:`NotAvailable` -- raised by a workload that cannot run here (no QEMU, a
  guest scenario that does not exist yet); the runner reports the reason.
* :func:`teststream` -- the guest's xorshift64 test stream (guest/freestanding/
  teststream.h), generated with numpy: the host sends it, and checks what
  comes back against it.
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

from pyvmm import affinity

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
               timeout: float = 300.0, placement: "Placement | None" = None,
               vsock: str = "", cid: int = GUEST_CID, extra: tuple[str, ...] = ()) -> list[str]:
    """``pyvmm run`` with the freestanding guest and a vsock device (CID ``cid``, 3) on
    ``uds``, its threads placed with ``--vcpu-affinity`` / ``--io-affinity``;
    ``vsock`` adds options to ``--vsock`` (e.g. ``proto=rfc2013,pairs=4``, ``group=DIR``);
    ``extra``: more ``run`` arguments (e.g. ``--forward ...``)."""
    argv = [sys.executable, "-m", "pyvmm", "-q", "run", "--kernel", str(elf),
            "--cmdline", scenario, "--vsock", f"{cid},uds={uds}" + (f",{vsock}" if vsock else ""),
            "--timeout", f"{timeout:g}", *extra]
    if placement is not None:
        argv += placement.pyvmm_args()
    if metrics is not None:
        argv += ["--metrics", str(metrics)]
    return argv


def qemu_machine_argv(elf: Path, scenario: str, *, qemu: str = "qemu-system-x86_64") -> list[str]:
    """QEMU microvm (KVM, one vCPU, 64 MiB) with the freestanding guest and no device
    but its serial console on stdout; the callers add theirs.  Always ``-nic none``
    and no vsock device.  ``debug-threads=on`` names QEMU's threads (vCPU: ``CPU
    0/KVM``), which placement and the CPU accounting go by; without it every thread
    is ``qemu-system-x86``.  The guest finds microvm's virtio-mmio devices by
    scanning its slots from 0xfeb00000 (QEMU 7.2's microvm puts no
    ``virtio_mmio.device=`` on this guest's command line: ``virtio-probe`` says
    so), as it does under pyvmm when a device has no such word."""
    return [qemu, "-name", "pyvmm-bench,debug-threads=on",
            "-M", "microvm", "-accel", "kvm", "-m", "64M", "-smp", "1",
            "-nodefaults", "-no-reboot", "-nographic", "-nic", "none", "-serial", "stdio",
            "-global", "virtio-mmio.force-legacy=false",
            "-kernel", str(elf), "-append", scenario]


def qemu_argv(elf: Path, scenario: str, chardev: Path, *, qemu: str = "qemu-system-x86_64",
              port: int = 1) -> list[str]:
    """QEMU microvm with the same guest and a virtio-serial port on a Unix socket.

    The chardev is a Unix-socket *client*: the benchmark listens on ``chardev``
    first and QEMU connects at start-up.  ``virtserialport nr=1`` (not
    ``virtconsole``): QEMU flow-controls only non-console ports, so no byte is
    dropped when the socket is slower than the guest (guest/freestanding/README.md).
    """
    return qemu_machine_argv(elf, scenario, qemu=qemu) + [
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=c0,path={chardev}",
        "-device", f"virtserialport,chardev=c0,nr={port}"]


def qemu_blk_argv(elf: Path, scenario: str, disk: Path, *,
                  qemu: str = "qemu-system-x86_64") -> list[str]:
    """QEMU microvm with the same guest and one virtio-blk device (vda) on the raw
    image ``disk``: ``cache=writeback`` (the host page cache, as pyvmm's default)
    and ``aio=threads`` (QEMU's thread pool doing preadv/pwritev)."""
    return qemu_machine_argv(elf, scenario, qemu=qemu) + [
        "-drive", f"file={disk},if=none,id=d0,format=raw,cache=writeback,aio=threads",
        "-device", "virtio-blk-device,drive=d0"]


# --------------------------------------------------------------------------
# placement: which CPUs the threads run on
# --------------------------------------------------------------------------

#: vCPU threads by their kernel name (comm): pyvmm's (pyvmm.affinity) and QEMU's
VCPU_THREAD = re.compile(r"^(pyvmm-vcpu\d+|CPU \d+/KVM)$")


def _cpus(cpus) -> str:
    from pyvmm.affinity import format_cpu_list
    return format_cpu_list(cpus)


@dataclass(frozen=True)
class Placement:
    """Host CPUs for the VMM's vCPU threads, its other threads (I/O, devices,
    QEMU's main loop) and the benchmark's client (this process's main thread,
    so the host end of every socket); None = not pinned."""
    vcpu: frozenset | None = None
    io: frozenset | None = None
    client: frozenset | None = None

    @classmethod
    def default(cls, available=None) -> "Placement":
        """The vCPU alone on the first CPU this process may use; the VMM's other
        threads and the client on the second.  One CPU: nothing pinned."""
        cpus = sorted(os.sched_getaffinity(0) if available is None else available)
        if len(cpus) < 2:
            return cls()
        return cls(frozenset({cpus[0]}), frozenset({cpus[1]}), frozenset({cpus[1]}))

    @property
    def pinned(self) -> bool:
        return any(c is not None for c in (self.vcpu, self.io, self.client))

    def label(self) -> str:
        if not self.pinned:
            return "unpinned"
        return ", ".join(f"{what} {_cpus(c) if c is not None else 'any'}"
                         for what, c in (("vCPU", self.vcpu), ("I/O", self.io),
                                         ("client", self.client)))

    def as_dict(self) -> dict:
        return {k: (_cpus(c) if c is not None else None)
                for k, c in (("vcpu", self.vcpu), ("io", self.io), ("client", self.client))}

    def pyvmm_args(self) -> list[str]:
        args = []
        if self.vcpu is not None:
            args += ["--vcpu-affinity", _cpus(self.vcpu)]
        if self.io is not None:
            args += ["--io-affinity", _cpus(self.io)]
        return args

    def place_threads(self, pid: int) -> dict[str, str]:
        """Pin every thread of process ``pid`` now: vCPU threads (by name,
        :data:`VCPU_THREAD`) to ``vcpu``, the others to ``io``.  For QEMU, which
        has no such option; returns {thread name: CPU list} of what was done."""
        done = {}
        for tid, comm in thread_names(pid).items():
            cpus = self.vcpu if VCPU_THREAD.match(comm) else self.io
            if cpus is None:
                continue
            try:
                os.sched_setaffinity(tid, cpus)
                done[comm] = _cpus(cpus)
            except OSError:          # the thread ended meanwhile
                pass
        return done

    def client_pinned(self):
        """Run the block with the calling thread on ``client``.  Threads and
        processes started inside inherit it (the console readers, the VMM
        subprocess until it places its own threads)."""
        return affinity.pinned(self.client)


def thread_names(pid: int) -> dict[int, str]:
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out[int(tid)] = f.read().rstrip("\n")
        except OSError:
            pass
    return out


@dataclass
class ThreadCpu:
    comm: str
    user: float        # utime, seconds (proc(5) field 14; includes guest time on hardware KVM)
    system: float      # stime, seconds (field 15)
    guest: float       # guest_time, seconds (field 43): ticks the thread was in guest mode
    #: /proc/<pid>/task/<tid>/schedstat field 1 (sum_exec_runtime, ns), in
    #: seconds: the thread's exact CPU time, used instead of utime + stime
    #: (10 ms ticks) where the kernel keeps it
    run: float | None = None


class GuestProcess:
    """A VMM running the test guest as a subprocess, with its console watched.

    ``with GuestProcess(argv, "pyvmm") as g: g.wait_for(r"vsock listening (\\d+)")``
    """

    def __init__(self, argv: list[str], name: str, *, stderr_path: Path | None = None,
                 placement: Placement | None = None) -> None:
        self.name = name
        #: QEMU only (pyvmm places its own threads): pin the process's threads
        #: per ``placement`` when the first console line arrives, i.e. once
        #: the vCPU thread exists and before any transfer starts
        self._place = placement if placement is not None and placement.pinned else None
        self.placed: dict[str, str] = {}
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
            if self._place is not None:
                self.placed = self._place.place_threads(self.pid)
                self._place = None
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


def parse_stat(text: str, schedstat: str | None = None, tick: int = _TICK) -> ThreadCpu:
    """One ``/proc/<pid>/task/<tid>/stat`` line (and optionally its ``schedstat``)
    -> :class:`ThreadCpu`.  comm may hold spaces and parentheses ("CPU 0/KVM"),
    so the fields are counted from the last ')'."""
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text.rpartition(")")[2].split()           # fields[0] is field 3
    run = None
    if schedstat:
        ns = int(schedstat.split()[0])
        run = ns / 1e9 if ns else None                  # 0: schedstat not kept (no CONFIG_SCHED_INFO)
    return ThreadCpu(comm, int(fields[11]) / tick, int(fields[12]) / tick,
                     int(fields[40]) / tick, run)


def thread_cpu(pid: int) -> dict[int, ThreadCpu]:
    """utime, stime, guest_time (fields 14, 15, 43 of proc(5)) and the
    scheduler's run time (schedstat) of every thread of ``pid``."""
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
            try:
                with open(f"{base}/{tid}/schedstat") as f:
                    sched = f.read()
            except OSError:
                sched = None
        except OSError:
            continue
        out[int(tid)] = parse_stat(text, sched)
    return out


def cpu_delta(before: dict[int, ThreadCpu], after: dict[int, ThreadCpu]) -> dict[str, float]:
    """VMM CPU seconds between two :func:`thread_cpu` snapshots, by thread kind.

    Each thread's share is its own CPU time over the window (:attr:`ThreadCpu.cpu`,
    never below 0); nothing is subtracted across threads:

    * ``vmm``: the threads that are **not** vCPU threads (:data:`VCPU_THREAD`):
      the VMM's I/O work, the figure "excl. vCPU threads";
    * ``vcpu``: the vCPU threads, whole: guest code plus exit handling.  The
      freestanding guest busy-polls, so this is ~100 % of the window;
    * ``total`` = ``vmm`` + ``vcpu``: "incl. vCPU threads";
    * ``guest``: guest_time of the vCPU threads, each capped at that thread's
      CPU time, and ``vcpu_exits`` = ``vcpu`` - ``guest``: for information.
      On PVM a vCPU thread's guest_time can exceed its utime (seen: gt 135
      ticks, utime 133), so utime - guest_time is not the exit handling there.

    A thread that appears between the snapshots counts from zero."""
    vmm = vcpu = guest = 0.0
    for tid, a in after.items():
        b = before.get(tid)
        if b is None:
            b = ThreadCpu(a.comm, 0.0, 0.0, 0.0, 0.0 if a.run is not None else None)
        if a.run is not None and b.run is not None:
            used = max(0.0, a.run - b.run)
        else:
            used = max(0.0, a.user - b.user) + max(0.0, a.system - b.system)
        if VCPU_THREAD.match(a.comm):
            vcpu += used
            guest += min(max(0.0, a.guest - b.guest), used)
        else:
            vmm += used
    return {"vmm": vmm, "vcpu": vcpu, "total": vmm + vcpu, "guest": guest,
            "vcpu_exits": vcpu - guest}


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


_FNV_OFFSET, _FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3
_whash_cache: dict[int, int] = {}


def whash(data) -> int:
    """The guest's word hash (teststream.h, verify=word): h = FNV offset, then
    for each little-endian 64-bit word w (the last zero-padded) h = (h + w) * P
    mod 2^64.  Horner's rule, so numpy does it: h = offset*P^k + sum(w[i]*P^(k-i))
    per block of k words (uint64 products and sums wrap mod 2^64)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    words = np.zeros(-(-len(raw) // 8), dtype=np.uint64)
    words.view(np.uint8)[:len(raw)] = raw
    h, powers = _FNV_OFFSET, {}
    for start in range(0, len(words), 1 << 20):
        block = words[start:start + (1 << 20)]
        k = len(block)
        if k not in powers:
            p = np.cumprod(np.full(k, _FNV_PRIME, dtype=np.uint64))     # P^1 .. P^k
            powers[k] = (p[::-1].copy(), int(p[-1]))
        rev, pk = powers[k]
        h = (h * pk + int(np.sum(block * rev, dtype=np.uint64))) & _M64
    return h


def stream_whash(n: int) -> int:
    """whash of the first ``n`` bytes of the test stream (cached: seconds for 256 MiB)."""
    if n not in _whash_cache:
        _whash_cache[n] = whash(teststream(n))
    return _whash_cache[n]


VERIFY_MODES = ("word", "full")


def check_guest_result(guest: "GuestProcess", pattern: str, verify: str, total: int) -> None:
    """The guest's result line (``pattern`` then ``N bytes <fnv|whash> H``): N must be
    ``total`` and the hash named for the mode; with ``word``, H must be the whash
    of the stream's first ``total`` bytes (full mode's FNV-1a is byte-serial: the
    host checks bytes instead)."""
    m = guest.wait_for(rf"{pattern} (\d+) bytes (fnv|whash) ([0-9a-f]+)")
    name = "whash" if verify == "word" else "fnv"
    if int(m.group(1)) != total or m.group(2) != name:
        raise WorkloadFailed(f"{guest.name}: guest reported {m.group(0)!r}, want {total} bytes "
                             f"and {name}" + guest.tail())
    if verify == "word" and int(m.group(3), 16) != stream_whash(total):
        raise WorkloadFailed(f"{guest.name}: whash {m.group(3)} is not the test stream's "
                             f"{stream_whash(total):x}" + guest.tail())


class StreamCheck:
    """The host's check of the test stream as it arrives from a guest.

    ``full``: every byte is compared with the stream.  ``word`` (the cheap
    mode): the first and the last :data:`SAMPLE` bytes of every read are, at
    whatever offsets the read starts and ends (where a split or a join would
    go wrong); with the byte count and, for guest->host, the guest's whash of
    what it sent (:func:`check_guest_result`)."""
    SAMPLE = 16

    def __init__(self, verify: str, total: int, what: str) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r}: one of {VERIFY_MODES}")
        self.full = verify == "full"
        self.expect = teststream(total)
        self.what = what
        self.offset = 0
        self.checked = 0

    def feed(self, data: memoryview) -> None:
        n, off = len(data), self.offset
        if off + n > len(self.expect):
            raise WorkloadFailed(f"{self.what}: {off + n} bytes, more than the {len(self.expect)} sent")
        if self.full or n <= 2 * self.SAMPLE:
            self._compare(data, 0, n)
        else:
            self._compare(data, 0, self.SAMPLE)
            self._compare(data, n - self.SAMPLE, n)
        self.offset += n

    def _compare(self, data: memoryview, a: int, b: int) -> None:
        off = self.offset
        got, want = data[a:b], self.expect[off + a:off + b]
        same = (np.array_equal(np.frombuffer(got, np.uint8), np.frombuffer(want, np.uint8))
                if b - a > 65536 else got.tobytes() == want.tobytes())
        if not same:
            bad = int(np.argmax(np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8)))
            raise WorkloadFailed(f"{self.what}: byte {off + a + bad} is {got[bad]:#04x}, "
                                 f"the stream has {want[bad]:#04x}")
        self.checked += b - a


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
    #: how bytes are checked: "word" (cheap: the guest checks every byte a word
    #: at a time, the host samples) or "full" (byte for byte on both sides)
    verify: str = "word"
    placement: Placement = field(default_factory=Placement)

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
