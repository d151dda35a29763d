"""``python tests/fuzz/run.py TARGET [libFuzzer options] [CORPUS_DIR ...]``: fuzz one target.

TARGET is one of ``tests/fuzz/targets.py``'s TARGETS (queue, mmio, vsock, blk).  The
options are libFuzzer's, e.g. ``-max_total_time=600`` (seconds), ``-runs=N``,
``-artifact_prefix=DIR/`` (where a crashing input is written).  With a corpus
directory, new inputs that reach new code are added to it (``make fuzz`` uses
``tests/fuzz/corpus/TARGET``, so what a long run learns is kept); a crash or an
invariant violation prints the Python traceback and exits non-zero, leaving the
input as ``crash-<sha1>``: move it into the corpus, and it becomes a regression
input that ``tests/unit/test_fuzz.py`` replays on every ``make test``.

``python tests/fuzz/run.py TARGET --replay DIR ...`` runs every file of the
directories through the target once (no fuzzing), e.g. under coverage.py to see
what the kept inputs reach::

    python -m coverage run --branch --source=pyvmm/virtio,pyvmm/vsock \
        tests/fuzz/run.py vsock --replay tests/fuzz/corpus/vsock
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

from targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    target = TARGETS[sys.argv.pop(1)]
    if sys.argv[1:2] == ["--replay"]:
        files = sorted(p for d in sys.argv[2:] for p in Path(d).iterdir())
        for path in files:
            target(path.read_bytes())
        print(f"replayed {len(files)} inputs")
        return
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
