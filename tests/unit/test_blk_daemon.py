"""QEMU's storage daemon behind pyvmm's disks (pyvmm.blk.daemon), with the real qemu-img
and qemu-storage-daemon: formats, backing chains, the daemon's life, locking, and data
written through NBD."""

from __future__ import annotations

import errno
import hashlib
import os
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

from pyvmm.blk.backend import BlockOp, BlockRequest
from pyvmm.blk.daemon import QemuImageBackend, StorageDaemon, image_chain, image_format
from pyvmm.blk.nbd import NbdTransmissionFlag
from pyvmm.errors import ConfigError

MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-img") and shutil.which("qemu-storage-daemon")),
    reason="needs qemu-img (Debian qemu-utils) and qemu-storage-daemon (qemu-system-common, "
           "brought by qemu-system-x86): make deps installs them")


@pytest.fixture(autouse=True)
def private_tmp(tmp_path, monkeypatch):
    """The daemons' private directories go under this test's tmp_path, so that what is
    left of them is this test's alone to see."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def write(offset: int, data: bytes) -> BlockRequest:
    return BlockRequest(BlockOp.WRITE, offset, len(data), [memoryview(bytearray(data))])


def read(backend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    assert backend.execute([BlockRequest(BlockOp.READ, offset, length, [memoryview(buf)])]) == [0]
    return bytes(buf)


def opened(path, **kw) -> QemuImageBackend:
    backend = QemuImageBackend(path, **kw)
    backend.open()
    return backend


def test_image_format_names_what_qemu_img_sees(tmp_path):
    for fmt in ("raw", "qcow2", "vmdk", "vhdx"):
        qemu_img("create", "-f", fmt, str(tmp_path / f"d.{fmt}"), "1M")
        assert image_format(tmp_path / f"d.{fmt}") == fmt


def test_a_backing_chain_that_cannot_be_opened_is_refused_with_qemu_imgs_message(tmp_path):
    qemu_img("create", "-u", "-f", "qcow2", "-b", "gone.img", "-F", "raw",
             str(tmp_path / "top.qcow2"), "1M")
    with pytest.raises(ConfigError, match=r"top.qcow2 cannot be opened: .*gone.img.*No such file"):
        image_format(tmp_path / "top.qcow2")
    with pytest.raises(ConfigError, match="does not exist"):
        image_format(tmp_path / "nothing.qcow2")


def test_qcow2_write_flush_read_discard_and_zeroes_and_the_data_stays(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "64M")
    backend = opened(image)
    assert (backend.fmt, backend.size, backend.read_only) == ("qcow2", 64 * MiB, False)
    assert backend.supports_discard and backend.supports_write_zeroes
    pattern = os.urandom(3 * MiB)
    assert backend.execute([write(MiB, pattern), BlockRequest(BlockOp.FLUSH)]) == [0, 0]
    assert read(backend, MiB, len(pattern)) == pattern
    assert backend.execute([
        BlockRequest(BlockOp.DISCARD, MiB, 64 * 1024),
        BlockRequest(BlockOp.WRITE_ZEROES, MiB + 64 * 1024, 64 * 1024, unmap=True),
        BlockRequest(BlockOp.WRITE_ZEROES, MiB + 128 * 1024, 4096, unmap=False),
        BlockRequest(BlockOp.FLUSH)]) == [0, 0, 0, 0]
    # a discarded qcow2 cluster with discard=unmap reads back as zeroes
    assert read(backend, MiB, 128 * 1024 + 4096) == bytes(128 * 1024 + 4096)
    assert read(backend, 64 * MiB - 512, 512) == bytes(512)
    # beyond the end: refused before the daemon sees it
    assert backend.execute([BlockRequest(BlockOp.READ, 64 * MiB, 512,
                                         [memoryview(bytearray(512))])]) == [errno.EINVAL]
    backend.close()
    subprocess.run(["qemu-img", "check", str(image)], check=True, capture_output=True)
    again = opened(image)
    assert read(again, MiB + 128 * 1024 + 4096, len(pattern) - 128 * 1024 - 4096) == \
        pattern[128 * 1024 + 4096:]
    again.close()


def test_a_raw_image_through_the_daemon(tmp_path):
    image = tmp_path / "disk.img"
    qemu_img("create", "-f", "raw", str(image), "8M")
    backend = opened(image, fmt="raw")
    assert backend.execute([write(4096, b"pyvmm" * 1000 + bytes(120)),
                            BlockRequest(BlockOp.FLUSH)]) == [0, 0]
    backend.close()
    with open(image, "rb") as f:
        f.seek(4096)
        assert f.read(5000) == b"pyvmm" * 1000


def test_a_qcow2_overlay_writes_to_itself_and_leaves_its_raw_base_untouched(tmp_path):
    base, overlay = tmp_path / "base.img", tmp_path / "overlay.qcow2"
    with open(base, "wb") as f:
        f.write(b"base" * (4 * MiB // 4))
    before = digest(base)
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    assert [entry["format"] for entry in image_chain(overlay)] == ["qcow2", "raw"]
    backend = opened(overlay)
    assert backend.size == 4 * MiB
    assert backend.execute([write(MiB, b"over" * 1024),
                            BlockRequest(BlockOp.DISCARD, 2 * MiB, 65536),
                            BlockRequest(BlockOp.FLUSH)]) == [0, 0, 0]
    assert read(backend, MiB - 512, 5120) == b"base" * 128 + b"over" * 1024 + b"base" * 128
    backend.close()
    assert digest(base) == before


def test_an_image_in_use_is_refused_with_a_clear_message(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "1M")
    first = opened(image)
    try:
        for read_only in (False, True):
            with pytest.raises(ConfigError, match=r"disk.qcow2 is in use by another process "
                                                  r"\(qemu-storage-daemon: "
                                                  r".*Failed to get (shared )?\"write\" lock"):
                opened(image, read_only=read_only)
    finally:
        first.close()
    opened(image).close()                        # free again once the first is closed


def test_a_read_only_disk_is_exported_read_only(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "1M")
    before = digest(image)
    backend = opened(image, read_only=True)
    assert not (backend.supports_discard or backend.supports_write_zeroes)
    assert backend.nbd.export.has(NbdTransmissionFlag.NBD_FLAG_READ_ONLY)
    assert backend.execute([write(0, bytes(512))]) == [errno.EROFS]
    second = opened(image, read_only=True)       # readers share
    second.close()
    backend.close()
    assert digest(image) == before


def test_the_daemon_ends_with_the_backend_and_leaves_nothing(tmp_path, private_tmp):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "1M")
    backend = opened(image)
    daemon = backend.daemon
    process, directory = daemon.process, daemon.directory
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(daemon.socket_path).st_mode)
    assert os.path.dirname(daemon.socket_path) == directory
    backend.close()
    backend.close()                              # idempotent
    assert process.returncode == 0               # SIGTERM: a clean exit, images closed
    assert not os.path.exists(directory)
    assert os.listdir(private_tmp) == []


def test_a_daemon_that_cannot_start_is_a_config_error_and_leaves_nothing(tmp_path, private_tmp,
                                                                          monkeypatch):
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "1M")
    with pytest.raises(ConfigError, match=r"disk.qcow2 cannot be opened: .*invalid VMDK"):
        opened(image, fmt="vmdk")
    command = StorageDaemon.command

    def bad_option_before_the_monitor(self, fd):
        argv = command(self, fd)
        at = argv.index("--chardev")
        return argv[:at] + ["--blockdev", "driver=no-such-driver,node-name=x"] + argv[at:]
    monkeypatch.setattr(StorageDaemon, "command", bad_option_before_the_monitor)
    with pytest.raises(ConfigError, match=r"qemu-storage-daemon cannot serve .*disk.qcow2 as "
                                          r"qcow2: .*'driver' does not accept value "
                                          r"'no-such-driver'"):
        opened(image)
    with pytest.raises(ConfigError, match="not an image format name"):
        StorageDaemon(image, "qcow2,file.filename=/etc/passwd", False)
    assert os.listdir(private_tmp) == []


def test_the_daemon_dies_with_pyvmm(tmp_path):
    """SIGKILL the process that started the daemon: PR_SET_PDEATHSIG takes the daemon too."""
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "1M")
    script = textwrap.dedent(f"""
        import sys
        from pyvmm.blk.daemon import StorageDaemon
        daemon = StorageDaemon({str(image)!r}, "qcow2", False)
        daemon.start()
        print(daemon.process.pid, daemon.directory, flush=True)
        sys.stdin.read()
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        pid, directory = parent.stdout.readline().split()
        daemon = os.pidfd_open(int(pid))
        parent.kill()
        parent.wait()
        ready, _, _ = select.select([daemon], [], [], 30)   # readable when the daemon exits
        os.close(daemon)
        assert ready, "the daemon outlived the process that started it"
        shutil.rmtree(directory)                 # nobody was left to remove it
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_the_base_under_an_overlay_cannot_be_written_by_anyone_else(tmp_path):
    """The daemon's NBD export shares every permission, so QEMU would let another process
    write the overlay's base; pyvmm holds QEMU's locks on the base for the daemon's life."""
    base, overlay = tmp_path / "base.img", tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "raw", str(base), "1M")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    backend = opened(overlay)
    try:
        with pytest.raises(ConfigError, match=r"base.img is in use by another process .*"
                                              r"Failed to get \"write\" lock"):
            opened(base, fmt="raw").close()
        reader = opened(base, fmt="raw", read_only=True)     # reading it is fine
        reader.close()
    finally:
        backend.close()
    opened(base, fmt="raw").close()              # free once the overlay is closed


def test_a_base_someone_is_writing_is_refused(tmp_path):
    base, overlay = tmp_path / "base.img", tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "raw", str(base), "1M")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    writer = StorageDaemon(base, "raw", False)
    writer.start()
    try:
        with pytest.raises(ConfigError, match=r"base.img is in use by another process "
                                              r"\(QEMU-style lock on byte 101: another user has "
                                              r"write access\)"):
            opened(overlay)
    finally:
        writer.stop()
    opened(overlay).close()


KILLED_AFTER = textwrap.dedent("""
    import sys
    from pyvmm.blk.backend import BlockOp, BlockRequest
    from pyvmm.blk.daemon import QemuImageBackend
    backend = QemuImageBackend(sys.argv[1])
    backend.open()
    pattern = bytes(range(256)) * 4096                      # 1 MiB
    batch = [BlockRequest(BlockOp.WRITE, 3 << 20, len(pattern), [memoryview(pattern)])]
    if sys.argv[2] == "flush":
        batch.append(BlockRequest(BlockOp.FLUSH))
    assert backend.execute(batch) == [0] * len(batch)
    print(backend.daemon.process.pid, backend.daemon.directory, flush=True)
    sys.stdin.read()
""")


def run_and_sigkill(image, mode: str) -> None:
    """Write 1 MiB through a pyvmm process (and flush it if ``mode`` says so), SIGKILL that
    process, and wait until its daemon is gone too."""
    parent = subprocess.Popen([sys.executable, "-c", KILLED_AFTER, str(image), mode],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid, directory = parent.stdout.readline().split()
        daemon = os.pidfd_open(int(pid))
        parent.kill()
        parent.wait()
        ready, _, _ = select.select([daemon], [], [], 30)
        os.close(daemon)
        assert ready, "the daemon outlived pyvmm"
        shutil.rmtree(directory)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_what_was_flushed_survives_sigkill_of_pyvmm_and_its_daemon(tmp_path):
    """qcow2 keeps new cluster mappings in the daemon's memory until a flush: the flush
    must reach the image (NBD_CMD_FLUSH -> the qcow2 driver -> fdatasync) before it is
    answered, so what the guest flushed is there after both processes are SIGKILLed."""
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(image), "8M")
    run_and_sigkill(image, "flush")
    subprocess.run(["qemu-img", "check", str(image)], check=True, capture_output=True)
    backend = opened(image)
    assert read(backend, 3 * MiB, MiB) == bytes(range(256)) * 4096
    backend.close()


def test_a_daemon_that_ignores_sigterm_is_killed_after_the_bound(tmp_path, monkeypatch):
    import pyvmm.blk.daemon as daemon_module
    monkeypatch.setattr(daemon_module, "DAEMON_STOP_TIMEOUT", 0.2)
    daemon = StorageDaemon(tmp_path / "disk.qcow2", "qcow2", False)
    daemon.process = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                               " print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    process = daemon.process
    assert process.stdout.readline() == "ready\n"          # SIGTERM is ignored from here on
    daemon.stop()
    assert process.returncode == -9                          # SIGKILL after the 0.2 s
    process.stdin.close()
    process.stdout.close()


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vpc", "qed"])
def test_every_format_round_trips_and_keeps_its_data(tmp_path, fmt):
    image = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-f", fmt, str(image), "8M")
    backend = opened(image)
    assert backend.fmt == fmt and backend.size >= 8 * MiB
    data = bytes(range(256)) * 256                           # 64 KiB
    assert backend.execute([write(2 * MiB, data), BlockRequest(BlockOp.FLUSH)]) == [0, 0]
    backend.close()
    again = opened(image)
    assert read(again, 2 * MiB, len(data)) == data
    again.close()
