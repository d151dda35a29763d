"""The proxy that runs the e2e tests inside the lab, on hosts where they cannot run directly.

tests/conftest.py deselects the e2e tests on a host without hardware KVM and
hands their ids to this test, which runs them all in one lab session (one
outer QEMU boot) with the same Python and the same checkout, and passes only
if they all pass there.  Their output is shown when it fails; the summary at
the end of the run repeats the lab's own pytest summary line and timings.

A failure is retried only when it is the lab's own: every failed test's
failure text (written by the session inside, see tests/conftest.py) must hold
:data:`LAB_SIGNATURE`.  Then those tests, and only they, run once more in a
fresh lab, and the summary says ``lab retries: N for <signature name>``.  Any
other failure (or a failure of the lab itself, a timeout, a missing report)
fails at once.
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

#: The one failure that is the lab's own, and the only one retried (once): the nested guest
#: shuts down (KVM_EXIT_SHUTDOWN, a triple fault) and KVM hands pyvmm the x86 reset state, as
#: kvm_amd does after a SHUTDOWN intercept.  Seen only in long, loaded lab sessions (nested
#: KVM on QEMU 7.2's multi-threaded TCG emulating SVM), with 2 vCPUs and with 1; never in 19
#: short traced boots; in the same sessions the outer kernel once panicked on a corrupted
#: stack, which no user process there can cause.  The cause is not proven (no hardware-KVM
#: host to compare; the faulting RIP not caught yet): tests/lab/README.md, "The 2-vCPU triple
#: fault: what is known", has the evidence and tests/lab/triple_fault.py hunts it.  pyvmm's
#: reason for that exit reads "vCPU N at RIP 0xfff0, ...: triple fault (KVM_EXIT_SHUTDOWN);
#: ... (the reset state: ...)", and the e2e tests put it into the failure of every test it
#: breaks.
LAB_SIGNATURE_NAME = "nested-SVM triple fault (KVM_EXIT_SHUTDOWN at the reset state)"
LAB_SIGNATURE = re.compile(r"vCPU \d+ at RIP 0xfff0\b[^\n]*: triple fault \(KVM_EXIT_SHUTDOWN\)"
                           r"[^\n]*\(the reset state")
#: the file (in the project, so the lab can write it) where the session inside lists its failures
FAILURES_FILE = ".pytest-lab-failures.json"
#: ... and where it writes the outer kernel's KVM trace at a triple fault (tests/lab/kvm_trace.py)
TRACE_FILE = ".pytest-lab-trace.txt"


def lab_own_failure(failures: dict[str, str]) -> bool:
    """True if there are failures and every one holds :data:`LAB_SIGNATURE`."""
    return bool(failures) and all(LAB_SIGNATURE.search(text) for text in failures.values())


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
    failures_file = top / FAILURES_FILE
    trace_file = top / TRACE_FILE
    traces = []             # (which run, what the session inside wrote about the outer trace)

    def run_in_lab(ids, label):
        failures_file.unlink(missing_ok=True)
        trace_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rsfE",
               "--rootdir", str(top), *ids]
        result = lab.run(cmd, timeout=LAB_TIMEOUT, cpus=LAB_CPUS, cwd=top,
                         env={"PYVMM_LAB_FAILURES": str(failures_file),
                              "PYVMM_LAB_TRACE": str(trace_file)})
        failures = json.loads(failures_file.read_text()) if failures_file.exists() else None
        failures_file.unlink(missing_ok=True)
        if trace_file.exists() and trace_file.read_text().strip():
            traces.append((label, trace_file.read_text()))
        trace_file.unlink(missing_ok=True)
        return result, failures

    first, failures = run_in_lab(nodeids, "first lab run")
    result, retries = first, 0
    retried = "lab retries: 0"
    if first.status == 1 and failures is not None and lab_own_failure(failures):
        retries = 1
        result, _ = run_in_lab(sorted(failures), "retry")
        retried = (f"lab retries: {retries} for {LAB_SIGNATURE_NAME}: {len(failures)} tests "
                   f"re-run in a fresh lab, {'passed' if result.status == 0 else 'failed again'}:"
                   f" {', '.join(sorted(failures))}")
    summary = [l for l in first.output.splitlines()
               if re.search(r"\d+ (passed|failed|error)", l) and " in " in l]
    t = first.timings
    where = (f"inside the lab (nested KVM in QEMU TCG, {LAB_CPUS} vCPUs): "
             f"{summary[-1].strip('= ') if summary else 'no pytest summary'}; lab boot "
             f"{t.get('qemu_to_init', 0):.1f} s, tests {t.get('cmd', 0):.1f} s, "
             f"total {t.get('total', 0):.1f} s; {retried}")
    if figures.exists():
        for name, value in json.loads(figures.read_text()).items():
            where += f"\n{'':>12}{name}: {value}"
    request.config.stash[LAB_SUMMARY] = where
    with capsys.disabled():
        print(f"\n[lab] {where}")
        if retries:                     # the retried failures stay visible, whatever the retry did
            print("[lab] first lab run's failures (the retried signature):")
            for nodeid, text in sorted(failures.items()):
                lines = text.splitlines()
                shown = [l for l in lines if LAB_SIGNATURE.search(l)][:1] + lines[-25:]
                print(f"[lab]   {nodeid}:\n" + "\n".join(f"[lab]     {l}" for l in shown))
        for label, text in traces:      # a caught SHUTDOWN exit, or why there is no trace
            print(f"[lab] {label}: " + "\n".join(f"[lab]   {l}" for l in text.splitlines()))
    not_retried = ("" if retries or first.status == 0 else
                   "; not retried: " + ("no failure report from the lab" if failures is None else
                                        f"not every failure is {LAB_SIGNATURE_NAME}"))
    assert result.status == 0, (f"e2e tests failed in the lab (status {result.status}"
                                f"{': ' + result.error if result.error else ''}{not_retried})\n"
                                f"--- first lab run ---\n{first.output[-12000:]}"
                                + (f"\n--- retry ---\n{result.output[-12000:]}" if retries else "")
                                + "".join(f"\n--- {label}: {text}" for label, text in traces)
                                + (f"\n--- the outer console (last 60 lines) ---\n"
                                   + "\n".join(result.console.splitlines()[-60:])
                                   if result.status == lab.EXIT_LAB_ERROR else ""))
