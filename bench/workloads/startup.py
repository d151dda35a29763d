"""VMM start-up: from spawning the VMM to the guest's first byte on the host.

Both VMMs are started as subprocesses, as a user would start them; the clock
starts just before ``Popen``.  pyvmm also reports its own timings
(``--metrics``: process start -> first KVM_RUN).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..common import (Context, GuestProcess, accept, pyvmm_argv, qemu_argv, unix_listener)
from . import metric, workload

PORT = 5000

metric("pyvmm.startup.kvm_run", "ms", "lower", "pyvmm process start -> first KVM_RUN")
for _vmm in ("pyvmm", "qemu"):
    metric(f"{_vmm}.startup.first_line", "ms", "lower", f"{_vmm} spawn -> first guest console line")
    metric(f"{_vmm}.startup.first_byte", "ms", "lower",
           f"{_vmm} spawn -> first guest byte on host socket")
metric("pyvmm.startup.first_conn", "ms", "lower", "pyvmm spawn -> guest's first vsock connection")


@workload("pyvmm-startup", produces=("pyvmm.startup.",), reps=10, quick_reps=5)
def pyvmm_startup(ctx: Context) -> dict[str, float]:
    """pyvmm start-up, from ``Popen`` of ``python -m pyvmm run`` to the guest's
    first vsock connection and its first byte.

    Guest: ``vsock-bulk-send port=5000 bytes=64``; this process listens on
    ``<uds>_5000``.  Measured: spawn -> first console line (the guest's
    ``vsock cid ...`` line, after virtio initialisation), spawn -> accept of
    the guest's connection, spawn -> its first byte; from pyvmm's
    ``--metrics`` JSON: process start -> first KVM_RUN (pyvmm's own clock,
    which includes the Python interpreter and numpy import)."""
    elf = ctx.need_elf()
    uds = ctx.path("startup.sock")
    metrics = ctx.path("startup-metrics.json")
    with unix_listener(Path(f"{uds}_{PORT}")) as listener:
        with GuestProcess(pyvmm_argv(elf, f"vsock-bulk-send port={PORT} bytes=64", uds,
                                     metrics=metrics, placement=ctx.placement), "pyvmm",
                          stderr_path=ctx.stderr("pyvmm-startup")) as guest:
            t0 = guest.spawned
            conn = accept(listener, guest)
            t_conn = time.monotonic()
            with conn:
                conn.recv(64)
                t_byte = time.monotonic()
                while conn.recv(64):
                    pass
            guest.expect_exit0()
            t_line = guest.lines[0][0]
    timings = json.loads(metrics.read_text())["timings"]
    return {"pyvmm.startup.kvm_run": (timings["first_kvm_run"] - timings["process_start"]) * 1e3,
            "pyvmm.startup.first_line": (t_line - t0) * 1e3,
            "pyvmm.startup.first_conn": (t_conn - t0) * 1e3,
            "pyvmm.startup.first_byte": (t_byte - t0) * 1e3}


@workload("qemu-startup", produces=("qemu.startup.",), reps=10, quick_reps=5)
def qemu_startup(ctx: Context) -> dict[str, float]:
    """QEMU start-up with the same guest, from ``Popen`` to the guest's first
    byte on the virtio-serial socket.

    Guest: ``console-bulk-send bytes=64 port=1``.  QEMU connects its chardev
    to our socket while it starts (before the guest runs), so there is no
    "first connection" to compare; measured: spawn -> first console line
    (``console ready``, after virtio initialisation) and spawn -> first byte."""
    elf, qemu = ctx.need_elf(), ctx.need_qemu()
    chardev = ctx.path("qemu-startup.sock")
    with unix_listener(chardev) as listener:
        with GuestProcess(qemu_argv(elf, "console-bulk-send bytes=64 port=1", chardev, qemu=qemu),
                          "qemu", stderr_path=ctx.stderr("qemu-startup"),
                          placement=ctx.placement) as guest:
            t0 = guest.spawned
            with accept(listener, guest) as conn:
                conn.recv(64)
                t_byte = time.monotonic()
            guest.expect_exit0()
            t_line = guest.lines[0][0]
    return {"qemu.startup.first_line": (t_line - t0) * 1e3,
            "qemu.startup.first_byte": (t_byte - t0) * 1e3}
