"""Ceilings: what this host can do at all, with no VMM in the path.

pyvmm's host end is a Unix socket, so a Unix socketpair between two processes
is the most any Unix-socket VMM could deliver to a host program; memcpy is
the most any copy-based data path could do.  Measured in the same run as the
VMMs, on the same (possibly busy) host.
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np

from ..common import Context, gbit, percentiles, recv_exact, size_label, size_name
from . import metric, workload

SIZES = (4096, 65536, 1 << 20)
RTT_SIZES = (64, 512, 4096)

for _s in SIZES:
    metric(f"ceiling.socketpair.{size_name(_s)}", "Gb/s", "higher",
           f"socketpair, {size_label(_s)} writes")
for _s in RTT_SIZES:
    for _p in ("p50", "p99", "p999"):
        metric(f"ceiling.socketpair.rtt.{size_name(_s)}.{_p}", "us", "lower",
               f"socketpair ping-pong {size_label(_s)} {_p}")
metric("ceiling.memcpy", "GB/s", "higher", "memcpy (numpy, 64 MiB)")


def _child(fn) -> int:
    """Run ``fn()`` in a forked child (its own GIL, as a separate host program
    would have); returns the pid."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return pid


@workload("ceiling-socketpair-throughput",
          produces=("ceiling.socketpair.4k", "ceiling.socketpair.64k", "ceiling.socketpair.1m"),
          reps=5, quick_reps=3, placed=False)
def socketpair_throughput(ctx: Context) -> dict[str, float]:
    """Unix socketpair throughput between two processes, for each write size.

    A forked child ``sendall``s N bytes in writes of S (4 KiB, 64 KiB, 1 MiB)
    from one preallocated buffer; the parent ``recv_into``s a buffer of S and
    times from the first byte to the last.  N is 256 MiB (64 MiB in quick
    mode).  This is the ceiling for a Unix-socket host end: the same system
    calls the bulk workloads' host side makes, with nothing behind them."""
    total = (64 if ctx.quick else 256) << 20
    out = {}
    for size in SIZES:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        payload = memoryview(bytes(size))

        def send() -> None:
            b.close()
            left = total
            while left:
                n = min(size, left)
                a.sendall(payload[:n])
                left -= n

        pid = _child(send)
        a.close()
        buf = memoryview(bytearray(size))
        got = b.recv_into(buf)
        t0 = time.perf_counter()
        while got < total:
            n = b.recv_into(buf)
            if not n:
                break
            got += n
        dt = time.perf_counter() - t0
        b.close()
        os.waitpid(pid, 0)
        out[f"ceiling.socketpair.{size_name(size)}"] = gbit(got, dt)
    return out


@workload("ceiling-socketpair-pingpong", produces=("ceiling.socketpair.rtt.",),
          reps=3, quick_reps=1, placed=False)
def socketpair_pingpong(ctx: Context) -> dict[str, float]:
    """Unix socketpair ping-pong latency between two processes, per message size.

    The parent sends S bytes (64 B, 512 B, 4 KiB), a forked child reads them
    whole and writes them back, the parent times each round trip with
    ``perf_counter_ns``: the same host-side loop as the vsock round-trip
    workload, with a Python echo peer instead of VMM + guest.  100,000 round
    trips per size (10,000 in quick mode)."""
    count = 10_000 if ctx.quick else 100_000
    out = {}
    for size in RTT_SIZES:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def echo() -> None:
            b.close()
            buf = memoryview(bytearray(size))
            for _ in range(count):
                recv_exact(a, buf)
                a.sendall(buf)

        pid = _child(echo)
        a.close()
        msg = bytes(size)
        buf = memoryview(bytearray(size))
        samples = np.empty(count, dtype=np.int64)
        clock = time.perf_counter_ns
        for i in range(count):
            t0 = clock()
            b.sendall(msg)
            recv_exact(b, buf)
            samples[i] = clock() - t0
        b.close()
        os.waitpid(pid, 0)
        for p, v in percentiles(samples).items():
            out[f"ceiling.socketpair.rtt.{size_name(size)}.{p}"] = v
    return out


@workload("ceiling-memcpy", produces=("ceiling.memcpy",), reps=5, quick_reps=3, placed=False)
def memcpy(ctx: Context) -> dict[str, float]:
    """memcpy bandwidth: ``np.copyto`` of a 64 MiB array (larger than the
    caches), best of 5 copies, in GB/s (bytes copied, not read+written)."""
    src = np.ones(64 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return {"ceiling.memcpy": src.nbytes / best / 1e9}
