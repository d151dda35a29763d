"""guest/rootfs/mkrootfs.py: an initramfs archive becomes an ext4 image with the same files.

Built for real with e2fsprogs (mkfs.ext4, debugfs, e2fsck: Priority required on Debian) from
a small archive written by the initramfs's own packer, then read back with debugfs: owners,
modes and device nodes as in the archive (which a builder without root could not set on
host files), the /sbin/init link the kernel runs from a disk, and the file's content.
"""

import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

GUEST = Path(__file__).resolve().parents[2] / "guest"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


mkcpio = _load(GUEST / "initramfs" / "mkcpio.py")
mkrootfs = _load(GUEST / "rootfs" / "mkrootfs.py")


def _cpio(tmp_path, body: bytes = b"#!/bin/sh\necho hi\n") -> Path:
    src = tmp_path / "init.src"
    src.write_bytes(body)
    lines = ["dir /dev 0755 0 0", "dir /sbin 0755 0 0", "dir /etc 0700 0 0",
             "nod /dev/console 0600 0 0 c 5 1", "nod /dev/vdz 0640 0 6 b 254 7",
             f"file /init {src} 0755 0 0", "slink /etc/sh /init 0777 0 0",
             "file /etc/owned-by-1000 /dev/null 0600 1000 1000"]
    out = io.BytesIO()
    mkcpio.write_cpio(lines, out)
    path = tmp_path / "in.cpio"
    path.write_bytes(out.getvalue())
    return path


def _debugfs(img: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(img)], capture_output=True,
                          text=True, check=True).stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rootfs")
    img = tmp / "rootfs.img"
    mkrootfs.make_rootfs(_cpio(tmp), img, 16)
    return img


def test_the_image_is_a_clean_sparse_ext4_of_the_asked_size(image):
    assert image.stat().st_size == 16 << 20
    assert image.stat().st_blocks * 512 < image.stat().st_size      # sparse on the host
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "Filesystem volume name:   pyvmm-root" in subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout


def test_device_nodes_owners_and_modes_are_the_archives(image):
    console = _debugfs(image, "stat /dev/console")
    assert "Type: character special" in console and "Mode:  0600" in console
    assert re.search(r"Device major/minor number: 05:01", console), console
    vdz = _debugfs(image, "stat /dev/vdz")
    assert "Type: block special" in vdz and "Mode:  0640" in vdz and "Group:     6" in vdz
    assert re.search(r"Device major/minor number: 254:07", vdz), vdz
    owned = _debugfs(image, "stat /etc/owned-by-1000")
    assert re.search(r"User:\s+1000\s+Group:\s+1000", owned), owned
    for path in ("/", "/init", "/etc", "/etc/sh", "/sbin/init"):
        assert re.search(r"User:\s+0\s+Group:\s+0", _debugfs(image, f"stat {path}")), path
    assert "Mode:  0700" in _debugfs(image, "stat /etc")


def test_files_links_and_the_sbin_init_link(image, tmp_path):
    out = tmp_path / "init"
    _debugfs(image, f"dump /init {out}")
    assert out.read_bytes() == b"#!/bin/sh\necho hi\n"
    assert 'Fast link dest: "/init"' in _debugfs(image, "stat /sbin/init")
    assert 'Fast link dest: "/init"' in _debugfs(image, "stat /etc/sh")


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:50], "no newc header at offset 0"),
    (lambda b: b.replace(b"init\0", b"..\0\0\0", 1), "unsafe name"),
    (lambda b: b[:b.index(b"#!/bin/sh") + 4], "truncated data"),
])
def test_a_malformed_archive_is_refused(tmp_path, damage, message):
    with pytest.raises(ValueError, match=message):
        mkrootfs.read_cpio(damage(_cpio(tmp_path).read_bytes()))
