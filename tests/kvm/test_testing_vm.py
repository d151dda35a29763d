"""KVM level: pyvmm.testing.VM (the pytest plugin's guest) with a real machine, its failure
reports included.  The freestanding guest stands in for Linux (it runs on PVM too, in well
under a second): it ends by itself, loops forever, or prints a line taken as ready."""

import pytest

from pyvmm import images
from pyvmm.testing import VM, VMBootError, VMEnded

pytestmark = pytest.mark.kvm


def _vm(scenario: str, **kw) -> VM:
    return VM(images.freestanding_guest(), cmdline=scenario, agent=False, quiet=False, **kw)


def test_a_guest_that_ends_while_booting_says_how():
    with pytest.raises(VMBootError) as e:
        with _vm("hello"):
            pass
    text = str(e.value)
    assert "the guest ended while booting" in text and "ended: status" in text, text
    assert "pyvmm-test-guest: hello from CPL3" in text, text          # the console tail


def test_a_guest_that_hangs_while_booting_is_stopped_and_says_where():
    with pytest.raises(VMBootError) as e:
        with _vm("loop", boot_timeout=2):
            pass
    text = str(e.value)
    assert "not ready within 2 s" in text and "RIP 0x" in text, text
    assert "pyvmm-test-guest: loop" in text, text


def test_a_ready_guest_runs_until_closed_and_then_refuses_work():
    vm = _vm("loop", ready=r"^pyvmm-test-guest: loop")
    with vm:
        assert vm.alive and vm.boot_seconds is not None
        assert "running" in vm.describe()
    assert not vm.alive
    with pytest.raises(VMEnded):
        vm.run("true")
