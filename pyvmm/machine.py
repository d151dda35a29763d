"""The machine: build a VM from a configuration, run its vCPUs, stop it cleanly.

This is where the layers meet (and the only module besides ``boot`` that
talks to the KVM layer)::

    MachineConfig --> Machine.__init__:  /dev/kvm -> VM -> guest RAM slot
                                          in-kernel irqchip (PIC, IOAPIC, LAPICs) + PIT
                                          legacy devices on the port-I/O bus
                                          kernel, initrd, cmdline, zero page, MP table
                                          vCPUs with their entry state
                      Machine.start():    one thread per vCPU: KVM_RUN -> exit -> device
                                          (named pyvmm-vcpu<N>, pinned to vcpu_affinity)
                                          one device I/O thread, "pyvmm-io", for every
                                          virtio device (ioeventfds, host sockets), and
                                          stdin's: pinned to io_affinity
                      Machine.wait():     until the guest resets, crashes, or time runs out;
                                          then the devices end their host connections

A vCPU thread spends its life in ``KVM_RUN`` with the GIL released; when KVM
returns an I/O or MMIO exit the thread answers it through the bus
(:func:`handle_exit`, a pure function) and goes back in.  Anything that ends
the run (a reset request, a triple fault, an internal error, the timeout,
Ctrl-C) goes through :meth:`Machine.stop`, which records the first reason,
then kicks every vCPU out of ``KVM_RUN``: ``immediate_exit`` is set (so a
vCPU about to enter returns at once) and a signal is sent to the thread (so
a vCPU already inside returns with EINTR).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO

from . import affinity, layout
from .boot import bootinfo, mptable, x86
from .boot.cmdline import Cmdline
from .boot.loader import EntryMode, load_initrd, load_kernel
from .devices.boot_timer import BootTimer
from .devices.bus import Bus
from .devices.i8042 import I8042
from .devices.serial import Serial
from .errors import ConfigError, KvmError, PyvmmError
from .kvm import Kvm, abi, exits
from .kvm.host import PVM_CMDLINE, HostInfo, detect
from .memory import GuestMemory
from .virtio.device import VirtioDevice
from .virtio.eventloop import IO_THREAD_NAME, EventLoop
from .virtio.mmio import MmioTransport

log = logging.getLogger("pyvmm")

#: the signal that kicks a vCPU thread out of KVM_RUN (its handler does nothing)
KICK_SIGNAL = signal.SIGRTMIN
#: signals meant for the process (Ctrl-C, kill, hang-up): only the main thread takes them
_MAIN_THREAD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                        signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2}

DEFAULT_CMDLINE = ("console=ttyS0", "reboot=k", "panic=-1", "pci=off", "io_delay=none")
#: how many of a vCPU's last exits a crash report lists (kept in a ring per vCPU)
RECENT_EXITS = 8
#: the x86 reset state (RIP 0xfff0, CS base 0xffff0000): after a SHUTDOWN intercept AMD SVM
#: leaves the VMCB undefined, so KVM (svm.c shutdown_interception) resets the vCPU before it
#: reports KVM_EXIT_SHUTDOWN; registers read then say nothing about where the fault was
RESET_RIP, RESET_CS_BASE = 0xFFF0, 0xFFFF0000


class ExitStatus:
    """pyvmm's process exit statuses."""
    GUEST_RESET = 0        # the guest asked for a reset (how a Linux guest powers off here)
    GUEST_CRASH = 1        # triple fault, KVM internal error, failed VM entry
    CONFIG = 2             # bad command line, kernel, initrd, no /dev/kvm
    TIMEOUT = 124          # --timeout expired (as coreutils timeout)
    HANGUP = 129           # SIGHUP (128 + 1, the shell's convention)
    INTERRUPTED = 130      # Ctrl-C
    TERMINATED = 143       # SIGTERM (128 + 15): systemd, Docker, CI runners, kill


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by a termination signal's handler (the CLI installs it
    for SIGTERM and SIGHUP): stops the machine exactly as Ctrl-C does, with its own
    status (:class:`ExitStatus`) and reason."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupted(e: KeyboardInterrupt) -> tuple[int, str]:
    if isinstance(e, Terminated):
        return 128 + e.signum, f"terminated ({signal.Signals(e.signum).name})"
    return ExitStatus.INTERRUPTED, "interrupted (Ctrl-C)"


@dataclass
class MachineConfig:
    kernel: str
    initrd: str | None = None
    cmdline: str = ""                   # appended after pyvmm's defaults
    mem: int = layout.DEFAULT_MEM
    cpus: int = 1
    timeout: float | None = None
    serial_out: BinaryIO | None = None  # default: sys.stdout.buffer
    stdin: BinaryIO | None = None       # host input for the guest's serial port
    default_cmdline: bool = True
    #: the virtio-vsock device: the guest's CID and the Firecracker-style Unix socket
    vsock: "VsockConfig | None" = None
    #: further virtio devices, in slot order after vsock (slot i at
    #: layout.mmio_device_base(i), IRQ layout.mmio_device_irq(i))
    virtio_devices: list = field(default_factory=list)
    #: virtio-blk disks, in slot order after those: the guest's vda, vdb, ... in this order
    disks: "list[DiskConfig]" = field(default_factory=list)
    #: host CPUs for the vCPU threads / for the device threads (the I/O thread
    #: pyvmm-io of all virtio devices, stdin): a CPU list like "0" or "0-1", or
    #: a set of ints; None = not pinned (pyvmm.affinity)
    vcpu_affinity: "str | frozenset[int] | None" = None
    io_affinity: "str | frozenset[int] | None" = None


@dataclass
class VsockConfig:
    guest_cid: int
    uds_path: str | None = None       # host end: CONNECT <port> here; guest connects go to uds_path_<port>
    #: the window (buf_alloc) each connection advertises, 64 KiB .. 64 MiB (None: the
    #: device's default, pyvmm.vsock.connection.CONN_TX_BUF_SIZE, 256 KiB)
    conn_buf_size: int | None = None
    #: the protocol (pyvmm.vsock.wire.WIRE_FORMATS): "virtio", the standard Socket Device
    #: (ID 19), or "rfc2013", the 2013 draft (ID 13) with ``pairs`` rx/tx queue pairs
    proto: str = "virtio"
    #: rfc2013 only: queue pairs, 1 .. 16 (None: one per vCPU)
    pairs: int | None = None
    #: the vsock group directory (VM-to-VM, pyvmm.vsock.group), or None
    group: str | None = None
    #: TCP forwarding (``--forward``): pyvmm.vsock.tcp.TcpToVsock / VsockToTcp, any order
    forwards: list = field(default_factory=list)


@dataclass
class DiskConfig:
    """One ``--disk PATH[,ro][,cache=writeback|none][,serial=ID]``: a virtio-blk device.

    A raw image is served by pyvmm itself; any other format (qcow2, vmdk, ...) by a
    ``qemu-storage-daemon`` that the Machine starts while it is built
    (:func:`pyvmm.blk.open_backend`) and stops when it is closed.  That daemon is killed
    when the *thread* that built the Machine ends (``PR_SET_PDEATHSIG``, so that it never
    outlives pyvmm): build such a Machine on the main thread, or on a thread that lives
    until the Machine is closed.  The CLI builds it on the main thread."""
    path: str
    #: the image is opened O_RDONLY and the guest sees VIRTIO_BLK_F_RO
    read_only: bool = False
    #: "writeback" (host page cache) or "none" (O_DIRECT where the file system allows;
    #: for an image behind the storage daemon, its cache.direct=on)
    cache: str = "writeback"
    #: what VIRTIO_BLK_T_GET_ID answers (/sys/block/vdX/serial): at most 20 ASCII bytes
    serial: str | None = None
    #: the image format as qemu-img names it ("raw", "qcow2", ...); None: probed, and a
    #: probed raw image refuses the guest's writes of a format magic (pyvmm.blk.open_backend)
    format: str | None = None


@dataclass
class VirtioSlot:
    """One virtio-mmio device as the machine wired it."""
    index: int
    base: int
    irq: int
    device: VirtioDevice
    transport: MmioTransport
    #: (queue index, eventfd) pairs: KVM signals the eventfd when the guest
    #: writes that index to QueueNotify (KVM_IOEVENTFD with datamatch)
    queue_eventfds: list[tuple[int, int]]


@dataclass
class RunResult:
    status: int
    reason: str
    exit_counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _process_age() -> float | None:
    """Seconds since this process started (from /proc/self/stat, 1/CLK_TCK resolution)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")       # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start
    except (OSError, ValueError, IndexError):
        return None


def _install_kick_handler() -> None:
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        if threading.current_thread() is not threading.main_thread():
            raise PyvmmError("the first Machine must be created in the main thread "
                             "(it installs the vCPU kick signal handler)")
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


def handle_exit(exit_: exits.VcpuExit, pio: Bus, mmio: Bus) -> bool:
    """Answer an I/O or MMIO exit through the buses; False if it is not one."""
    if isinstance(exit_, exits.IoOut):
        if exit_.count == 1:
            pio.write(exit_.port, exit_.data)
        else:
            for i in range(0, len(exit_.data), exit_.size):
                pio.write(exit_.port, exit_.data[i:i + exit_.size])
        return True
    if isinstance(exit_, exits.IoIn):
        size = exit_.size
        for i in range(0, len(exit_.data), size):
            exit_.data[i:i + size] = pio.read(exit_.port, size)
        return True
    if isinstance(exit_, exits.MmioWrite):
        mmio.write(exit_.addr, exit_.data)
        return True
    if isinstance(exit_, exits.MmioRead):
        exit_.data[:] = mmio.read(exit_.addr, len(exit_.data))
        return True
    return False


#: what a few instructions the PVM CPL0 emulator lacks look like (docs/pvm.md)
_KNOWN_INSNS = (
    (b"\xcc", "INT3"), (b"\x0f\x01\xca", "CLAC"), (b"\x0f\x01\xcb", "STAC"),
    (b"\xf3\x0f\xb8", "POPCNT"), (b"\xf3\x48\x0f\xb8", "POPCNT"), (b"\x0f\xae", "XSAVE/XRSTOR family"),
    (b"\x48\x0f\xae", "XSAVE/XRSTOR family"), (b"\xf3\x0f\xc7", "RDPID"),
)


def describe_exit(exit_: exits.VcpuExit) -> str:
    """A few words for one exit, for a crash report's list of a vCPU's last exits."""
    if isinstance(exit_, (exits.IoIn, exits.IoOut)):
        return f"{type(exit_).__name__} port {exit_.port:#x}"
    if isinstance(exit_, (exits.MmioRead, exits.MmioWrite)):
        return f"{type(exit_).__name__} {exit_.addr:#x}"
    return type(exit_).__name__


def _name_insn(code: bytes) -> str:
    for prefix, name in _KNOWN_INSNS:
        if code.startswith(prefix):
            return name
    return "an instruction KVM could not emulate"


class Machine:
    def __init__(self, config: MachineConfig, host: HostInfo | None = None) -> None:
        self.config = config
        self.host = host or detect()
        self.t0 = time.monotonic()
        #: seconds since self.t0 (the Machine's creation); "process_start" is negative:
        #: when the pyvmm process started, relative to t0
        self.timings: dict[str, float] = {}
        age = _process_age()
        if age is not None:
            self.timings["process_start"] = -age
        self._result: RunResult | None = None
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._exit_counts: collections.Counter = collections.Counter()
        self._counts_lock = threading.Lock()
        self._io_lock = threading.Lock()       # legacy devices are not thread-safe
        #: per vCPU index, its last RECENT_EXITS exits (for the report of a crash)
        self._recent_exits: dict[int, collections.deque] = {}
        self._closers: list = []
        _install_kick_handler()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- construction ------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        if cfg.cpus < 1:
            raise ConfigError(f"--cpus {cfg.cpus}: a machine needs at least one vCPU")
        if not layout.MEM_MIN <= cfg.mem <= layout.MEM_MAX:
            raise ConfigError(f"--mem {cfg.mem // layout.MiB} MiB is out of range: "
                              f"{layout.MEM_MIN // layout.MiB} MiB to {layout.MEM_MAX // layout.MiB} MiB")
        if cfg.mem % layout.PAGE_SIZE:
            raise ConfigError(f"--mem {cfg.mem} is not a multiple of 4 KiB")
        self.vcpu_cpus = affinity.cpu_set(cfg.vcpu_affinity, "--vcpu-affinity")
        self.io_cpus = affinity.cpu_set(cfg.io_affinity, "--io-affinity")
        self.memory = GuestMemory(cfg.mem)
        self._closers.append(self.memory.close)
        self.kernel = load_kernel(self.memory, cfg.kernel)
        initrd = None
        if cfg.initrd:
            max_addr = None
            if self.kernel.setup_header is not None and self.kernel.setup_header.initrd_addr_max:
                max_addr = self.kernel.setup_header.initrd_addr_max + 1
            initrd = load_initrd(self.memory, cfg.initrd, self.kernel.end, max_addr)
        try:
            self.kvm = Kvm()
        except KvmError as e:
            raise ConfigError(f"cannot use KVM: {e} (is this a KVM-capable host, and may "
                              "this user open /dev/kvm?)") from None
        self._closers.append(self.kvm.close)
        max_cpus = min(self.kvm.max_vcpus(), mptable.MAX_CPUS)
        if not 1 <= cfg.cpus <= max_cpus:
            raise ConfigError(f"--cpus {cfg.cpus} is out of range: 1 to {max_cpus} on this host")
        self.initrd = initrd

        self.vm = self.kvm.create_vm()
        self._closers.append(self.vm.close)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_START)
        self.vm.set_tss_addr(layout.KVM_TSS_START)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.vm.set_user_memory_region(0, self.memory.base, self.memory.size,
                                       self.memory.host_address)

        self._build_devices()
        #: the one device I/O loop; its thread (IO_THREAD_NAME) starts in start()
        self.io_loop = EventLoop()
        self._closers.append(self.io_loop.close)
        devices = list(cfg.virtio_devices)
        #: the vsock device, its Python API, and its TCP forwarding backend (or None):
        #: ``vsock_forward.listening`` holds the addresses its listeners bound
        self.vsock_device = self.vsock_api = self.vsock_forward = None
        if cfg.vsock is not None:
            from .vsock import VsockDevice, default_backends
            from .vsock.tcp import TcpForwardBackend
            # the Python API, TCP forwarding, the Unix socket; the last two bind in
            # attach_loop below (ConfigError: in use)
            self.vsock_api, backends = default_backends(cfg.vsock.uds_path, cfg.vsock.forwards)
            self.vsock_forward = next((b for b in backends if isinstance(b, TcpForwardBackend)), None)
            from .vsock.wire import WIRE_FORMATS
            kw = {} if cfg.vsock.conn_buf_size is None else {"conn_buf_size": cfg.vsock.conn_buf_size}
            wire = WIRE_FORMATS.get(cfg.vsock.proto)
            if wire is None:
                raise ConfigError(f"vsock proto {cfg.vsock.proto!r}: expected one of {sorted(WIRE_FORMATS)}")
            if wire.multiqueue:
                kw["pairs"] = cfg.vsock.pairs if cfg.vsock.pairs is not None else min(cfg.cpus, 16)
            elif cfg.vsock.pairs is not None:
                raise ConfigError("vsock pairs= needs proto=rfc2013")
            if cfg.vsock.group is not None:
                from .vsock import VsockGroup
                kw["group"] = VsockGroup(cfg.vsock.group)
            self.vsock_device = VsockDevice(cfg.vsock.guest_cid, backends, wire=wire, **kw)
            devices.insert(0, self.vsock_device)
        #: the virtio-blk devices, in --disk order (the guest's vda, vdb, ...)
        self.blk_devices = []
        if cfg.disks:
            from .blk import open_backend
            from .blk.device import BlkDevice
            for disk in cfg.disks:
                # opened and locked (a daemon started), or ConfigError with nothing left
                # open; from here on any failure of the build closes it (self.close())
                backend = open_backend(disk)
                self._closers.append(backend.close)
                self.blk_devices.append(BlkDevice(backend, serial=disk.serial))
            devices += self.blk_devices
        if len(devices) > layout.MMIO_MAX_DEVICES:
            raise ConfigError(f"{len(devices)} virtio devices: at most {layout.MMIO_MAX_DEVICES}")
        self.virtio_slots = []
        for device in devices:
            self._closers.append(device.close)
            device.attach_loop(self.io_loop)
            self.virtio_slots.append(self._add_virtio_device(device))
        self._closers.append(self._stop_io)

        self.cmdline = self._make_cmdline()
        bootinfo.write_cmdline(self.memory, self.cmdline.as_bytes())
        if self.kernel.mode is EntryMode.LINUX_64:
            bootinfo.write_zero_page(self.memory, self.kernel, self.cmdline.as_bytes(), initrd)
        else:
            bootinfo.write_pvh_start_info(self.memory, initrd)
        mptable.write(self.memory, cfg.cpus)
        gdt = x86.write_gdt(self.memory)
        x86.write_identity_page_tables(self.memory)

        supported = self.kvm.supported_cpuid()
        self.vcpus = []
        for i in range(cfg.cpus):
            vcpu = self.vm.create_vcpu(i)
            self._closers.append(vcpu.close)
            self.vcpus.append(vcpu)
            vcpu.set_cpuid2(x86.guest_cpuid(supported, i, cfg.cpus))
            vcpu.set_msrs(x86.boot_msrs())
            vcpu.set_fpu(x86.boot_fpu())
            x86.set_lint(vcpu)
        boot = self.vcpus[0]
        long_mode = self.kernel.mode is EntryMode.LINUX_64
        boot.set_sregs(x86.boot_sregs(boot.get_sregs(), gdt, long_mode))
        boot.set_regs(x86.boot_regs(self.kernel.entry, long_mode))

    def _make_cmdline(self) -> Cmdline:
        cfg = self.config
        line = Cmdline(layout.CMDLINE_MAX_SIZE)
        if self.kernel.mode is EntryMode.LINUX_64 and cfg.default_cmdline:
            for word in DEFAULT_CMDLINE:
                line.insert_str(word)
            if self.host.is_pvm:
                log.info("PVM host: adding %s to the kernel command line (see README, "
                         "'PVM hosts')", " ".join(PVM_CMDLINE))
                for word in PVM_CMDLINE:
                    line.insert_str(word)
        for slot in self.virtio_slots:
            line.add_virtio_mmio_device(layout.MMIO_DEVICE_SIZE, slot.base, slot.irq)
        line.insert_str(cfg.cmdline)
        return line

    def _eventfd_irq(self, gsi: int):
        """An eventfd wired to ``gsi`` with KVM_IRQFD; returns the trigger callable."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._closers.append(lambda: os.close(fd))
        self.vm.register_irqfd(fd, gsi)
        return lambda: os.eventfd_write(fd, 1)

    def _build_devices(self) -> None:
        cfg = self.config
        self.pio_bus = Bus(name="pio", unmapped_read_value=0xFF)
        self.mmio_bus = Bus(name="mmio", unmapped_read_value=0x00)
        out = cfg.serial_out if cfg.serial_out is not None else sys.stdout.buffer
        self._rx_drained = threading.Event()
        self.serial = Serial(self._serial_writer(out), self._eventfd_irq(layout.COM1_IRQ),
                             on_rx_drained=self._rx_drained.set)
        self.pio_bus.insert(layout.COM1_PORT, layout.COM1_PORT_COUNT, self.serial, "serial")
        self.i8042 = I8042(on_reset=lambda: self.stop(ExitStatus.GUEST_RESET,
                                                      "the guest requested a reset (i8042)"))
        self.pio_bus.insert(layout.I8042_DATA_PORT,
                            layout.I8042_COMMAND_PORT - layout.I8042_DATA_PORT + 1,
                            self.i8042, "i8042")
        self.boot_timer = BootTimer(start=self.t0)
        self.pio_bus.insert(layout.BOOT_TIMER_PORT, 1, self.boot_timer, "boot-timer")

    def _add_virtio_device(self, device: VirtioDevice) -> VirtioSlot:
        """Map ``device`` on the next virtio-mmio slot: transport on the MMIO bus,
        interrupt through an irqfd, one ioeventfd per queue (no vCPU exit to
        Python on a queue notify).  The machine's I/O thread watches the
        eventfds (``device.add_reader``)."""
        index = len(self.virtio_slots)
        base, irq = layout.mmio_device_base(index), layout.mmio_device_irq(index)
        transport = MmioTransport(device, self.memory, self._eventfd_irq(irq))
        self.mmio_bus.insert(base, layout.MMIO_DEVICE_SIZE, transport,
                             f"virtio-mmio@{base:#x} ({type(device).__name__})")
        queue_eventfds = []
        for q in range(transport.num_queues):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._closers.append(lambda fd=fd: os.close(fd))
            self.vm.register_ioeventfd(fd, base + MmioTransport.NOTIFY_OFFSET, 4, datamatch=q)
            queue_eventfds.append((q, fd))
            device.add_reader(fd, self._queue_kick(fd, transport, q))
        return VirtioSlot(index, base, irq, device, transport, queue_eventfds)

    @staticmethod
    def _queue_kick(fd: int, transport, q: int):
        def kick() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            transport.queue_notify(q)
        return kick

    def _stop_io(self) -> None:
        """The devices stop their host-side work, then the I/O thread stops."""
        for slot in self.virtio_slots:
            slot.device.stop()
        self.io_loop.stop_thread()

    @property
    def vsock(self):
        """The vsock device's Python API: ``connect(port)``, ``listen(port)``, ``counters()``."""
        if self.vsock_api is None:
            raise PyvmmError("this machine has no vsock device (MachineConfig.vsock)")
        return self.vsock_api

    def _serial_writer(self, out: BinaryIO):
        def write(data: bytes) -> None:
            if "first_serial_byte" not in self.timings:
                self.timings["first_serial_byte"] = time.monotonic() - self.t0
            out.write(data)
            out.flush()
        return write

    # -- running ----------------------------------------------------------------
    def start(self) -> None:
        """Start the devices, the I/O thread and one thread per vCPU; returns at once.

        The threads are created with the process's termination signals blocked
        (they inherit the mask), so SIGINT and friends reach the main thread:
        a signal taken by a worker thread would only set Python's flag, and a
        main thread sleeping in :meth:`wait` would not see it until its timeout.
        The vCPU kick signal stays deliverable."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)
        try:
            with self._io_placement():
                for slot in self.virtio_slots:
                    slot.device.start()
                self.io_loop.start_thread()
                self.io_loop.run_in_loop(affinity.set_thread_name, IO_THREAD_NAME, wait=True)
                if self.config.stdin is not None:
                    threading.Thread(target=self._stdin_loop, name="stdin", daemon=True).start()
            for vcpu in self.vcpus:
                t = threading.Thread(target=self._vcpu_loop, args=(vcpu,),
                                     name=f"vcpu{vcpu.index}", daemon=True)
                self._threads.append(t)
                t.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _io_placement(self):
        """Threads started inside run on ``io_cpus``: a new thread inherits the
        affinity of the thread that creates it, so the creator is pinned for
        the moment and then put back."""
        return affinity.pinned(self.io_cpus)

    def wait(self, timeout: float | None = None) -> RunResult:
        """Block until the run ends (or ``timeout``, defaulting to the config's).

        Ctrl-C (KeyboardInterrupt) at any point stops the machine cleanly, and so does
        :class:`Terminated` (SIGTERM / SIGHUP, when the caller installed that handler)."""
        timeout = self.config.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                if not self._done.is_set():
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    if not self._done.wait(remaining):
                        self.stop(ExitStatus.TIMEOUT, f"timed out after {timeout:g} s")
                self._join_vcpus()
                break
            except KeyboardInterrupt as e:
                self.stop(*_interrupted(e))
        self._end_host_connections()
        if self._result.status == ExitStatus.TIMEOUT:
            for line in self.vcpu_states():
                log.info("%s", line)
        return self._result

    def _end_host_connections(self) -> None:
        """The run is over, so nothing in the guest will answer a host peer again: the
        devices end their host connections and close their listeners now (a peer sees EOF
        at once), not only when the machine is closed -- a program embedding pyvmm may
        keep it open to read its counters.  Idempotent, as ``device.stop()`` is."""
        for slot in self.virtio_slots:
            slot.device.stop()

    def run(self) -> RunResult:
        try:
            self.start()
        except KeyboardInterrupt as e:
            self.stop(*_interrupted(e))
        return self.wait()

    def vcpu_states(self) -> list[str]:
        """Where each (stopped) vCPU is: for the report of a run that hung."""
        lines = []
        for vcpu in self.vcpus:
            try:
                regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
                state = abi.KvmMpState(vcpu.get_mp_state()).name.removeprefix("KVM_MP_STATE_")
            except (KvmError, ValueError) as e:
                lines.append(f"vCPU {vcpu.index}: state unavailable ({e})")
                continue
            mode = ("long mode" if sregs.efer & x86.EFER_LMA else
                    "protected mode" if sregs.cr0 & x86.X86_CR0_PE else "real mode")
            lines.append(f"vCPU {vcpu.index}: {state.lower()}, {mode}, CPL {sregs.cs.selector & 3},"
                         f" RIP {regs.rip:#x}, CS base {sregs.cs.base:#x}")
        return lines

    def stop(self, status: int, reason: str) -> None:
        """End the run (the first reason given wins) and kick every vCPU out."""
        with self._counts_lock:
            if self._result is None:
                self.timings["end"] = time.monotonic() - self.t0
                self._result = RunResult(status, reason, self._exit_counts, self.timings)
        self._done.set()
        self._rx_drained.set()
        self._kick_all()

    def _kick_all(self) -> None:
        for vcpu, t in zip(self.vcpus, self._threads):
            if vcpu.fd >= 0:
                vcpu.set_immediate_exit(True)
            if t.is_alive() and t is not threading.current_thread():
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    def _join_vcpus(self) -> None:
        for t in self._threads:
            while t.is_alive():
                t.join(0.05)      # re-kick: a signal can land just before KVM_RUN is entered
                if t.is_alive():
                    self._kick_all()

    def _vcpu_loop(self, vcpu) -> None:
        counts: collections.Counter = collections.Counter()
        recent = self._recent_exits[vcpu.index] = collections.deque(maxlen=RECENT_EXITS)
        pio, mmio, lock = self.pio_bus, self.mmio_bus, self._io_lock
        done = self._done
        affinity.set_thread_name(f"{affinity.VCPU_THREAD_PREFIX}{vcpu.index}")
        if vcpu.index == 0:
            self.timings["first_kvm_run"] = time.monotonic() - self.t0
        try:
            if self.vcpu_cpus is not None:
                affinity.pin_thread(0, self.vcpu_cpus)
            while not done.is_set():
                exit_ = vcpu.run()
                kind = type(exit_).__name__
                counts[kind] += 1
                if isinstance(exit_, exits.Interrupted):
                    continue
                recent.append(exit_)
                with lock:
                    if handle_exit(exit_, pio, mmio):
                        continue
                self.stop(*self._diagnose(vcpu, exit_))
        except Exception as e:           # a pyvmm bug or a failing ioctl: end the run, say why
            log.exception("vCPU %d stopped", vcpu.index)
            self.stop(ExitStatus.GUEST_CRASH, f"vCPU {vcpu.index}: {e}")
        finally:
            with self._counts_lock:
                self._exit_counts.update(counts)

    def _diagnose(self, vcpu, exit_) -> tuple[int, str]:
        """One line saying why the run ends on this exit: RIP, code bytes, meaning."""
        where, code_text = f"vCPU {vcpu.index}", ""
        try:
            regs = vcpu.get_regs()
            where += f" at RIP {regs.rip:#x}"
            code = exit_.insn_bytes if isinstance(exit_, exits.InternalError) else b""
            code = code or self._code_at(vcpu, regs.rip)
            code_text = f", code {code.hex(' ')}" if code else ", no memory at RIP"
        except (KvmError, PyvmmError):
            code = b""
        if isinstance(exit_, exits.Shutdown):
            return (ExitStatus.GUEST_CRASH, f"{where}{code_text}: triple fault (KVM_EXIT_SHUTDOWN)"
                    f"; {self._crash_state(vcpu)}")
        if isinstance(exit_, exits.InternalError):
            what = exit_.suberror_name
            if exit_.suberror == abi.KvmInternalError.KVM_INTERNAL_ERROR_EMULATION:
                what += f": {_name_insn(code)}"
                if self.host.is_pvm:
                    what += " (the PVM CPL0 emulator lacks some instructions; see README)"
            return (ExitStatus.GUEST_CRASH,
                    f"{where}{code_text}: KVM internal error, {what}")
        if isinstance(exit_, exits.FailEntry):
            return (ExitStatus.GUEST_CRASH, f"{where}: VM entry failed, hardware reason "
                    f"{exit_.hardware_entry_failure_reason:#x} on host CPU {exit_.cpu}")
        if isinstance(exit_, exits.SystemEvent):
            if exit_.type in (abi.KvmSystemEvent.KVM_SYSTEM_EVENT_SHUTDOWN,
                              abi.KvmSystemEvent.KVM_SYSTEM_EVENT_RESET):
                return ExitStatus.GUEST_RESET, f"the guest requested system event {exit_.type}"
            return ExitStatus.GUEST_CRASH, f"{where}: system event {exit_.type} (crash)"
        if isinstance(exit_, exits.Hlt):
            return ExitStatus.GUEST_RESET, f"{where}: the guest halted"
        return ExitStatus.GUEST_CRASH, f"{where}: unexpected exit {exit_}"

    def _crash_state(self, vcpu) -> str:
        """The vCPU's registers and its last exits, for the report of a triple fault."""
        recent = self._recent_exits.get(vcpu.index, ())
        last = "last exits (oldest first): " + (", ".join(map(describe_exit, recent)) or "none")
        try:
            r, s = vcpu.get_regs(), vcpu.get_sregs()
        except KvmError as e:
            return f"registers unavailable ({e}); {last}"
        state = (f"RSP {r.rsp:#x} RFLAGS {r.rflags:#x} CR0 {s.cr0:#x} CR2 {s.cr2:#x} "
                 f"CR3 {s.cr3:#x} CR4 {s.cr4:#x} EFER {s.efer:#x} CS {s.cs.selector:#x} "
                 f"base {s.cs.base:#x} IDT {s.idt.base:#x}/{s.idt.limit:#x}")
        if r.rip == RESET_RIP and s.cs.base == RESET_CS_BASE:
            state += (" (the reset state: KVM reset this vCPU before reporting the shutdown, "
                      "as it does on AMD SVM, so these are not the faulting registers)")
        return f"{state}; {last}"

    def _code_at(self, vcpu, rip: int) -> bytes:
        gpa = vcpu.translate(rip)
        if gpa is None or not self.memory.contains(gpa, 1):
            return b""
        return self.memory.read(gpa, min(15, self.memory.end - gpa))

    def _stdin_loop(self) -> None:
        """Feed host input to the UART, never more than its FIFO takes."""
        fd = self.config.stdin.fileno()
        pending = b""
        while not self._done.is_set():
            if not pending:
                try:
                    pending = os.read(fd, 64)
                except OSError:
                    return
                if not pending:
                    return                 # EOF
            self._rx_drained.clear()
            with self._io_lock:
                taken = self.serial.enqueue_raw_bytes(pending)
            pending = pending[taken:]
            if pending:                    # FIFO full: wait until the guest drains it
                while not (self._rx_drained.wait(1.0) or self._done.is_set()):
                    pass

    def close(self) -> None:
        for closer in reversed(self._closers):
            try:
                closer()
            except (OSError, ValueError, BufferError):
                pass
        self._closers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._threads and not self._done.is_set():
            self.stop(ExitStatus.INTERRUPTED, "machine closed")
            self._join_vcpus()
        self.close()
