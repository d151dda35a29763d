"""Round trips and echo streams: the guest echoes, the host times.

pyvmm: the guest runs ``vsock-echo-server`` (echoes every connection until
the peer shuts down, up to 8 connections at once); the host connects through
the Firecracker host end.  QEMU: the same guest runs ``console-echo`` on a
virtio-serial port whose Unix-socket chardev this process listens on.
The echo streams send the test stream and check what comes back with
:class:`bench.common.StreamCheck` (a sample of every read with
``ctx.verify`` = word, every byte with full); the guest only copies.
"""

from __future__ import annotations

import selectors
import socket
import time

import numpy as np

from ..common import (Context, GuestProcess, StreamCheck, accept, firecracker_connect, gbit,
                      percentiles, pyvmm_argv, qemu_argv, recv_exact, size_label, size_name,
                      teststream, unix_listener)
from . import metric, workload

RTT_SIZES = (64, 512, 4096)
WARMUP = 200
PORT = 1234
STREAM_WRITE = 65536

for _vmm in ("pyvmm", "qemu"):
    for _s in RTT_SIZES:
        for _p in ("p50", "p99", "p999"):
            metric(f"{_vmm}.rtt.{size_name(_s)}.{_p}", "us", "lower",
                   f"{_vmm} round trip {size_label(_s)} {_p}")
    for _k in (1, 2):
        metric(f"{_vmm}.echo.{_k}conn", "Gb/s", "higher",
               f"{_vmm} echo stream, {_k} conn, 64 KiB writes (each way)")


def _samples(ctx: Context) -> int:
    return 10_000 if ctx.quick else 100_000


def _ping_pong(sock: socket.socket, size: int, count: int) -> np.ndarray:
    """``count`` timed round trips of ``size`` bytes (after :data:`WARMUP` untimed)."""
    msg = bytes(range(256)) * (size // 256) + bytes(size % 256)
    buf = memoryview(bytearray(size))
    samples = np.empty(count, dtype=np.int64)
    clock = time.perf_counter_ns
    for _ in range(WARMUP):
        sock.sendall(msg)
        recv_exact(sock, buf)
    for i in range(count):
        t0 = clock()
        sock.sendall(msg)
        recv_exact(sock, buf)
        samples[i] = clock() - t0
    if bytes(buf) != msg:
        raise RuntimeError("the echo came back different")
    return samples


@workload("pyvmm-rtt", produces=("pyvmm.rtt.",), reps=3, quick_reps=1)
def pyvmm_rtt(ctx: Context) -> dict[str, float]:
    """pyvmm round-trip latency on one vsock connection, per message size.

    Guest: ``vsock-echo-server port=1234 conns=3``.  Host: for each size S
    (64 B, 512 B, 4 KiB) one connection (``CONNECT 1234``), 200 untimed
    round trips, then 100,000 timed ones (10,000 quick): ``sendall`` S bytes,
    ``recv_into`` until S bytes are back, ``perf_counter_ns`` around each.
    Reported: p50, p99, p99.9 in microseconds."""
    elf = ctx.need_elf()
    count = _samples(ctx)
    uds = ctx.path("rtt.sock")
    scenario = f"vsock-echo-server port={PORT} conns={len(RTT_SIZES)}"
    out: dict[str, float] = {}
    with GuestProcess(pyvmm_argv(elf, scenario, uds, placement=ctx.placement), "pyvmm",
                      stderr_path=ctx.stderr("pyvmm-rtt")) as guest:
        guest.wait_for(rf"^vsock listening {PORT}$")
        for size in RTT_SIZES:
            with firecracker_connect(uds, PORT) as s:
                samples = _ping_pong(s, size, count)
            for p, v in percentiles(samples).items():
                out[f"pyvmm.rtt.{size_name(size)}.{p}"] = v
        guest.expect_exit0()
    return out


@workload("qemu-rtt", produces=("qemu.rtt.",), reps=3, quick_reps=1)
def qemu_rtt(ctx: Context) -> dict[str, float]:
    """QEMU round-trip latency over virtio-serial, per message size.

    Guest: ``console-echo port=1 bytes=<all the bytes below>``.  Host: on the
    chardev socket, for each size S the same loop as pyvmm-rtt (200 untimed,
    then 100,000 / 10,000 timed round trips of S bytes).  The guest echoes
    each received buffer (at most 4 KiB) as it arrives."""
    elf, qemu = ctx.need_elf(), ctx.need_qemu()
    count = _samples(ctx)
    total = sum(s * (count + WARMUP) for s in RTT_SIZES)
    chardev = ctx.path("qemu-rtt.sock")
    out: dict[str, float] = {}
    with unix_listener(chardev) as listener, GuestProcess(
            qemu_argv(elf, f"console-echo bytes={total} port=1", chardev, qemu=qemu), "qemu",
            stderr_path=ctx.stderr("qemu-rtt"), placement=ctx.placement) as guest:
        with accept(listener, guest) as s:
            guest.wait_for(r"^console ready")
            for size in RTT_SIZES:
                samples = _ping_pong(s, size, count)
                for p, v in percentiles(samples).items():
                    out[f"qemu.rtt.{size_name(size)}.{p}"] = v
        guest.expect_exit0()
    return out


def _echo_stream(socks: list[socket.socket], total: int, verify: str) -> float:
    """Write the first ``total`` bytes of the test stream on each socket in
    64 KiB writes while reading the echo back and checking it (``verify``);
    seconds until every byte is back (one thread, a selector)."""
    payload = teststream(total)
    checks = {s: StreamCheck(verify, total, f"echo stream {i + 1}") for i, s in enumerate(socks)}
    buf = memoryview(bytearray(STREAM_WRITE))
    sent = {s: 0 for s in socks}
    back = {s: 0 for s in socks}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    t0 = time.perf_counter()
    left = len(socks)
    while left:
        for key, events in sel.select():
            s = key.fileobj
            if events & selectors.EVENT_READ:
                try:
                    n = s.recv_into(buf)
                except BlockingIOError:
                    n = -1
                if n == 0:
                    raise RuntimeError(f"echo closed after {back[s]} of {total} bytes")
                if n > 0:
                    checks[s].feed(buf[:n])
                    back[s] += n
                    if back[s] >= total:
                        sel.unregister(s)
                        left -= 1
                        continue
            if events & selectors.EVENT_WRITE and sent[s] < total:
                try:
                    sent[s] += s.send(payload[sent[s]:sent[s] + STREAM_WRITE])
                except BlockingIOError:
                    pass
                if sent[s] >= total:
                    sel.modify(s, selectors.EVENT_READ)
    dt = time.perf_counter() - t0
    for s in socks:
        s.setblocking(True)
    return dt


def echo_streams(ctx: Context, conns: int, vsock: str = "") -> float:
    """Gb/s each way of ``conns`` echo streams at once through one pyvmm (the
    pyvmm-echo-stream loop); ``vsock``: more ``--vsock`` options."""
    total = (16 if ctx.quick else 64) << 20
    uds = ctx.path(f"echo-{conns}.sock")
    with GuestProcess(pyvmm_argv(ctx.need_elf(), f"vsock-echo-server port={PORT} conns={conns}", uds,
                                 placement=ctx.placement, vsock=vsock), "pyvmm",
                      stderr_path=ctx.stderr("pyvmm-echo")) as guest:
        guest.wait_for(rf"^vsock listening {PORT}$")
        socks = [firecracker_connect(uds, PORT) for _ in range(conns)]
        try:
            dt = _echo_stream(socks, total, ctx.verify)
        finally:
            for s in socks:
                s.close()
        guest.expect_exit0()
    return gbit(total * conns, dt)


@workload("pyvmm-echo-stream", produces=("pyvmm.echo.",), reps=5, quick_reps=3)
def pyvmm_echo_stream(ctx: Context) -> dict[str, float]:
    """pyvmm, bytes both ways at once: echo streams on 1 and on 2 connections.

    Guest: ``vsock-echo-server port=1234 conns=K`` (one pyvmm for each K).  Host: K
    connections at once; on each it writes N bytes of the test stream
    in 64 KiB writes while reading the echo (a selector loop) and checking it
    (a sample of each read, or every byte with --verify full), until all N are back.  Reported:
    N x connections / time, i.e. Gb/s *each way*.  N is 64 MiB (16 MiB quick)
    per connection.  (The guest's ``vsock-bulk-*`` scenarios run one stream
    in one direction only, so this is the workload with several streams.)"""
    return {f"pyvmm.echo.{k}conn": echo_streams(ctx, k) for k in (1, 2)}


@workload("qemu-echo-stream", produces=("qemu.echo.",), reps=5, quick_reps=3)
def qemu_echo_stream(ctx: Context) -> dict[str, float]:
    """QEMU, bytes both ways at once over one virtio-serial port.

    Guest: ``console-echo bytes=N port=1``; host: the same selector loop as
    pyvmm-echo-stream on the chardev socket (one port = one stream; a second
    port would need a guest scenario driving two ports)."""
    elf, qemu = ctx.need_elf(), ctx.need_qemu()
    total = (16 if ctx.quick else 64) << 20
    chardev = ctx.path("qemu-echo.sock")
    with unix_listener(chardev) as listener, GuestProcess(
            qemu_argv(elf, f"console-echo bytes={total} port=1", chardev, qemu=qemu), "qemu",
            stderr_path=ctx.stderr("qemu-echo"), placement=ctx.placement) as guest:
        with accept(listener, guest) as s:
            guest.wait_for(r"^console ready")
            dt = _echo_stream([s], total, ctx.verify)
        guest.expect_exit0()
    return {"qemu.echo.1conn": gbit(total, dt)}
