"""A raw image file as a :class:`~pyvmm.blk.backend.BlockBackend`: ``RawBackend``.

This module owns everything pyvmm does to a raw image (or a block device)
on the host: opening it (read-only images are never opened for writing),
locking it as QEMU does, its size, and carrying out the device's batches
with plain system calls on views of guest RAM:

==============  ==========================================================
BlockOp         system call
==============  ==========================================================
READ / WRITE    ``os.preadv`` / ``os.pwritev`` on the guest's buffers (no copy),
                repeated on a short transfer
FLUSH           ``os.fdatasync``
DISCARD         ``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``; where the
                file system cannot punch holes it is a no-op (a discard is advice)
WRITE_ZEROES    ``fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)`` (``unmap``:
                PUNCH_HOLE first), else PUNCH_HOLE, else zeroes written with
                ``pwrite`` in :data:`ZERO_CHUNK` pieces
==============  ==========================================================

(``os.posix_fallocate`` only allocates, so ``fallocate(2)`` is called
through ctypes.)

Size.  The disk is the file's size rounded *down* to whole 512-byte
sectors, as Firecracker does: the guest never sees, reads or writes the
tail of a file whose size is not a multiple of 512 (a warning says so).

``cache``.  ``"writeback"`` (the default) goes through the host page cache;
the guest's FLUSH makes its writes durable.  ``"none"`` opens a second
descriptor with ``O_DIRECT`` (QEMU's ``cache=none``): requests whose file
offset, buffer addresses and lengths are multiples of
:data:`DIRECT_IO_ALIGN` go through it; any other request, and any request
the kernel refuses with EINVAL (a device with larger sectors), takes the
buffered descriptor instead (counted in :attr:`RawBackend.direct_fallbacks`).
A file system without O_DIRECT (tmpfs before Linux 6.6) makes ``cache=none``
act as ``writeback``, with a logged note.  FLUSH is needed in both modes
(O_DIRECT bypasses the page cache, not the disk's cache).

Locking: QEMU's lock bytes on the I/O descriptor (:mod:`pyvmm.blk.lock`), so that pyvmm
and QEMU refuse each other's images in use.  pyvmm takes what a QEMU virtio-blk takes:

=========================  ========================  =====================================
open                       uses (bytes locked)       does not share (bytes locked)
=========================  ========================  =====================================
read-write                 CONSISTENT_READ, WRITE     WRITE, RESIZE
                           (100, 101)                 (201, 203)
read-only                  CONSISTENT_READ (100)      WRITE, RESIZE (201, 203)
=========================  ========================  =====================================

so two read-only users coexist, a writer and anybody else do not.  A refused
open is a :class:`~pyvmm.errors.ConfigError` naming the byte and the permission.
QEMU's read-only tools (``qemu-img info``, ``qemu-io -r``) use only
CONSISTENT_READ and share everything, so they can still read an image pyvmm
holds, as they can one a running QEMU holds.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from typing import Sequence

import numpy as np

from ..errors import ConfigError
from . import PROBE_BYTES, format_of_head
from .backend import BlockOp, BlockRequest
from .lock import disk_perms, in_use, lock_conflict

__all__ = ["DIRECT_IO_ALIGN", "RawBackend", "ZERO_CHUNK"]

logger = logging.getLogger("pyvmm.blk")

#: O_DIRECT: file offset, buffer address and length must be multiples of this (512: the
#: sector; a device that needs more refuses with EINVAL and the request is done buffered)
DIRECT_IO_ALIGN = 512
#: bytes of zeroes one pwrite writes when fallocate cannot zero a range
ZERO_CHUNK = 1 << 20

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: fallocate errnos that mean "not on this file system": try the next way
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# the members the per-request path compares with (an enum class lookup costs ~0.1 us)
_READ, _WRITE, _FLUSH = BlockOp.READ, BlockOp.WRITE, BlockOp.FLUSH


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``; OSError on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _advance(views: Sequence[memoryview], n: int) -> Sequence[memoryview]:
    """``views`` (a list or a tuple) without their first ``n`` bytes."""
    while n:
        first = len(views[0])
        if n >= first:
            views = views[1:]
            n -= first
        else:
            views = [views[0][n:], *views[1:]]
            n = 0
    return views


def _transfer(call, fd: int, views: Sequence[memoryview], offset: int, left: int) -> None:
    """``os.preadv`` / ``os.pwritev`` of the ``left`` bytes of ``views`` (their total) until
    every byte moved (short transfers repeat).  Empty views are harmless to both calls
    and :func:`_advance` drops them; only beyond IOV_MAX views are they left out first, so
    that no call gets only empty ones (its 0 would read as the end of the file)."""
    if len(views) > _IOV_MAX:
        views = [v for v in views if len(v)]
    while left:
        n = call(fd, views[:_IOV_MAX], offset)
        if n == 0:      # the file shrank under us (someone else truncated it)
            raise OSError(errno.EIO, "unexpected end of the image file")
        left -= n
        if left:        # a short transfer (or more than IOV_MAX views): the rest
            offset += n
            views = _advance(views, n)


def _address(view: memoryview) -> int:
    return np.frombuffer(view, np.uint8).ctypes.data


class RawBackend:
    """A raw image file (or block device); see the module docstring."""

    def __init__(self, path: str, read_only: bool = False, cache: str = "writeback",
                 probed: bool = False) -> None:
        if cache not in ("writeback", "none"):
            raise ConfigError(f"disk {path}: cache={cache!r}: expected writeback or none")
        self.path = str(path)
        self.read_only = read_only
        self.cache = cache
        self.size = 0
        self.supports_discard = not read_only
        self.supports_write_zeroes = not read_only
        self.fd = -1
        #: the O_DIRECT descriptor (cache=none), or -1
        self.direct_fd = -1
        #: requests that could not use O_DIRECT and went through the page cache
        self.direct_fallbacks = 0
        self._unsupported_modes: set[int] = set()
        self._zeroes: memoryview | None = None
        #: the format was guessed (no ``format=raw``): writes that would give the image
        #: another format's magic are refused (:meth:`_would_change_format`)
        self.probed = probed
        #: such writes refused
        self.format_writes_refused = 0

    def _flags(self) -> int:
        """O_RDONLY for a read-only disk: its file is never opened for writing."""
        return (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC

    def open(self) -> None:
        what = f"disk {self.path}"
        try:
            self.fd = os.open(self.path, self._flags())
        except OSError as e:
            raise ConfigError(f"{what}: cannot open {'read-only' if self.read_only else 'read-write'}"
                              f": {e.strerror}") from None
        try:
            self._acquire(what)
        except OSError as e:
            self.close()
            raise ConfigError(f"{what}: {e.strerror}") from None
        except BaseException:
            self.close()
            raise

    def _acquire(self, what: str) -> None:
        """Check, lock and measure the open image; open the O_DIRECT descriptor."""
        st = os.fstat(self.fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ConfigError(f"{what}: not a regular file or block device")
        conflict = lock_conflict(self.fd, *disk_perms(self.read_only))
        if conflict is not None:
            raise in_use(self.path, conflict)
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if size % 512:
            logger.warning("%s: size %d is not a multiple of 512; the last %d bytes are not "
                           "part of the disk", what, size, size % 512)
        self.size = size - size % 512
        if self.cache == "none":
            try:
                self.direct_fd = os.open(self.path, self._flags() | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise ConfigError(f"{what}: cannot open with O_DIRECT: {e.strerror}") from None
                logger.info("%s: the file system does not support O_DIRECT; cache=none acts as "
                            "cache=writeback", what)

    def close(self) -> None:
        for name in ("direct_fd", "fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    # -- the batch -------------------------------------------------------------------------
    def execute(self, batch: Sequence[BlockRequest]) -> list[int]:
        out = []
        for req in batch:
            try:
                self._one(req)
                out.append(0)
            except OSError as e:
                out.append(e.errno or errno.EIO)
        return out

    def _one(self, req: BlockRequest) -> None:
        op = req.op
        if op is _FLUSH:
            os.fdatasync(self.fd)
            return
        # the device checked the range; a backend checks again before touching the file
        if req.offset < 0 or req.length < 0 or req.offset + req.length > self.size:
            raise OSError(errno.EINVAL, "request outside the disk")
        if op is _READ or op is _WRITE:
            if sum(map(len, req.buffers)) != req.length:
                raise OSError(errno.EINVAL, "buffers do not add up to the request length")
            if op is _WRITE and self.read_only:
                raise OSError(errno.EROFS, "read-only disk")
            if op is _WRITE and self.probed and req.offset < PROBE_BYTES \
                    and self._would_change_format(req):
                self.format_writes_refused += 1
                if self.format_writes_refused == 1:
                    logger.warning("disk %s: the guest wrote another image format's magic into "
                                   "the start of a raw image whose format was probed; refused "
                                   "(give format=raw to allow it)", self.path)
                raise OSError(errno.EPERM, "write of an image format's magic to a probed raw image")
            call = os.preadv if op is _READ else os.pwritev
            if self.direct_fd >= 0:
                if self._aligned(req):
                    try:
                        _transfer(call, self.direct_fd, req.buffers, req.offset, req.length)
                        return
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                self.direct_fallbacks += 1
            _transfer(call, self.fd, req.buffers, req.offset, req.length)
            return
        if self.read_only:
            raise OSError(errno.EROFS, "read-only disk")
        if op is BlockOp.DISCARD:
            self._fallocate_first((FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,), req)
            return                      # not supported: a discard is only advice
        if op is BlockOp.WRITE_ZEROES:
            modes = (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            if req.unmap:
                modes = modes[::-1]
            if not self._fallocate_first(modes, req):
                self._write_zeroes(req.offset, req.length)
            return
        raise OSError(errno.EOPNOTSUPP, f"unknown operation {op}")

    def _would_change_format(self, req: BlockRequest) -> bool:
        """Would the image's first :data:`PROBE_BYTES` look like another format after ``req``?"""
        head = bytearray(os.pread(self.fd, PROBE_BYTES, 0).ljust(PROBE_BYTES, b"\0"))
        pos = req.offset
        for view in req.buffers:
            if pos >= PROBE_BYTES:
                break
            n = min(len(view), PROBE_BYTES - pos)
            head[pos:pos + n] = view[:n]
            pos += len(view)
        return format_of_head(bytes(head)) != "raw"

    @staticmethod
    def _aligned(req: BlockRequest) -> bool:
        a = DIRECT_IO_ALIGN
        return req.offset % a == 0 and all(len(v) % a == 0 and _address(v) % a == 0
                                           for v in req.buffers if len(v))

    def _fallocate_first(self, modes: Sequence[int], req: BlockRequest) -> bool:
        """The first of ``modes`` this file system does; False if none does."""
        for mode in modes:
            if mode in self._unsupported_modes:
                continue
            try:
                fallocate(self.fd, mode, req.offset, req.length)
                return True
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self._unsupported_modes.add(mode)
                logger.info("disk %s: fallocate mode %#x is not supported here (%s)", self.path,
                            mode, e.strerror)
        return False

    def _write_zeroes(self, offset: int, length: int) -> None:
        if self._zeroes is None:
            self._zeroes = memoryview(bytes(ZERO_CHUNK))
        while length:
            n = min(length, ZERO_CHUNK)
            _transfer(os.pwritev, self.fd, [self._zeroes[:n]], offset, n)
            offset += n
            length -= n
