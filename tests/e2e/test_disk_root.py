"""End to end: a Linux guest boots from an ext4 disk, writes a file, reboots, and reads it back.

The README's own commands, run as a user runs them: ``pyvmm run --disk IMAGE --cmdline
root=/dev/vda`` with the default kernel (no initramfs is attached when ``root=`` is given), on

* a raw image (a sparse copy of ``make rootfs``'s image), served by pyvmm itself, and
* a qcow2 overlay on a raw base (``qemu-img create -f qcow2 -b base -F raw``), served by
  qemu-storage-daemon over NBD; the base must come out bit-for-bit untouched.

Each boot runs one command through /init's ``pyvmm.run`` contract; the first writes
``/persist`` and the second reads it back in a fresh guest, so the data went through
the guest's page cache, virtio-blk, pyvmm and the image file and came back the same way.
Afterwards the host checks the image itself: e2fsck finds it clean (/init remounts the disk
root read-only before its reboot) and the file is in it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm import images

pytestmark = [pytest.mark.e2e, pytest.mark.own_guests]

BOOT_TIMEOUT = 300                   # seconds, per boot (a boot takes ~10 s in the lab)
PAYLOAD = "written-by-the-first-boot"


def boot(disk: Path, command: str) -> str:
    """``pyvmm run --disk DISK --cmdline 'root=/dev/vda ...'``: the console, after a clean end."""
    cmdline = f'root=/dev/vda loglevel=4 pyvmm.run="{command}"'
    proc = subprocess.run([sys.executable, "-m", "pyvmm", "run", "--disk", str(disk),
                           "--cmdline", cmdline, "--timeout", str(BOOT_TIMEOUT)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=BOOT_TIMEOUT + 60)
    explain = f"--- pyvmm's log ---\n{proc.stderr[-3000:]}\n--- console ---\n{proc.stdout[-4000:]}"
    assert proc.returncode == 0, explain
    assert "pyvmm-guest: exit 0" in proc.stdout, explain
    return proc.stdout


def write_then_read_back(disk: Path) -> None:
    first = boot(disk, f"grep ' / ' /proc/mounts && echo {PAYLOAD} > /persist && sync")
    # the root is the disk, ext4, made writable by /init; not the initramfs's rootfs
    assert "/dev/root / ext4 rw" in first, first[-3000:]
    second = boot(disk, "cat /persist")
    assert PAYLOAD in second.split("pyvmm-guest: ready", 1)[1], second[-3000:]


def sha256(path: Path) -> str:
    return hashlib.file_digest(path.open("rb"), "sha256").hexdigest()


def test_boot_from_a_raw_ext4_disk_write_reboot_read(tmp_path):
    disk = tmp_path / "rootfs.img"
    shutil.copyfile(images.default_rootfs(), disk)
    write_then_read_back(disk)
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dump = subprocess.run(["debugfs", "-R", "cat /persist", str(disk)], capture_output=True,
                          text=True, check=True)
    assert dump.stdout == PAYLOAD + "\n", dump.stdout + dump.stderr


def test_boot_through_a_qcow2_overlay_leaves_the_base_untouched(tmp_path):
    base = tmp_path / "base.img"
    shutil.copyfile(images.default_rootfs(), base)
    before = sha256(base)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(overlay)], check=True)
    write_then_read_back(overlay)
    assert sha256(base) == before
    check = subprocess.run(["qemu-img", "check", str(overlay)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # the write is in the overlay: the two images now differ where /persist was written
    compare = subprocess.run(["qemu-img", "compare", "-q", str(base), str(overlay)])
    assert compare.returncode == 1
