"""pytest plugin: the ``vm`` fixture, a booted Linux guest whose commands the guest agent runs.

Installed with pyvmm (entry point ``pytest11``, name ``pyvmm``), so any test can ask for it::

    def test_the_guest_runs_linux(vm):
        assert vm.check("uname -s") == "Linux\\n"

    @pytest.mark.pyvmm(cpus=2, mem=512 << 20)
    def test_two_cpus(vm):
        assert vm.check("nproc").strip() == "2"

``vm`` is a :class:`pyvmm.testing.VM` (run, check, put, get, connect, console, vsock, uds).
Guests boot when a test first needs one and are shared: one per distinct configuration
(the command-line options below plus the test's ``pyvmm`` marker), kept until the session
ends, so a suite pays for one boot.  ``@pytest.mark.pyvmm(fresh=True)`` gives a test a guest
of its own, stopped after it.  The marker takes VM's keywords: kernel, initrd, cpus, mem
(bytes), cmdline, cid, forwards (the vsock device's TCP forwards), disks, agent, quiet,
ready, boot_timeout.

Failures say why:

* a guest that does not boot errors every test that needs it with :class:`VMBootError` (how
  it ended or where each vCPU hung, and its console); a configuration is booted once, its
  error is remembered rather than retried;
* a guest that ends during a test fails that test with how it ended; the next test gets a
  new guest;
* a failed test's report has a section "pyvmm guest" (state, cmdline, console tail);
* on a host whose /dev/kvm cannot run a guest's user space (none; PVM) the tests using ``vm``
  are skipped with the exact reason, or fail with it under ``--pyvmm-require`` (a CI job
  that must not pass by skipping).

Options, on the command line or as ini settings (``pyvmm_kernel = PATH`` ...):
``--pyvmm-kernel PATH``, ``--pyvmm-initrd PATH`` (default: the images of ``make kernel
guest``), ``--pyvmm-cpus N``, ``--pyvmm-mem MiB``, ``--pyvmm-boot-timeout SECONDS``,
``--pyvmm-require``.

On a PVM host (like pyvmm's own development machine) the tests can still run, inside pyvmm's
lab (nested KVM in QEMU, from a pyvmm checkout: ``tests/lab/run -- .venv/bin/python -m
pytest FILE``), which is how pyvmm's CI runs examples/test_guest.py.
"""

from __future__ import annotations

import pytest

from . import testing
from .testing import VM, VMBootError

_POOL = pytest.StashKey["_Pool"]()
_UNKNOWN = object()
#: the marker's keywords beyond VM's own
_MARKER_ONLY = {"fresh"}
_VM_KEYWORDS = {"kernel", "initrd", "cpus", "mem", "cmdline", "cid", "forwards", "disks",
                "agent", "quiet", "ready", "boot_timeout"}


#: (option, ini name, type, help): each option may be given on the command line or as an ini
#: setting (pytest.ini / pyproject.toml [tool.pytest.ini_options]); the command line wins
_OPTIONS = (
    ("kernel", "pyvmm_kernel", str, "guest kernel, vmlinux or bzImage (default: make kernel's)"),
    ("initrd", "pyvmm_initrd", str, "guest initramfs; it must start pyvmm-agent as pyvmm's does "
                                    "(default: make guest's)"),
    ("cpus", "pyvmm_cpus", int, "guest vCPUs (default 1)"),
    ("mem", "pyvmm_mem", int, f"guest memory in MiB (default {testing.DEFAULT_MEM >> 20})"),
    ("boot_timeout", "pyvmm_boot_timeout", float,
     f"bound on each boot in seconds (default {testing.BOOT_TIMEOUT:g})"),
)


def pytest_addoption(parser) -> None:
    group = parser.getgroup("pyvmm", "pyvmm guests (the vm fixture)")
    for _, name, type_, help_ in _OPTIONS:
        group.addoption("--" + name.replace("_", "-"), type=type_, dest=name, help=help_)
        parser.addini(name, help_)
    group.addoption("--pyvmm-require", action="store_true", dest="pyvmm_require",
                    help="fail, not skip, the tests using vm where guests cannot run")
    parser.addini("pyvmm_require", "as --pyvmm-require", type="bool", default=False)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "pyvmm(**kw): the vm fixture's guest for this test: VM keywords (cpus, "
        "mem, cmdline, kernel, initrd, ...), fresh=True for a guest of its own")
    config.stash[_POOL] = _Pool()


def pytest_unconfigure(config) -> None:
    pool = config.stash.get(_POOL, None)
    if pool is not None:
        pool.close()


class _Pool:
    """The session's shared guests, one per configuration, and the boots that failed."""

    def __init__(self) -> None:
        self.guests: dict[str, VM] = {}
        self.failed: dict[str, str] = {}
        self.boots: list[tuple[str, float | None, str]] = []    # (configuration, seconds, error)
        self._unusable: str | None | object = _UNKNOWN

    def unusable(self) -> str | None:
        """Why this host cannot run guests (asked once), or None."""
        if self._unusable is _UNKNOWN:
            self._unusable = testing.unusable_reason()
        return self._unusable

    def boot(self, kw: dict) -> VM:
        vm = None
        try:
            vm = VM(**kw)               # a missing image, a bad option: pyvmm's ConfigError
            vm.start()
        except BaseException as e:
            if vm is not None:
                vm.close()
            first = (str(e).splitlines() or [type(e).__name__])[0]
            self.boots.append((_describe(kw), None, first))
            raise
        self.boots.append((_describe(kw), vm.boot_seconds, ""))
        return vm

    def shared(self, kw: dict) -> VM:
        key = _describe(kw)
        if key in self.failed:
            raise VMBootError(f"(booted once for an earlier test, not retried)\n{self.failed[key]}")
        vm = self.guests.get(key)
        if vm is None:
            try:
                vm = self.guests[key] = self.boot(kw)
            except Exception as e:     # VMBootError, or a VM that cannot be made (ConfigError)
                self.failed[key] = str(e)
                raise
        return vm

    def drop(self, vm: VM) -> None:
        for key, v in list(self.guests.items()):
            if v is vm:
                del self.guests[key]
        vm.close()

    def close(self) -> None:
        for vm in self.guests.values():
            vm.close()
        self.guests.clear()


def _describe(kw: dict) -> str:
    return ", ".join(f"{k}={kw[k]!r}" for k in sorted(kw)) or "defaults"


def _settings(request) -> tuple[dict, bool]:
    """VM keywords from the options and the closest ``pyvmm`` marker; and ``fresh``."""
    config = request.config
    kw = {}
    for key, name, type_, _ in _OPTIONS:
        value = config.getoption(name)
        if value is None and config.getini(name):
            try:
                value = type_(config.getini(name))
            except ValueError:
                raise pytest.UsageError(f"ini setting {name} = {config.getini(name)!r} is not "
                                        f"{type_.__name__}") from None
        if value is not None:
            kw[key] = value << 20 if key == "mem" else value
    marker = request.node.get_closest_marker("pyvmm")
    fresh = False
    if marker is not None:
        if marker.args:
            raise pytest.UsageError(f"{request.node.nodeid}: pyvmm(...) takes keywords only")
        unknown = set(marker.kwargs) - _VM_KEYWORDS - _MARKER_ONLY
        if unknown:
            raise pytest.UsageError(f"{request.node.nodeid}: pyvmm(...) does not know "
                                    f"{', '.join(sorted(unknown))} (it knows "
                                    f"{', '.join(sorted(_VM_KEYWORDS | _MARKER_ONLY))})")
        fresh = bool(marker.kwargs.get("fresh", False))
        kw.update({k: v for k, v in marker.kwargs.items() if k in _VM_KEYWORDS})
    return kw, fresh


@pytest.fixture
def vm(request):
    """A running Linux guest with the guest agent (pyvmm.testing.VM), shared by the tests
    of one configuration unless marked ``pyvmm(fresh=True)``."""
    pool: _Pool = request.config.stash[_POOL]
    reason = pool.unusable()
    if reason:
        if request.config.getoption("pyvmm_require") or request.config.getini("pyvmm_require"):
            pytest.fail(f"--pyvmm-require: {reason}")
        pytest.skip(reason)
    kw, fresh = _settings(request)
    guest = pool.boot(kw) if fresh else pool.shared(kw)
    try:
        yield guest
    finally:
        ended = not guest.alive
        if fresh or ended:
            pool.drop(guest)
    if ended:
        pytest.fail(f"the guest ended during this test\n{guest.describe()}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    guest = getattr(item, "funcargs", {}).get("vm")
    if report.failed and isinstance(guest, VM):
        report.sections.append(("pyvmm guest", guest.describe()))


def pytest_terminal_summary(terminalreporter, config) -> None:
    pool = config.stash.get(_POOL, None)
    if pool is None or not pool.boots:
        return
    terminalreporter.section("pyvmm guests")
    for key, seconds, error in pool.boots:
        terminalreporter.line(f"{key}: " + (f"booted in {seconds:.1f} s" if not error
                                            else f"did not boot: {error}"))
