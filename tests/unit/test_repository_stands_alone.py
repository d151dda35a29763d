"""The repository stands alone: nothing in it cites files outside it.

A reader of a clone has only the clone.  Notes that lived beside the repository on the
development machines (their ``shared/`` directory) are not there, so every fact the code or
the docs rely on must be in the repository's own docs (``docs/pvm.md`` for PVM hosts) and
cited by repository path.  This test reads every text file of the project (the same walk as
the install-list test, outside ``.git``, ``.venv``, ``build`` and the benchmark results) and
fails on a citation of such a path, and on a ``docs/*.md`` citation whose file is missing.
"""

from __future__ import annotations

import re

from test_install_list import ROOT, _project_files

#: What a citation of a file outside the repository looks like.
OUTSIDE = re.compile(r"/work/|\.\./shared/|\bshared/(host-facts|vsock-facts|style-anchors|rfc2013)"
                     r"|\bhost-facts\.md")
DOCS = re.compile(r"(?<![\w/])docs/[\w./-]+\.md")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".c", ".h", ".S", ".ld", ".txt", ".toml", ".config",
                 ".patch", ".list", ""}


def _text_files():
    for path in _project_files():
        if path.suffix in TEXT_SUFFIXES and path.name != "test_repository_stands_alone.py":
            try:
                yield path, path.read_text()
            except (UnicodeDecodeError, OSError):
                continue


def test_no_file_cites_a_path_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
             for path, text in _text_files() for m in OUTSIDE.finditer(text)]
    assert not found, "cites files outside the repository:\n" + "\n".join(found)


def test_cited_docs_exist():
    cited = {(path.relative_to(ROOT), m.group(0)) for path, text in _text_files()
             for m in DOCS.finditer(text)}
    assert cited, "no docs/ citation found: the scan is not looking where it should"
    missing = sorted(f"{where}: {doc}" for where, doc in cited if not (ROOT / doc).is_file())
    assert not missing, "cites docs that do not exist:\n" + "\n".join(missing)
