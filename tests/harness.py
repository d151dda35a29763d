"""Running a guest from a test: boot it with pyvmm's Python API, capture its console.

Used by the KVM-level, Linux-boot and end-to-end tests.  A run is bounded by
a timeout (pyvmm's own watchdog), so a hung guest fails its test instead of
hanging the suite.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest

from pyvmm import images
from pyvmm.machine import Machine, MachineConfig, RunResult


#: e2e test ids this session hands to the lab, and the lab run's summary line
LAB_NODEIDS = pytest.StashKey[list]()
LAB_SUMMARY = pytest.StashKey[str]()


@dataclass
class GuestRun:
    result: RunResult
    console: str
    cmdline: str
    boot_phases: tuple = ()       # (code, seconds) written to the boot-timer port

    @property
    def lines(self) -> list[str]:
        return self.console.splitlines()

    def explain(self) -> str:
        """Everything a failing assertion should show."""
        tail = "\n".join(self.lines[-40:])
        return (f"status {self.result.status}: {self.result.reason}\ncmdline: {self.cmdline}\n"
                f"--- console (last 40 lines) ---\n{tail}")


def run_guest(kernel, *, cmdline: str = "", initrd=None, cpus: int = 1, mem: int = 64 << 20,
              timeout: float = 60.0, default_cmdline: bool = True) -> GuestRun:
    out = io.BytesIO()
    config = MachineConfig(kernel=str(kernel), initrd=str(initrd) if initrd else None,
                           cmdline=cmdline, mem=mem, cpus=cpus, timeout=timeout,
                           serial_out=out, default_cmdline=default_cmdline)
    with Machine(config) as vm:
        line = str(vm.cmdline)
        result = vm.run()
        phases = tuple((r.code, r.seconds) for r in vm.boot_timer.records)
    text = out.getvalue().decode("utf-8", "replace").replace("\r\n", "\n")
    return GuestRun(result, text, line, phases)


def freestanding(scenario: str, **kw) -> GuestRun:
    """Boot the freestanding test guest with ``scenario`` as its command line."""
    return run_guest(images.freestanding_guest(), cmdline=scenario, **kw)
