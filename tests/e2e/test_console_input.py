"""End to end: host stdin reaches the guest's serial console (pyvmm run as a user runs it)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_a_shell_on_the_console_takes_host_input():
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "--timeout", "240",
                             "--cmdline", "pyvmm.shell=1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    try:
        for line in proc.stdout:                       # wait for the shell before typing
            seen.append(line)
            if b"pyvmm-guest: shell" in line:
                break
        proc.stdin.write(b"echo answer=$((6 * 7))\nexit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    console = b"".join(seen) + out
    assert b"answer=42" in console, console[-3000:]
    assert proc.returncode == 0, err.decode()[-2000:]
