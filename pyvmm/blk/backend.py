"""The seam between the virtio-blk device and the image behind it: ``BlockBackend``.

This module owns the contract, and only the contract, between the virtio-blk device
(virtio 1.2 §5.2) and the thing that holds the disk's bytes on the host (Firecracker
``devices/virtio/block``: the device parses the virtqueue, a ``FileEngine`` does the
I/O).  Backends:

* a raw image file, read and written with ``preadv``/``pwritev`` on views of guest
  RAM (no copy in Python);
* any other image format (qcow2, vmdk, vhdx, ...): QEMU's ``qemu-storage-daemon``
  exporting it over NBD on a private Unix socket, pyvmm speaking NBD to it.

The device is *given* its backend and never builds one (the machine does), as with
vsock.  The device validates every request against the guest (header, direction and
length of each descriptor, sector range against :attr:`BlockBackend.size`) before a
backend sees it: a backend receives only requests that are in bounds, with buffers
that are views of guest memory of exactly ``length`` bytes in total.

Batches: the device hands a backend every request of one wake-up at once
(:meth:`BlockBackend.execute`), so a backend can overlap them (NBD pipelines them on
its socket; a raw file does them in order).  ``execute`` returns, per request, 0 or
an errno; the device answers VIRTIO_BLK_S_IOERR for any errno.  ``execute`` runs on
the machine's I/O loop thread and must return (a backend bounds its own waits).

Life of a backend::

    open()        once, on the machine's thread before the guest runs: acquire the
                  image (open, lock, start a daemon); ConfigError if it cannot
    execute(batch)   on the I/O loop thread, any number of times
    close()       once, after the loop stopped; idempotent, safe if open() failed
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, Sequence


class BlockOp(enum.Enum):
    """What a backend is asked to do (the virtio-blk request types that reach the image)."""
    READ = "read"                   # VIRTIO_BLK_T_IN: fill ``buffers`` from [offset, offset+length)
    WRITE = "write"                 # VIRTIO_BLK_T_OUT: write ``buffers`` there
    FLUSH = "flush"                 # VIRTIO_BLK_T_FLUSH: make every completed write durable
    DISCARD = "discard"             # VIRTIO_BLK_T_DISCARD: the range may read back as anything
    WRITE_ZEROES = "write_zeroes"   # VIRTIO_BLK_T_WRITE_ZEROES: the range reads back as zeroes


@dataclass
class BlockRequest:
    op: BlockOp
    offset: int = 0                 # bytes from the start of the disk
    length: int = 0                 # bytes; for READ/WRITE the buffers' total length
    buffers: Sequence[memoryview] = field(default_factory=tuple)   # READ/WRITE only
    unmap: bool = False             # WRITE_ZEROES: the backend may deallocate the range


class BlockBackend(Protocol):
    """What the virtio-blk device needs from the image behind it."""

    #: the disk's size in bytes (a multiple of 512: the device exposes 512-byte sectors)
    size: int
    #: True: the image was opened read-only; the device refuses writes before they get here
    read_only: bool
    #: which optional operations the backend carries out (the device offers the
    #: matching feature bits only if so)
    supports_discard: bool
    supports_write_zeroes: bool

    def open(self) -> None: ...

    def execute(self, batch: Sequence[BlockRequest]) -> list[int]:
        """Carry out ``batch`` in order; per request 0 (done) or an errno (failed)."""
        ...

    def close(self) -> None: ...
