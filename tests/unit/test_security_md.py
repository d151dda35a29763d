"""SECURITY.md's limit table cites tests and constants: each must exist, so the page
cannot silently drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "SECURITY.md").read_text()


def test_every_cited_test_exists():
    cited = set(re.findall(r"`(?:kvm )?(test_[a-z0-9_]+)(?:\[[^\]]*\])?`", TEXT))
    cited |= set(re.findall(r"kvm `(test_[a-z0-9_]+)", TEXT))
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"^def (test_[a-z0-9_]+)", path.read_text(), re.M))
    assert cited, "no test names found in SECURITY.md"
    assert not cited - defined, sorted(cited - defined)


def test_every_cited_constant_exists_where_it_is_said_to_be():
    rows = re.findall(r"`(pyvmm/[a-z_/]+\.py)` `([A-Z][A-Z0-9_]+)`", TEXT)
    assert rows
    missing = [f"{path} {name}" for path, name in rows
               if not re.search(rf"^{name} = ", (ROOT / path).read_text(), re.M)]
    assert not missing, missing
