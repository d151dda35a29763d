"""The command line: ``pyvmm run`` boots a guest, ``pyvmm info`` describes the host,
``pyvmm exec`` runs a command in a running guest (:mod:`pyvmm.agent.command`).

Conventions follow kvmtool / Firecracker / cloud-hypervisor where they agree:
``--kernel``, ``--initrd``, ``--cmdline``, ``--mem`` (a size, default unit
MiB), ``--cpus``.  A problem with what was asked for (a missing kernel, a
file that is no kernel, ``--mem`` out of range, no ``/dev/kvm``) is one line
on stderr and exit status 2, never a traceback.  See
:class:`pyvmm.machine.ExitStatus` for the other statuses.
"""

from __future__ import annotations

import argparse
import re
import contextlib
import json                 # here, not when --metrics is written: at the fd limit an import fails
import logging
import resource
import signal
import sys
import termios
import tty

from . import affinity, images, layout
from .agent import command as agent_command
from .errors import ConfigError, PyvmmError
from .kvm.host import KvmFlavour, detect

log = logging.getLogger("pyvmm")


def parse_size(text: str) -> int:
    """'64M', '1G', '65536K', or a bare number of MiB -> bytes."""
    units = {"K": layout.KiB, "M": layout.MiB, "G": layout.GiB}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = layout.MiB
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    if not t.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 64M, 1G)")
    return int(t) * mult


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: seconds > 0")
    return value


def parse_vsock(text: str):
    """'CID[,uds=PATH][,group=DIR][,buf=SIZE][,proto=virtio|rfc2013][,pairs=N]' (also
    'cid=CID,socket=PATH', cloud-hypervisor's spelling).

    ``group=DIR`` joins the vsock group in directory DIR: pyvmm processes given the same
    directory carry packets between their guests' CIDs (pyvmm.vsock.group).

    ``buf`` is the window each connection advertises (its buf_alloc; a size as for
    ``--mem`` but in KiB by default, e.g. 256K or 1M); the device checks its range.
    ``proto=rfc2013`` is the 2013 draft device (ID 13, docs/vsock-draft-vs-spec.md)
    with ``pairs`` rx/tx queue pairs, 1 .. 16 (default: one per vCPU)."""
    from .machine import VsockConfig
    from .vsock.device import MAX_PAIRS
    from .vsock.wire import WIRE_FORMATS
    usage = "expected CID[,uds=PATH][,group=DIR][,buf=SIZE][,proto=virtio|rfc2013][,pairs=N]"
    cid, uds, group, buf, proto, pairs = None, None, None, None, "virtio", None
    for i, item in enumerate(text.split(",")):
        key, eq, value = item.partition("=")
        if not eq and i == 0:
            key, value = "cid", key
        if key == "cid" and value.isdigit():
            cid = int(value)
        elif key in ("uds", "socket") and value:
            uds = value
        elif key == "group" and value:
            group = value
        elif key == "buf" and value:
            buf = parse_size(value if not value.isdigit() else value + "K")
        elif key == "proto" and value in WIRE_FORMATS:
            proto = value
        elif key == "proto":
            raise argparse.ArgumentTypeError(
                f"invalid --vsock {text!r}: unknown proto {value!r} (virtio or rfc2013)")
        elif key == "pairs" and value.isdigit() and 1 <= int(value) <= MAX_PAIRS:
            pairs = int(value)
        elif key == "pairs":
            raise argparse.ArgumentTypeError(
                f"invalid --vsock {text!r}: pairs must be 1 .. {MAX_PAIRS}")
        else:
            raise argparse.ArgumentTypeError(f"invalid --vsock {text!r}: {usage}")
    if cid is None:
        raise argparse.ArgumentTypeError(f"invalid --vsock {text!r}: no CID")
    if pairs is not None and not WIRE_FORMATS[proto].multiqueue:
        raise argparse.ArgumentTypeError(f"invalid --vsock {text!r}: pairs= needs proto=rfc2013")
    if group is not None and WIRE_FORMATS[proto].multiqueue:
        raise argparse.ArgumentTypeError(f"invalid --vsock {text!r}: group= needs proto=virtio")
    return VsockConfig(cid, uds, conn_buf_size=buf, proto=proto, pairs=pairs, group=group)


def parse_forward(text: str):
    """'tcp:[ADDR:]PORT=vsock:GUESTPORT' or 'vsock:PORT=tcp:HOST:PORT' (pyvmm.vsock.tcp)."""
    from .vsock.tcp import parse_forward as parse
    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid --forward {text!r}: {e}") from None


def parse_disk(text: str):
    """'PATH[,ro][,cache=writeback|none][,serial=ID][,format=FMT]' -> DiskConfig (the path
    may not hold a comma).  The image itself is checked when the machine is built."""
    from .machine import DiskConfig
    usage = "expected PATH[,ro][,cache=writeback|none][,serial=ID][,format=FMT]"
    path, *options = text.split(",")
    if not path:
        raise argparse.ArgumentTypeError(f"invalid --disk {text!r}: no path; {usage}")
    disk = DiskConfig(path)
    for item in options:
        key, eq, value = item.partition("=")
        if key == "ro" and not eq:
            disk.read_only = True
        elif key == "cache" and value in ("writeback", "none"):
            disk.cache = value
        elif key == "cache":
            raise argparse.ArgumentTypeError(
                f"invalid --disk {text!r}: cache must be writeback or none")
        elif key == "serial" and eq:
            disk.serial = value
        elif key == "format" and re.fullmatch(r"[a-z0-9]+", value):
            disk.format = value
        else:
            raise argparse.ArgumentTypeError(f"invalid --disk {text!r}: {usage}")
    return disk


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyvmm", description="A Python VMM on Linux KVM.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a guest")
    run.add_argument("--kernel", help="vmlinux ELF, PVH ELF or bzImage "
                     "(default: the cached guest kernel from 'make kernel')")
    run.add_argument("--initrd", help="initramfs (default with the default kernel: "
                     "the cached one from 'make guest', unless --cmdline names a root= device)")
    run.add_argument("--cmdline", default="", help="extra kernel command line")
    run.add_argument("--no-default-cmdline", action="store_true",
                     help="do not add pyvmm's console/reboot/PVM parameters")
    run.add_argument("--mem", type=parse_size, default=layout.DEFAULT_MEM,
                     help="guest RAM, e.g. 64M or 1G (default 64M)")
    run.add_argument("--cpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--timeout", type=positive_float, help="stop the guest after S seconds")
    run.add_argument("--serial", default="stdio", help="'stdio' or a file for the console output")
    run.add_argument("--vsock", type=parse_vsock,
                     metavar="CID[,uds=PATH][,group=DIR][,buf=SIZE][,proto=virtio|rfc2013][,pairs=N]",
                     help="a virtio-vsock device with guest CID; host programs reach guest "
                     "port P by writing 'CONNECT P\\n' to the Unix socket PATH, and a guest "
                     "connect to CID 2 port P goes to PATH_P (Firecracker's protocol); buf: "
                     "each connection's window, 64K to 64M (default 256K); proto=rfc2013: the "
                     "2013 draft device (ID 13, only pyvmm's own guest driver speaks it) with "
                     "N rx/tx queue pairs, 1 to 16 (default: one per vCPU), and datagrams "
                     "(PATH.dgram, PATH_P.dgram); group=DIR: pyvmm processes given the same "
                     "DIR carry packets between their guests' CIDs (VM-to-VM; a CID already "
                     "in the group is refused)")
    run.add_argument("--forward", type=parse_forward, action="append", default=[],
                     metavar="tcp:[ADDR:]PORT=vsock:GUESTPORT | vsock:PORT=tcp:HOST:PORT",
                     help="TCP forwarding through the vsock device (needs --vsock); repeat "
                     "for more. tcp:[ADDR:]PORT=vsock:GUESTPORT: a host TCP listener on "
                     "ADDR:PORT (default address 127.0.0.1; IPv6 as [::1]:PORT; port 0: "
                     "the kernel picks one, logged) whose connections reach guest vsock "
                     "port GUESTPORT. vsock:PORT=tcp:HOST:PORT: guest connections to CID 2 "
                     "port PORT are connected to the host TCP address (refused or "
                     "unreachable: the guest gets a reset). In the guest, "
                     "vsock-tcp-relay carries a vsock port to a guest TCP port and back")
    run.add_argument("--disk", type=parse_disk, action="append", default=[],
                     metavar="PATH[,ro][,cache=writeback|none][,serial=ID][,format=FMT]",
                     help="a virtio-blk disk backed by the image PATH; repeat for more "
                     "(the guest's vda, vdb, ... in this order). A raw image is served "
                     "directly; any other format qemu-img knows (qcow2, vmdk, vhdx, ...) "
                     "through qemu-storage-daemon over NBD on a private Unix socket. ro: "
                     "read-only (the file is never opened for writing); cache=none: O_DIRECT "
                     "(for a non-raw image the daemon's cache.direct=on); serial: the disk's "
                     "ID, at most 20 characters; format: the image's format as qemu-img names "
                     "it (default: probed; a probed raw image refuses guest writes of another "
                     "format's magic to its start, as QEMU does). An image in use by another pyvmm or QEMU is "
                     "refused")
    run.add_argument("--vcpu-affinity", metavar="CPUS", help="host CPUs for the vCPU threads, "
                     "a list like 0, 1-3 or 0,2 (default: not pinned)")
    run.add_argument("--io-affinity", metavar="CPUS", help="host CPUs for the device threads "
                     "(the I/O thread pyvmm-io, stdin); same syntax (default: not pinned)")
    run.add_argument("--metrics", metavar="PATH", help="write the device counters as JSON "
                     "to PATH when the run ends")

    sub.add_parser("info", help="what KVM this host has, and the default images")
    agent_command.add_parser(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pyvmm: %(message)s"))
    root = logging.getLogger("pyvmm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@contextlib.contextmanager
def _cbreak(stream):
    """Character-at-a-time input from a terminal; Ctrl-C still stops pyvmm."""
    if stream is None or not stream.isatty():
        yield
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def cmd_info() -> int:
    host = detect()
    print(f"kvm: {host.flavour.value} ({host.detail})")
    if host.flavour is KvmFlavour.PVM:
        print("     guest CPL0 code is emulated; a stock Linux guest cannot run its userspace here")
    for name, fn in (("kernel", images.default_kernel), ("initramfs", images.default_initramfs),
                     ("root file system", images.default_rootfs),
                     ("freestanding guest", images.freestanding_guest)):
        path = fn(required=False)
        print(f"{name}: {path or 'not built (make guest / make kernel)'}")
    return 0


#: the soft RLIMIT_NOFILE ``pyvmm run`` raises itself to (at most the hard limit): the vsock
#: device may hold 1023 connections (MAX_CONNECTIONS) and 1024 Unix peers in the CONNECT
#: handshake (MAX_HANDSHAKES), one fd each, beside its own; many systems start at 1024
NOFILE_WANTED = 4096


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(NOFILE_WANTED, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < NOFILE_WANTED:
        log.warning("open files limited to %d (hard limit): fewer vsock connections fit", want)


def _names_a_root(cmdline: str) -> bool:
    """Whether the user's cmdline has ``root=``: then the root file system is a disk (e.g.
    ``--disk rootfs.img --cmdline root=/dev/vda``), and the default initramfs, which Linux
    would run instead, is not attached."""
    return any(word.startswith("root=") for word in cmdline.split())


def cmd_run(args) -> int:
    from .machine import Machine, MachineConfig   # numpy import only when a VM is made
    from .vsock.tcp import VsockToTcp

    if args.forward:
        if args.vsock is None:
            raise ConfigError("--forward needs a vsock device: add --vsock CID")
        args.vsock.forwards = list(args.forward)
    _raise_nofile()
    vcpu_cpus = affinity.cpu_set(args.vcpu_affinity, "--vcpu-affinity")
    io_cpus = affinity.cpu_set(args.io_affinity, "--io-affinity")
    kernel, initrd = args.kernel, args.initrd
    if kernel is None:
        kernel = str(images.default_kernel())
        if initrd is None and not _names_a_root(args.cmdline):
            initrd = str(images.default_initramfs())
    host = detect()
    serial_out, close_serial = sys.stdout.buffer, None
    stdin = sys.stdin.buffer if sys.stdin is not None else None
    if args.serial != "stdio":
        try:
            serial_out = close_serial = open(args.serial, "wb")
        except OSError as e:
            raise ConfigError(f"--serial {args.serial!r}: {e.strerror}") from None
        stdin = None
    config = MachineConfig(kernel=kernel, initrd=initrd, cmdline=args.cmdline, mem=args.mem,
                           cpus=args.cpus, timeout=args.timeout, serial_out=serial_out,
                           stdin=stdin, default_cmdline=not args.no_default_cmdline,
                           vsock=args.vsock, vcpu_affinity=vcpu_cpus, io_affinity=io_cpus,
                           disks=args.disk)
    try:
        with Machine(config, host) as vm:
            log.info("host: %s (%s)", host.flavour.value, host.detail)
            if host.is_pvm and vm.kernel.format != "pvh-elf":
                log.warning("PVM host: the guest kernel runs emulated (slowly) and a stock "
                            "Linux guest cannot run its userspace here")
                if args.cpus > 1:
                    log.warning("PVM host: Linux's bring-up of secondary CPUs was seen to hang "
                                "here ('Booting SMP configuration'); --cpus 1 is safer")
            log.info("kernel %s (%s, %s), %d MiB, %d vCPU(s)", kernel, vm.kernel.format,
                     vm.kernel.mode.value, args.mem // layout.MiB, args.cpus)
            log.debug("cmdline: %s", vm.cmdline)
            for what, cpus in (("vCPU threads", vcpu_cpus), ("device threads", io_cpus)):
                if cpus is not None:
                    log.info("%s on CPU %s", what, affinity.format_cpu_list(cpus))
            if args.vsock is not None:
                log.info("vsock: guest CID %d%s%s", args.vsock.guest_cid,
                         f", host end {args.vsock.uds_path}" if args.vsock.uds_path else "",
                         f", group {args.vsock.group}" if args.vsock.group else "")
                for forward in args.forward:
                    if isinstance(forward, VsockToTcp):
                        log.info("forward: guest connections to vsock port %d -> TCP %s port %d",
                                 forward.port, forward.host, forward.host_port)
            if vm.vsock_forward is not None:
                for forward, (addr, port) in vm.vsock_forward.listening:
                    log.info("forward: TCP %s port %d -> guest vsock port %d", addr, port,
                             forward.guest_port)
            for i, (disk, dev) in enumerate(zip(args.disk, vm.blk_devices)):
                log.info("disk vd%s: %s, %d sectors%s%s", chr(ord("a") + i),
                         disk.path, dev.capacity, ", read-only" if disk.read_only else "",
                         ", cache=none" if disk.cache == "none" else "")
            with _cbreak(stdin if args.serial == "stdio" else None):
                result = vm.run()
            if args.metrics:
                _write_metrics(args.metrics, vm, result)
    finally:
        if close_serial is not None:
            close_serial.close()
    log.info("%s (status %d)", result.reason, result.status)
    log.info("times since pyvmm started: %s", _format_times(result.timings))
    log.info("exits: %s", ", ".join(f"{k} {v}" for k, v in sorted(result.exit_counts.items())))
    return result.status


def _write_metrics(path: str, vm, result) -> None:
    doc = {"status": result.status, "reason": result.reason, "timings": result.timings,
           "exits": dict(result.exit_counts)}
    if vm.vsock_device is not None:
        doc["vsock"] = vm.vsock_device.counters()
    if vm.blk_devices:
        doc["blk"] = [dev.counters() for dev in vm.blk_devices]
    doc["virtio"] = [{"base": slot.base, "irq": slot.irq, **slot.transport.snapshot()}
                     for slot in vm.virtio_slots]
    try:
        with open(path, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True, default=str)
    except OSError as e:
        log.error("--metrics %s: %s", path, e.strerror)


def _format_times(t: dict[str, float]) -> str:
    origin = t.get("process_start", 0.0)          # negative: before the Machine was made
    parts = []
    for key, label in (("first_kvm_run", "first KVM_RUN"),
                       ("first_serial_byte", "first guest serial byte"), ("end", "end")):
        if key in t:
            parts.append(f"{label} {t[key] - origin:.3f} s")
    return ", ".join(parts)


@contextlib.contextmanager
def _terminate_like_ctrl_c():
    """SIGTERM and SIGHUP stop the machine exactly as Ctrl-C does (clean-up: host sockets
    unlinked, threads joined, --metrics written), exiting 143 / 129.  The first signal
    raises :class:`~pyvmm.machine.Terminated` in the main thread; later ones are ignored
    so that they cannot interrupt the clean-up the first one started."""
    from .machine import Terminated
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Terminated(signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        if args.command == "info":
            return cmd_info()
        if args.command == "exec":
            return agent_command.run(args)
        with _terminate_like_ctrl_c():
            return cmd_run(args)
    except KeyboardInterrupt as e:      # before the machine ran (it handles them once it runs)
        return 128 + e.signum if hasattr(e, "signum") else 130
    except ConfigError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return 2
    except PyvmmError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
