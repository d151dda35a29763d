"""What is behind ``/dev/kvm`` on this host: hardware KVM, or PVM.

PVM (``kvm_pvm``) is a software nested-virtualisation backend: guest code at
CPL3 runs natively but guest code at CPL0 is emulated, about 4000x slower,
and a stock Linux guest dies at its first userspace ``SYSCALL``.  pyvmm must
say which one it runs on, and on PVM it adds the kernel command-line
workarounds that let a stock kernel boot (see :data:`PVM_CMDLINE`).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass


class KvmFlavour(enum.Enum):
    HARDWARE = "hardware KVM"
    PVM = "PVM (software nested virtualisation)"
    NONE = "no /dev/kvm"
    UNKNOWN = "KVM of unknown kind"


#: Kernel parameters that keep a stock Linux guest off instructions the PVM
#: CPL0 emulator lacks (XRSTOR, POPCNT, CLAC/STAC, RDPID, FSGSBASE, INVPCID,
#: PKU).  Seen on PVM hosts (docs/pvm.md); harmless on hardware KVM.
PVM_CMDLINE = ("noxsave", "clearcpuid=smap,popcnt,rdpid", "nofsgsbase", "noinvpcid", "nopku")


@dataclass(frozen=True)
class HostInfo:
    flavour: KvmFlavour
    detail: str

    @property
    def is_pvm(self) -> bool:
        return self.flavour is KvmFlavour.PVM

    @property
    def runs_guest_userspace(self) -> bool:
        """Can a stock Linux guest run its userspace here?"""
        return self.flavour is KvmFlavour.HARDWARE


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def detect(dev: str = "/dev/kvm", sys_module: str = "/sys/module",
           cpuinfo_path: str = "/proc/cpuinfo") -> HostInfo:
    """Classify this host's KVM from sysfs and /proc/cpuinfo (no ioctls)."""
    if not os.path.exists(dev):
        return HostInfo(KvmFlavour.NONE, f"{dev} does not exist")
    if os.path.isdir(os.path.join(sys_module, "kvm_pvm")):
        return HostInfo(KvmFlavour.PVM, "kvm_pvm module loaded")
    try:
        with open(cpuinfo_path) as f:
            flags = _cpu_flags(f.read())
    except OSError:
        flags = set()
    for module, flag in (("kvm_intel", "vmx"), ("kvm_amd", "svm")):
        if os.path.isdir(os.path.join(sys_module, module)):
            return HostInfo(KvmFlavour.HARDWARE, f"{module} module loaded")
        if flag in flags:
            return HostInfo(KvmFlavour.HARDWARE, f"CPU has {flag}")
    return HostInfo(KvmFlavour.UNKNOWN, "no kvm_intel/kvm_amd/kvm_pvm module and no vmx/svm flag")
