"""The lab refuses, in one line and before QEMU starts, an image cache it could not share.

Inside the lab, /tmp, /run and /var/tmp are fresh tmpfs (tests/lab/README.md), so a
``PYVMM_CACHE`` under them is invisible to the command: a fresh-machine check with its
cache in /tmp failed as "no default vmlinux ... build it with: make kernel" inside, after
the kernel had just been built.  No QEMU is started here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))
import lab  # noqa: E402


@pytest.mark.parametrize("cache", ["/tmp/pyvmm-cache", "/var/tmp/c", "/run/x/y"])
def test_a_cache_the_lab_hides_is_refused_with_the_reason(monkeypatch, cache):
    monkeypatch.setenv("PYVMM_CACHE", cache)
    monkeypatch.delenv("PYVMM_IN_LAB", raising=False)
    ok, why = lab.available()
    assert not ok and f"PYVMM_CACHE={cache} is under" in why and "fresh tmpfs" in why
    result = lab.run(["true"], timeout=5)
    assert result.status == lab.EXIT_LAB_ERROR and "fresh tmpfs" in result.error


@pytest.mark.parametrize("cache", ["/root/.cache/pyvmm", "/srv/cache", None])
def test_other_caches_pass_the_check(monkeypatch, cache):
    if cache is None:
        monkeypatch.delenv("PYVMM_CACHE", raising=False)
    else:
        monkeypatch.setenv("PYVMM_CACHE", cache)
    lab._check_cache_visible()               # raises LabError if refused


def test_a_cache_inside_the_project_is_visible_even_under_tmp(monkeypatch):
    monkeypatch.setenv("PYVMM_CACHE", str(lab.PROJECT_DIR / "build" / "cache"))
    lab._check_cache_visible()
