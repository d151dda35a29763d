"""End to end: a user's test file with pyvmm's ``vm`` fixture (examples/test_guest.py), run
by pytest as a user would, in a process of its own: the plugin comes in through its pytest11
entry point, boots real guests (the default one, then a 2-vCPU one a marker asks for) and runs
commands through the guest agent.  ``--pyvmm-require``: a skip would be a failure here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.own_guests]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "test_guest.py"


def test_a_users_test_file_with_the_vm_fixture(tmp_path, record_property):
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
                           "--pyvmm-require", str(EXAMPLE)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert re.search(r"\b5 passed\b", done.stdout), out[-3000:]
    boots = re.findall(r"^(.*): booted in ([\d.]+) s$", done.stdout, re.M)
    assert len(boots) == 2, out[-3000:]                 # shared by four tests, and the marker's
    record_property("pytest_plugin_boots", {k: float(s) for k, s in boots})
