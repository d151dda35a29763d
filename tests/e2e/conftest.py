"""The Linux guest the e2e tests share: one boot per session, whatever subset runs, in any order.

The guest is the default kernel and initramfs with 2 vCPUs and a vsock device (CID 3, the
Firecracker-style Unix socket in a temporary directory, and the TCP forwards of
tests/e2e/test_forward.py, ``linux.forward_ports``: :data:`FORWARD_TO_GUEST`,
:data:`FORWARD_TO_HOST`, :data:`FORWARD_REFUSED`; their ports are no other test's).  Its
console runs a command loop
(:class:`harness.ShellGuest`): a test types the commands it needs (a guest-side server on a
port of its own, a client) and reads back only their own output and exit status.  No test
relies on another having run before it, or reads what another left; a test that needs a
fresh boot (the bzImage, the CLI with its stdin) makes its own.  The guest agent's tests use
the pytest plugin's ``vm`` fixture instead (pyvmm.pytest_plugin: a guest of its own).

Every test using the guest checks that it is running before and after: a guest that ended
(a crash) fails the tests saying how it ended (pyvmm's reason), rather than with a timeout.
"""

from __future__ import annotations

import socket
import types

import pytest

from harness import ShellGuest
from pyvmm import images
from pyvmm.machine import VsockConfig
from pyvmm.vsock.tcp import TcpToVsock, VsockToTcp

GUEST_CID = 3
GUEST_CPUS = 2
GUEST_MEM = 128 << 20          # the stress test runs ~200 guest processes at once
#: the whole session's bound (the lab gives the e2e tests 1800 s)
GUEST_TIMEOUT = 1500
#: --forward tcp:127.0.0.1:0=vsock:1501: a host TCP port (the kernel's pick) to guest port 1501
FORWARD_TO_GUEST = 1501
#: --forward vsock:2501=tcp:127.0.0.1:P, P the port of ``linux.forward_server`` (host TCP)
FORWARD_TO_HOST = 2501
#: --forward vsock:2502=tcp:127.0.0.1:Q, Q a port bound but never listening: refused
FORWARD_REFUSED = 2502


def pytest_collection_modifyitems(items):
    """Tests marked ``own_guests`` first (stable otherwise): they boot guests of their own
    and time-share the machine with whatever else runs; before them the shared guest has
    not booted yet.  In the lab (one vCPU) the shared 2-vCPU guest, idle, still made the
    vsock_test guests boot 2x slower and pushed one of vsock_test's own 10 s timeouts
    over.  Scheduling only: each test still runs alone, in any order and any subset.
    Tests using the pytest plugin's ``vm`` fixture come last: its guest stays up until the
    session ends, and was idle beside the shared guest's timing-sensitive tests (the
    64-connection stress test's host connects timed out once in a CI-equivalent run)."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("own_guests") else
               2 if "vm" in getattr(item, "fixturenames", ()) else 1)


@pytest.fixture(scope="session")
def linux_session(tmp_path_factory):
    uds = str(tmp_path_factory.mktemp("vsock") / "v.sock")
    server = socket.socket()                # the host TCP server FORWARD_TO_HOST reaches
    refused = socket.socket()               # held bound, never listening: nobody else takes it
    for s in (server, refused):
        s.bind(("127.0.0.1", 0))
    server.listen(8)
    forwards = [TcpToVsock("127.0.0.1", 0, FORWARD_TO_GUEST),
                VsockToTcp(FORWARD_TO_HOST, "127.0.0.1", server.getsockname()[1]),
                VsockToTcp(FORWARD_REFUSED, "127.0.0.1", refused.getsockname()[1])]
    guest = ShellGuest(images.default_kernel(), initrd=images.default_initramfs(),
                       cpus=GUEST_CPUS, mem=GUEST_MEM, timeout=GUEST_TIMEOUT,
                       vsock=VsockConfig(GUEST_CID, uds, forwards=forwards))
    try:
        with guest:
            guest.wait_ready()
            guest.uds = uds
            guest.forward_server = server
            guest.forward_ports = types.SimpleNamespace(
                to_guest=FORWARD_TO_GUEST, to_host=FORWARD_TO_HOST, refused=FORWARD_REFUSED)
            yield guest
    finally:
        server.close()
        refused.close()


def _ended(guest: ShellGuest, when: str) -> str:
    r = guest.result
    return (f"the shared guest ended {when} (status {r.status}: {r.reason})\n--- console tail ---\n"
            + "\n".join(guest.console.text().splitlines()[-30:]))


@pytest.fixture
def linux(linux_session):
    """The shared guest, checked to be running before the test and still running after it."""
    if linux_session.ended:
        pytest.fail(_ended(linux_session, "before this test"))
    yield linux_session
    if linux_session.ended:
        pytest.fail(_ended(linux_session, "during this test"))
