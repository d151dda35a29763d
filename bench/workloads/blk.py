"""virtio-blk on pyvmm: the freestanding guest's ``blk-load`` against a raw image.

The guest (guest/freestanding/virtio_blk.c) keeps ``depth`` requests in flight on
the one request queue and times the whole load with its TSC; it prints the ticks
(``blk load mode=... ticks=T bad=0``), and the rates are computed here from them and
the host's TSC frequency, since pyvmm's CPUID states none to the guest.  That
frequency is the host's ``cpu MHz`` from /proc/cpuinfo (the TSC rate on hosts with
an invariant TSC, which a guest's RDTSC reads unscaled), recorded in the run's info.

The image is a sparse raw file in the run's temporary directory, ``cache=writeback``
(the host page cache: this measures pyvmm's device path, not the disk); the flush
that ends a write load is outside the timed window.  Checked once on the development
host: a 256 MiB random-read load took 1.166 s by the guest's TSC at the cpuinfo rate
and 1.169 s between its start and result lines on the host.  Sequential
writes come first so that the sequential reads read written blocks, not holes.
QEMU is not compared here (yet).
"""

from __future__ import annotations

import re

from ..common import Context, GuestProcess, NotAvailable, WorkloadFailed, guest_has, pyvmm_argv
from . import metric, workload

MiB = 1 << 20
#: the image: large enough that a random 4 KiB load rarely hits a block twice in cache lines
DISK_BYTES = 512 * MiB
#: (mode, request bytes, metric key, unit): the order they run in
LOADS = (("seqwrite", MiB, "pyvmm.blk.seqwrite.1M", "MiB/s"),
         ("seqread", MiB, "pyvmm.blk.seqread.1M", "MiB/s"),
         ("randwrite", 4096, "pyvmm.blk.randwrite.4K", "IOPS"),
         ("randread", 4096, "pyvmm.blk.randread.4K", "IOPS"))

for _mode, _bs, _key, _unit in LOADS:
    metric(_key, _unit, "higher", f"pyvmm virtio-blk {_mode} {_bs >> 10} KiB requests ({_unit})")


def host_tsc_khz() -> int:
    """The host's ``cpu MHz`` (first CPU) in kHz."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return round(float(line.split(":")[1]) * 1000)
    raise NotAvailable("no 'cpu MHz' in /proc/cpuinfo: the TSC frequency is unknown")


def blk_load(ctx: Context, disk, mode: str, bs: int, mib: int) -> tuple[int, int]:
    """One ``blk-load`` run on its own pyvmm; returns (requests, TSC ticks)."""
    argv = pyvmm_argv(ctx.need_elf(), f"blk-load mode={mode} bs={bs} mb={mib}",
                      ctx.path("blk.sock"), placement=ctx.placement)
    argv += ["--disk", f"{disk},format=raw"]
    with GuestProcess(argv, "pyvmm", stderr_path=ctx.stderr(f"pyvmm-blk-{mode}")) as guest:
        m = guest.wait_for(rf"blk load mode={mode} bs={bs} depth=\d+ ios=(\d+) bytes=\d+ "
                           r"ticks=(\d+) bad=(\d+)", timeout=300)
        guest.expect_exit0()
    if int(m.group(3)):
        raise WorkloadFailed(f"blk-load {mode}: {m.group(3)} requests did not complete OK")
    return int(m.group(1)), int(m.group(2))


@workload("pyvmm-blk", produces=("pyvmm.blk.",), reps=3, quick_reps=1)
def pyvmm_blk(ctx: Context) -> dict[str, float]:
    """virtio-blk through pyvmm, guest-timed (TSC): sequential 1 MiB writes then reads
    (MiB/s), random 4 KiB writes then reads (IOPS), ``blk-load`` with its default depth
    (4 requests of 1 MiB, 32 of 4 KiB in flight) on a 512 MiB sparse raw image."""
    elf = ctx.need_elf()
    if not guest_has(elf, "blk-load"):
        raise NotAvailable("the guest ELF has no blk-load scenario")
    khz = host_tsc_khz()
    ctx.info["blk_tsc_khz"] = f"{khz} (host /proc/cpuinfo cpu MHz)"
    disk = ctx.path("blk.raw")
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    out: dict[str, float] = {}
    try:
        for mode, bs, key, unit in LOADS:
            mib = (64 if ctx.quick else 256) if bs == MiB else (8 if ctx.quick else 32)
            ios, ticks = blk_load(ctx, disk, mode, bs, mib)
            seconds = ticks / (khz * 1e3)
            out[key] = ios * bs / MiB / seconds if unit == "MiB/s" else ios / seconds
    finally:
        disk.unlink(missing_ok=True)
    return out
