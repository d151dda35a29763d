"""QEMU's image locks, taken by pyvmm so that pyvmm and QEMU refuse each other's images in use.

This module owns the lock bytes and nothing else: which bytes a user of an image locks, how a
conflict is found, and the one message that names it.  It is QEMU's ``block/file-posix.c``
(``raw_apply_lock_bytes``, ``raw_check_lock_bytes``), so that pyvmm and QEMU
(``qemu-system-*``, ``qemu-img``, ``qemu-io``, ``qemu-storage-daemon``) see each other.

The locks are open-file-description locks (``F_OFD_SETLK``, shared ``F_RDLCK``, one byte
each), held by the descriptor until it is closed.  For each permission bit ``i``
(:class:`BlkPerm`, QEMU's ``include/block/block-common.h``)::

    byte RAW_LOCK_PERM_BASE + i    (100 + i)  locked: "I use permission i"
    byte RAW_LOCK_SHARED_BASE + i  (200 + i)  locked: "I do not let others use permission i"

An opener first takes its own locks (all "use" bytes, then all "do not share" bytes, as QEMU
does), then checks (``F_OFD_GETLK`` for a write lock: does another open file hold a lock
there?) byte 200 + i for every permission it uses and byte 100 + i for every one it does not
share.  Taking before checking means two openers starting at once cannot both win.  A shared
lock can only fail to be taken if somebody holds a *write* lock on the byte (not QEMU: it
takes none); that is a conflict too.  An OFD lock has no owner pid, so a conflict names the
byte and the permission, not the process.

Users: :class:`~pyvmm.blk.raw.RawBackend` locks its I/O descriptor
(:func:`lock_conflict`); :mod:`pyvmm.blk.daemon` holds locks on every backing file under an
image the storage daemon serves (:func:`hold_locks`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from enum import IntFlag

from ..errors import ConfigError

__all__ = ["BlkPerm", "NOT_SHARED", "PERM_NAMES", "RAW_LOCK_PERM_BASE", "RAW_LOCK_SHARED_BASE",
           "disk_perms", "hold_locks", "in_use", "lock_conflict"]

#: QEMU block/file-posix.c: "Libvirt takes byte 0, we start from higher bytes"
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200
#: struct flock (x86-64): short l_type, l_whence; off_t l_start, l_len; pid_t l_pid
_FLOCK = struct.Struct("hhqqi4x")


class BlkPerm(IntFlag):
    """QEMU's block permissions (include/block/block-common.h), bit ``i`` <-> lock byte 100/200 + i."""
    BLK_PERM_CONSISTENT_READ = 0x01
    BLK_PERM_WRITE = 0x02
    BLK_PERM_WRITE_UNCHANGED = 0x04
    BLK_PERM_RESIZE = 0x08


#: the permissions' names as QEMU's messages spell them (bdrv_perm_names)
PERM_NAMES = {BlkPerm.BLK_PERM_CONSISTENT_READ: "consistent read", BlkPerm.BLK_PERM_WRITE: "write",
              BlkPerm.BLK_PERM_WRITE_UNCHANGED: "write unchanged", BlkPerm.BLK_PERM_RESIZE: "resize"}


#: what a pyvmm disk does not let others do while it is open (what a QEMU virtio-blk unshares)
NOT_SHARED = BlkPerm.BLK_PERM_WRITE | BlkPerm.BLK_PERM_RESIZE


def disk_perms(read_only: bool) -> tuple[BlkPerm, BlkPerm]:
    """(permissions used, permissions not shared) of a pyvmm disk, or of a backing file
    (``read_only``) under one: it reads consistently, writes unless read-only, and lets
    nobody else write or resize the file meanwhile."""
    used = BlkPerm.BLK_PERM_CONSISTENT_READ
    if not read_only:
        used |= BlkPerm.BLK_PERM_WRITE
    return used, NOT_SHARED


def _bit(perm: BlkPerm) -> int:
    return perm.bit_length() - 1


def _lock_byte(fd: int, byte: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, byte, 1, 0))


def _locked_by_others(fd: int, byte: int) -> bool:
    """Would a write lock on ``byte`` conflict with a lock of another open file
    (``qemu_lock_fd_test``)?"""
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
    return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK


def lock_conflict(fd: int, used: BlkPerm, not_shared: BlkPerm) -> str | None:
    """Take QEMU's locks on ``fd`` for a user of the permissions ``used`` that shares none
    of ``not_shared``, then check others'.  None if nobody conflicts, else the conflict
    (the byte and the permission).  The locks taken stay with ``fd`` either way (close it
    to drop them).  OSError for anything but a conflict."""
    for base, perms in ((RAW_LOCK_PERM_BASE, used), (RAW_LOCK_SHARED_BASE, not_shared)):
        for perm in BlkPerm:
            if perm & perms:
                byte = base + _bit(perm)
                try:
                    _lock_byte(fd, byte)
                except OSError as e:        # somebody holds a write lock there (not QEMU)
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    return f"a write lock on byte {byte}, the {PERM_NAMES[perm]} byte"
    for perm in BlkPerm:
        if perm & used and _locked_by_others(fd, RAW_LOCK_SHARED_BASE + _bit(perm)):
            return (f"QEMU-style lock on byte {RAW_LOCK_SHARED_BASE + _bit(perm)}: another user "
                    f"does not share {PERM_NAMES[perm]} access")
        if perm & not_shared and _locked_by_others(fd, RAW_LOCK_PERM_BASE + _bit(perm)):
            return (f"QEMU-style lock on byte {RAW_LOCK_PERM_BASE + _bit(perm)}: another user "
                    f"has {PERM_NAMES[perm]} access")
    return None


def in_use(path: str, conflict: str) -> ConfigError:
    """The one refusal of an image somebody else uses, ``conflict`` from :func:`lock_conflict`."""
    return ConfigError(f"disk {path} is in use by another process ({conflict})")


def hold_locks(path: str, used: BlkPerm, not_shared: BlkPerm) -> int:
    """Open ``path`` read-only and lock it as :func:`lock_conflict` does; return the
    descriptor, which holds the locks until it is closed.  ConfigError if the file cannot
    be opened or somebody holds a conflicting lock (:func:`in_use`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"disk {path} cannot be opened: {e.strerror}") from None
    try:
        conflict = lock_conflict(fd, used, not_shared)
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"disk {path} cannot be locked: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    if conflict is not None:
        os.close(fd)
        raise in_use(path, conflict)
    return fd
