"""End to end: the default guest's userspace runs under pyvmm.

These need a Linux guest that can run userspace: hardware KVM, or the lab
(nested KVM in a QEMU TCG guest) on other hosts; see tests/conftest.py.
They use the shared 2-vCPU guest (tests/e2e/conftest.py), each typing its own
commands on its console; the bzImage test boots a guest of its own, which also
checks /init's ``pyvmm.run`` contract end to end (the exit status on the
console, then the reset).
"""

import re

import pytest

from harness import run_guest
from pyvmm import images
from pyvmm.devices.boot_timer import PHASE_INIT_START
from pyvmm.machine import ExitStatus

pytestmark = pytest.mark.e2e


def test_init_reaches_its_ready_line(linux):
    assert linux.console.text().count("pyvmm-guest: ready") == 1


def test_the_chosen_program_runs_with_its_arguments(linux):
    cmd = linux.run("pyvmm-hello e2e 'two words'")
    assert cmd.status == 0, cmd.explain()
    assert "hello from pyvmm guest userspace" in cmd.output, cmd.explain()
    assert "pyvmm-hello: argv[1]=e2e" in cmd.output, cmd.explain()
    assert "pyvmm-hello: argv[2]=two words" in cmd.output, cmd.explain()


def test_a_commands_exit_status_comes_back_over_the_console(linux):
    assert linux.run("sh -c 'exit 3'").status == 3
    assert linux.run("true").status == 0


def test_both_vcpus_come_up(linux):
    assert re.search(r"smp: Brought up 1 node, 2 CPUs", linux.console.text())
    cmd = linux.run("pyvmm-hello")
    assert "online_cpus=2" in cmd.output, cmd.explain()


def test_the_hypervisor_cpuid_bit_and_kvm_clock(linux):
    """Leaf 1 ECX bit 31 and the KVM leaves: without them Linux finds no
    kvm-clock and hangs calibrating the TSC on real and nested KVM."""
    cmd = linux.run("grep -m1 -o -w hypervisor /proc/cpuinfo")
    assert cmd.status == 0 and cmd.output == "hypervisor", cmd.explain()
    # the available_clocksource line, e.g. "kvm-clock tsc acpi_pm"
    cmd = linux.run("cat /sys/devices/system/clocksource/clocksource0/available_clocksource")
    assert re.fullmatch(r"(\S+ )*kvm-clock( \S+)*\s*", cmd.output), cmd.explain()


def test_init_writes_the_boot_timer(linux):
    codes = [r.code for r in linux.vm.boot_timer.records]
    assert PHASE_INIT_START in codes, codes


def test_bzimage_boots_and_init_reports_the_exit_status():
    run = run_guest(images.default_bzimage(), initrd=images.default_initramfs(),
                    cmdline='pyvmm.run="pyvmm-hello bzimage; exit 3"', timeout=300)
    assert "pyvmm-guest: ready" in run.console, run.explain()
    assert "pyvmm-hello: argv[1]=bzimage" in run.console, run.explain()
    assert "pyvmm-guest: exit 3" in run.console, run.explain()
    assert run.result.status == ExitStatus.GUEST_RESET, run.explain()
