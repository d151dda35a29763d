"""Bulk transfer, one stream: pyvmm's vsock against QEMU's virtio-serial.

Both VMMs run as subprocesses with the same freestanding guest ELF; the host
side is this process, talking Unix sockets to either.  Throughput is timed on
the host side from the first byte to the last, so both VMMs are measured the
same way whatever their connection set-up looks like.  During that window the
VMM process's CPU time is read from ``/proc/<pid>/task/*/stat`` (see
:func:`bench.common.cpu_delta`) and reported per GB moved, without and with
the vCPU threads.

Every byte is verified as ``ctx.verify`` says: the guest runs its scenario
with ``verify=word`` (checks every byte a 64-bit word at a time, prints the
word hash) or ``verify=full`` (byte for byte, FNV-1a); what the host receives
goes through :class:`bench.common.StreamCheck` (a sample of every read, or
every byte), and the guest's result line through
:func:`bench.common.check_guest_result`.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from ..common import (WAIT, Context, GuestProcess, NotAvailable, StreamCheck, WorkloadFailed, accept,
                      check_guest_result, cpu_delta, firecracker_connect, gbit, guest_has,
                      pyvmm_argv, qemu_argv, size_label, size_name, teststream, unix_listener)
from . import metric, workload

SIZES = (4096, 65536, 1 << 20)
GUEST_VSOCK_CHUNK_MAX = 65536          # VSOCK_TX_PAYLOAD in guest/freestanding/vsock.h
GUEST_CONSOLE_CHUNK_MAX = 4096         # CONSOLE_BUF_SIZE in guest/freestanding/virtio_console.c
PORT = 5000

def bulk_metrics(prefix: str, sizes, label: str) -> None:
    """Declare the Gb/s and CPU-per-GB metrics of ``prefix`` (pyvmm, qemu, draft) per size."""
    for size in sizes:
        n, sl = size_name(size), size_label(size)
        for direction, what in (("g2h", "guest->host"), ("h2g", "host->guest")):
            metric(f"{prefix}.{direction}.{n}", "Gb/s", "higher", f"{label} {what} {sl}")
            metric(f"{prefix}.cpu.{direction}.{n}", "s/GB", "lower",
                   f"{label} CPU per GB {what} {sl} (excl. vCPU threads)")
            metric(f"{prefix}.cputotal.{direction}.{n}", "s/GB", "lower",
                   f"{label} CPU per GB {what} {sl} (incl. vCPU threads)")


for _vmm in ("pyvmm", "qemu"):
    bulk_metrics(_vmm, SIZES, _vmm)


def _total(ctx: Context, size: int) -> int:
    """Bytes per transfer: enough for a few hundred ms at the rates seen here, so
    that the 10 ms CPU-time ticks of /proc are a small error."""
    mib = 16 if size <= 4096 else 64
    return (mib if ctx.quick else 4 * mib) << 20


def _receive(conn, guest: GuestProcess, size: int, total: int,
             check: StreamCheck) -> tuple[int, float, dict]:
    """Read ``total`` bytes in ``recv_into`` calls of ``size``, each checked;
    returns (bytes after the first read, seconds from the first byte to the
    last, VMM CPU)."""
    buf = memoryview(bytearray(size))
    first = conn.recv_into(buf)
    if not first:
        raise WorkloadFailed(f"{guest.name}: the connection closed before any byte" + guest.tail())
    cpu0, t0 = guest.cpu(), time.perf_counter()
    check.feed(buf[:first])
    got = first
    while got < total:
        n = conn.recv_into(buf)
        if not n:
            raise WorkloadFailed(f"{guest.name}: closed after {got} of {total} bytes"
                                 + guest.tail())
        check.feed(buf[:n])
        got += n
    dt = time.perf_counter() - t0
    return got - first, dt, cpu_delta(cpu0, guest.cpu())


def _record(out: dict, key: str, nbytes: int, seconds: float, cpu: dict) -> None:
    vmm, direction, size = key.split(".")
    out[key] = gbit(nbytes, seconds)
    out[f"{vmm}.cpu.{direction}.{size}"] = cpu["vmm"] / (nbytes / 1e9)
    out[f"{vmm}.cputotal.{direction}.{size}"] = cpu["total"] / (nbytes / 1e9)


@workload("pyvmm-bulk-g2h",
          produces=("pyvmm.g2h.", "pyvmm.cpu.g2h.", "pyvmm.cputotal.g2h."),
          reps=5, quick_reps=3)
def pyvmm_g2h(ctx: Context) -> dict[str, float]:
    """pyvmm, guest -> host, one vsock stream, for each write size S.

    The guest runs ``vsock-bulk-send port=5000 bytes=N chunk=min(S, 64 KiB)
    verify=V`` (its RW packets are at most 64 KiB); pyvmm connects to
    ``<uds>_5000``, where this process accepts and ``recv_into``s a buffer of
    S, checking each read (a sample with V = word, all of it with full).  N is 256 MiB
    (64 MiB quick; 64/16 MiB for S = 4 KiB).  One pyvmm process per size."""
    out: dict[str, float] = {}
    for size in SIZES:
        pyvmm_g2h_once(ctx, size, out, "pyvmm")
    return out


def pyvmm_g2h_once(ctx: Context, size: int, out: dict, prefix: str, vsock: str = "",
                   tcp: bool = False) -> None:
    """One pyvmm-bulk-g2h transfer of writes of ``size``, into ``out[prefix.g2h.<size>]``
    (and the CPU keys); ``vsock``: more ``--vsock`` options (the draft rows); ``tcp``: the
    host end is a TCP listener on 127.0.0.1 that ``--forward vsock:5000=tcp:...`` reaches,
    not ``<uds>_5000``."""
    elf = ctx.need_elf()
    total = _total(ctx, size)
    uds = ctx.path(f"g2h-{size_name(size)}.sock")
    extra: tuple[str, ...] = ()
    if tcp:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        extra = ("--forward", f"vsock:{PORT}=tcp:127.0.0.1:{listener.getsockname()[1]}")
    else:
        listener = unix_listener(Path(f"{uds}_{PORT}"))
    chunk = min(size, GUEST_VSOCK_CHUNK_MAX)
    scenario = f"vsock-bulk-send port={PORT} bytes={total} chunk={chunk} verify={ctx.verify}"
    check = StreamCheck(ctx.verify, total, f"{prefix} guest->host")
    with listener, GuestProcess(pyvmm_argv(elf, scenario, uds, placement=ctx.placement, vsock=vsock,
                                           extra=extra),
                                "pyvmm", stderr_path=ctx.stderr(f"{prefix}-g2h")) as guest:
        conn = accept(listener, guest)
        with conn:
            nbytes, dt, cpu = _receive(conn, guest, size, total, check)
        guest.expect_exit0()
        check_guest_result(guest, "vsock bulk sent", ctx.verify, total)
    _record(out, f"{prefix}.g2h.{size_name(size)}", nbytes, dt, cpu)


@workload("pyvmm-bulk-h2g",
          produces=("pyvmm.h2g.", "pyvmm.cpu.h2g.", "pyvmm.cputotal.h2g."),
          reps=5, quick_reps=3)
def pyvmm_h2g(ctx: Context) -> dict[str, float]:
    """pyvmm, host -> guest, one vsock stream, for each write size S.

    The guest runs ``vsock-bulk-recv port=5000 bytes=N listen=1 verify=V`` and
    checks every byte against its test stream (word-wise with V = word); once it prints ``vsock listening``
    this process connects (``CONNECT 5000``), ``sendall``s the test stream in
    writes of S, and waits for the guest's close (EOF): the time runs from the
    first write to that EOF, i.e. until the guest has every byte.  The guest
    posts 4 KiB receive buffers whatever S is.  N is 256 MiB (64 MiB quick;
    64/16 MiB for S = 4 KiB)."""
    out: dict[str, float] = {}
    data = teststream(_total(ctx, max(SIZES)))
    for size in SIZES:
        pyvmm_h2g_once(ctx, size, out, "pyvmm", data)
    return out


def pyvmm_h2g_once(ctx: Context, size: int, out: dict, prefix: str, data: memoryview,
                   vsock: str = "", tcp: bool = False) -> None:
    """One pyvmm-bulk-h2g transfer of writes of ``size`` (of ``data``, the test stream),
    into ``out[prefix.h2g.<size>]`` (and the CPU keys); ``vsock`` as for g2h; ``tcp``: the
    host connects to a ``--forward tcp:127.0.0.1:P=vsock:5000`` listener, not ``CONNECT``
    on ``uds`` (P: a port free a moment before pyvmm starts)."""
    elf = ctx.need_elf()
    total = _total(ctx, size)
    uds = ctx.path(f"h2g-{size_name(size)}.sock")
    scenario = f"vsock-bulk-recv port={PORT} bytes={total} listen=1 verify={ctx.verify}"
    extra: tuple[str, ...] = ()
    if tcp:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            tcp_port = probe.getsockname()[1]
        extra = ("--forward", f"tcp:127.0.0.1:{tcp_port}=vsock:{PORT}")
    with GuestProcess(pyvmm_argv(elf, scenario, uds, placement=ctx.placement, vsock=vsock, extra=extra),
                      "pyvmm", stderr_path=ctx.stderr(f"{prefix}-h2g")) as guest:
        guest.wait_for(rf"^vsock listening {PORT}$")
        with (socket.create_connection(("127.0.0.1", tcp_port), timeout=WAIT) if tcp
              else firecracker_connect(uds, PORT)) as conn:
            cpu0, t0 = guest.cpu(), time.perf_counter()
            for off in range(0, total, size):
                conn.sendall(data[off:off + size])
            if conn.recv(1):
                raise WorkloadFailed("the guest sent data on a bulk-recv connection")
            dt = time.perf_counter() - t0
            cpu = cpu_delta(cpu0, guest.cpu())
        guest.expect_exit0()
        check_guest_result(guest, "vsock bulk received", ctx.verify, total)
    _record(out, f"{prefix}.h2g.{size_name(size)}", total, dt, cpu)


@workload("qemu-bulk-g2h",
          produces=("qemu.g2h.", "qemu.cpu.g2h.", "qemu.cputotal.g2h."),
          reps=5, quick_reps=3)
def qemu_g2h(ctx: Context) -> dict[str, float]:
    """QEMU (the peer), guest -> host, one virtio-serial port, per host read size S.

    The same guest ELF runs ``console-bulk-send bytes=N chunk=4096 port=1
    verify=V`` under ``qemu-system-x86_64 -M microvm -accel kvm``, its port on a Unix
    socket chardev that this process listens on, ``recv_into``-ing a buffer of
    S.  The guest's console buffers are 4 KiB, so the guest writes 4 KiB
    whatever S is (pyvmm's guest writes up to 64 KiB): S changes only the
    host side here.  N is 256 MiB (64 MiB quick; 64/16 MiB for S = 4 KiB)."""
    elf, qemu = ctx.need_elf(), ctx.need_qemu()
    out: dict[str, float] = {}
    for size in SIZES:
        total = _total(ctx, size)
        chardev = ctx.path(f"qemu-g2h-{size_name(size)}.sock")
        listener = unix_listener(chardev)
        chunk = min(size, GUEST_CONSOLE_CHUNK_MAX)
        scenario = f"console-bulk-send bytes={total} chunk={chunk} port=1 verify={ctx.verify}"
        check = StreamCheck(ctx.verify, total, "qemu guest->host")
        with listener, GuestProcess(qemu_argv(elf, scenario, chardev, qemu=qemu), "qemu",
                                    stderr_path=ctx.stderr("qemu-g2h"),
                                    placement=ctx.placement) as guest:
            conn = accept(listener, guest)
            with conn:
                nbytes, dt, cpu = _receive(conn, guest, size, total, check)
            guest.expect_exit0()
            check_guest_result(guest, "console bulk sent", ctx.verify, total)
        _record(out, f"qemu.g2h.{size_name(size)}", nbytes, dt, cpu)
    return out


@workload("qemu-bulk-h2g",
          produces=("qemu.h2g.", "qemu.cpu.h2g.", "qemu.cputotal.h2g."),
          reps=5, quick_reps=3)
def qemu_h2g(ctx: Context) -> dict[str, float]:
    """QEMU (the peer), host -> guest over virtio-serial.

    Guest: ``console-bulk-recv bytes=N port=1 verify=V`` checks every byte of
    the test stream; the host writes it in writes of S to the chardev socket, timed
    from the first write to the guest's "console bulk received" line."""
    elf, qemu = ctx.need_elf(), ctx.need_qemu()
    if not guest_has(elf, "console-bulk-recv"):
        raise NotAvailable("the guest has no console-bulk-recv scenario")
    out: dict[str, float] = {}
    data = teststream(_total(ctx, max(SIZES)))
    for size in SIZES:
        total = _total(ctx, size)
        chardev = ctx.path(f"qemu-h2g-{size_name(size)}.sock")
        listener = unix_listener(chardev)
        scenario = f"console-bulk-recv bytes={total} port=1 verify={ctx.verify}"
        with listener, GuestProcess(qemu_argv(elf, scenario, chardev, qemu=qemu), "qemu",
                                    stderr_path=ctx.stderr("qemu-h2g"),
                                    placement=ctx.placement) as guest:
            conn = accept(listener, guest)
            with conn:
                guest.wait_for(r"^console ready")
                cpu0, t0 = guest.cpu(), time.perf_counter()
                for off in range(0, total, size):
                    conn.sendall(data[off:off + size])
                guest.wait_for(r"^console bulk received")
                dt = time.perf_counter() - t0
                cpu = cpu_delta(cpu0, guest.cpu())
            guest.expect_exit0()
            check_guest_result(guest, "console bulk received", ctx.verify, total)
        _record(out, f"qemu.h2g.{size_name(size)}", total, dt, cpu)
    return out
