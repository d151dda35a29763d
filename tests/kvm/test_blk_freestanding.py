"""KVM level: the freestanding guest's virtio-blk driver against pyvmm's virtio-blk device.

The guest (guest/freestanding/virtio_blk.c, scenario ``blk-check``) writes a pattern
derived from (sector, seed) with several requests in flight, flushes, reads it back and
checks it, asks GET_ID, DISCARDs and WRITE_ZEROES a tail, reads past the end; here the
host file is checked afterwards against the same pattern computed in Python.  Everything
runs at CPL3, so at native speed on PVM hosts: no lab.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from harness import LiveGuest
from pyvmm import images
from pyvmm.machine import DiskConfig

pytestmark = pytest.mark.kvm

PREFIX = "pyvmm-test-guest: "
SECTOR = 512
MiB = 1 << 20
#: sectors blk-check puts after its range: 16 DISCARDed, then 16 WRITE_ZEROES'd
TAIL = 16
U64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def pattern(start: int, sectors: int, seed: int) -> np.ndarray:
    """The guest's pattern_word (virtio_blk.c) for sectors [start, start + sectors)."""
    x = np.arange(start * 64, (start + sectors) * 64, dtype=np.uint64)
    z = x + np.uint64((seed * GOLDEN + GOLDEN) & U64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def words_sum(words: np.ndarray) -> int:
    return int(words.sum(dtype=np.uint64))


def image(path, size: int, data: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return str(path)


def sectors_of(path, start: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start * SECTOR)
        return f.read(count * SECTOR)


def blk_check(cmdline: str, disks, timeout: float = 60):
    with LiveGuest(images.freestanding_guest(), cmdline=cmdline, timeout=timeout,
                   disks=disks) as g:
        return g.finish(timeout)


def check_written(path, start: int, sectors: int, seed: int) -> None:
    """The file holds the pattern over the range, the WRITE_ZEROES'd tail holds zeroes."""
    got = np.frombuffer(sectors_of(path, start, sectors), dtype="<u8")
    want = pattern(start, sectors, seed)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"first differing sector {start + bad[0] // 64}"
    assert sectors_of(path, start + sectors + TAIL, TAIL) == bytes(TAIL * SECTOR)


def test_blk_check_pattern_lands_in_the_file(tmp_path):
    start, sectors, seed = 64, 2048, 7
    disk = image(tmp_path / "vda.raw", 8 * MiB)
    run = blk_check(f"blk-check start={start} sectors={sectors} seed={seed} serial=disk-one",
                    [DiskConfig(disk, serial="disk-one", format="raw")])
    assert PREFIX + "blk check ok problems 0" in run.console, run.explain()
    assert PREFIX + "exit 0" in run.console
    assert PREFIX + "blk vda capacity 16384 size_max 1048576" in run.console
    assert PREFIX + "blk id status 0 'disk-one'" in run.console
    assert PREFIX + "blk read past capacity ioerr ok" in run.console
    assert "write-zeroes 16 sectors status 0 read status 0 zeroes ok" in run.console
    total = sectors + 2 * TAIL
    m = re.search(rf"blk wrote {total} sectors at {start} seed {seed} bad 0 sum ([0-9a-f]+)",
                  run.console)
    assert m and int(m.group(1), 16) == words_sum(pattern(start, total, seed)), run.explain()
    check_written(disk, start, sectors, seed)
    assert sectors_of(disk, 0, start) == bytes(start * SECTOR)          # nothing before it


def test_read_only_disk_refuses_writes_and_is_vdb(tmp_path):
    """A second disk is vdb; ``ro`` answers a write VIRTIO_BLK_S_IOERR and the file stays."""
    content = np.random.default_rng(5).integers(0, 1 << 63, 4 * MiB // 8, dtype=np.uint64)
    vda = image(tmp_path / "vda.raw", 8 * MiB)
    vdb = image(tmp_path / "vdb.raw", 4 * MiB, content.tobytes())
    before = hashlib.sha256(open(vdb, "rb").read()).hexdigest()
    run = blk_check("blk-check disk=1 serial=disk-two",
                    [DiskConfig(vda, format="raw"),
                     DiskConfig(vdb, read_only=True, serial="disk-two", format="raw")])
    assert PREFIX + "blk check ok problems 0" in run.console, run.explain()
    assert PREFIX + "blk vdb capacity 8192 " in run.console
    assert PREFIX + "blk id status 0 'disk-two'" in run.console
    assert PREFIX + "blk read-only write ioerr ok" in run.console
    m = re.search(r"blk read 2048 sectors bad 0 sum ([0-9a-f]+)", run.console)
    assert m and int(m.group(1), 16) == words_sum(content[:2048 * 64]), run.explain()
    assert hashlib.sha256(open(vdb, "rb").read()).hexdigest() == before
    assert open(vda, "rb").read() == bytes(8 * MiB)                       # vda: untouched


def test_flushed_data_survives_sigkill_of_pyvmm(tmp_path):
    """The guest writes and flushes, says so and spins; pyvmm dies by SIGKILL; the data is there."""
    seed = 9
    disk = image(tmp_path / "vda.raw", 8 * MiB)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvmm", "run", "--kernel", str(images.freestanding_guest()),
         "--cmdline", f"blk-check hold=1 seed={seed}", "--disk", f"{disk},format=raw",
         "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    seen = []
    try:
        for line in proc.stdout:             # ends at EOF if pyvmm dies first
            seen.append(line.decode(errors="replace").rstrip())
            if line.startswith((PREFIX + "blk holding").encode()):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    out = "\n".join(seen)
    assert PREFIX + "blk holding" in out, out + proc.stderr.read().decode(errors="replace")
    assert PREFIX + "blk flush status 0" in out, out
    assert proc.returncode == -signal.SIGKILL
    got = np.frombuffer(sectors_of(disk, 0, 2048 + 2 * TAIL), dtype="<u8")
    assert np.array_equal(got, pattern(0, 2048 + 2 * TAIL, seed))


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img is not installed (qemu-utils)")
@pytest.mark.skipif(not shutil.which("qemu-storage-daemon"),
                    reason="qemu-storage-daemon is not installed (qemu-system-x86 / qemu-storage-daemon)")
def test_blk_check_on_a_qcow2_image(tmp_path):
    start, sectors, seed = 8, 1024, 3
    disk = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    run = blk_check(f"blk-check start={start} sectors={sectors} seed={seed}",
                    [DiskConfig(str(disk), format="qcow2")])
    assert PREFIX + "blk check ok problems 0" in run.console, run.explain()
    raw = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(raw)],
                   check=True)
    check_written(raw, start, sectors, seed)
