"""QEMU's storage daemon as the engine behind every image format that is not raw.

This module owns the life of one ``qemu-storage-daemon`` per disk: which format an image is
(:func:`image_format`, from ``qemu-img info``), starting the daemon on it with an NBD export
on a private Unix socket (:class:`StorageDaemon`), knowing when it is ready, turning its
refusals into clear :class:`~pyvmm.errors.ConfigError` messages, and stopping it.
:class:`QemuImageBackend` puts the daemon and an :class:`~pyvmm.blk.nbd.NbdBackend`
together into one :class:`~pyvmm.blk.backend.BlockBackend`.  qcow2, vmdk, vhdx, ... are
then read and written by QEMU's own block layer rather than by a reader of our own.

The daemon, for ``disk.qcow2`` read-write::

    qemu-storage-daemon
      --blockdev driver=file,filename=/abs/disk.qcow2,node-name=file0,discard=unmap
      --blockdev driver=qcow2,file=file0,node-name=disk0,discard=unmap
      --nbd-server addr.type=unix,addr.path=<private dir>/nbd.sock
      --export type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on
      --chardev socket,id=qmp0,fd=<listening socket>,server=on,wait=off
      --monitor chardev=qmp0

* **Private directory**: ``tempfile.mkdtemp`` (mode 0700) holds ``nbd.sock``, ``qmp.sock``
  and the daemon's stderr; removed when the daemon stops.
* **Readiness, without polling**: pyvmm binds the QMP socket itself and passes the
  listening descriptor (the man page's "file descriptor passing so there is no need to busy
  wait"), connects to it at once (the connection waits in the backlog) and reads QMP's
  greeting.  The daemon sets itself up option by option, in order, and the monitor comes
  *last*: it exists, and can greet, only once the image is open, the NBD server listens
  and the export is there.  "Last" matters: seen, a greeting arrived before an option
  placed after the monitor failed (QMP monitors do their I/O on a thread of their own, so
  the greeting does not wait for the options that follow; the man page's promise of
  "started" is about --pidfile).  If the daemon fails, it exits, the only listening
  descriptor goes with it and the read ends at once; its stderr says why.
* **Locking**: QEMU's defaults (``locking=auto``: OFD locks on the image).  A format driver
  (qcow2, vmdk, ...) takes the WRITE permission on its file and shares it with nobody, so an
  image a QEMU, another qemu-storage-daemon or another pyvmm is using is refused
  (``Failed to get "write" lock``), and turned into "in use by another process".  A raw
  image through the daemon is not protected that way (an NBD export shares every
  permission), which is one reason raw images use pyvmm's own raw backend instead.
  The same sharing reaches the backing files: the daemon opens them read-only but lets
  others write them (a backing file's parent shares WRITE, so QEMU lets its backing be
  written).  So pyvmm itself holds QEMU's locks on every backing file of the chain for the
  daemon's life (:func:`pyvmm.blk.lock.hold_locks`: "I read it consistently, nobody may write or
  resize it"), and refuses to start when someone is writing one: a base under an overlay
  stays untouched.
* **Flushes and cache**: ``cache.no-flush`` stays off and ``cache.direct`` at its default
  (off) for ``cache="writeback"``: data goes through the host's page cache and
  NBD_CMD_FLUSH reaches the qcow2 driver's flush (its metadata caches) and then
  ``fdatasync`` on the image file (file-posix ``handle_aiocb_flush``).  ``cache="none"``
  (``--disk ...,cache=none``) puts ``cache.direct=on`` on both nodes, so the image file is
  opened ``O_DIRECT`` and its backing files too (QEMU's backing files inherit
  ``cache.direct`` from their parent: ``bdrv_backing_options``); QEMU aligns the requests
  itself.  As with raw images, a file system without O_DIRECT makes ``cache=none`` act as
  ``writeback``, with a logged note.  ``discard=unmap`` lets TRIM and WRITE_ZEROES without
  NBD_CMD_FLAG_NO_HOLE deallocate (the default, ``ignore``, would drop every discard).
* **Stopping**: SIGTERM (the daemon flushes and closes its images), at most
  :data:`DAEMON_STOP_TIMEOUT` seconds, then SIGKILL.  The daemon also dies with pyvmm:
  ``PR_SET_PDEATHSIG`` (SIGKILL) is set in the child before exec.  Linux sends it when the
  *thread* that started the daemon ends, so start it on the machine's main thread (the
  backend's ``open()`` runs there).

Trust: the image path and its format come from the user, who is trusted (SECURITY.md);
the daemon is QEMU, trusted as the host's software is, but what it says over NBD is still
checked (:mod:`pyvmm.blk.nbd`).  Format probing of an image a guest can write is the
classic QEMU hazard (a raw image whose guest wrote a qcow2 header with a backing file);
:func:`image_format` reports what the file looks like *now*: callers that know the format
should pass it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from .backend import BlockRequest
from .lock import disk_perms, hold_locks, in_use
from .nbd import NbdBackend

__all__ = ["DAEMON_START_TIMEOUT", "DAEMON_STOP_TIMEOUT", "EXPORT_NAME", "QEMU_IMG_TIMEOUT",
           "QemuImageBackend", "StorageDaemon", "image_chain", "image_format"]

logger = logging.getLogger("pyvmm.blk")

#: seconds qemu-img info may take
QEMU_IMG_TIMEOUT = 30.0
#: seconds from starting the daemon to its QMP greeting (it has opened the image by then)
DAEMON_START_TIMEOUT = 30.0
#: seconds the daemon has to exit after SIGTERM before it gets SIGKILL
DAEMON_STOP_TIMEOUT = 5.0
#: the name of the daemon's one NBD export
EXPORT_NAME = "disk0"
#: the most of the daemon's stderr quoted in an error message
_STDERR_QUOTE = 2000
#: a format name as QEMU spells its block drivers (goes into a --blockdev option unescaped)
_FORMAT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
PR_SET_PDEATHSIG = 1                     # <linux/prctl.h>


def _tool(name: str) -> str:
    """The path of a QEMU program, or a ConfigError naming its Debian package."""
    path = shutil.which(name)
    if path is None:
        package = {"qemu-img": "qemu-utils", "qemu-storage-daemon": "qemu-system-common"}[name]
        raise ConfigError(f"{name} is not installed (Debian package {package}; make deps "
                          f"installs it): pyvmm needs it for disk images that are not raw")
    return path


def image_chain(path: str | os.PathLike, fmt: str | None = None) -> list[dict]:
    """``qemu-img info --output=json --backing-chain`` of ``path``: the image first, then
    its backing files.  ``fmt``: the image's format if known (then it is not probed).  A
    chain QEMU cannot open (a missing or unreadable backing file) is a ConfigError with
    qemu-img's message.  ``-U`` (force share): an image in use is reported here and refused
    by the daemon, with one message, in one place."""
    path = os.path.abspath(path)                # an absolute path: never read as "proto:..."
    if not os.path.exists(path):
        raise ConfigError(f"disk image {path} does not exist")
    if fmt is not None and not _FORMAT_NAME.match(fmt):
        raise ConfigError(f"{fmt!r} is not an image format name")
    command = [_tool("qemu-img"), "info", "--output=json", "--backing-chain", "-U", path]
    if fmt is not None:
        command[2:2] = ["-f", fmt]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"qemu-img info {path} took more than {QEMU_IMG_TIMEOUT:g} s") from None
    if done.returncode != 0:
        message = " ".join(done.stderr.split())[:_STDERR_QUOTE] or f"exit {done.returncode}"
        raise ConfigError(f"disk image {path} cannot be opened: {message}")
    info = json.loads(done.stdout)
    return info if isinstance(info, list) else [info]


def image_format(path: str | os.PathLike) -> str:
    """The format of the image at ``path`` ("raw", "qcow2", "vmdk", ...), after checking
    that its whole backing chain opens (:func:`image_chain`)."""
    return image_chain(path)[0]["format"]


def _opt(value: str) -> str:
    """A value inside a QEMU option string: commas are doubled."""
    return value.replace(",", ",,")


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it


def _die_with_parent() -> None:
    """In the daemon's process before exec: SIGKILL it when pyvmm('s starting thread) dies."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _has_direct_io(path: str) -> bool:
    """Can ``path`` be opened O_DIRECT?  False (logged) where its file system says EINVAL."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise ConfigError(f"disk {path}: cannot open with O_DIRECT: {e.strerror}") from None
        logger.info("disk %s: the file system does not support O_DIRECT; cache=none acts as "
                    "cache=writeback", path)
        return False
    return True


class StorageDaemon:
    """One ``qemu-storage-daemon`` exporting ``path`` (format ``fmt``) over NBD as
    :data:`EXPORT_NAME` on :attr:`socket_path` (module docstring).  A context manager;
    :meth:`start` returns once the export is ready or raises ConfigError; :meth:`stop` is
    idempotent and safe after a failed start."""

    def __init__(self, path: str | os.PathLike, fmt: str, read_only: bool,
                 cache: str = "writeback") -> None:
        if not _FORMAT_NAME.match(fmt):
            raise ConfigError(f"{fmt!r} is not an image format name")
        if cache not in ("writeback", "none"):
            raise ConfigError(f"disk {path}: cache={cache!r}: expected writeback or none")
        self.path = os.path.abspath(path)
        self.fmt = fmt
        self.read_only = read_only
        self.cache = cache
        #: cache.direct=on (cache="none" where the file system has O_DIRECT)
        self.direct = False
        self.directory: str | None = None
        self.socket_path: str | None = None
        self.process: subprocess.Popen | None = None
        self._backing_locks: list[int] = []

    def __enter__(self) -> "StorageDaemon":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def command(self, qmp_fd: int) -> list[str]:
        ro = ",read-only=on" if self.read_only else ",discard=unmap"
        if self.direct:
            ro += ",cache.direct=on"
        return [_tool("qemu-storage-daemon"),
                "--blockdev", f"driver=file,filename={_opt(self.path)},node-name=file0{ro}",
                "--blockdev", f"driver={self.fmt},file=file0,node-name=disk0{ro}",
                "--nbd-server", f"addr.type=unix,addr.path={_opt(self.socket_path)}",
                "--export", f"type=nbd,id=exp0,node-name=disk0,name={EXPORT_NAME},"
                            f"writable={'off' if self.read_only else 'on'}",
                # last: the greeting on this monitor means everything above is set up
                "--chardev", f"socket,id=qmp0,fd={qmp_fd},server=on,wait=off",
                "--monitor", "chardev=qmp0"]

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        chain = [] if self.fmt == "raw" else image_chain(self.path, self.fmt)
        for backing in chain[1:]:
            self._backing_locks.append(hold_locks(backing["filename"], *disk_perms(read_only=True)))
        self.direct = self.cache == "none" and _has_direct_io(self.path)
        self.directory = tempfile.mkdtemp(prefix="pyvmm-qsd-")       # mode 0700
        self.socket_path = os.path.join(self.directory, "nbd.sock")
        qmp_path = os.path.join(self.directory, "qmp.sock")
        stderr_path = os.path.join(self.directory, "stderr")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, \
                open(stderr_path, "wb") as stderr:
            listener.bind(qmp_path)
            listener.listen(1)
            self.process = subprocess.Popen(
                self.command(listener.fileno()), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=stderr, pass_fds=[listener.fileno()],
                start_new_session=True, preexec_fn=_die_with_parent)
        # from here on only the daemon holds the listening socket
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        greeting = b""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qmp:
            try:
                qmp.settimeout(DAEMON_START_TIMEOUT)
                qmp.connect(qmp_path)
                while b"\n" not in greeting and len(greeting) < 65536:
                    qmp.settimeout(max(0.001, deadline - time.monotonic()))
                    chunk = qmp.recv(4096)
                    if not chunk:
                        break
                    greeting += chunk
            except socket.timeout:
                raise ConfigError(f"qemu-storage-daemon did not start on {self.path} within "
                                  f"{DAEMON_START_TIMEOUT:g} s") from None
            except OSError:
                pass                            # refused or reset: the daemon has exited
        if b'"QMP"' not in greeting:
            raise self._failure()

    def _failure(self) -> ConfigError:
        """The daemon exited during its start: its message, made clear."""
        try:
            self.process.wait(timeout=DAEMON_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        text = Path(self.directory, "stderr").read_bytes().decode("utf-8", "replace")
        message = " ".join(text.split())[:_STDERR_QUOTE] or f"exit {self.process.returncode}"
        if re.search(r'Failed to get (shared )?"\w+" lock', text):
            return in_use(self.path, f"qemu-storage-daemon: {message}")
        return ConfigError(f"qemu-storage-daemon cannot serve {self.path} as {self.fmt}: "
                           f"{message}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=DAEMON_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        directory, self.directory = self.directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        locks, self._backing_locks = self._backing_locks, []
        for fd in locks:
            os.close(fd)


class QemuImageBackend:
    """A :class:`~pyvmm.blk.backend.BlockBackend` for an image of any format QEMU reads:
    a :class:`StorageDaemon` on it and an :class:`~pyvmm.blk.nbd.NbdBackend` to the daemon.
    ``fmt`` None: ask :func:`image_format`.  Raw images work too, but belong to pyvmm's raw
    backend (faster, and locked against other writers, which the daemon's export is not).
    ``cache``: "writeback" or "none" (``cache.direct=on``; :class:`StorageDaemon`).  The
    server's mistakes are counted in ``nbd.errors``.  :meth:`open` starts the daemon: call it
    on a thread that outlives the backend (the machine's main thread), since the daemon gets
    SIGKILL when that thread ends (``PR_SET_PDEATHSIG``)."""

    def __init__(self, path: str | os.PathLike, fmt: str | None = None,
                 read_only: bool = False, cache: str = "writeback") -> None:
        self.path = os.path.abspath(path)
        self.fmt = fmt
        self.read_only = read_only
        self.cache = cache
        self.size = 0
        self.supports_discard = False
        self.supports_write_zeroes = False
        self.daemon: StorageDaemon | None = None
        self.nbd: NbdBackend | None = None

    def open(self) -> None:
        try:
            fmt = self.fmt or image_format(self.path)
            self.daemon = StorageDaemon(self.path, fmt, self.read_only, self.cache)
            self.daemon.start()
            self.nbd = NbdBackend(self.daemon.socket_path, EXPORT_NAME, self.read_only)
            self.nbd.open()
        except BaseException:
            self.close()
            raise
        self.fmt = fmt
        self.size = self.nbd.size
        self.supports_discard = self.nbd.supports_discard
        self.supports_write_zeroes = self.nbd.supports_write_zeroes

    def execute(self, batch: Sequence[BlockRequest]) -> list[int]:
        if self.nbd is None:
            return [errno.EIO] * len(batch)
        return self.nbd.execute(batch)

    def close(self) -> None:
        nbd, self.nbd = self.nbd, None
        if nbd is not None:
            nbd.close()
        daemon, self.daemon = self.daemon, None
        if daemon is not None:
            daemon.stop()
