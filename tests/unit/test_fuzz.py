"""The fuzz targets (tests/fuzz/targets.py) inside ``make test``: every kept input replayed,
then a short coverage-guided run of each target (``make fuzz`` runs them for longer).

A crash or invariant violation in the short run fails this test with the traceback and
the input (hex): add it to ``tests/fuzz/corpus/<target>/`` and it is replayed from then on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
CORPUS = FUZZ / "corpus"
#: seconds of coverage-guided fuzzing per target in ``make test`` (FUZZ_SECONDS overrides)
SHORT_RUN = int(os.environ.get("FUZZ_SECONDS", "20"))
TARGET_NAMES = ("queue", "mmio", "vsock", "blk")

atheris = pytest.importorskip("atheris", reason="atheris is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def targets():
    sys.path.insert(0, str(FUZZ))
    try:
        import targets as module
    finally:
        sys.path.remove(str(FUZZ))
    return module.TARGETS


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_kept_inputs_replay_cleanly(targets, name):
    inputs = sorted((CORPUS / name).iterdir()) if (CORPUS / name).is_dir() else []
    assert inputs, f"no kept inputs in {CORPUS / name}"
    for path in inputs:
        try:
            targets[name](path.read_bytes())
        except Exception as e:
            raise AssertionError(f"{path.name}: {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_short_fuzz_run_finds_nothing(tmp_path, name):
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS / name, corpus)               # what the run learns stays in tmp
    proc = subprocess.run([sys.executable, str(FUZZ / "run.py"), name, f"-max_total_time={SHORT_RUN}",
                           f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", str(corpus)],
                          capture_output=True, text=True, timeout=SHORT_RUN + 120, cwd=FUZZ)
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*"))
    if proc.returncode != 0 or crashes:
        found = "\n".join(f"{p.name}: {p.read_bytes().hex()}" for p in crashes)
        raise AssertionError(f"fuzz target {name} failed (exit {proc.returncode}):\n"
                             f"{proc.stderr[-4000:]}\n{found}")
    runs = [line for line in proc.stderr.splitlines() if "stat::number_of_executed_units" in line]
    assert runs and int(runs[0].split(":")[-1]) > 0, proc.stderr[-2000:]
