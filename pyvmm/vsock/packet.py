"""virtio-vsock packets: the 44-byte header, the constants, and guest buffers.

This module owns the wire format of the Socket Device (virtio 1.2 §5.10,
"Socket Device"; Linux ``include/uapi/linux/virtio_vsock.h``) and the two
ways a packet meets guest memory:

* **tx** (guest -> device, §5.10.6.4): :func:`parse_tx_chain` turns one
  descriptor chain of the tx virtqueue into a :class:`TxPacket`: the header
  *copied out once* (the guest may rewrite its buffer afterwards: no
  time-of-check/time-of-use), and the payload as zero-copy ``memoryview``\\ s
  of guest RAM, exactly ``hdr.len`` bytes long.  The chain is read as one
  byte stream, whatever its shape: Linux puts the header in its own
  descriptor and the payload in the next, but the header may be split across
  descriptors and a payload over 32 KiB arrives as several pages.
* **rx** (device -> guest, §5.10.6.4): :class:`RxBuffer` wraps one chain of
  the rx virtqueue.  Its device-writable part holds the header at offset 0
  and the payload right after it, in EITHER layout Linux has used: one
  descriptor of 44 + N bytes (6.2+) or a 44-byte descriptor followed by an
  N-byte one (<= 6.1).  The payload capacity is read from the descriptors,
  never assumed to be 4096; ``used.len`` is 44 + payload length.

The header (``struct virtio_vsock_hdr``, packed, all little-endian)::

    off size field       what
      0    8 src_cid     upper 32 bits zero
      8    8 dst_cid
     16    4 src_port
     20    4 dst_port
     24    4 len         payload bytes that follow the header
     28    2 type        VIRTIO_VSOCK_TYPE_STREAM 1 / _SEQPACKET 2
     30    2 op          VIRTIO_VSOCK_OP_*
     32    4 flags       SHUTDOWN: VIRTIO_VSOCK_SHUTDOWN_RCV/SEND;
                         SEQPACKET RW: VIRTIO_VSOCK_SEQ_EOM/EOR
     36    4 buf_alloc   sender's receive buffer size
     40    4 fwd_cnt     bytes the sender's receiver has consumed (free-running u32)

What a hostile tx chain gets (each reason counted and logged once by the
caller through :class:`VsockPacketError`):

=============================================  ===================================
chain                                          :class:`VsockPacketError` reason
=============================================  ===================================
fewer than 44 readable bytes                   "tx chain shorter than the header"
``len`` > 64 KiB (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE) "tx hdr.len larger than 64 KiB"
``len`` > readable bytes after the header      "tx hdr.len larger than the buffer"
=============================================  ===================================

A buffer *longer* than ``len`` is accepted and its tail ignored (the spec
defines the payload by ``len``; Firecracker does the same).  Whether the
packet makes sense (op, type, ports, credit) is the muxer's business.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import NamedTuple

from ..virtio.queue import DescriptorChain

__all__ = [
    "HDR",
    "VIRTIO_VSOCK_HDR_LEN",
    "VIRTIO_VSOCK_MAX_PKT_BUF_SIZE",
    "VMADDR_CID_HOST",
    "RxBuffer",
    "TxPacket",
    "VirtioVsockEventId",
    "VirtioVsockFeature",
    "VirtioVsockOp",
    "VirtioVsockSeqFlag",
    "VirtioVsockShutdown",
    "VirtioVsockType",
    "VsockHeader",
    "VsockPacketError",
    "parse_tx_chain",
    "slice_views",
    "wrap32",
]


class VirtioVsockOp(IntEnum):
    """``hdr.op`` (§5.10.6; Linux ``enum virtio_vsock_op``)."""
    VIRTIO_VSOCK_OP_INVALID = 0
    VIRTIO_VSOCK_OP_REQUEST = 1         # connect
    VIRTIO_VSOCK_OP_RESPONSE = 2        # connection accepted
    VIRTIO_VSOCK_OP_RST = 3             # refused / forcibly closed
    VIRTIO_VSOCK_OP_SHUTDOWN = 4        # flags: VIRTIO_VSOCK_SHUTDOWN_*
    VIRTIO_VSOCK_OP_RW = 5              # data
    VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6   # "here is my buf_alloc/fwd_cnt"
    VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7  # "tell me your buf_alloc/fwd_cnt"


class VirtioVsockType(IntEnum):
    """``hdr.type`` (§5.10.6.2; Linux ``enum virtio_vsock_type``)."""
    VIRTIO_VSOCK_TYPE_STREAM = 1
    VIRTIO_VSOCK_TYPE_SEQPACKET = 2


class VirtioVsockShutdown(IntFlag):
    """``hdr.flags`` of VIRTIO_VSOCK_OP_SHUTDOWN (§5.10.6.5); sticky once sent.

    Linux's mask names (``enum virtio_vsock_shutdown``); the spec gives the
    bit numbers as VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE (0) / _F_SEND (1).
    """
    VIRTIO_VSOCK_SHUTDOWN_RCV = 1       # the sender will receive no more data
    VIRTIO_VSOCK_SHUTDOWN_SEND = 2      # the sender will send no more data


class VirtioVsockSeqFlag(IntFlag):
    """``hdr.flags`` of a SEQPACKET VIRTIO_VSOCK_OP_RW (§5.10.6.6)."""
    VIRTIO_VSOCK_SEQ_EOM = 1            # last packet of a message
    VIRTIO_VSOCK_SEQ_EOR = 2            # the sender used MSG_EOR


class VirtioVsockEventId(IntEnum):
    """``struct virtio_vsock_event.id`` on the event virtqueue (§5.10.6.7)."""
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0


class VirtioVsockFeature(IntEnum):
    """Device feature *bit numbers* (§5.10.3)."""
    VIRTIO_VSOCK_F_STREAM = 0           # v1.2
    VIRTIO_VSOCK_F_SEQPACKET = 1        # v1.2
    VIRTIO_VSOCK_F_NO_IMPLIED_STREAM = 2  # v1.3


#: The same values as plain ints, for the per-packet code.  IntEnum/IntFlag arithmetic builds
#: a new enum object for every ``&``, ``|`` and ``~`` (``bench/micro_vsock.py --profile``:
#: about 15 such operations per packet cost more CPU than the packet's sendmsg).  The enums
#: stay the names at the API, in logs and in tests.
OP_REQUEST = int(VirtioVsockOp.VIRTIO_VSOCK_OP_REQUEST)
OP_RESPONSE = int(VirtioVsockOp.VIRTIO_VSOCK_OP_RESPONSE)
OP_RST = int(VirtioVsockOp.VIRTIO_VSOCK_OP_RST)
OP_SHUTDOWN = int(VirtioVsockOp.VIRTIO_VSOCK_OP_SHUTDOWN)
OP_RW = int(VirtioVsockOp.VIRTIO_VSOCK_OP_RW)
OP_CREDIT_UPDATE = int(VirtioVsockOp.VIRTIO_VSOCK_OP_CREDIT_UPDATE)
OP_CREDIT_REQUEST = int(VirtioVsockOp.VIRTIO_VSOCK_OP_CREDIT_REQUEST)
RCV = int(VirtioVsockShutdown.VIRTIO_VSOCK_SHUTDOWN_RCV)
SEND = int(VirtioVsockShutdown.VIRTIO_VSOCK_SHUTDOWN_SEND)
BOTH = RCV | SEND
EOM = int(VirtioVsockSeqFlag.VIRTIO_VSOCK_SEQ_EOM)
EOR = int(VirtioVsockSeqFlag.VIRTIO_VSOCK_SEQ_EOR)
SEQPACKET = int(VirtioVsockType.VIRTIO_VSOCK_TYPE_SEQPACKET)
STREAM = int(VirtioVsockType.VIRTIO_VSOCK_TYPE_STREAM)


#: the well-known host CID (``VMADDR_CID_HOST``, ``include/uapi/linux/vm_sockets.h``)
VMADDR_CID_HOST = 2
#: ``sizeof(struct virtio_vsock_hdr)``
VIRTIO_VSOCK_HDR_LEN = 44
#: the largest payload Linux puts in one packet (``VIRTIO_VSOCK_MAX_PKT_BUF_SIZE``)
VIRTIO_VSOCK_MAX_PKT_BUF_SIZE = 64 * 1024
#: ``struct virtio_vsock_hdr``, packed little-endian
HDR = struct.Struct("<QQIIIHHIII")
_U32 = 0xFFFF_FFFF


def wrap32(value: int) -> int:
    """``value`` as a free-running u32 counter (``Wrapping<u32>`` in Firecracker)."""
    return value & _U32


class VsockHeader(NamedTuple):
    """One ``struct virtio_vsock_hdr``, as Python ints (field names verbatim)."""
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def unpack(cls, data) -> VsockHeader:
        return cls._make(HDR.unpack_from(data, 0))

    def pack(self) -> bytes:
        return HDR.pack(*self)

    def describe(self) -> str:
        """A short text for logs (values from the guest: never used as a log *reason*)."""
        try:
            op = VirtioVsockOp(self.op).name.removeprefix("VIRTIO_VSOCK_OP_")
        except ValueError:
            op = f"op{self.op}"
        return (f"{op} {self.src_cid}:{self.src_port}->{self.dst_cid}:{self.dst_port} "
                f"type={self.type} len={self.len} flags={self.flags:#x} "
                f"buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt}")



class VsockPacketError(Exception):
    """A tx chain that is not a packet.  ``reason`` is a fixed string (for
    :class:`~pyvmm.virtio.queue.GuestErrorLog`); ``hdr`` is the header if
    one could be read (so the muxer can reset the connection it names)."""

    def __init__(self, reason: str, hdr: VsockHeader | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hdr = hdr


def slice_views(views: list[memoryview], start: int, length: int) -> list[memoryview]:
    """The byte range ``[start, start + length)`` of the concatenation of
    ``views``, as views (no copy).  Stops early if the views run out."""
    out: list[memoryview] = []
    for view in views:
        if length <= 0:
            break
        n = len(view)
        if start >= n:
            start -= n
            continue
        take = min(n - start, length)
        out.append(view[start:start + take])
        length -= take
        start = 0
    return out


class TxPacket(NamedTuple):
    """A parsed guest packet: the header (a copy) and ``hdr.len`` payload bytes
    as views of guest RAM, valid until the chain is returned with add_used."""
    hdr: VsockHeader
    payload: list[memoryview]

    def payload_bytes(self) -> bytes:
        """A copy of the payload (for tests and the rare path that must copy)."""
        return b"".join(self.payload)


def parse_tx_chain(chain: DescriptorChain) -> TxPacket:
    """One tx chain as a packet, or :class:`VsockPacketError` (see the table above)."""
    views = chain.readable_views()
    total = chain.readable_len
    if total < VIRTIO_VSOCK_HDR_LEN:
        raise VsockPacketError("tx chain shorter than the header")
    first = views[0]
    if len(first) >= VIRTIO_VSOCK_HDR_LEN:
        raw = bytes(first[:VIRTIO_VSOCK_HDR_LEN])          # the one copy of the header
    else:
        raw = b"".join(bytes(v) for v in slice_views(views, 0, VIRTIO_VSOCK_HDR_LEN))
    hdr = VsockHeader.unpack(raw)
    if hdr.len > VIRTIO_VSOCK_MAX_PKT_BUF_SIZE:
        raise VsockPacketError("tx hdr.len larger than 64 KiB", hdr)
    if hdr.len > total - VIRTIO_VSOCK_HDR_LEN:
        raise VsockPacketError("tx hdr.len larger than the buffer", hdr)
    return TxPacket(hdr, slice_views(views, VIRTIO_VSOCK_HDR_LEN, hdr.len))


class RxBuffer:
    """One rx chain being filled with one packet (§5.10.6.4).

    ``capacity`` is how many payload bytes fit after the header (0 for a
    header-only buffer), capped at VIRTIO_VSOCK_MAX_PKT_BUF_SIZE.  A chain
    whose writable part is shorter than 44 bytes is ``usable == False``:
    the device returns it with ``used.len = 0`` (Linux drops used.len < 44).
    """

    def __init__(self, chain: DescriptorChain) -> None:
        self.chain = chain
        self.head = chain.head
        self._views = chain.writable_views()
        self.usable = chain.writable_len >= VIRTIO_VSOCK_HDR_LEN
        self.capacity = (min(chain.writable_len - VIRTIO_VSOCK_HDR_LEN, VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
                         if self.usable else 0)
        #: the header written by :meth:`write_header`, for metrics and tests
        self.hdr: VsockHeader | None = None
        # the first descriptor, if the whole header fits in it (both Linux layouts): one pack_into
        first = self._views[0] if self._views else None
        self._hdr_view = first if first is not None and len(first) >= VIRTIO_VSOCK_HDR_LEN else None
        self._payload: list[memoryview] | None = None   # all payload views, made on first use

    def payload_views(self, limit: int) -> list[memoryview]:
        """Views of the first ``min(limit, capacity)`` payload bytes (in guest RAM).
        The caller must not modify the list (the whole-payload one is kept)."""
        if limit >= self.capacity:
            views = self._payload
            if views is None:
                views = self._payload = slice_views(self._views, VIRTIO_VSOCK_HDR_LEN, self.capacity)
            return views
        return slice_views(self._views, VIRTIO_VSOCK_HDR_LEN, limit)

    def write_payload(self, data, offset: int = 0) -> int:
        """Copy ``data`` into the payload area from ``offset`` on; returns bytes written."""
        src = memoryview(data).cast("B")
        n = min(len(src), self.capacity - offset)
        done = 0
        for view in self.payload_views(offset + n):
            if offset >= len(view):
                offset -= len(view)
                continue
            take = len(view) - offset
            view[offset:offset + take] = src[done:done + take]
            done += take
            offset = 0
        return done

    def write_header(self, hdr: VsockHeader) -> int:
        """Write the header at offset 0; returns ``used.len`` = 44 + hdr.len."""
        if self._hdr_view is not None:
            HDR.pack_into(self._hdr_view, 0, *hdr)
        else:                                   # the header itself split over descriptors
            raw = memoryview(hdr.pack())
            done = 0
            for view in slice_views(self._views, 0, VIRTIO_VSOCK_HDR_LEN):
                view[:] = raw[done:done + len(view)]
                done += len(view)
        self.hdr = hdr
        return VIRTIO_VSOCK_HDR_LEN + hdr.len
