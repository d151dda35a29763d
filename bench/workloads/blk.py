"""virtio-blk on pyvmm and on QEMU: the freestanding guest's ``blk-load`` against a raw image.

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

QEMU (``qemu-blk``) runs the same guest ELF with the same loads (modes, request
sizes, depths, MiB) on the same kind of image (a fresh 512 MiB sparse raw file per
run, so both VMMs start from holes), under ``qemu-system-x86_64 -M microvm -accel
kvm`` with ``-drive ...,format=raw,cache=writeback,aio=threads -device
virtio-blk-device`` (:func:`bench.common.qemu_blk_argv`; no NIC, no vsock device),
timed the same way: the guest's TSC ticks at the host's cpuinfo rate (KVM gives
both guests the host's TSC unscaled here; QEMU's CPUID states no TSC rate to this
guest either).  pyvmm places its own threads before the guest starts; QEMU's are
placed by :class:`bench.common.GuestProcess` when the first console line (the
guest's ``start`` line) arrives, so at the very start of the timed window.
"""

from __future__ import annotations

import re

from ..common import (Context, GuestProcess, NotAvailable, WorkloadFailed, guest_has, pyvmm_argv,
                      qemu_blk_argv)
from . import metric, workload

MiB = 1 << 20
#: the image: large enough that a random 4 KiB load rarely hits a block twice in cache lines
DISK_BYTES = 512 * MiB
#: (mode, request bytes, metric name after ``<vmm>.blk.``, unit): the order they run in
LOADS = (("seqwrite", MiB, "seqwrite.1M", "MiB/s"),
         ("seqread", MiB, "seqread.1M", "MiB/s"),
         ("randwrite", 4096, "randwrite.4K", "IOPS"),
         ("randread", 4096, "randread.4K", "IOPS"))
#: the VMMs compared, in the table's order
VMMS = ("pyvmm", "qemu")

for _vmm in VMMS:
    for _mode, _bs, _name, _unit in LOADS:
        metric(f"{_vmm}.blk.{_name}", _unit, "higher",
               f"{_vmm} virtio-blk {_mode} {_bs >> 10} KiB requests ({_unit})")


def host_tsc_khz() -> int:
    """The host's ``cpu MHz`` (first CPU) in kHz."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return round(float(line.split(":")[1]) * 1000)
    raise NotAvailable("no 'cpu MHz' in /proc/cpuinfo: the TSC frequency is unknown")


def load_mib(ctx: Context, bs: int) -> int:
    """MiB moved by one load: 256 (64 quick) for 1 MiB requests, 32 (8 quick) for 4 KiB."""
    return (64 if ctx.quick else 256) if bs == MiB else (8 if ctx.quick else 32)


def blk_load(ctx: Context, vmm: str, disk, mode: str, bs: int, mib: int) -> tuple[int, int]:
    """One ``blk-load`` run on its own pyvmm or QEMU process; returns (requests, TSC ticks)."""
    elf = ctx.need_elf()
    scenario = f"blk-load mode={mode} bs={bs} mb={mib}"
    if vmm == "pyvmm":
        argv = pyvmm_argv(elf, scenario, ctx.path("blk.sock"), placement=ctx.placement)
        argv += ["--disk", f"{disk},format=raw"]
        placement = None                     # pyvmm places its own threads
    else:
        argv = qemu_blk_argv(elf, scenario, disk, qemu=ctx.need_qemu())
        placement = ctx.placement
    with GuestProcess(argv, vmm, stderr_path=ctx.stderr(f"{vmm}-blk-{mode}"),
                      placement=placement) as guest:
        m = guest.wait_for(rf"blk load mode={mode} bs={bs} depth=\d+ ios=(\d+) bytes=\d+ "
                           r"ticks=(\d+) bad=(\d+)", timeout=300)
        guest.expect_exit0()
    if int(m.group(3)):
        raise WorkloadFailed(f"{vmm} blk-load {mode}: {m.group(3)} requests did not complete OK")
    return int(m.group(1)), int(m.group(2))


def blk_loads(ctx: Context, vmm: str) -> dict[str, float]:
    """The four loads in order on a fresh sparse raw image, as ``<vmm>.blk.*`` metrics."""
    elf = ctx.need_elf()
    if vmm == "qemu":
        ctx.need_qemu()
    if not guest_has(elf, "blk-load"):
        raise NotAvailable("the guest ELF has no blk-load scenario")
    khz = host_tsc_khz()
    ctx.info["blk_tsc_khz"] = f"{khz} (host /proc/cpuinfo cpu MHz)"
    disk = ctx.path(f"{vmm}-blk.raw")
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    out: dict[str, float] = {}
    try:
        for mode, bs, name, unit in LOADS:
            ios, ticks = blk_load(ctx, vmm, disk, mode, bs, load_mib(ctx, bs))
            seconds = ticks / (khz * 1e3)
            out[f"{vmm}.blk.{name}"] = ios * bs / MiB / seconds if unit == "MiB/s" \
                else ios / seconds
    finally:
        disk.unlink(missing_ok=True)
    return out


@workload("pyvmm-blk", produces=("pyvmm.blk.",), reps=3, quick_reps=1)
def pyvmm_blk(ctx: Context) -> dict[str, float]:
    """virtio-blk through pyvmm, guest-timed (TSC): sequential 1 MiB writes then reads
    (MiB/s), random 4 KiB writes then reads (IOPS), ``blk-load`` with its default depth
    (4 requests of 1 MiB, 32 of 4 KiB in flight) on a 512 MiB sparse raw image
    (``--disk PATH,format=raw``, cache=writeback)."""
    return blk_loads(ctx, "pyvmm")


@workload("qemu-blk", produces=("qemu.blk.",), reps=3, quick_reps=1)
def qemu_blk(ctx: Context) -> dict[str, float]:
    """virtio-blk through QEMU (the peer): exactly ``pyvmm-blk``'s loads with the same
    guest ELF on a fresh 512 MiB sparse raw image, under ``qemu-system-x86_64 -M
    microvm -accel kvm -nodefaults -nic none -no-reboot`` with ``-drive
    file=IMG,if=none,id=d0,format=raw,cache=writeback,aio=threads -device
    virtio-blk-device,drive=d0``; guest-timed the same way."""
    return blk_loads(ctx, "qemu")
