"""The proxy that runs the e2e tests inside the lab, on hosts where they cannot run directly.

tests/conftest.py deselects the e2e tests on a host without hardware KVM and
hands their ids to this test, which runs them all in one lab session (one
outer QEMU boot) with the same Python and the same checkout, and passes only
if they all pass there.  Tests that fail are re-run once in a fresh lab (a
guest in nested KVM under QEMU's software SVM has been seen to triple-fault
rarely); a pass on retry is reported as FLAKY in the summary, with the first
failure.  Their output is shown when it fails; the summary at the end of the
run repeats the lab's own pytest summary line and timings.
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
    def run_in_lab(ids):
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rsfE",
               "--rootdir", str(top), *ids]
        return lab.run(cmd, timeout=LAB_TIMEOUT, cpus=LAB_CPUS, cwd=top)

    result = run_in_lab(nodeids)
    first = result
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+::\S+)", result.output, re.M)))
    # re-run whole files: the tests of a file share one guest boot and run as its steps
    failed_files = sorted({nodeid.split("::")[0] for nodeid in failed})
    retried = ""
    if result.status == 1 and failed:
        # One retry of the files of the failed tests, in a fresh lab: the lab is nested KVM inside
        # QEMU's software SVM, and a guest there has been seen to triple-fault once in
        # about ten runs (never on the host, never on retry).  The retry and the first
        # failure are both reported, so flakiness stays visible.
        result = run_in_lab(failed_files)
        first_reasons = sorted(set(re.findall(r"AssertionError: (status \d+: [^\n]{0,160})",
                                              first.output)))
        retried = (f"; FLAKY: {len(failed)} failed on the first lab run and were re-run "
                   f"with their files ({'passed' if result.status == 0 else 'failed again'}): "
                   f"{', '.join(failed)}; first failure: {'; '.join(first_reasons) or '?'}")
    summary = [l for l in first.output.splitlines()
               if re.search(r"\d+ (passed|failed|error)", l) and " in " in l]
    t = first.timings
    where = (f"inside the lab (nested KVM in QEMU TCG, {LAB_CPUS} vCPUs): "
             f"{summary[-1].strip('= ') if summary else 'no pytest summary'}; lab boot "
             f"{t.get('qemu_to_init', 0):.1f} s, tests {t.get('cmd', 0):.1f} s, "
             f"total {t.get('total', 0):.1f} s{retried}")
    if figures.exists():
        for name, value in json.loads(figures.read_text()).items():
            where += f"\n{'':>12}{name}: {value}"
    request.config.stash[LAB_SUMMARY] = where
    with capsys.disabled():
        print(f"\n[lab] {where}")
    assert result.status == 0, (f"e2e tests failed in the lab (status {result.status}"
                                f"{': ' + result.error if result.error else ''})\n"
                                f"--- first lab run ---\n{first.output[-12000:]}\n"
                                f"--- last lab run ---\n{result.output[-12000:]}")
