"""KVM level: two freestanding guests talk vsock through a group (pyvmm.vsock.group).

Guest A (CID 3) and guest B (CID 4) are two machines given the same group directory,
each with its own I/O thread as in two pyvmm processes; the test that kills a member runs
A as a real ``pyvmm run`` process and sends it SIGKILL.  The guests are the freestanding
CPL3 driver's scenarios (guest/freestanding/README.md), so this runs at native speed on PVM
hosts: no lab.  Every byte is the xorshift test stream, checked by the receiving guest.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from harness import LiveGuest
from pyvmm import images
from pyvmm.machine import VsockConfig

pytestmark = pytest.mark.kvm

PREFIX = "pyvmm-test-guest: "
A, B = 3, 4
GIB = 1 << 30


@pytest.fixture
def gdir(tmp_path):
    return tmp_path / "g"


def member(gdir, cid: int, scenario: str, timeout: float = 120) -> LiveGuest:
    return LiveGuest(images.freestanding_guest(), cmdline=scenario, timeout=timeout,
                     vsock=VsockConfig(cid, None, group=str(gdir)))


def test_echo_between_two_guests(gdir):
    with member(gdir, A, "vsock-echo-server port=1234 conns=1") as a:
        a.wait_for(PREFIX + "vsock listening 1234")
        with member(gdir, B, f"vsock-echo-client port=1234 cid={A} size=4096 count=200") as b:
            run_b = b.finish(120)
        run_a = a.finish(60)
    assert f"vsock echo ok {4096 * 200}" in run_b.console, run_b.explain()
    assert "vsock echo done 1" in run_a.console, run_a.explain()
    for run in (run_a, run_b):
        assert run.vsock["guest_errors"] == 0 and run.vsock["host_errors"] == 0, run.vsock
    assert run_b.vsock["group"]["flows"] == 0                 # closed cleanly: forgotten


def test_64_concurrent_connections_between_two_guests(gdir):
    with member(gdir, A, "vsock-echo-server port=1234 conns=64") as a:
        a.wait_for(PREFIX + "vsock listening 1234")
        with member(gdir, B, f"vsock-echo-many port=1234 cid={A} conns=64 size=262144") as b:
            run_b = b.finish(300)
        run_a = a.finish(60)
    assert f"vsock echo many ok 64 {64 * 262144}" in run_b.console, run_b.explain()
    assert f"vsock echo done 64 {64 * 262144}" in run_a.console, run_a.explain()


@pytest.mark.parametrize("sender, receiver", [(B, A), (A, B)], ids=["B-to-A", "A-to-B"])
def test_1gib_each_way_checked(gdir, sender, receiver, record_property):
    with member(gdir, receiver, f"vsock-bulk-recv port=1237 bytes={GIB} listen=1",
                timeout=600) as r:
        r.wait_for(PREFIX + "vsock listening 1237")
        t0 = time.monotonic()
        with member(gdir, sender, f"vsock-bulk-send port=1237 bytes={GIB} chunk=65536 "
                    f"cid={receiver}", timeout=600) as s:
            run_s = s.finish(600)
        run_r = r.finish(120)
        seconds = time.monotonic() - t0
    sent = re.search(rf"vsock bulk sent {GIB} bytes fnv ([0-9a-f]+)", run_s.console)
    got = re.search(rf"vsock bulk received {GIB} bytes fnv ([0-9a-f]+)", run_r.console)
    assert sent and got and sent.group(1) == got.group(1), run_s.explain() + run_r.explain()
    assert "FAILED" not in run_r.console
    assert run_r.vsock["rx_bytes"] == GIB and run_s.vsock["tx_bytes"] == GIB
    record_property("vm_to_vm_MBps", round(GIB / seconds / 1e6, 1))


def test_seqpacket_boundaries_between_two_guests(gdir):
    with member(gdir, A, "vsock-echo-server port=1235 conns=1") as a:
        a.wait_for(PREFIX + "vsock listening 1235")
        with member(gdir, B, f"vsock-echo-client port=1235 cid={A} size=30000 count=20 "
                    "type=seqpacket") as b:
            run_b = b.finish(120)
        run_a = a.finish(60)
    # the client checks that every message end (EOM) falls every 30000 bytes, no others
    assert "vsock echo ok 600000" in run_b.console, run_b.explain()
    assert "vsock echo done 1" in run_a.console, run_a.explain()


def test_a_cid_no_member_has_is_refused(gdir):
    with member(gdir, B, "vsock-echo-client port=1234 cid=9 size=1 count=1") as b:
        run = b.finish(60)
    assert re.search(r"connect .*failed", run.console), run.explain()
    assert run.vsock["group_no_member"] == 1 and run.vsock["rst_sent"] == 1


def _pyvmm_member(gdir, cid: int, scenario: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", "--kernel", str(images.freestanding_guest()),
         "--cmdline", scenario, "--vsock", f"{cid},group={gdir}", "--timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_member_resets_its_peers_connections_and_a_taken_cid_is_refused(gdir,
                                                                                  record_property):
    a = _pyvmm_member(gdir, A, "vsock-echo-server port=1234 conns=64")
    lines: list[str] = []
    listening = threading.Event()

    def read_a():
        for line in a.stdout:
            lines.append(line)
            if "vsock listening 1234" in line:
                listening.set()
    reader = threading.Thread(target=read_a, daemon=True)
    reader.start()
    try:
        assert listening.wait(60), "".join(lines)
        # a second member asking for CID 3 is refused, with the reason, exit status 2
        dup = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--kernel",
                              str(images.freestanding_guest()), "--cmdline", "hello",
                              "--vsock", f"{A},group={gdir}"],
                             capture_output=True, text=True, timeout=60)
        assert dup.returncode == 2, dup
        assert f"CID {A} is already a member (pid {a.pid})" in dup.stderr, dup.stderr
        # 64 connections from B stream without end; then A's process is killed
        with member(gdir, B, f"vsock-echo-many port=1234 cid={A} conns=64 size={1 << 40}",
                    timeout=120) as b:
            b.wait_for(PREFIX + "vsock echo many: 64 connections open")
            killed = time.monotonic()
            a.send_signal(signal.SIGKILL)
            b.wait_for(PREFIX + "vsock echo many: FAILED: connection", 30)   # the first reset
            lag = time.monotonic() - killed
            b.wait_for(PREFIX + "exit 1", 30)
            run_b = b.finish(30)
    finally:
        a.kill()
        a.wait(30)
        reader.join(10)
    resets = re.findall(r"vsock echo many: FAILED: connection (\d+): .*end: reset by peer "
                        r"\(RST\)", run_b.console)
    assert sorted(map(int, resets)) == list(range(1, 65)), run_b.explain()
    assert run_b.vsock["group_leave_rsts"] == 64 and run_b.vsock["group_peers_left"] >= 1
    record_property("peers_reset_after_kill_s", round(lag, 3))
    assert lag < 1.0, f"the guest saw its connections reset {lag:.3f} s after the kill"
