"""End to end: the default guest's userspace runs under pyvmm.

These need a Linux guest that can run userspace: hardware KVM, or the lab
(nested KVM in a QEMU TCG guest) on other hosts; see tests/conftest.py.
One boot with 2 vCPUs is shared by the module; it runs a shell line chosen
on the kernel command line and reports back through the serial console.
"""

import re

import pytest

from harness import run_guest
from pyvmm import images
from pyvmm.devices.boot_timer import PHASE_INIT_START
from pyvmm.machine import ExitStatus

pytestmark = pytest.mark.e2e

SCRIPT = ("pyvmm-hello e2e 'two words'; "
          "grep -m1 -o -w hypervisor /proc/cpuinfo; "
          "cat /sys/devices/system/clocksource/clocksource0/available_clocksource; "
          "exit 3")


@pytest.fixture(scope="module")
def boot():
    return run_guest(images.default_kernel(), initrd=images.default_initramfs(), cpus=2,
                     cmdline=f'pyvmm.run="{SCRIPT}"', timeout=300)


def test_init_reaches_its_ready_line(boot):
    assert "pyvmm-guest: ready" in boot.console, boot.explain()


def test_the_chosen_program_runs_with_its_arguments(boot):
    assert "hello from pyvmm guest userspace" in boot.console, boot.explain()
    assert "pyvmm-hello: argv[1]=e2e" in boot.console, boot.explain()
    assert "pyvmm-hello: argv[2]=two words" in boot.console, boot.explain()


def test_the_exit_status_comes_back_over_the_console(boot):
    assert "pyvmm-guest: exit 3" in boot.console, boot.explain()
    assert boot.result.status == ExitStatus.GUEST_RESET, boot.explain()


def test_both_vcpus_come_up(boot):
    assert re.search(r"smp: Brought up 1 node, 2 CPUs", boot.console), boot.explain()
    assert "online_cpus=2" in boot.console, boot.explain()


def test_the_hypervisor_cpuid_bit_and_kvm_clock(boot):
    """Leaf 1 ECX bit 31 and the KVM leaves: without them Linux finds no
    kvm-clock and hangs calibrating the TSC on real and nested KVM."""
    assert "hypervisor" in boot.lines, boot.explain()
    # the available_clocksource line, e.g. "kvm-clock tsc acpi_pm"
    assert re.search(r"^(\S+ )*kvm-clock( \S+)*\s*$", boot.console, re.M), boot.explain()


def test_init_writes_the_boot_timer(boot):
    assert PHASE_INIT_START in [code for code, _ in boot.boot_phases], boot.boot_phases


def test_bzimage_boots_too():
    run = run_guest(images.default_bzimage(), initrd=images.default_initramfs(),
                    cmdline='pyvmm.run="pyvmm-hello bzimage"', timeout=300)
    assert "pyvmm-guest: ready" in run.console, run.explain()
    assert "pyvmm-guest: exit 0" in run.console, run.explain()
