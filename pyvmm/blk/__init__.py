"""virtio-blk (virtio 1.2 §5.2, device ID 2) and the images behind it.

``backend`` is the seam between the device and the host file: the device turns the
guest's requests into :class:`~pyvmm.blk.backend.BlockRequest` batches, a backend
(a raw file, or QEMU's storage daemon over NBD for every other image format)
carries them out.

* :mod:`~pyvmm.blk.wire` -- the guest-visible layout (config, header, segments, numbers).
* :mod:`~pyvmm.blk.device` -- ``BlkDevice``: the queue, the checks, the batches.
* :mod:`~pyvmm.blk.raw` -- ``RawBackend``: a raw image with preadv/pwritev, QEMU's locks.
* :func:`open_backend` -- the one place that decides which backend serves a ``--disk``.
"""

from __future__ import annotations

import os
import stat

from ..errors import ConfigError

__all__ = ["IMAGE_MAGICS", "detect_format", "open_backend"]

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


def detect_format(path: str) -> str:
    """'raw', or the format whose magic ``path`` starts with (:data:`IMAGE_MAGICS`)."""
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):      # a FIFO would block the read
            raise ConfigError(f"disk {path}: not a regular file or block device")
        with open(path, "rb") as f:
            head = f.read(0x44)
    except OSError as e:
        raise ConfigError(f"disk {path}: {e.strerror}") from None
    for offset, magic, name in IMAGE_MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return "raw"


def open_backend(disk):
    """The opened backend for ``disk`` (a :class:`pyvmm.machine.DiskConfig`: ``path``,
    ``read_only``, ``cache``): raw images are served by
    :class:`~pyvmm.blk.raw.RawBackend`; any other format will be served by QEMU's
    storage daemon over NBD, which is not wired yet (ConfigError).  Raises
    ConfigError if the image cannot be used (missing, in use, ...)."""
    fmt = detect_format(disk.path)
    if fmt != "raw":
        raise ConfigError(f"disk {disk.path}: a {fmt} image; pyvmm serves raw images itself, and "
                          "the qemu-storage-daemon (NBD) path for other formats is not wired yet")
    from .raw import RawBackend
    backend = RawBackend(disk.path, read_only=disk.read_only, cache=disk.cache)
    backend.open()
    return backend
