"""RawBackend: I/O on views, size rounding, QEMU's lock bytes (against QEMU itself where it is
installed), hole punching, zeroes, O_DIRECT, read-only opens, and open_backend's format check."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess

import pytest

from blk_guest import make_image
from pyvmm.blk import detect_format, open_backend
from pyvmm.blk import lock as lock_mod
from pyvmm.blk import raw as raw_mod
from pyvmm.blk.backend import BlockOp, BlockRequest
from pyvmm.blk.raw import _IOV_MAX, RawBackend
from pyvmm.errors import ConfigError
from pyvmm.machine import DiskConfig

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    make_image(path, 4 * MiB)
    return path


@pytest.fixture
def backend(image):
    b = RawBackend(str(image))
    b.open()
    yield b
    b.close()


def _fd_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return int(next(l for l in f if l.startswith("flags:")).split()[1], 8)


def _views(buf: bytearray, *sizes):
    view, out, pos = memoryview(buf), [], 0
    for n in sizes:
        out.append(view[pos:pos + n])
        pos += n
    return out


def test_read_and_write_scatter_gather(backend, image):
    data = image.read_bytes()
    buf = bytearray(4096)
    assert backend.execute([BlockRequest(BlockOp.READ, 8192, 4096, _views(buf, 512, 1536, 2048))]) == [0]
    assert bytes(buf) == data[8192:8192 + 4096]
    new = bytearray(os.urandom(3072))
    assert backend.execute([BlockRequest(BlockOp.WRITE, 512, 3072, _views(new, 1024, 2048))]) == [0]
    assert image.read_bytes()[512:3584] == new


def test_short_transfers_are_repeated(backend, image, monkeypatch):
    """preadv/pwritev may move fewer bytes than asked: the backend goes on."""
    calls = []

    def short(real):
        def call(fd, views, offset):
            calls.append(offset)
            first = views[0][:100]      # at most 100 bytes of the first buffer
            return real(fd, [first], offset)
        return call
    monkeypatch.setattr(os, "preadv", short(os.preadv))
    monkeypatch.setattr(os, "pwritev", short(os.pwritev))
    new = bytearray(os.urandom(1024))
    assert backend.execute([BlockRequest(BlockOp.WRITE, 0, 1024, _views(new, 512, 512))]) == [0]
    buf = bytearray(1024)
    assert backend.execute([BlockRequest(BlockOp.READ, 0, 1024, _views(buf, 1000, 24))]) == [0]
    assert bytes(buf) == bytes(new) == image.read_bytes()[:1024]
    assert len(calls) > 4
    again = bytearray(1024)             # buffers as a tuple (BlockRequest's default type)
    assert backend.execute([BlockRequest(BlockOp.READ, 0, 1024, tuple(_views(again, 1000, 24)))]) == [0]
    assert again == buf


def test_empty_views_anywhere_and_more_views_than_iov_max(backend, image):
    """Empty buffers before, between and after the data, and more views than one
    preadv/pwritev takes (IOV_MAX) with the first IOV_MAX of them empty: every byte moves."""
    empty = [memoryview(bytearray(0))] * (_IOV_MAX + 3)
    new = bytearray(os.urandom(2048))
    views = empty + _views(new, 512, 0, 1024, 512) + empty[:2]
    assert backend.execute([BlockRequest(BlockOp.WRITE, 4096, 2048, views)]) == [0]
    assert image.read_bytes()[4096:6144] == new
    buf = bytearray(2048)
    views = empty[:1] + _views(buf, 1024, 0, 1024) + empty
    assert backend.execute([BlockRequest(BlockOp.READ, 4096, 2048, views)]) == [0]
    assert buf == new


def test_a_file_truncated_under_the_backend_gives_eio_not_a_hang(backend, image):
    os.truncate(image, 4096)
    buf = bytearray(4096)
    assert backend.execute([BlockRequest(BlockOp.READ, 8192, 4096, [memoryview(buf)])]) == [errno.EIO]


def test_requests_outside_the_disk_never_touch_the_file(backend, image):
    before = image.read_bytes()
    buf = bytearray(1024)
    bad = [BlockRequest(BlockOp.WRITE, 4 * MiB - 512, 1024, [memoryview(buf)]),
           BlockRequest(BlockOp.WRITE, -512, 512, [memoryview(buf)[:512]]),
           BlockRequest(BlockOp.WRITE, 0, 1024, [memoryview(buf)[:512]]),      # buffers != length
           BlockRequest(BlockOp.WRITE_ZEROES, 4 * MiB, 512),
           BlockRequest(BlockOp.DISCARD, 4 * MiB - 512, 1024)]
    assert backend.execute(bad) == [errno.EINVAL] * len(bad)
    assert image.read_bytes() == before


def test_size_is_rounded_down_to_whole_sectors(tmp_path, caplog):
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x55" * 1300)
    b = RawBackend(str(path))
    with caplog.at_level(logging.WARNING, "pyvmm.blk"):
        b.open()
    try:
        assert b.size == 1024
        assert "not a multiple of 512" in caplog.text
        buf = bytearray(1024)
        assert b.execute([BlockRequest(BlockOp.WRITE_ZEROES, 0, 1024)]) == [0]
        assert path.read_bytes() == bytes(1024) + b"\x55" * 276       # the tail untouched
    finally:
        b.close()


def test_flush_is_fdatasync(backend, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fdatasync", calls.append)
    assert backend.execute([BlockRequest(BlockOp.FLUSH)]) == [0]
    assert calls == [backend.fd]


def test_discard_punches_holes(backend, image):
    os.fsync(backend.fd)
    blocks = os.stat(image).st_blocks
    assert backend.execute([BlockRequest(BlockOp.DISCARD, MiB, 2 * MiB)]) == [0]
    if raw_mod.FALLOC_FL_PUNCH_HOLE | raw_mod.FALLOC_FL_KEEP_SIZE in backend._unsupported_modes:
        pytest.skip(f"the file system of {image.parent} cannot punch holes (fallocate)")
    assert os.stat(image).st_blocks <= blocks - (2 * MiB) // 512
    assert image.read_bytes()[MiB:3 * MiB] == bytes(2 * MiB)


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_reads_back_zeroes(backend, image, unmap):
    before = image.read_bytes()
    assert backend.execute([BlockRequest(BlockOp.WRITE_ZEROES, 4096, 8192, unmap=unmap)]) == [0]
    after = image.read_bytes()
    assert after[4096:12288] == bytes(8192)
    assert after[:4096] == before[:4096] and after[12288:] == before[12288:]


def test_write_zeroes_without_fallocate_writes_zeroes_in_chunks(backend, image, monkeypatch):
    def no_fallocate(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "not here")
    monkeypatch.setattr(raw_mod, "fallocate", no_fallocate)
    monkeypatch.setattr(raw_mod, "ZERO_CHUNK", 4096)
    assert backend.execute([BlockRequest(BlockOp.WRITE_ZEROES, 512, 3 * 4096 + 512)]) == [0]
    assert image.read_bytes()[512:512 + 3 * 4096 + 512] == bytes(3 * 4096 + 512)
    # a discard where holes cannot be punched is advice not taken, not an error
    assert backend.execute([BlockRequest(BlockOp.DISCARD, 0, 512)]) == [0]


def test_read_only_open_is_o_rdonly_and_refuses_writes(image):
    before = image.read_bytes()
    b = RawBackend(str(image), read_only=True)
    b.open()
    try:
        assert _fd_flags(b.fd) & os.O_ACCMODE == os.O_RDONLY
        assert not b.supports_discard and not b.supports_write_zeroes
        buf = bytearray(512)
        assert b.execute([BlockRequest(BlockOp.WRITE, 0, 512, [memoryview(buf)]),
                          BlockRequest(BlockOp.WRITE_ZEROES, 0, 512),
                          BlockRequest(BlockOp.DISCARD, 0, 512)]) == [errno.EROFS] * 3
    finally:
        b.close()
    assert image.read_bytes() == before


def test_cache_none_uses_o_direct_and_falls_back_for_misaligned_buffers(image):
    b = RawBackend(str(image), cache="none")
    b.open()
    try:
        if b.direct_fd < 0:
            pytest.skip(f"the file system of {image.parent} does not support O_DIRECT")
        assert _fd_flags(b.direct_fd) & os.O_DIRECT
        assert not _fd_flags(b.fd) & os.O_DIRECT
        import mmap
        page = mmap.mmap(-1, 4 * 4096)          # page-aligned, as guest RAM
        aligned = memoryview(page)[4096:8192]
        aligned[:] = os.urandom(4096)
        assert b.execute([BlockRequest(BlockOp.WRITE, 8192, 4096, [aligned])]) == [0]
        assert b.direct_fallbacks == 0
        misaligned = memoryview(page)[8193:12289]
        assert b.execute([BlockRequest(BlockOp.READ, 8192, 4096, [misaligned])]) == [0]
        assert b.direct_fallbacks == 1
        assert bytes(misaligned) == bytes(aligned) == image.read_bytes()[8192:12288]
        del aligned, misaligned
        page.close()
    finally:
        b.close()


# -- locks ----------------------------------------------------------------------------------

def _open(path, read_only=False):
    b = RawBackend(str(path), read_only=read_only)
    b.open()
    return b


def test_a_second_writer_is_refused_until_the_first_closes(image):
    first = _open(image)
    try:
        with pytest.raises(ConfigError, match=r"in use by another process \(QEMU-style lock on byte 201"):
            _open(image)
        with pytest.raises(ConfigError, match=r"in use by another process \(QEMU-style lock on byte 101"):
            _open(image, read_only=True)
    finally:
        first.close()
    _open(image).close()


def test_read_only_opens_coexist_and_keep_writers_out(image):
    a, b = _open(image, True), _open(image, True)
    try:
        with pytest.raises(ConfigError, match="byte 201: another user does not share write access"):
            _open(image)
    finally:
        a.close()
        b.close()


def test_a_write_lock_by_a_third_party_is_refused(image):
    import fcntl
    fd = os.open(image, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock_mod._FLOCK.pack(fcntl.F_WRLCK, 0, 100, 1, 0))
        with pytest.raises(ConfigError, match="a write lock on byte 100, the consistent read byte"):
            _open(image, True)
    finally:
        os.close(fd)


QEMU_IO = shutil.which("qemu-io")
QSD = shutil.which("qemu-storage-daemon")


@pytest.mark.skipif(QEMU_IO is None, reason="qemu-io is not installed (Debian package qemu-utils)")
@pytest.mark.parametrize("read_only", [False, True])
def test_qemu_refuses_to_write_an_image_pyvmm_uses(image, read_only):
    b = _open(image, read_only)
    try:
        r = subprocess.run([QEMU_IO, "-f", "raw", "-c", "write 0 512", str(image)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, r
    finally:
        b.close()
    r = subprocess.run([QEMU_IO, "-f", "raw", "-c", "read 0 512", str(image)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r


@pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon is not installed (Debian package "
                    "qemu-system-common)")
def test_pyvmm_refuses_an_image_qemu_storage_daemon_exports(image, tmp_path):
    pidfile = tmp_path / "qsd.pid"
    r = subprocess.run([QSD, "--daemonize", "--pidfile", str(pidfile),
                        "--blockdev", f"driver=file,node-name=f,filename={image}",
                        "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
                        "--export", "type=nbd,id=e,node-name=f,writable=on"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r             # --daemonize: returns once the export exists
    pid = int(pidfile.read_text())
    try:
        for read_only in (False, True):
            with pytest.raises(ConfigError, match="byte 101: another user has write access"):
                _open(image, read_only)
    finally:
        os.kill(pid, 15)


# -- open_backend ---------------------------------------------------------------------------

def test_open_backend_serves_raw_images(image):
    b = open_backend(DiskConfig(str(image), read_only=True))
    try:
        assert isinstance(b, RawBackend) and b.fd >= 0 and b.read_only and b.size == 4 * MiB
    finally:
        b.close()


QEMU_IMG = shutil.which("qemu-img")


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vdi", "vpc", "qed"])
def test_other_formats_are_told_from_raw_by_their_magic(tmp_path, fmt):
    """(open_backend hands them to the storage daemon: tests/unit/test_blk_open.py)"""
    path = tmp_path / f"disk.{fmt}"
    if QEMU_IMG is None:
        pytest.skip("qemu-img is not installed (Debian package qemu-utils)")
    subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, str(path), "1M"], check=True, timeout=60)
    assert detect_format(str(path)) == fmt


def test_missing_image_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        open_backend(DiskConfig(str(tmp_path / "nope.img")))


def test_a_fifo_or_directory_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(ConfigError, match="not a regular file or block device"):
            open_backend(DiskConfig(str(path)))
