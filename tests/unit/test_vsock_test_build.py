"""guest/vsock_test/build.sh's products: the kernel's vsock_test from 6.1 and 6.12, and their cpio.

Checked without KVM and without running any of them: the archive's entries (parsed as the
kernel's initramfs unpacker reads newc), that each program is a static x86-64 ELF, that the
archive appends cleanly to the default initramfs, and that guest/vsock_test/README.md's test
table is what the built programs' ``--list`` printed (build.sh saved it). The build itself runs
in ``make test`` before pytest (``make vsock-test``); without it these tests skip.
"""

from __future__ import annotations

import re
import stat
import struct
from pathlib import Path

import pytest

from pyvmm import images
from pyvmm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "guest" / "vsock_test" / "README.md"
VERSIONS = ("6.1", "6.12")
PROGRAMS = ("vsock_test-6.1", "vsock_diag_test-6.1", "vsock_test-6.12", "vsock_diag_test-6.12",
            "vsock_perf-6.12")


def read_newc(data: bytes) -> list[tuple[str, int, int, bytes]]:
    """(name, mode, uid, data) of every entry of one or more concatenated newc archives, in
    order, as init/initramfs.c reads them (a TRAILER!!! ends one archive; zero padding between
    archives is skipped)."""
    entries, pos = [], 0
    while pos < len(data):
        if data[pos:pos + 4] == b"\0\0\0\0":
            pos += 4
            continue
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, filesize, namesize = fields[1], fields[2], fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name != "TRAILER!!!":
            entries.append((name, mode, uid, body))
    return entries


def elf_is_static_x86_64(body: bytes) -> bool:
    """ELF64, little-endian, EM_X86_64, and no PT_INTERP (no dynamic loader)."""
    if body[:4] != b"\x7fELF" or body[4] != 2 or body[5] != 1:
        return False
    e_machine, = struct.unpack_from("<H", body, 18)
    e_phoff, = struct.unpack_from("<Q", body, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", body, 54)
    types = [struct.unpack_from("<I", body, e_phoff + i * e_phentsize)[0] for i in range(e_phnum)]
    return e_machine == 62 and 3 not in types          # PT_INTERP = 3


def test_the_path_and_the_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    assert images.vsock_test_cpio(required=False) is None
    with pytest.raises(ConfigError, match="make vsock-test"):
        images.vsock_test_cpio()
    built = tmp_path / "vsock-test" / "k1"
    built.mkdir(parents=True)
    (built / "vsock-test.cpio").write_bytes(b"")
    (tmp_path / "vsock-test" / "current").symlink_to("k1")
    assert images.vsock_test_cpio() == tmp_path / "vsock-test" / "current" / "vsock-test.cpio"


@pytest.fixture(scope="module")
def built() -> Path:
    cpio = images.vsock_test_cpio(required=False)
    if cpio is None:
        pytest.skip(f"no vsock-test build in {images.cache_dir()}: run make vsock-test")
    return cpio.parent


def test_the_archive_holds_both_generations_as_static_programs(built):
    entries = {name: (mode, uid, body) for name, mode, uid, body in
               read_newc((built / "vsock-test.cpio").read_bytes())}
    assert sorted(entries) == sorted(["usr", "usr/bin", *(f"usr/bin/{p}" for p in PROGRAMS)])
    for program in PROGRAMS:
        mode, uid, body = entries[f"usr/bin/{program}"]
        assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o755 and uid == 0, program
        assert elf_is_static_x86_64(body), program
        assert body == (built / program).read_bytes(), program


def test_the_archive_appends_to_the_default_initramfs(built):
    """Its directories are the initramfs's own, with the same modes (re-creating them changes
    nothing), and every other entry is new."""
    initramfs = images.default_initramfs(required=False)
    if initramfs is None:
        pytest.skip(f"no initramfs in {images.cache_dir()}: run make guest")
    base = read_newc(initramfs.read_bytes())
    extra = read_newc((built / "vsock-test.cpio").read_bytes())
    both = read_newc(initramfs.read_bytes() + (built / "vsock-test.cpio").read_bytes())
    assert len(both) == len(base) + len(extra)
    base_modes = {name: (mode, uid) for name, mode, uid, _ in base}
    for name, mode, uid, _ in extra:
        if stat.S_ISDIR(mode):
            assert base_modes.get(name) == (mode, uid), name
        else:
            assert name not in base_modes, name


def _list_file(built: Path, program: str) -> dict[int, str]:
    lines = (built / f"list-{program}.txt").read_text().splitlines()
    assert lines[0] == "ID\tTest name"
    return {int(i): name for i, name in (line.split("\t", 1) for line in lines[1:])}


def test_6_12_keeps_the_ids_of_6_1(built):
    old, new = _list_file(built, "vsock_test-6.1"), _list_file(built, "vsock_test-6.12")
    assert len(old) >= 11 and len(new) > len(old)
    assert {i: new[i] for i in old} == old


def test_the_readme_table_is_what_list_printed(built):
    section = README.read_text().split("## What `--list` says", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| ([^|]*?) ?\| ([^|]*?) ?\|$", section, re.MULTILINE)
    assert rows, "no test table in the README"
    readme = {v: {int(i): cols[k] for i, *cols in rows if cols[k]} for k, v in enumerate(VERSIONS)}
    for version in VERSIONS:
        assert readme[version] == _list_file(built, f"vsock_test-{version}"), version
    diag = re.search(r"^vsock_diag_test, both versions: (.*)\.$", section, re.MULTILINE)
    for version in VERSIONS:
        listed = _list_file(built, f"vsock_diag_test-{version}")
        assert diag and diag.group(1) == ", ".join(f"{i} {n}" for i, n in listed.items())
