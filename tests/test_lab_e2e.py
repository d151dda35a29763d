"""The proxy that runs the e2e tests inside the lab, on hosts where they cannot run directly.

tests/conftest.py deselects the e2e tests on a host without hardware KVM and
hands their ids to this test, which runs them all in one lab session (one
outer QEMU boot) with the same Python and the same checkout, and passes only
if they all pass there.  Their output is shown when it fails; the summary at
the end of the run repeats the lab's own pytest summary line and timings.

A failure is retried only when it is the lab's own: every failed test's
failure text (written by the session inside, see tests/conftest.py) must hold
:data:`LAB_SIGNATURE`, and the outer kernel's KVM trace of that run must show the
emulator's fault (:func:`lab_trace_signature`).  Then those tests, and only they, run once more in a
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
#: seconds after which a test inside the lab is taken to hang and every thread's stack is
#: written to the output (pytest's faulthandler_timeout; the test goes on): the longest e2e
#: test takes ~3 minutes in the lab
HUNG_TEST = 600
#: One vCPU: single-threaded TCG.  With 2 (multi-threaded TCG) the nested guests triple-faulted
#: far more often (tests/lab/README.md, "The 2-vCPU triple fault": in one session on
#: 2026-11-30, three shutdowns in eight minutes of vsock_test between two 1-vCPU guests;
#: the same four vsock_test runs with one lab vCPU: all passed in 7.4 minutes, no shutdown).  The e2e tests' 2-vCPU guest runs on it as well (KVM
#: time-shares the two guest vCPUs on the one lab vCPU).
LAB_CPUS = 1

#: The one failure that is the lab's own, and the only one retried (once): the nested guest
#: triple-faults because QEMU 7.2's TCG, emulating nested SVM, hands the guest a state no
#: real CPU would.  Two things must both hold:
#:
#: * every failed test holds pyvmm's report of a shutdown at the x86 reset state
#:   (:data:`LAB_SIGNATURE`: kvm_amd resets the vCPU before pyvmm sees KVM_EXIT_SHUTDOWN, so
#:   the registers say nothing), and
#: * the outer kernel's KVM trace of that run (tests/lab/kvm_trace.py, frozen at the first
#:   SHUTDOWN exit) shows the event being delivered at the shutdown (EXITINTINFO) was a #PF
#:   with P clear, and one of two things no real CPU does (:func:`lab_trace_signature`):
#:
#:   - **RSVD without P.**  Hardware and KVM's own walker set P with RSVD (a reserved bit
#:     can only be found in a present entry); QEMU's TCG walker alone reports RSVD without P
#:     (target/i386/tcg/sysemu/excp_helper.c since its August 2022 rework:
#:     ``do_fault_rsvd: error_code = PG_ERROR_RSVD_MASK``).  Caught twice on 2026-11-30:
#:     fetches at ``kvm_hypercall4+0x15`` and ``native_apic_mem_write+0x8``, right where L1
#:     KVM had re-entered the guest after handling an exit itself, in kernel boot before any
#:     virtio device existed.
#:   - **The guest at the outer kernel's VMRUN.**  The faulting RIP is in the outer
#:     kernel's ``kvm_amd`` text (named ``<outer kvm_amd:...>`` by the trace): the emulated
#:     VMRUN entered the guest with L1's own RIP.  Our guest kernels are built without
#:     modules (nothing of theirs is in the module area) and pyvmm never sets a running
#:     vCPU's registers.  Caught in CI on 2026-11-30: ``kvm_entry: vcpu 0, rip
#:     0xffffffffc035120c``, then the shutdown there with error code 0x10 (fetch, not
#:     present); in that lab build ``kvm_amd`` loads at 0xffffffffc033d000 and the address
#:     is ``__svm_vcpu_run+0x9c``, the instruction right after its ``vmrun``.
#:
#: Any other failure, including a shutdown whose trace shows something else or no trace,
#: fails at once.
LAB_SIGNATURE_NAME = "QEMU TCG nested-SVM fault (KVM_EXIT_SHUTDOWN: a #PF no real CPU raises)"
LAB_SIGNATURE = re.compile(r"vCPU \d+ at RIP 0xfff0\b[^\n]*: triple fault \(KVM_EXIT_SHUTDOWN\)"
                           r"[^\n]*\(the reset state")
#: the SHUTDOWN exit in the outer kernel's trace (kvm_exit, AMD: exit code 0x7f "shutdown")
_TRACE_SHUTDOWN = re.compile(r"kvm_exit: vcpu \d+ reason shutdown rip (0x[0-9a-f]+)(?: (<[^>]*>))? "
                             r"info1 0x[0-9a-f]+ info2 0x[0-9a-f]+ intr_info (0x[0-9a-f]+) "
                             r"error_code (0x[0-9a-f]+)")
#: EXITINTINFO: valid (bit 31), an exception (type 3, bits 10:8) with an error code (bit 11)
_EVENT_VALID, _EVENT_EXCEPTION, _EVENT_HAS_ERROR = 1 << 31, 3 << 8, 1 << 11
_PF_VECTOR, _PF_P, _PF_RSVD = 14, 1 << 0, 1 << 3


def lab_trace_signature(trace: str) -> str | None:
    """What the trace's SHUTDOWN exit shows, if it is the signature; else None."""
    m = _TRACE_SHUTDOWN.search(trace)
    if m is None:
        return None
    rip, where = m.group(1), m.group(2) or ""
    info, code = int(m.group(3), 16), int(m.group(4), 16)
    if not (info & _EVENT_VALID and info & (7 << 8) == _EVENT_EXCEPTION
            and info & _EVENT_HAS_ERROR and info & 0xFF == _PF_VECTOR and not code & _PF_P):
        return None
    if code & _PF_RSVD:
        return f"#PF error code {code:#x} (RSVD without P) being delivered at RIP {rip}"
    if where.startswith("<outer kvm_amd:"):
        return f"#PF error code {code:#x} being delivered at the outer kernel's {where[1:-1]}"
    return None


#: the file (in the project, so the lab can write it) where the session inside lists its failures
FAILURES_FILE = ".pytest-lab-failures.json"
#: ... and where it writes the outer kernel's KVM trace at a triple fault (tests/lab/kvm_trace.py)
TRACE_FILE = ".pytest-lab-trace.txt"


def lab_own_failure(failures: dict[str, str], trace: str) -> bool:
    """True if there are failures, every one holds :data:`LAB_SIGNATURE`, and the run's
    outer trace shows the signature's SHUTDOWN (:func:`lab_trace_signature`)."""
    return (bool(failures) and all(LAB_SIGNATURE.search(text) for text in failures.values())
            and lab_trace_signature(trace) is not None)


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
        # -v: a run that times out shows which test was running; faulthandler_timeout: a
        # test running longer than HUNG_TEST dumps every thread's stack into the output
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rsfE",
               "-o", f"faulthandler_timeout={HUNG_TEST}", "--rootdir", str(top), *ids]
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
    first_trace = traces[0][1] if traces else ""
    if first.status == 1 and failures is not None and lab_own_failure(failures, first_trace):
        retries = 1
        result, _ = run_in_lab(sorted(failures), "retry")
        retried = (f"lab retries: {retries} for {LAB_SIGNATURE_NAME} "
                   f"({lab_trace_signature(first_trace)}): {len(failures)} tests "
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
                                        f"not every failure is {LAB_SIGNATURE_NAME}"
                                        + ("" if lab_trace_signature(first_trace) else
                                           " (the outer trace does not show it)")))
    assert result.status == 0, (f"e2e tests failed in the lab (status {result.status}"
                                f"{': ' + result.error if result.error else ''}{not_retried})\n"
                                f"--- first lab run ---\n{first.output[-12000:]}"
                                + (f"\n--- retry ---\n{result.output[-12000:]}" if retries else "")
                                + "".join(f"\n--- {label}: {text}" for label, text in traces)
                                + (f"\n--- the outer console (last 60 lines) ---\n"
                                   + "\n".join(result.console.splitlines()[-60:])
                                   if result.status == lab.EXIT_LAB_ERROR else ""))
