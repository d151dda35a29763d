"""Thread placement: CPU lists, the host CPUs a thread may run on, and thread names.

Owns ``--vcpu-affinity`` / ``--io-affinity`` (``MachineConfig.vcpu_affinity`` /
``io_affinity``): parsing a CPU list in the kernel's list format
(Documentation/admin-guide/cgroup-v1/cpusets.rst, "0-3,8", as ``taskset -c``
and ``/sys/devices/system/cpu/online`` write it), checking it against the CPUs
this process may use (``sched_getaffinity(2)``), and applying it to one thread
with ``sched_setaffinity(2)`` on that thread's id.  Also the threads' kernel
names (``prctl(PR_SET_NAME)``, the ``comm`` of ``/proc/<pid>/task/<tid>``),
so that tools and the benchmark tell a vCPU thread from the others: pyvmm's
vCPU threads are called ``pyvmm-vcpu<N>`` (:data:`VCPU_THREAD_PREFIX`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re

from .errors import ConfigError

#: the comm of pyvmm's vCPU threads is this prefix followed by the vCPU index
VCPU_THREAD_PREFIX = "pyvmm-vcpu"
PR_SET_NAME = 15                     # <linux/prctl.h>
TASK_COMM_LEN = 16                   # <linux/sched.h>, including the NUL

_ITEM = re.compile(r"(\d+)(?:-(\d+))?")


def parse_cpu_list(text: str, what: str = "CPU list") -> frozenset[int]:
    """``"0"``, ``"1"``, ``"0-1"``, ``"0,2-3"`` -> the set of CPU numbers.

    Raises :class:`ConfigError` (one line naming ``what``) for anything else:
    empty items, a range whose end is below its start, signs, spaces inside."""
    cpus: set[int] = set()
    items = text.strip().split(",")
    for item in items:
        m = _ITEM.fullmatch(item)
        if not m:
            raise ConfigError(f"{what} {text!r}: expected CPU numbers and ranges like 0, 1-3, 0,2")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"{what} {text!r}: range {item} ends before it starts")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def format_cpu_list(cpus) -> str:
    """The inverse of :func:`parse_cpu_list`, ranges collapsed: {0, 1, 2, 5} -> "0-2,5"."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [c]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def _read_cpu_list(path: str) -> frozenset[int] | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return parse_cpu_list(text) if text else None
    except (OSError, ConfigError):
        return None


def available_cpus() -> frozenset[int]:
    """The CPUs a thread of this process may be given: its cpuset's (cgroup v2
    ``cpuset.cpus.effective``, v1 ``cpuset.effective_cpus``), else the online
    CPUs.  Not this thread's own affinity mask: ``taskset -c 1 pyvmm run
    --vcpu-affinity 0`` is a fair request."""
    candidates = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    candidates += [f"/sys/fs/cgroup{path}/cpuset.cpus.effective",
                                   f"/sys/fs/cgroup/unified{path}/cpuset.cpus.effective"]
                elif "cpuset" in controllers.split(","):
                    candidates.append(f"/sys/fs/cgroup/cpuset{path}/cpuset.effective_cpus")
    except (OSError, ValueError):
        pass
    candidates.append("/sys/devices/system/cpu/online")
    for path in candidates:
        cpus = _read_cpu_list(path.replace("//", "/"))
        if cpus:
            return cpus
    return frozenset(os.sched_getaffinity(0))


def cpu_set(value, what: str, available: frozenset[int] | None = None) -> frozenset[int] | None:
    """A CPU list as given (a string, or an iterable of ints, or None) -> a
    checked set, or None for "not pinned".

    Every CPU must be one this process may use; otherwise :class:`ConfigError`
    naming ``what`` and the CPUs that are available."""
    if value is None:
        return None
    if isinstance(value, str):
        cpus = parse_cpu_list(value, what)
    else:
        try:
            cpus = frozenset(int(c) for c in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} {value!r}: not a CPU list") from None
        if not cpus or min(cpus) < 0:
            raise ConfigError(f"{what} {format_cpu_list(cpus) or 'empty'}: not a CPU list")
    avail = available_cpus() if available is None else available
    missing = cpus - avail
    if missing:
        raise ConfigError(f"{what} {format_cpu_list(cpus)}: CPU {format_cpu_list(missing)} is not "
                          f"available (this process may use {format_cpu_list(avail)})")
    return cpus


def pin_thread(tid: int, cpus) -> None:
    """Let thread ``tid`` (a native thread id; 0 = the calling thread) run only on ``cpus``."""
    os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def pinned(cpus):
    """Run the block with the calling thread on ``cpus`` (None: leave it alone), then put
    it back.  Threads and processes started inside inherit the placement, which is how
    pyvmm places its I/O thread and the bench its client."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    pin_thread(0, cpus)
    try:
        yield
    finally:
        pin_thread(0, saved)


def set_thread_name(name: str) -> None:
    """Name the calling thread for the kernel (``/proc/self/task/<tid>/comm``, ``ps -L``, ``top -H``).

    At most 15 bytes are kept (TASK_COMM_LEN).  Failure is ignored: a name is
    a convenience, and the benchmark falls back to treating unnamed threads
    as non-vCPU threads."""
    raw = name.encode()[:TASK_COMM_LEN - 1]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0)
    except (OSError, AttributeError):
        pass
