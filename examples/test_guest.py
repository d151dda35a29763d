"""Testing with a Linux guest: pyvmm's pytest plugin and its ``vm`` fixture.

With pyvmm installed (here: ``make venv kernel guest`` in the checkout), on a host with
hardware KVM::

    .venv/bin/python -m pytest examples/test_guest.py

The first test that asks for ``vm`` boots the default guest (Linux 6.1 and pyvmm's
initramfs, ~1 s on hardware); the tests after it share that guest.  Commands run through
the guest agent over vsock: no network device, no ssh.  pyvmm's own CI runs this file inside
its lab (tests/e2e/test_vm_fixture.py).
"""

import hashlib
import os

import pytest


def test_the_guest_runs_linux(vm):
    assert vm.check("uname -s") == "Linux\n"


def test_a_command_gives_its_status_and_output(vm):
    r = vm.run("echo to stdout; echo to stderr >&2; exit 3")
    assert (r.status, r.stdout, r.stderr) == (3, b"to stdout\n", b"to stderr\n")


def test_files_go_in_and_come_back(vm):
    data = os.urandom(256 << 10)
    vm.put("/tmp/blob", data)
    assert vm.check("sha256sum /tmp/blob").split()[0] == hashlib.sha256(data).hexdigest()
    assert vm.get("/tmp/blob") == data


def test_the_console_is_there_to_read(vm):
    assert "pyvmm-guest: ready" in vm.console.text()


@pytest.mark.pyvmm(cpus=2, mem=192 << 20)
def test_a_guest_of_another_shape(vm):
    """A marker asks for another configuration: a second guest, shared by the tests that ask
    for the same one."""
    assert vm.check("nproc") == "2\n"
    assert "MemTotal" in vm.check("cat /proc/meminfo")
