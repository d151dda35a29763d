"""Connection rate: connect, a 64-byte echo, close -- over and over.

Only pyvmm: virtio-serial has no connections, so there is no QEMU peer for
this one; the issue's target is absolute (>= 5,000 connections/s).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np

from ..common import (Context, GuestProcess, NotAvailable, WorkloadFailed, accept, guest_has,
                      percentiles, pyvmm_argv, read_line, recv_exact, unix_listener)
from . import metric, workload

PORT = 1234
G2H_PORT = 2000
MESSAGE = bytes(range(64))

metric("pyvmm.conn.h2g.rate", "conn/s", "higher", "pyvmm connections/s host->guest")
for _p in ("p50", "p99"):
    metric(f"pyvmm.conn.h2g.connect.{_p}", "us", "lower", f"pyvmm connect latency h->g {_p}")
metric("pyvmm.conn.g2h.rate", "conn/s", "higher", "pyvmm connections/s guest->host")


@workload("pyvmm-conn-h2g", produces=("pyvmm.conn.h2g.",), reps=5, quick_reps=3)
def pyvmm_conn_h2g(ctx: Context) -> dict[str, float]:
    """pyvmm, host -> guest connections per second, and connect latency.

    Guest: ``vsock-echo-server port=1234 conns=K``.  Host, K times in a row:
    a new Unix socket connects to the Firecracker host end, writes
    ``CONNECT 1234\\n``, reads ``OK <port>\\n`` (connect latency: from
    ``socket()`` to that line, i.e. until the guest has accepted), writes 64
    bytes, reads the 64 back, closes.  Rate = K / total time.  K is 5,000
    (500 quick)."""
    elf = ctx.need_elf()
    k = 500 if ctx.quick else 5_000
    uds = ctx.path("conn.sock")
    buf = memoryview(bytearray(len(MESSAGE)))
    lat = np.empty(k, dtype=np.int64)
    clock = time.perf_counter_ns
    with GuestProcess(pyvmm_argv(elf, f"vsock-echo-server port={PORT} conns={k}", uds,
                                 placement=ctx.placement), "pyvmm",
                      stderr_path=ctx.stderr("pyvmm-conn")) as guest:
        guest.wait_for(rf"^vsock listening {PORT}$")
        t0 = time.perf_counter()
        for i in range(k):
            c0 = clock()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(uds))
                s.sendall(b"CONNECT %d\n" % PORT)
                reply = read_line(s)
                if not reply.startswith(b"OK "):
                    raise WorkloadFailed(f"connection {i}: CONNECT got {reply!r}" + guest.tail())
                lat[i] = clock() - c0
                s.sendall(MESSAGE)
                recv_exact(s, buf)
            finally:
                s.close()
        dt = time.perf_counter() - t0
        guest.expect_exit0()
    pct = percentiles(lat)
    return {"pyvmm.conn.h2g.rate": k / dt, "pyvmm.conn.h2g.connect.p50": pct["p50"],
            "pyvmm.conn.h2g.connect.p99": pct["p99"]}


@workload("pyvmm-conn-g2h", produces=("pyvmm.conn.g2h.",), reps=5, quick_reps=3)
def pyvmm_conn_g2h(ctx: Context) -> dict[str, float]:
    """pyvmm, guest -> host connections per second.

    Guest: ``vsock-connect-loop port=2000 count=K size=64``: K times in a row,
    connect to CID 2 port 2000 (pyvmm dials ``<uds>_2000``), send 64 bytes,
    read the echo, close (SHUTDOWN, then the host's RST).  Host: accepts each
    connection on ``<uds>_2000`` and echoes it.  Rate = K / host time from the
    first accept to the last connection's end.  K is 2,000 (500 quick)."""
    elf = ctx.need_elf()
    if not guest_has(elf, "vsock-connect-loop"):
        raise NotAvailable("the guest has no connect-loop scenario (vsock-echo-client "
                           "makes one connection per boot)")
    k = 500 if ctx.quick else 2_000
    uds = ctx.path("conng.sock")
    listener = unix_listener(Path(f"{uds}_{G2H_PORT}"))
    buf = bytearray(4096)
    try:
        with GuestProcess(pyvmm_argv(elf, f"vsock-connect-loop port={G2H_PORT} count={k} size=64",
                                     uds, placement=ctx.placement), "pyvmm", stderr_path=ctx.stderr("pyvmm-conng")) as guest:
            t0 = None
            for i in range(k):
                conn = accept(listener, guest)
                t0 = t0 if t0 is not None else time.perf_counter()
                with conn:
                    while n := conn.recv_into(buf):
                        conn.sendall(memoryview(buf)[:n])
            dt = time.perf_counter() - t0
            guest.wait_for(rf"^vsock connect loop {k} connections in \d+ ticks$")
            guest.expect_exit0()
    finally:
        listener.close()
    return {"pyvmm.conn.g2h.rate": k / dt}
