"""Linux guests for tests: boot one, run commands in it, and say clearly why it failed.

Owns :class:`VM` -- a Linux guest booted through pyvmm's Python API (pyvmm.machine) with
its serial console captured, a vsock device whose Firecracker-style Unix socket sits in a
private directory, and the guest agent (``pyvmm-agent``, pyvmm.agent) that the default
initramfs's /init starts when the command line has ``pyvmm.agent=1`` -- and
:class:`Console`, the captured serial output a test can read and wait on.  The pytest
plugin (pyvmm.pytest_plugin, the ``vm`` fixture) is built on these; they work without
pytest too::

    with VM() as vm:                               # the default kernel and initramfs (make)
        r = vm.run("uname -r")
        print(r.status, r.stdout)

A VM needs a /dev/kvm that runs guest user space: hardware KVM.  :func:`unusable_reason`
says why this host cannot (no /dev/kvm; PVM, where a stock Linux guest dies at its first
user-space system call, docs/pvm.md).

Every wait is bounded: the boot by :data:`BOOT_TIMEOUT` (a guest that ends or hangs while
booting raises :class:`VMBootError` with its exit reason, where each vCPU was, and the
console's last lines); each agent request by its own timeout (pyvmm.agent.client).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from typing import Iterable

from . import images
from .agent import Agent, AgentError, Result
from .kvm.host import HostInfo, KvmFlavour, detect
from .machine import DiskConfig, Machine, MachineConfig, RunResult, VsockConfig

__all__ = ["BOOT_TIMEOUT", "COMMAND_TIMEOUT", "CONSOLE_TAIL", "QUIET", "Console", "VM",
           "VMBootError", "VMEnded", "CommandFailed", "unusable_reason"]

#: seconds from start to the ready line (on hardware KVM the default guest is ready in ~1 s;
#: nested in the lab, tens of seconds).  Only a hung boot waits this long: one that crashes
#: ends the machine and is reported at once.
BOOT_TIMEOUT = 300.0
#: the default deadline of :meth:`VM.run` (the agent then kills the command's process group)
COMMAND_TIMEOUT = 300.0
#: console lines a failure report shows
CONSOLE_TAIL = 40
#: what /init prints once the agent listens and the guest is ready (guest/initramfs/init)
READY_LINE = r"^pyvmm-guest: ready\r?$"
#: on the guest's command line before the caller's (which may override it): the kernel's
#: warnings and errors reach the console, its info messages do not.  Each console byte is an
#: exit to pyvmm; nested in pyvmm's lab the default guest then boots in ~10 s instead of ~75 s
QUIET = "loglevel=4"
#: the guest's memory, unless given
DEFAULT_MEM = 256 << 20
#: the guest's vsock CID, unless given (each VM has its own device: CIDs need not differ)
DEFAULT_CID = 3


def unusable_reason(host: HostInfo | None = None) -> str | None:
    """None if this host's /dev/kvm can run a Linux guest's user space, else why not."""
    host = host or detect()
    if host.flavour is KvmFlavour.NONE:
        return f"no /dev/kvm on this host ({host.detail})"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user (add it to group kvm)"
    if host.flavour is KvmFlavour.PVM:
        return ("/dev/kvm here is PVM (software nested virtualisation): a stock Linux guest "
                "dies at its first user-space system call, so its commands cannot run; "
                "pyvmm needs hardware KVM for this (docs/pvm.md)")
    return None


class VMBootError(RuntimeError):
    """The guest did not become ready: it ended, or hung past the boot timeout."""


class VMEnded(RuntimeError):
    """The guest is no longer running (it crashed, powered off, or was closed)."""


class CommandFailed(AssertionError):
    """:meth:`VM.check`: the command did not exit 0 in time (an AssertionError, so pytest
    shows it as a test's failure)."""

    def __init__(self, result: Result) -> None:
        self.result = result
        how = ("timed out" if result.timed_out else
               f"killed by signal {result.signal}" if result.signal else
               f"exit status {result.exit_code}")
        super().__init__(f"{result.argv!r}: {how}\n--- stdout ---\n{_tail(result.stdout)}"
                         f"\n--- stderr ---\n{_tail(result.stderr)}")


def _tail(data: bytes, lines: int = 20) -> str:
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


class Console:
    """A guest's serial output, kept whole and watchable for lines (a file-like sink:
    MachineConfig.serial_out)."""

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

    def tail(self, lines: int = CONSOLE_TAIL) -> str:
        with self._cond:
            return self._tail_locked(lines)

    def wait_for(self, pattern: str, timeout: float, done: threading.Event) -> re.Match:
        """Block until a console line matches ``pattern`` (a ``re.M`` search, line by line);
        AssertionError after ``timeout`` or once ``done`` is set (the guest ended) without
        a match.

        Only whole lines are searched (up to the last newline; everything once the guest has
        ended): a line still arriving could match a shorter text than it will hold, e.g.
        ``pid (\\d+)`` on "pid 7" of "pid 70" (seen: a test then killed the wrong process).
        Each line is searched once: the console is written a byte at a time (each byte one
        exit), and searching all of it at every byte made a long-lived guest's console
        quadratic -- in the lab, a shared e2e guest's tests slowed down test by test until
        the e2e set ran past its bound."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        searched = 0                    # bytes of whole lines searched already
        with self._cond:
            while True:
                ended = done.is_set()
                end = len(self._buf) if ended else self._buf.rfind(b"\n") + 1
                if end > searched:
                    lines = bytes(self._buf[searched:end])
                    searched = end
                    m = rx.search(lines.decode("utf-8", "replace").replace("\r\n", "\n"))
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or ended:
                    raise AssertionError(f"no console line matching {pattern!r} within "
                                         f"{timeout:g} s (guest {'ended' if done.is_set() else 'running'})"
                                         f"\n--- console tail ---\n" + self._tail_locked(30))
                self._cond.wait(min(left, 1.0))

    def _tail_locked(self, lines: int) -> str:
        text = bytes(self._buf[-(256 * lines):]).decode("utf-8", "replace").replace("\r\n", "\n")
        return "\n".join(text.splitlines()[-lines:])


class VM:
    """A Linux guest with the guest agent: ``with VM() as vm: vm.run(...)``.

    ``kernel``/``initrd``: paths (None: the default images, ``make kernel guest``; an
    initrd of your own must start pyvmm-agent and print the ready line as
    guest/initramfs/init does, or pass ``agent=False``, ``ready=`` your own line).
    ``cmdline`` is appended to pyvmm's defaults, ``pyvmm.agent=1`` (``agent``) and
    :data:`QUIET` (``quiet``).  ``forwards`` and
    ``disks`` are MachineConfig's (pyvmm.vsock.tcp.TcpToVsock / VsockToTcp; DiskConfig or a
    path).  Build a VM with disks in other formats than raw on a thread that outlives it
    (MachineConfig's DiskConfig says why)."""

    def __init__(self, kernel=None, initrd=None, *, cpus: int = 1, mem: int = DEFAULT_MEM,
                 cmdline: str = "", cid: int = DEFAULT_CID, forwards: Iterable = (),
                 disks: Iterable = (), agent: bool = True, quiet: bool = True,
                 ready: str = READY_LINE, boot_timeout: float = BOOT_TIMEOUT) -> None:
        self.kernel = str(kernel or images.default_kernel())
        self.initrd = str(initrd or images.default_initramfs())
        self.cid = cid
        self.console = Console()
        self.boot_timeout = boot_timeout
        self._ready = ready
        self._dir = tempfile.mkdtemp(prefix="pyvmm-vm-")
        self.uds = os.path.join(self._dir, "v.sock")
        self.config = MachineConfig(
            kernel=self.kernel, initrd=self.initrd, cpus=cpus, mem=mem, timeout=None,
            cmdline=" ".join(filter(None, ["pyvmm.agent=1" if agent else "",
                                           QUIET if quiet else "", cmdline])),
            serial_out=self.console,
            vsock=VsockConfig(cid, self.uds, forwards=list(forwards)),
            disks=[d if isinstance(d, DiskConfig) else DiskConfig(str(d)) for d in disks])
        self.machine: Machine | None = None
        self._ended = threading.Event()
        self._result: RunResult | None = None
        self._waiter: threading.Thread | None = None
        self._agents = threading.local()
        self._agents_made: list[Agent] = []
        self._lock = threading.Lock()
        self.boot_seconds: float | None = None

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> "VM":
        """Boot and wait for the ready line; VMBootError (the machine stopped) if it
        does not come."""
        t0 = time.monotonic()
        self.machine = Machine(self.config)
        self.machine.start()
        self._waiter = threading.Thread(target=self._wait, name="pyvmm-vm-wait", daemon=True)
        self._waiter.start()
        try:
            self.console.wait_for(self._ready, self.boot_timeout, self._ended)
        except AssertionError:
            if not self._ended.is_set():
                self.machine.stop(124, f"not ready within {self.boot_timeout:g} s")
                self._waiter.join()
                where = "".join(f"\n{line}" for line in self.machine.vcpu_states())
                raise VMBootError(f"the guest was not ready within {self.boot_timeout:g} s "
                                  f"(no line matching {self._ready!r}); where each vCPU was:"
                                  f"{where}\n{self.describe()}") from None
            raise VMBootError(f"the guest ended while booting\n{self.describe()}") from None
        self.boot_seconds = time.monotonic() - t0
        return self

    def _wait(self) -> None:
        self._result = self.machine.wait()
        self._ended.set()

    def close(self) -> None:
        """Stop the guest (if it runs) and free everything; idempotent."""
        for a in self._agents_made:
            a.close()
        self._agents_made.clear()
        if self.machine is not None:
            if self._waiter is not None and self._waiter.is_alive():
                self.machine.stop(130, "VM closed")
                self._waiter.join()
            self.machine.close()
            self.machine = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "VM":
        if self.machine is None:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state -------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.machine is not None and not self._ended.is_set()

    @property
    def result(self) -> RunResult | None:
        """How the run ended, once it has."""
        return self._result

    @property
    def vsock(self):
        """The vsock device's Python API (Machine.vsock: connect, listen, counters)."""
        return self._machine().vsock

    def _machine(self) -> Machine:
        if not self.alive:
            raise VMEnded(self.describe())
        return self.machine

    def describe(self) -> str:
        """The guest's state and console tail: what a failing test should show."""
        if self.machine is None and self._result is None:
            state = "not started (or closed)"
        elif self._result is None:
            state = "running"
        else:
            state = f"ended: status {self._result.status}: {self._result.reason}"
        return (f"guest {state}; kernel {self.kernel}, initrd {self.initrd}, cmdline "
                f"{self.config.cmdline!r}\n--- console (last {CONSOLE_TAIL} lines) ---\n"
                f"{self.console.tail()}")

    # -- the guest agent -----------------------------------------------------------------------
    def agent(self) -> Agent:
        """This thread's connection to the guest agent (made on first use, and again after
        an error closed it)."""
        self._machine()
        a = getattr(self._agents, "agent", None)
        if a is None or a.closed:
            a = Agent.connect_uds(self.uds, io_timeout=COMMAND_TIMEOUT)
            with self._lock:
                self._agents_made = [x for x in self._agents_made if not x.closed] + [a]
            self._agents.agent = a
        return a

    def _call(self, what, *args, **kw):
        try:
            return getattr(self.agent(), what)(*args, **kw)
        except AgentError as e:
            if not self.alive:
                raise VMEnded(f"{e}\n{self.describe()}") from None
            raise

    def run(self, cmd, *, timeout: float | None = COMMAND_TIMEOUT, **kw) -> Result:
        """Run ``cmd`` in the guest (a string through /bin/sh -c, or an argv list) and
        return its Result (status, stdout, stderr, timed_out); the keywords are
        Agent.run's (env, cwd, stdin, on_output, max_output)."""
        return self._call("run", cmd, timeout=timeout, **kw)

    def check(self, cmd, **kw) -> str:
        """As :meth:`run`, but CommandFailed unless it exits 0 in time; returns its stdout
        as text."""
        r = self.run(cmd, **kw)
        if not r.ok:
            raise CommandFailed(r)
        return r.stdout.decode("utf-8", "replace")

    def put(self, path: str, data: bytes, mode: int = 0o644) -> int:
        """Write the guest file ``path`` (Agent.put)."""
        return self._call("put", path, data, mode)

    def get(self, path: str, **kw) -> bytes:
        """Read the guest file ``path`` (Agent.get)."""
        return self._call("get", path, **kw)

    def connect(self, port: int, timeout: float = 60.0):
        """A stream socket to guest vsock ``port`` (Machine.vsock.connect);
        ConnectionRefusedError if nothing in the guest listens there."""
        return self.vsock.connect(port, timeout=timeout)

    def listen(self, port: int, **kw):
        """A listener for guest connections to CID 2 ``port`` (Machine.vsock.listen:
        ``accept()`` gives a socket)."""
        return self.vsock.listen(port, **kw)
