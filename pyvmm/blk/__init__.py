"""virtio-blk (virtio 1.2 §5.2, device ID 2) and the images behind it.

``backend`` is the seam between the device and the host file: the device turns the
guest's requests into :class:`~pyvmm.blk.backend.BlockRequest` batches, a backend
(a raw file, or QEMU's storage daemon over NBD for every other image format)
carries them out.

* :mod:`~pyvmm.blk.wire` -- the guest-visible layout (config, header, segments, numbers).
* :mod:`~pyvmm.blk.device` -- ``BlkDevice``: the queue, the checks, the batches.
* :mod:`~pyvmm.blk.raw` -- ``RawBackend``: a raw image with preadv/pwritev, QEMU's locks.
* :mod:`~pyvmm.blk.lock` -- QEMU's image lock bytes (used by both backends).
* :mod:`~pyvmm.blk.nbd`, :mod:`~pyvmm.blk.daemon` -- ``QemuImageBackend``: every other
  format through ``qemu-storage-daemon``, spoken to over NBD on a private Unix socket.
* :func:`open_backend` -- the one place that decides which backend serves a ``--disk``.
"""

from __future__ import annotations

import os
import stat

from ..errors import ConfigError

__all__ = ["IMAGE_MAGICS", "PROBE_BYTES", "detect_format", "format_of_head", "open_backend"]

#: (offset, magic, format name as qemu-img says it) of the image formats pyvmm recognises
#: cheaply; anything else is taken for raw
IMAGE_MAGICS = (
    (0, b"QFI\xfb", "qcow2"),           # qcow and qcow2 share it (the version follows)
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),               # a sparse extent
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),            # a dynamic VHD (a fixed one is raw with a footer)
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"LUKS\xba\xbe", "luks"),
)
#: how much of an image's start :func:`format_of_head` looks at
PROBE_BYTES = max(offset + len(magic) for offset, magic, _ in IMAGE_MAGICS)


def format_of_head(head: bytes) -> str:
    """'raw', or the format whose magic ``head`` (an image's first bytes) starts with."""
    for offset, magic, name in IMAGE_MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return "raw"


def detect_format(path: str) -> str:
    """'raw', or the format whose magic ``path`` starts with (:data:`IMAGE_MAGICS`)."""
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):      # a FIFO would block the read
            raise ConfigError(f"disk {path}: not a regular file or block device")
        with open(path, "rb") as f:
            head = f.read(PROBE_BYTES)
    except OSError as e:
        raise ConfigError(f"disk {path}: {e.strerror}") from None
    return format_of_head(head)


def open_backend(disk):
    """The opened backend for ``disk`` (a :class:`pyvmm.machine.DiskConfig`: ``path``,
    ``read_only``, ``cache``).  Raw images (:func:`detect_format` finds no other format's
    magic) are served by :class:`~pyvmm.blk.raw.RawBackend`; any other format by QEMU's
    storage daemon over NBD (:class:`~pyvmm.blk.daemon.QemuImageBackend`), under the name
    ``qemu-img info`` gives it (:func:`~pyvmm.blk.daemon.image_format`, which also checks
    that its backing chain opens).  Raises ConfigError if the image cannot be used
    (missing, in use, a chain that does not open, another format's magic on what
    qemu-img reads as raw, qemu-img or qemu-storage-daemon not installed: the message
    names the Debian package); nothing is left running then.

    The storage daemon is started by the calling thread and dies with it
    (``PR_SET_PDEATHSIG``): call this on a thread that outlives the disk, as
    :class:`pyvmm.machine.Machine` does when it is built on the main thread.

    ``disk.format`` given: no probing, the image is that format.  Not given and probed
    raw: the guest may not write another format's magic into the image's start (QEMU's
    "restricted write to sector 0 of probed raw images"): otherwise a guest could make its
    own disk a qcow2 whose backing file is any host file pyvmm can read, at the next boot.
    """
    fmt = disk.format
    if fmt is None:
        fmt = magic = detect_format(disk.path)
        if magic != "raw":
            from .daemon import image_format
            fmt = image_format(disk.path)       # qemu-img's name for it ("qcow" or "qcow2", ...)
            if fmt == "raw":                    # a damaged header: neither guess is safe
                raise ConfigError(f"disk {disk.path} starts with the {magic} magic but qemu-img "
                                  "reads it as raw (a damaged image?): refused rather than guessed")
    if fmt == "raw":
        from .raw import RawBackend
        backend = RawBackend(disk.path, read_only=disk.read_only, cache=disk.cache,
                             probed=disk.format is None)
    else:
        from .daemon import QemuImageBackend
        backend = QemuImageBackend(disk.path, fmt, read_only=disk.read_only, cache=disk.cache)
    backend.open()                              # closes itself if it fails
    return backend
