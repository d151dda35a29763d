"""virtio-blk as the guest sees it: config space, request header, segments, numbers, as VALUES.

This module owns the guest-visible layout of the block device (virtio 1.2
§5.2 "Block Device"; Linux ``include/uapi/linux/virtio_blk.h``, whose names
are used verbatim) and nothing else: no queues, no files.  Everything is
little-endian (a VERSION_1 device).

A request is a descriptor chain whose bytes, taken in order, are::

    device-readable   struct virtio_blk_outhdr   16 bytes: le32 type; le32 ioprio; le64 sector
                      u8 data[]                  OUT: what to write;
                                                 DISCARD / WRITE_ZEROES: struct
                                                 virtio_blk_discard_write_zeroes[n]
    device-writable   u8 data[]                  IN: what was read; GET_ID: the ID string
                      u8 status                  VIRTIO_BLK_S_*: the last writable byte

§2.6.4 ("Message Framing"): the device must not assume anything about how
the driver cuts these bytes into descriptors (Linux puts the header and the
status in descriptors of their own, the data in one per segment, often in an
indirect table), so the device reads them as byte ranges of the chain.
"""

from __future__ import annotations

import struct
from enum import IntEnum

import numpy as np

__all__ = [
    "SECTOR_SHIFT",
    "SECTOR_SIZE",
    "VIRTIO_BLK_CONFIG",
    "VIRTIO_BLK_DISCARD_WRITE_ZEROES",
    "VIRTIO_BLK_ID_BYTES",
    "VIRTIO_BLK_OUTHDR",
    "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP",
    "VirtioBlkFeature",
    "VirtioBlkStatus",
    "VirtioBlkType",
    "config_bytes",
]

#: the unit of ``sector`` and ``capacity``, whatever ``blk_size`` says (§5.2.4)
SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
#: the length of a VIRTIO_BLK_T_GET_ID answer; NUL-padded, no NUL if exactly this long
VIRTIO_BLK_ID_BYTES = 20
#: ``virtio_blk_discard_write_zeroes.flags``: WRITE_ZEROES may deallocate the range
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 0x00000001


class VirtioBlkFeature(IntEnum):
    """Device-specific feature *bit numbers* (§5.2.3)."""
    VIRTIO_BLK_F_BARRIER = 0         # legacy
    VIRTIO_BLK_F_SIZE_MAX = 1        # size_max: the largest segment
    VIRTIO_BLK_F_SEG_MAX = 2         # seg_max: the most segments in a request
    VIRTIO_BLK_F_GEOMETRY = 4
    VIRTIO_BLK_F_RO = 5              # the disk is read-only
    VIRTIO_BLK_F_BLK_SIZE = 6        # blk_size: the logical block size
    VIRTIO_BLK_F_SCSI = 7            # legacy
    VIRTIO_BLK_F_FLUSH = 9           # VIRTIO_BLK_T_FLUSH (legacy name VIRTIO_BLK_F_WCE)
    VIRTIO_BLK_F_TOPOLOGY = 10
    VIRTIO_BLK_F_CONFIG_WCE = 11     # writeback is writable
    VIRTIO_BLK_F_MQ = 12             # num_queues request queues
    VIRTIO_BLK_F_DISCARD = 13        # VIRTIO_BLK_T_DISCARD, max_discard_*
    VIRTIO_BLK_F_WRITE_ZEROES = 14   # VIRTIO_BLK_T_WRITE_ZEROES, max_write_zeroes_*
    VIRTIO_BLK_F_LIFETIME = 15
    VIRTIO_BLK_F_SECURE_ERASE = 16
    VIRTIO_BLK_F_ZONED = 17


class VirtioBlkType(IntEnum):
    """``virtio_blk_outhdr.type`` (§5.2.6)."""
    VIRTIO_BLK_T_IN = 0
    VIRTIO_BLK_T_OUT = 1
    VIRTIO_BLK_T_SCSI_CMD = 2        # legacy
    VIRTIO_BLK_T_FLUSH = 4
    VIRTIO_BLK_T_GET_ID = 8
    VIRTIO_BLK_T_GET_LIFETIME = 10
    VIRTIO_BLK_T_DISCARD = 11
    VIRTIO_BLK_T_WRITE_ZEROES = 13
    VIRTIO_BLK_T_SECURE_ERASE = 14
    VIRTIO_BLK_T_ZONE_APPEND = 15
    VIRTIO_BLK_T_ZONE_REPORT = 16
    VIRTIO_BLK_T_ZONE_OPEN = 18
    VIRTIO_BLK_T_ZONE_CLOSE = 20
    VIRTIO_BLK_T_ZONE_FINISH = 22
    VIRTIO_BLK_T_ZONE_RESET = 24
    VIRTIO_BLK_T_ZONE_RESET_ALL = 26


class VirtioBlkStatus(IntEnum):
    """The status byte (§5.2.6)."""
    VIRTIO_BLK_S_OK = 0
    VIRTIO_BLK_S_IOERR = 1           # device or driver error
    VIRTIO_BLK_S_UNSUPP = 2          # a request the device does not support


#: ``struct virtio_blk_outhdr { le32 type; le32 ioprio; le64 sector; }``: 16 bytes
VIRTIO_BLK_OUTHDR = struct.Struct("<IIQ")
#: ``struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; }``
VIRTIO_BLK_DISCARD_WRITE_ZEROES = struct.Struct("<QII")

#: ``struct virtio_blk_config`` up to ``write_zeroes_may_unmap`` and its padding (60 bytes;
#: the secure-erase and zoned fields after it belong to features pyvmm does not offer, so
#: the config space ends here and a driver never reads them)
VIRTIO_BLK_CONFIG = np.dtype([
    ("capacity", "<u8"),                    # in 512-byte sectors
    ("size_max", "<u4"),                    # VIRTIO_BLK_F_SIZE_MAX
    ("seg_max", "<u4"),                     # VIRTIO_BLK_F_SEG_MAX
    ("cylinders", "<u2"),                   # struct virtio_blk_geometry (VIRTIO_BLK_F_GEOMETRY)
    ("heads", "u1"),
    ("sectors", "u1"),
    ("blk_size", "<u4"),                    # VIRTIO_BLK_F_BLK_SIZE
    ("physical_block_exp", "u1"),           # struct virtio_blk_topology (VIRTIO_BLK_F_TOPOLOGY)
    ("alignment_offset", "u1"),
    ("min_io_size", "<u2"),
    ("opt_io_size", "<u4"),
    ("writeback", "u1"),                    # "wce" in Linux (VIRTIO_BLK_F_CONFIG_WCE)
    ("unused0", "u1"),
    ("num_queues", "<u2"),                  # VIRTIO_BLK_F_MQ
    ("max_discard_sectors", "<u4"),         # VIRTIO_BLK_F_DISCARD
    ("max_discard_seg", "<u4"),
    ("discard_sector_alignment", "<u4"),
    ("max_write_zeroes_sectors", "<u4"),    # VIRTIO_BLK_F_WRITE_ZEROES
    ("max_write_zeroes_seg", "<u4"),
    ("write_zeroes_may_unmap", "u1"),
    ("unused1", "u1", (3,)),
])


def config_bytes(**fields: int) -> bytes:
    """``struct virtio_blk_config`` with the given fields set, the rest zero."""
    cfg = np.zeros((), VIRTIO_BLK_CONFIG)
    for name, value in fields.items():
        cfg[name] = value
    return cfg.tobytes()
