"""KVM level: pyvmm runs its freestanding test guest on /dev/kvm.

The guest (guest/freestanding) enters long mode itself from pyvmm's 32-bit
PVH entry, drops to CPL3 and does its work there, so these tests run at full
speed on PVM hosts too.  Each boot takes well under a second.
"""

import re

import pytest

from harness import freestanding
from pyvmm.machine import ExitStatus

pytestmark = pytest.mark.kvm


def test_hello_from_cpl3():
    run = freestanding("hello", timeout=30)
    assert run.result.status == ExitStatus.GUEST_RESET, run.explain()
    m = re.search(r"pyvmm-test-guest: hello from CPL3 \(cs=(0x[0-9a-f]+)\)", run.console)
    assert m, run.explain()
    assert int(m.group(1), 16) & 3 == 3                  # the RPL of CS is the CPL
    assert "pyvmm-test-guest: exit 0" in run.console
    assert "i8042" in run.result.reason


def test_exits_are_decoded_and_counted():
    n = 50
    run = freestanding(f"count {n}", timeout=30)
    assert run.result.status == ExitStatus.GUEST_RESET, run.explain()
    lines = [l for l in run.lines if l.startswith("pyvmm-test-guest: line ")]
    assert lines == [f"pyvmm-test-guest: line {i}" for i in range(1, n + 1)]
    counts = run.result.exit_counts
    # every console byte is one OUT to the THR; each is preceded by an LSR poll (an IN)
    assert counts["IoOut"] >= sum(len(l) + 1 for l in lines)
    assert counts["IoIn"] >= len(lines)
    assert run.result.timings["first_kvm_run"] <= run.result.timings["first_serial_byte"]


def test_guest_exception_is_reported_by_the_guest():
    run = freestanding("fault", timeout=30)
    assert re.search(r"pyvmm-test-guest: exception 6 err=0x0 rip=0x[0-9a-f]+", run.console), \
        run.explain()
    assert run.result.status == ExitStatus.GUEST_RESET


def test_internal_error_gives_a_one_line_diagnosis():
    run = freestanding("internal-error", timeout=30)
    assert run.result.status == ExitStatus.GUEST_CRASH, run.explain()
    reason = run.result.reason
    assert "\n" not in reason
    assert "KVM internal error" in reason and "RIP 0xe0000000" in reason, reason
    assert run.result.exit_counts["InternalError"] == 1


def test_watchdog_stops_a_guest_stuck_in_a_loop():
    run = freestanding("loop", timeout=2)
    assert "pyvmm-test-guest: loop" in run.console, run.explain()
    assert run.result.status == ExitStatus.TIMEOUT
    assert "timed out after 2 s" in run.result.reason
    assert 2 <= run.result.timings["end"] < 10


def test_smp_brings_up_two_vcpus():
    run = freestanding("smp cpus=2", cpus=2, timeout=60)
    assert "pyvmm-test-guest: cpus 2" in run.console, run.explain()
    assert run.result.status == ExitStatus.GUEST_RESET


def test_unknown_scenario_exits_1():
    run = freestanding("no-such-thing", timeout=30)
    assert "pyvmm-test-guest: unknown scenario 'no-such-thing'" in run.console, run.explain()
    assert "pyvmm-test-guest: exit 1" in run.console


def test_ctrl_c_stops_cleanly():
    """SIGINT to a running pyvmm: every vCPU is kicked out of KVM_RUN, exit 130."""
    import signal
    import subprocess
    import sys

    from pyvmm import images
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", "--kernel", str(images.freestanding_guest()),
         "--cmdline", "loop", "--cpus", "2", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:                 # wait until the guest is spinning at CPL3
            if b"spinning" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == ExitStatus.INTERRUPTED, err.decode()
    assert b"interrupted (Ctrl-C)" in err and b"Traceback" not in err
