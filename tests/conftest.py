"""How the suite decides where each test runs, and the summary of what ran where.

Four classes of test, by marker:

* (none) unit tests: no KVM, no images.  Run everywhere.
* ``kvm``: pyvmm runs freestanding guests on /dev/kvm (hardware KVM or PVM).
* ``linux_boot``: pyvmm boots the default Linux guest kernel on /dev/kvm.
* ``e2e``: needs a Linux guest *with a working userspace*.  On hardware KVM
  they run here.  On other hosts (PVM, no KVM) they are deselected from this
  session and run, all together, inside the lab (``tests/lab``: nested KVM in
  a QEMU TCG guest) by the single proxy test ``tests/test_lab_e2e.py``.  The
  lab is never a silent skip: if it cannot start, that test fails saying why,
  unless ``PYVMM_NO_LAB=1`` opts out explicitly.

At the end, the terminal summary says how many tests of each class ran,
were skipped (and why) and where.  Inside the lab, with ``PYVMM_LAB_FAILURES``
set to a file in the project, the session also writes there, as JSON, every
failed test's id and full failure text (setup, call and teardown): the proxy
reads it to decide whether a failure is the lab's own (tests/test_lab_e2e.py).
With ``PYVMM_LAB_TRACE`` set too, the session records the outer kernel's KVM trace
(tests/lab/kvm_trace.py), which freezes at a nested guest's first triple fault, and
writes its end to that file if it did: where the guest was when it faulted.
"""

from __future__ import annotations

import collections
import json
import os

import sys
from pathlib import Path

import pytest

from harness import LAB_NODEIDS, LAB_SUMMARY
from pyvmm.kvm.host import KvmFlavour, detect

HOST = detect()
IN_LAB = os.environ.get("PYVMM_IN_LAB") == "1"
CLASSES = ("kvm", "linux_boot", "e2e")


def kvm_unusable_reason() -> str | None:
    """None if /dev/kvm can be opened read-write here, else why not."""
    if HOST.flavour is KvmFlavour.NONE:
        return "no /dev/kvm on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def e2e_runs_here() -> bool:
    return HOST.flavour is KvmFlavour.HARDWARE


@pytest.hookimpl(trylast=True)          # after -k / -m deselection: hand the lab only what was chosen
def pytest_collection_modifyitems(session, config, items):
    reason = kvm_unusable_reason()
    lab_items = []
    for item in items:
        if item.get_closest_marker("e2e"):
            if not e2e_runs_here():
                lab_items.append(item)
        elif reason and (item.get_closest_marker("kvm") or item.get_closest_marker("linux_boot")):
            item.add_marker(pytest.mark.skip(reason=reason))
    if lab_items:
        config.hook.pytest_deselected(items=lab_items)
        items[:] = [i for i in items if i not in lab_items]
    config.stash[LAB_NODEIDS] = [i.nodeid for i in lab_items]


_outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_skip_reasons: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
#: failed test id -> its failure texts (setup, call, teardown), for PYVMM_LAB_FAILURES
_failures: dict[str, str] = {}


def _test_class(report) -> str:
    if report.nodeid.startswith("tests/lab/"):
        return "lab"                      # the lab's own tests (host side)
    if report.nodeid.startswith("tests/test_lab_e2e.py"):
        return "lab proxy"
    for name in CLASSES:
        if name in report.keywords:
            return name
    return "unit"


def pytest_runtest_logreport(report):
    if report.failed:
        _failures[report.nodeid] = (_failures.get(report.nodeid, "")
                                    + f"--- {report.when} ---\n{report.longreprtext}\n")
    cls = _test_class(report)
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes[cls][report.outcome] += 1
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            _skip_reasons[cls][reason.removeprefix("Skipped: ")] += 1


def _kvm_trace():
    sys.path.insert(0, str(Path(__file__).resolve().parent / "lab"))
    import kvm_trace
    return kvm_trace


def pytest_sessionstart(session):
    path = os.environ.get("PYVMM_LAB_TRACE")
    if path and IN_LAB:
        why_not = _kvm_trace().start()
        Path(path).write_text(f"{why_not}\n" if why_not else "")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("PYVMM_LAB_FAILURES")
    if path and IN_LAB:
        with open(path, "w") as f:
            json.dump(_failures, f, indent=1)
    path = os.environ.get("PYVMM_LAB_TRACE")
    if path and IN_LAB and _kvm_trace().caught():
        from pyvmm import images
        vmlinux = images.default_kernel(required=False)     # the bzImage holds the same kernel
        Path(path).write_text(
            "the outer kernel's KVM trace, frozen at the first SHUTDOWN exit (guest RIPs named "
            f"from {vmlinux}):\n" + _kvm_trace().excerpt(vmlinux=vmlinux) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    where = {
        "unit": "here",
        "lab": "here: QEMU TCG starting the lab",
        "lab proxy": "here: runs the e2e tests inside the lab",
        "kvm": f"here, on {HOST.flavour.value}",
        "linux_boot": f"here, on {HOST.flavour.value}",
        "e2e": ("inside the lab (nested KVM)" if IN_LAB else f"here, on {HOST.flavour.value}"),
    }
    tr = terminalreporter
    tr.section("pyvmm: what ran where")
    for cls in ("unit", "lab") + CLASSES + ("lab proxy",):
        counts = _outcomes.get(cls)
        if not counts:
            continue
        parts = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        tr.write_line(f"{cls:>10}: {parts} ({where[cls]})")
        for reason, n in _skip_reasons[cls].items():
            tr.write_line(f"{'':>10}  skipped {n}: {reason}")
    lab = config.stash.get(LAB_SUMMARY, None)
    if lab:
        tr.write_line(f"{'e2e':>10}: {lab}")
