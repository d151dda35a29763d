"""The proxy that runs the e2e tests inside the lab, on hosts where they cannot run directly.

tests/conftest.py deselects the e2e tests on a host without hardware KVM and
hands their ids to this test, which runs them all in one lab session (one
outer QEMU boot) with the same Python and the same checkout, and passes only
if they all pass there.  Their output is shown when it fails; the summary at
the end of the run repeats the lab's own pytest summary line and timings.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from harness import LAB_NODEIDS, LAB_SUMMARY

sys.path.insert(0, str(Path(__file__).resolve().parent / "lab"))
import lab  # noqa: E402

LAB_TIMEOUT = 1800
LAB_CPUS = 2          # the e2e tests boot a 2-vCPU guest; multi-threaded TCG gives 2 real ones


def test_e2e_tests_in_the_lab(request, capsys):
    nodeids = request.config.stash.get(LAB_NODEIDS, [])
    if not nodeids:
        pytest.skip("no e2e test to hand to the lab (they run directly on hardware KVM, "
                    "or none was selected)")
    if os.environ.get("PYVMM_NO_LAB") == "1":
        pytest.skip(f"PYVMM_NO_LAB=1: {len(nodeids)} e2e tests not run (explicit opt-out)")
    ok, why = lab.available()
    if not ok:
        pytest.fail(f"the lab cannot start, so {len(nodeids)} e2e tests cannot run: {why} "
                    "(set PYVMM_NO_LAB=1 to opt out explicitly)")
    top = Path(__file__).resolve().parents[1]
    figures = top / ".pytest-figures.json"       # written by e2e tests inside the lab
    figures.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
           "--rootdir", str(top), *nodeids]
    result = lab.run(cmd, timeout=LAB_TIMEOUT, cpus=LAB_CPUS, cwd=top)
    summary = [l for l in result.output.splitlines()
               if re.search(r"\d+ (passed|failed|error)", l) and " in " in l]
    t = result.timings
    where = (f"inside the lab (nested KVM in QEMU TCG, {LAB_CPUS} vCPUs): "
             f"{summary[-1].strip('= ') if summary else 'no pytest summary'}; lab boot "
             f"{t.get('qemu_to_init', 0):.1f} s, tests {t.get('cmd', 0):.1f} s, "
             f"total {t.get('total', 0):.1f} s")
    if figures.exists():
        for name, value in json.loads(figures.read_text()).items():
            where += f"\n{'':>12}{name}: {value}"
    request.config.stash[LAB_SUMMARY] = where
    with capsys.disabled():
        print(f"\n[lab] {where}")
    assert result.status == 0, (f"e2e tests failed in the lab (status {result.status}"
                                f"{': ' + result.error if result.error else ''})\n"
                                f"--- lab output ---\n{result.output[-20000:]}")
