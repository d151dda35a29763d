"""The lab itself, tested from the host. Each test boots the lab once (about 5 s warm; the
first run of all also builds the image, about 10 s plus the download). Skipped where
lab.available() says no, which includes inside the lab."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lab  # noqa: E402

AVAILABLE, REASON = lab.available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"lab not available: {REASON}")


def test_status_and_output_come_back_apart_from_look_alike_lines():
    probe = lab.PROJECT_DIR / "tests" / "lab" / f".write-probe-{os.getpid()}"
    script = (f"echo 'exit 0 1.0'; echo 'error fake' >&2; printf 'a\\r\\nb'; "
              f"echo written > {probe.name}; exit 7")
    try:
        result = lab.run(["sh", "-c", script], timeout=300, cwd=probe.parent)
        assert result.error is None, result.console
        assert result.status == 7
        assert result.stdout == "exit 0 1.0\na\r\nb"     # no "\n" -> "\r\n" on the way
        assert result.stderr == "error fake\n"
        assert probe.read_text() == "written\n"          # the project is shared read-write
    finally:
        probe.unlink(missing_ok=True)


def test_dev_kvm_inside_answers_kvm_get_api_version():
    code = ("import fcntl, os; fd = os.open('/dev/kvm', os.O_RDWR); "
            "print(fcntl.ioctl(fd, 0xAE00), os.environ['PYVMM_IN_LAB'], os.getcwd())")
    result = lab.run([sys.executable, "-c", code], timeout=300)
    assert result.status == 0, result.output
    assert result.stdout.split() == ["12", "1", str(lab.PROJECT_DIR)]
    for name in ("prepare", "boot_to_init", "init_to_cmd", "start_to_cmd", "cmd", "total"):
        assert result.timings[name] >= 0


def test_timeout_stops_the_machine():
    result = lab.run(["sleep", "1000"], timeout=20)
    assert result.status == lab.EXIT_TIMEOUT
    assert result.error == "timed out after 20 s"
    assert result.timings["total"] < 60


def test_the_outer_kvm_trace_freezes_at_a_nested_guests_triple_fault():
    """The e2e sessions record the outer kernel's KVM trace to catch a nested guest's triple
    fault (tests/lab/kvm_trace.py); this control faults on purpose and checks that the ring
    stopped at exactly that SHUTDOWN exit, with the guest's RIP."""
    result = lab.run([sys.executable, "tests/lab/triple_fault.py", "--control"], timeout=300,
                     cwd=lab.PROJECT_DIR)
    assert result.status == 0, result.output
    assert "trace control: ok" in result.stdout
