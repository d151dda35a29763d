"""Checks at the file-descriptor limit, each run in a child interpreter of its own.

RLIMIT_NOFILE belongs to the whole process.  Inside the pytest process, something else (a
thread another test left running) took the descriptors such a check had just freed, in a CI
run of 2026-11-30, and the check failed although the code under test was right; a child
interpreter has no other thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

#: descriptors left free below the lowered limit (the check's own sockets need none more)
SPARE = 8


def run_in_child(func, *args: str) -> None:
    """Call ``func(*args)``, a module-level function of a test module in this directory, in
    a child interpreter; an AssertionError with the child's output if it fails."""
    here = Path(__file__).resolve().parent
    path = [here.parents[1], here.parent, here]     # pyvmm, tests/ (harness), tests/unit
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path)))
    code = f"import sys, {func.__module__} as m; m.{func.__name__}(*sys.argv[1:])"
    child = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stdout + child.stderr


@contextlib.contextmanager
def descriptors_exhausted():
    """Lower the soft limit to what is open plus SPARE and open /dev/null until EMFILE;
    yields a function that frees those descriptors; restores the limit at the end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hogs: list[int] = []

    def free() -> None:
        for fd in hogs:
            os.close(fd)
        hogs.clear()

    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + SPARE, hard))
        try:
            while True:
                hogs.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            if e.errno != errno.EMFILE:
                raise
        yield free
    finally:
        free()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
