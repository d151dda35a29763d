"""``pyvmm.blk.open_backend`` on images that are not raw: the device built on what it
returns (qcow2, and a qcow2 overlay on a raw base) driven by the mock driver, cache=none
reaching the storage daemon as O_DIRECT, the missing QEMU programs named with their Debian
packages, and a Machine whose build fails leaving no qemu-storage-daemon behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from blk_guest import IMAGE_SIZE, T, BlkGuest, file_hash, make_image
from harness import host_processes
from pyvmm.blk import open_backend
from pyvmm.blk.daemon import QemuImageBackend, StorageDaemon
from pyvmm.errors import ConfigError
from pyvmm.machine import DiskConfig

OK, IOERR = 0, 1
QEMU_IMG = shutil.which("qemu-img")
QSD = shutil.which("qemu-storage-daemon")
needs_qemu = pytest.mark.skipif(
    not (QEMU_IMG and QSD),
    reason="needs qemu-img (Debian qemu-utils) and qemu-storage-daemon (qemu-system-common, "
           "brought by qemu-system-x86): make deps installs them")


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """The daemons' private directories go under this test's tmp_path (what is left of
    them is this test's alone to see)."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def qemu_img(*args: str) -> None:
    subprocess.run([QEMU_IMG, *args], check=True, capture_output=True, timeout=60)


def my_daemons() -> list[int]:
    """Pids of this process's qemu-storage-daemon children (comm is cut at 15 characters)."""
    return [pid for pid, comm, ppid, _ in host_processes()
            if comm.startswith("qemu-storage") and ppid == os.getpid()]


def drive(backend, base_bytes: bytes | None) -> bytes:
    """Through the virtio-blk device and the mock driver: write two places, flush, read
    them back; the rest still reads as ``base_bytes`` (or zeroes).  Returns what was
    written at sector 8."""
    guest = BlkGuest(backend)
    try:
        assert guest.config(0, 8) == IMAGE_SIZE // 512              # capacity
        first, last = os.urandom(4096), os.urandom(512)
        assert guest.write(8, first, 2) == (OK, 1)
        assert guest.write(IMAGE_SIZE // 512 - 1, last) == (OK, 1)
        assert guest.request(T.VIRTIO_BLK_T_FLUSH)[:2] == (OK, 1)
        assert guest.read(8, 4096, 3)[::2] == (OK, first)
        assert guest.read(IMAGE_SIZE // 512 - 1, 512)[::2] == (OK, last)
        status, _, untouched = guest.read(100, 8192)
        assert status == OK
        assert untouched == (base_bytes[100 * 512:100 * 512 + 8192] if base_bytes else bytes(8192))
    finally:
        guest.close()                               # closes the backend: the daemon stops
    assert backend.daemon is None and not my_daemons()
    return first


@needs_qemu
def test_a_qcow2_image_is_served_by_the_storage_daemon_through_the_device(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), str(IMAGE_SIZE))
    backend = open_backend(DiskConfig(str(image)))
    assert isinstance(backend, QemuImageBackend) and backend.fmt == "qcow2"
    first = drive(backend, None)
    check = subprocess.run([QEMU_IMG, "check", str(image)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    again = open_backend(DiskConfig(str(image), read_only=True))   # what was written stayed
    guest = BlkGuest(again)
    try:
        assert guest.read(100, 512)[::2] == (OK, bytes(512))
        assert guest.read(8, 4096)[::2] == (OK, first)
        assert guest.request(T.VIRTIO_BLK_T_OUT, b"x" * 512, in_bytes=0)[0] == 1   # IOERR: ro
    finally:
        guest.close()


@needs_qemu
def test_a_qcow2_overlay_on_a_raw_base_takes_the_writes_and_leaves_the_base_untouched(tmp_path):
    base, overlay = tmp_path / "rootfs.img", tmp_path / "overlay.qcow2"
    base_bytes = make_image(base)
    before = file_hash(base)
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    backend = open_backend(DiskConfig(str(overlay)))
    assert isinstance(backend, QemuImageBackend) and backend.fmt == "qcow2"
    drive(backend, base_bytes)
    assert file_hash(base) == before
    compare = subprocess.run([QEMU_IMG, "compare", "-f", "raw", "-F", "qcow2", str(base),
                           str(overlay)], capture_output=True, text=True, timeout=60)
    assert compare.returncode == 1, compare.stdout + compare.stderr           # 1: the images differ


def _daemon_fd_flags(daemon: StorageDaemon, path) -> list[int]:
    """The open flags of every descriptor of the daemon's process on ``path``."""
    pid, target, flags = daemon.process.pid, os.path.realpath(path), []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != target:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags.append(int(f.read().split("flags:")[1].split()[0], 8))
        except (OSError, IndexError):
            continue
    return flags


def _direct_io_here(path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@needs_qemu
@pytest.mark.parametrize("cache, direct", [("writeback", False), ("none", True)])
def test_cache_none_opens_the_image_and_its_base_o_direct_in_the_daemon(tmp_path, cache, direct):
    base, overlay = tmp_path / "base.img", tmp_path / "overlay.qcow2"
    make_image(base)
    if direct and not _direct_io_here(base):
        pytest.skip(f"the file system of {tmp_path} has no O_DIRECT (cache=none acts as writeback)")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    backend = open_backend(DiskConfig(str(overlay), cache=cache))
    try:
        assert backend.daemon.direct is direct
        for path in (overlay, base):
            flags = _daemon_fd_flags(backend.daemon, path)
            assert flags, f"the daemon has no descriptor on {path}"
            assert all(bool(f & os.O_DIRECT) is direct for f in flags), (path, [oct(f) for f in flags])
    finally:
        backend.close()


@needs_qemu
def test_a_format_magic_on_what_qemu_img_reads_as_raw_is_refused(tmp_path):
    """A damaged qcow2 header: serving it raw would let the guest overwrite the image,
    serving it as qcow2 is impossible; refused, and nothing started."""
    image = tmp_path / "damaged.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(508))       # the magic, version 0: not a qcow2
    with pytest.raises(ConfigError, match="starts with the qcow2 magic but qemu-img reads it as raw"):
        open_backend(DiskConfig(str(image)))
    assert not my_daemons() and not os.listdir(tempfile.tempdir)


def test_missing_qemu_programs_are_named_with_their_debian_packages(tmp_path, monkeypatch):
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(508))       # a qcow2 magic: needs the daemon path
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(ConfigError, match=r"qemu-img is not installed \(Debian package qemu-utils"):
        open_backend(DiskConfig(str(image)))
    if QEMU_IMG is None:
        return
    qemu_img("create", "-f", "qcow2", str(image), "1M")
    (bin_dir / "qemu-img").symlink_to(QEMU_IMG)      # qemu-img there, the daemon not
    with pytest.raises(ConfigError, match=r"qemu-storage-daemon is not installed \(Debian "
                                          r"package qemu-system-common"):
        open_backend(DiskConfig(str(image)))
    assert not os.listdir(tempfile.tempdir)           # no private directory left behind


@pytest.fixture
def elf(tmp_path):
    """A tiny valid PVH ELF (never run: the Machine is only built)."""
    from test_boot import make_elf
    p = tmp_path / "guest.elf"
    p.write_bytes(make_elf([(0x100000, b"\xf4", 1)], 0x100000, pvh_entry=0x100000))
    return str(p)


@pytest.mark.kvm
@needs_qemu
def test_a_machine_refusing_an_image_in_use_leaves_no_storage_daemon(elf, tmp_path, private_tmp):
    """The second disk is a qcow2 a running qemu-storage-daemon holds: the Machine's build
    fails with the in-use ConfigError, and the daemon it had started for the first disk
    (a good qcow2) is stopped with it; the holder's daemon is not pyvmm's to stop."""
    from pyvmm.machine import Machine, MachineConfig
    good, held = tmp_path / "good.qcow2", tmp_path / "held.qcow2"
    for image in (good, held):
        qemu_img("create", "-f", "qcow2", str(image), "1M")
    holder = StorageDaemon(held, "qcow2", read_only=False)
    holder.start()
    try:
        assert my_daemons() == [holder.process.pid]
        config = MachineConfig(kernel=elf, disks=[DiskConfig(str(good)), DiskConfig(str(held))])
        with pytest.raises(ConfigError, match=r"held.qcow2 is in use by another process "
                                              r"\(qemu-storage-daemon: .*Failed to get"):
            Machine(config)
        assert my_daemons() == [holder.process.pid]
        assert os.listdir(private_tmp) == [os.path.basename(holder.directory)]
    finally:
        holder.stop()
    assert not my_daemons()


@pytest.mark.parametrize("fmt, refused", [(None, True), ("raw", False)])
def test_a_probed_raw_image_refuses_a_guest_write_of_a_format_magic(tmp_path, fmt, refused):
    """QEMU's rule for probed raw images: otherwise the guest could turn its disk into a
    qcow2 whose backing file is any host file, opened at the next boot."""
    image = tmp_path / "disk.img"
    make_image(image)
    guest = BlkGuest(open_backend(DiskConfig(str(image), format=fmt)))
    try:
        evil = b"QFI\xfb\0\0\0\3" + bytes(504)
        assert guest.write(0, evil)[0] == (IOERR if refused else OK)
        assert (image.read_bytes()[:4] == b"QFI\xfb") is not refused
        assert guest.write(0, b"\0" * 512)[0] == OK                  # any other bytes: fine
        assert guest.write(1, evil)[0] == OK                         # the magic elsewhere: fine
    finally:
        guest.close()


@needs_qemu
def test_format_given_is_not_probed(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), str(IMAGE_SIZE))
    with pytest.raises(ConfigError):            # a format qemu-img does not know
        open_backend(DiskConfig(str(image), format="qcow2x"))
    backend = open_backend(DiskConfig(str(image), format="raw"))   # declared raw: served raw
    try:
        assert type(backend).__name__ == "RawBackend" and not backend.probed
    finally:
        backend.close()
    backend = open_backend(DiskConfig(str(image), format="qcow2"))
    assert isinstance(backend, QemuImageBackend)
    drive(backend, None)
