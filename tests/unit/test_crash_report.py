"""pyvmm's report of a triple fault, and the lab proxy's one retried signature that depends on it.

The report (Machine._diagnose on KVM_EXIT_SHUTDOWN) holds the vCPU's registers and its last
exits, and says when those registers are the x86 reset state (KVM on AMD SVM resets the vCPU
before it reports the shutdown).  tests/test_lab_e2e.py retries a failure only if it holds
LAB_SIGNATURE: these check that pyvmm's real report matches it, and nothing else does.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyvmm.kvm import abi, exits
from pyvmm.machine import RECENT_EXITS, ExitStatus, Machine, describe_exit

import test_lab_e2e


class FakeVcpu:
    def __init__(self, rip: int, cs_base: int) -> None:
        self.index = 1
        self.regs = abi.kvm_regs(rip=rip, rsp=0x1000)
        self.sregs = abi.kvm_sregs()
        self.sregs.cs.base = cs_base
        self.sregs.cr0 = 0x60000010

    def get_regs(self):
        return self.regs

    def get_sregs(self):
        return self.sregs

    def translate(self, rip):
        return None


def report(rip: int, cs_base: int, recent=()) -> tuple[int, str]:
    machine = SimpleNamespace(_recent_exits={1: collections.deque(recent, maxlen=RECENT_EXITS)},
                              _code_at=lambda vcpu, rip: b"")
    machine._crash_state = lambda vcpu: Machine._crash_state(machine, vcpu)
    return Machine._diagnose(machine, FakeVcpu(rip, cs_base), exits.Shutdown())


def test_a_shutdown_at_the_reset_state_is_reported_as_such_with_the_last_exits():
    recent = [exits.IoOut(0x3F8, 1, 1, b"x"), exits.MmioWrite(0xD0000050, b"\0" * 4)]
    status, reason = report(0xFFF0, 0xFFFF0000, recent)
    assert status == ExitStatus.GUEST_CRASH
    assert "\n" not in reason
    assert "vCPU 1 at RIP 0xfff0" in reason and "triple fault (KVM_EXIT_SHUTDOWN)" in reason
    assert "CR0 0x60000010" in reason and "(the reset state" in reason, reason
    assert "last exits (oldest first): IoOut port 0x3f8, MmioWrite 0xd0000050" in reason, reason
    assert test_lab_e2e.LAB_SIGNATURE.search(reason), reason


def test_a_shutdown_elsewhere_keeps_its_registers_and_is_not_the_lab_signature():
    """On VMX, KVM does not reset the vCPU: the registers are the faulting ones."""
    status, reason = report(0xFFFFFFFF81000000, 0, [])
    assert "RIP 0xffffffff81000000" in reason and "reset state" not in reason, reason
    assert "last exits (oldest first): none" in reason
    assert not test_lab_e2e.LAB_SIGNATURE.search(reason)


#: the SHUTDOWN exit the outer trace caught on 2026-11-30 (tests/lab/README.md)
CAUGHT = ("pyvmm-vcpu0-144 [000] .....   184.117800: kvm_exit: vcpu 0 reason shutdown rip "
          "0xffffffff81025aaa <kvm_hypercall4.constprop.0+0x15> info1 0x0000000000000000 info2 "
          "0x0000000000000000 intr_info 0x80000b0e error_code 0x00000018")
#: ... and the one CI caught the same day: the guest entered at the outer kernel's VMRUN
AT_VMRUN = ("pyvmm-vcpu0-144 [000] .....   173.111604: kvm_exit: vcpu 0 reason shutdown rip "
            "0xffffffffc035120c <outer kvm_amd:__svm_vcpu_run+0x9c> info1 0x0000000000000000 "
            "info2 0x0000000000000000 intr_info 0x80000b0e error_code 0x00000010")
SHUTDOWN = "the guest ended: status 1: " + report(0xFFF0, 0xFFFF0000)[1]


@pytest.mark.parametrize("failures, trace, retried", [
    ({}, CAUGHT, False),
    ({"t::a": "AssertionError: results differ"}, CAUGHT, False),
    ({"t::a": SHUTDOWN}, CAUGHT, True),
    ({"t::a": SHUTDOWN}, "", False),                                    # no trace: not proven
    ({"t::a": SHUTDOWN}, CAUGHT.replace("0x00000018", "0x00000019"), False),   # P set: hardware
    ({"t::a": SHUTDOWN}, CAUGHT.replace("0x00000018", "0x00000010"), False),   # no RSVD
    ({"t::a": SHUTDOWN}, AT_VMRUN, True),
    ({"t::a": SHUTDOWN}, AT_VMRUN.replace("0x00000010", "0x00000011"), False),  # P set
    ({"t::a": SHUTDOWN}, AT_VMRUN.replace("<outer kvm_amd:__svm_vcpu_run+0x9c> ", ""), False),
    ({"t::a": SHUTDOWN}, AT_VMRUN.replace("outer kvm_amd:", ""), False),        # a guest symbol
    ({"t::a": SHUTDOWN}, CAUGHT.replace("0x80000b0e", "0x80000b0d"), False),   # a #GP
    ({"t::a": SHUTDOWN}, CAUGHT.replace("0x80000b0e", "0x00000b0e"), False),   # no event
    ({"t::a": SHUTDOWN, "t::b": "AssertionError: SHA-256 differs"}, CAUGHT, False),
    ({"t::a": "status 1: vCPU 0 at RIP 0xfff0: KVM internal error"}, CAUGHT, False),
])
def test_the_proxy_retries_only_the_proven_lab_signature(failures, trace, retried):
    assert test_lab_e2e.lab_own_failure(failures, trace) is retried


def test_the_outer_symbolizer_names_kvm_amd_text_only(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
    import kvm_trace
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("ffffffff81000000 T _stext\n"
                        "ffffffffc0351170 t __svm_vcpu_run\t[kvm_amd]\n"
                        "ffffffffc0351300 t svm_vcpu_free\t[kvm_amd]\n"
                        "ffffffffc0360000 t vp_notify\t[virtio_pci]\n")
    name = kvm_trace._outer_symbolizer(kallsyms)
    assert name(0xFFFFFFFFC035120C) == "<outer kvm_amd:__svm_vcpu_run+0x9c>"
    assert name(0xFFFFFFFFC0351310) == ""          # past kvm_amd's last known symbol
    assert name(0xFFFFFFFF81000010) == ""          # the outer kernel's own text: not named
    assert name(0xFFFFFFFFC0360000) == ""          # another module
    assert kvm_trace._outer_symbolizer(tmp_path / "absent")(0xFFFFFFFFC035120C) == ""


def test_describe_exit_names_ports_and_addresses():
    assert describe_exit(exits.IoIn(0x64, 1, 1, memoryview(bytearray(1)))) == "IoIn port 0x64"
    assert describe_exit(exits.Shutdown()) == "Shutdown"
