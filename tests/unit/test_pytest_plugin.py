"""The pytest plugin's own logic (pyvmm.pytest_plugin), without KVM: user test files run by
pytester in this process, against a scripted stand-in for pyvmm.testing.VM.  The real
guest behind the fixture is exercised in the lab (tests/e2e/test_vm_fixture.py)."""

from __future__ import annotations

import importlib.metadata

import pytest

import pyvmm.pytest_plugin as plugin
from pyvmm import testing
from pyvmm.kvm.host import HostInfo, KvmFlavour
from pyvmm.testing import VMBootError

pytest_plugins = ["pytester"]


class FakeVM:
    """Records how it was made; ``cmdline="panic"`` does not boot; ``die()`` ends it."""

    made: list["FakeVM"] = []

    def __init__(self, **kw) -> None:
        self.kw = kw
        self.alive = False
        self.closed = False
        self.boot_seconds = 0.25
        FakeVM.made.append(self)

    def start(self) -> "FakeVM":
        if self.kw.get("cmdline") == "panic":
            raise VMBootError("the guest ended while booting\n--- console ---\nKernel panic - not syncing")
        self.alive = True
        return self

    def die(self) -> None:
        self.alive = False

    def close(self) -> None:
        self.alive = False
        self.closed = True

    def describe(self) -> str:
        return f"fake guest {self.kw}; console tail: pyvmm-guest: ready"


@pytest.fixture
def fake(monkeypatch):
    FakeVM.made = []
    monkeypatch.setattr(plugin, "VM", FakeVM)
    monkeypatch.setattr(testing, "unusable_reason", lambda host=None: None)
    return FakeVM


def test_the_plugin_is_registered_through_the_pytest11_entry_point():
    eps = importlib.metadata.entry_points(group="pytest11")
    assert [ep.value for ep in eps if ep.name == "pyvmm"] == ["pyvmm.pytest_plugin"]


def test_tests_of_one_configuration_share_a_guest_a_marker_makes_another(pytester, fake):
    pytester.makepyfile("""
        import pytest
        seen = []
        def test_a(vm): seen.append(vm)
        def test_b(vm): assert vm is seen[0]
        @pytest.mark.pyvmm(cpus=2)
        def test_c(vm): assert vm is not seen[0] and vm.kw == {"cpus": 2}
        @pytest.mark.pyvmm(fresh=True)
        def test_d(vm): assert vm is not seen[0]
        def test_e(vm): assert vm is seen[0]
    """)
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=5)
    assert [f.kw for f in fake.made] == [{}, {"cpus": 2}, {}]
    assert all(f.closed for f in fake.made)          # the fresh one after its test, the rest at the end


def test_options_reach_the_guest(pytester, fake):
    pytester.makepyfile("def test_a(vm): pass")
    pytester.runpytest_inprocess("--pyvmm-kernel", "/k", "--pyvmm-initrd", "/i", "--pyvmm-cpus", "4",
                                 "--pyvmm-mem", "512", "--pyvmm-boot-timeout", "9"
                                 ).assert_outcomes(passed=1)
    assert fake.made[0].kw == {"kernel": "/k", "initrd": "/i", "cpus": 4, "mem": 512 << 20,
                               "boot_timeout": 9.0}


def test_a_guest_that_does_not_boot_errors_its_tests_and_is_booted_once(pytester, fake):
    pytester.makepyfile("""
        import pytest
        pytestmark = pytest.mark.pyvmm(cmdline="panic")
        def test_a(vm): pass
        def test_b(vm): pass
    """)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=2)
    assert len(fake.made) == 1
    result.stdout.fnmatch_lines(["*Kernel panic - not syncing*", "*not retried*",
                                 "*pyvmm guests*", "cmdline='panic': did not boot: the guest ended while booting"])


def test_a_guest_that_ends_during_a_test_fails_it_and_the_next_test_gets_a_new_one(pytester, fake):
    pytester.makepyfile("""
        seen = []
        def test_a(vm):
            seen.append(vm)
            vm.die()
        def test_b(vm): assert vm is not seen[0] and vm.alive
    """)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=2, errors=1)          # test_a passes its call, errors at teardown
    result.stdout.fnmatch_lines(["*the guest ended during this test*", "*fake guest*"])
    assert len(fake.made) == 2 and fake.made[0].closed


def test_a_failed_test_shows_the_guest(pytester, fake):
    pytester.makepyfile("def test_a(vm): assert False, 'the guest said no'")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*- pyvmm guest -*", "fake guest {}; console tail: pyvmm-guest: ready"])


def test_where_guests_cannot_run_the_tests_skip_with_the_reason_or_fail_when_required(
        pytester, fake, monkeypatch):
    monkeypatch.setattr(testing, "unusable_reason", lambda host=None: "no /dev/kvm on this host (x)")
    pytester.makepyfile("""
        def test_a(vm): pass
        def test_b(): pass
    """)
    result = pytester.runpytest_inprocess("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * no /dev/kvm on this host (x)"])
    result = pytester.runpytest_inprocess("--pyvmm-require")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*--pyvmm-require: no /dev/kvm on this host (x)*"])
    assert not fake.made


def test_a_marker_keyword_the_vm_does_not_take_is_an_error(pytester, fake):
    pytester.makepyfile("""
        import pytest
        @pytest.mark.pyvmm(cpu=2)
        def test_a(vm): pass
    """)
    result = pytester.runpytest_inprocess()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*pyvmm(...) does not know cpu*"])
    assert not fake.made


@pytest.mark.parametrize("flavour, expected", [
    (KvmFlavour.NONE, "no /dev/kvm on this host (/dev/kvm does not exist)"),
    (KvmFlavour.PVM, "/dev/kvm here is PVM"),
])
def test_the_reasons_a_host_cannot_run_guests(flavour, expected, monkeypatch):
    monkeypatch.setattr(testing.os, "access", lambda path, mode: True)
    reason = testing.unusable_reason(HostInfo(flavour, "/dev/kvm does not exist"))
    assert reason.startswith(expected)
    assert testing.unusable_reason(HostInfo(KvmFlavour.HARDWARE, "")) is None
