"""Linux boot: the default guest kernel and initramfs under pyvmm on /dev/kvm.

One boot is shared by every test in this module (on a PVM host it takes about
two minutes: the guest kernel's CPL0 code is emulated there).  What is
expected depends on the host:

* hardware KVM: the kernel boots, /init prints its ready line, runs the
  program named by ``pyvmm.run`` and reboots; pyvmm exits 0.
The guest has pyvmm's vsock device (CID 3): the kernel's own virtio_vsock
driver must probe it, negotiate, fill the rx queue and post its event
buffers, which is checked from pyvmm's transport state at the end.

* PVM: the kernel boots to ``Run /init``; the first userspace SYSCALL then
  fails (a PVM limit, docs/pvm.md), init dies, the kernel panics
  and, with ``panic=-1 reboot=k``, resets through the i8042; pyvmm exits 0.
  pyvmm must have added its PVM command-line workarounds and said so.
"""

import re

import pytest

from harness import run_guest
from pyvmm import images
from pyvmm.machine import VsockConfig
from pyvmm.virtio.device import VirtioFeature
from pyvmm.kvm.host import PVM_CMDLINE, KvmFlavour, detect
from pyvmm.machine import ExitStatus

pytestmark = pytest.mark.linux_boot

HOST = detect()


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    uds = tmp_path_factory.mktemp("vsock") / "v.sock"
    return run_guest(images.default_kernel(), initrd=images.default_initramfs(),
                     cmdline='pyvmm.run="pyvmm-hello linux-boot-test"', timeout=900,
                     vsock=VsockConfig(3, str(uds)))


def test_kernel_log_reaches_the_serial_console(boot):
    assert re.search(r"Linux version 6\.1\.\d+", boot.console), boot.explain()
    assert re.search(r"Command line: console=ttyS0 ", boot.console), boot.explain()
    assert "printk: console [ttyS0] enabled" in boot.console or \
        "console [ttyS0] enabled" in boot.console, boot.explain()


def test_the_guest_sees_pyvmm_as_a_kvm_hypervisor(boot):
    assert "Hypervisor detected: KVM" in boot.console, boot.explain()
    assert "kvm-clock: " in boot.console, boot.explain()


def test_boot_structures_are_found(boot):
    assert "BIOS-e820: [mem 0x0000000000100000-0x0000000003ffffff] usable" in boot.console
    assert "Intel MultiProcessor Specification v1.4" in boot.console
    assert "MPTABLE: OEM ID: PYVMM" in boot.console
    assert re.search(r"RAMDISK: \[mem 0x[0-9a-f]+-0x0*3ffffff\]", boot.console), boot.explain()


def test_the_kernel_reaches_init(boot):
    assert "Run /init as init process" in boot.console, boot.explain()


def test_pyvmm_ends_the_run_cleanly(boot):
    assert boot.result.status == ExitStatus.GUEST_RESET, boot.explain()
    assert "i8042" in boot.result.reason
    t = boot.result.timings
    assert 0 < t["first_kvm_run"] < t["first_serial_byte"] < t["end"]


@pytest.mark.skipif(HOST.flavour is not KvmFlavour.PVM, reason="PVM-specific behaviour")
def test_on_pvm_workarounds_are_applied_and_userspace_stops_as_documented(boot):
    for word in PVM_CMDLINE:
        assert word in boot.cmdline
    assert "Attempted to kill init" in boot.console, boot.explain()


@pytest.mark.skipif(HOST.flavour is not KvmFlavour.HARDWARE,
                    reason="guest userspace runs only on hardware KVM (PVM host)")
def test_on_hardware_kvm_userspace_runs(boot):
    assert "pyvmm-guest: ready" in boot.console, boot.explain()
    assert "hello from pyvmm guest userspace" in boot.console, boot.explain()
    assert "pyvmm-guest: exit 0" in boot.console, boot.explain()
    assert not any(w in boot.cmdline for w in PVM_CMDLINE)


def test_the_guest_vsock_driver_probes_and_posts_its_buffers(boot):
    """Linux 6.1's virtio_vsock driver against pyvmm's device (vsock-facts.md):
    status ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK, VERSION_1 and SEQPACKET
    acked, the rx queue filled, 8 event buffers posted, no guest errors."""
    assert "virtio_mmio.device=4K@0xd0000000:5" in boot.cmdline
    assert "virtio-mmio: Registering device virtio-mmio.0 at 0xd0000000" in boot.console
    (vsock,) = boot.virtio
    assert vsock["device_id"] == 19
    assert {"ACKNOWLEDGE", "DRIVER", "FEATURES_OK", "DRIVER_OK"} <= set(vsock["status"]), vsock
    assert vsock["driver_features"] & (1 << VirtioFeature.VIRTIO_F_VERSION_1)
    assert vsock["driver_features"] & (1 << 1)          # VIRTIO_VSOCK_F_SEQPACKET
    assert vsock["activated"] and vsock["guest_errors"] == 0
    assert vsock["notifies_before_driver_ok"] == 0
    rx, tx, event = vsock["queues"]
    assert rx["avail_idx"] >= rx["size"] // 2, rx       # filled until the ring is full
    assert event["avail_idx"] == 8, event               # 8 event buffers of 4 bytes
    assert tx["avail_idx"] == 0                         # nothing sent: no userspace here
