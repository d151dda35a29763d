"""Linux boot from a disk: the default kernel mounts its root file system through pyvmm's virtio-blk.

One boot of the default kernel with no initramfs and ``make rootfs``'s ext4 image as a
read-only disk (vda; ``root=/dev/vda ro``): the cached base is never opened for writing.
These are kernel-level milestones, so they run directly on a PVM host (the guest kernel's
CPL0 code emulated: about two minutes): the kernel's virtio_blk driver probes the device and
reads the capacity from its config space, ext4 mounts, and the kernel runs ``/sbin/init``
from the disk.  Past that:

* hardware KVM: /init (via the /sbin/init link) prints its ready line and runs ``pyvmm.run``;
* PVM: the first userspace syscall fails (docs/pvm.md), init dies, the kernel resets.

The run also answers how much the kernel read and that it sent nothing the device refused.
"""

import re

import pytest

from harness import run_guest
from pyvmm import images
from pyvmm.kvm.host import KvmFlavour, detect
from pyvmm.machine import DiskConfig, ExitStatus

pytestmark = pytest.mark.linux_boot

HOST = detect()
SECTOR = 512


@pytest.fixture(scope="module")
def boot():
    return run_guest(images.default_kernel(), timeout=900,
                     cmdline="root=/dev/vda ro pyvmm.run=\"grep ' / ' /proc/mounts\"",
                     disks=[DiskConfig(str(images.default_rootfs()), read_only=True)])


def test_the_kernel_finds_the_disk_and_its_size(boot):
    sectors = images.default_rootfs().stat().st_size // SECTOR
    assert re.search(rf"virtio_blk virtio0: \[vda\] {sectors} 512-byte logical blocks",
                     boot.console), boot.explain()
    (blk,) = boot.virtio
    assert blk["device_id"] == 2
    assert {"ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"} <= set(blk["status"]), blk
    assert blk["activated"] and blk["guest_errors"] == 0, blk


def test_ext4_mounts_the_disk_as_root_and_the_kernel_runs_init_from_it(boot):
    assert re.search(r"EXT4-fs \(vda\): mounted filesystem", boot.console), boot.explain()
    assert "VFS: Mounted root (ext4 filesystem) readonly on device 254:0" in boot.console, \
        boot.explain()
    assert "Run /sbin/init as init process" in boot.console, boot.explain()
    assert "RAMDISK" not in boot.console                   # no initramfs was given


def test_the_device_served_reads_only_and_refused_nothing(boot):
    (blk,) = boot.blk
    assert blk["read_only"] and blk["requests_in"] > 0, blk
    assert blk["requests_out"] == 0 and blk["read_only_refusals"] == 0, blk
    assert blk["status_ioerr"] == 0 and blk["status_unsupp"] == 0, blk
    assert not blk["guest_errors_by_reason"] and not blk["host_errors_by_reason"], blk


def test_the_run_ends_with_the_guests_reset(boot):
    assert boot.result.status == ExitStatus.GUEST_RESET, boot.explain()


@pytest.mark.skipif(HOST.flavour is not KvmFlavour.PVM, reason="PVM-specific behaviour")
def test_on_pvm_userspace_from_the_disk_stops_as_documented(boot):
    assert "Attempted to kill init" in boot.console, boot.explain()


@pytest.mark.skipif(HOST.flavour is not KvmFlavour.HARDWARE,
                    reason="guest userspace runs only on hardware KVM (PVM host)")
def test_on_hardware_kvm_init_runs_from_the_disk(boot):
    assert "pyvmm-guest: ready" in boot.console, boot.explain()
    assert re.search(r"/dev/root / ext4 ro", boot.console), boot.explain()
