"""vsock packets in guest memory: tx chains -> packets, rx buffers.

This module owns the two ways a packet meets guest memory (virtio 1.2
§5.10.6.4), for either wire format (:mod:`pyvmm.vsock.wire`: the header
is ``wire.hdr_len`` bytes, 44 in the standard, 39 in the draft; "44" below
is the standard's):

* **tx** (guest -> device): :func:`parse_tx_chain` turns one descriptor
  chain of a tx virtqueue into a :class:`TxPacket`: the header *copied out
  once* (the guest may rewrite its buffer afterwards: no
  time-of-check/time-of-use), and the payload as zero-copy ``memoryview``\\ s
  of guest RAM, exactly ``hdr.len`` bytes long.  The chain is read as one
  byte stream, whatever its shape: Linux puts the header in its own
  descriptor and the payload in the next, but the header may be split across
  descriptors and a payload over 32 KiB arrives as several pages.
* **rx** (device -> guest): :class:`RxBuffer` wraps one chain of an rx
  virtqueue.  Its device-writable part holds the header at offset 0 and the
  payload right after it, in EITHER layout Linux has used: one descriptor of
  44 + N bytes (6.2+) or a 44-byte descriptor followed by an N-byte one
  (<= 6.1).  The payload capacity is read from the descriptors, never
  assumed to be 4096; ``used.len`` is header + payload length.

What a hostile tx chain gets (each reason counted and logged once by the
caller through :class:`VsockPacketError`):

=============================================  ===================================
chain                                          :class:`VsockPacketError` reason
=============================================  ===================================
fewer readable bytes than a header             "tx chain shorter than the header"
``len`` > 64 KiB (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE) "tx hdr.len larger than 64 KiB"
``len`` > readable bytes after the header      "tx hdr.len larger than the buffer"
=============================================  ===================================

A buffer *longer* than ``len`` is accepted and its tail ignored (the spec
defines the payload by ``len``; Firecracker does the same).  Whether the
packet makes sense (op, type, ports, credit) is the muxer's business.
"""

from __future__ import annotations

from typing import NamedTuple

from ..virtio.queue import DescriptorChain
from .wire import VIRTIO, VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, VsockHeader, WireFormat

__all__ = [
    "RxBuffer",
    "TxPacket",
    "VsockPacketError",
    "parse_tx_chain",
    "slice_views",
]


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


def parse_tx_chain(chain: DescriptorChain, wire: WireFormat = VIRTIO) -> TxPacket:
    """One tx chain as a packet, or :class:`VsockPacketError` (see the table above)."""
    views = chain.readable_views()
    total = chain.readable_len
    hdr_len = wire.hdr_len
    if total < hdr_len:
        raise VsockPacketError("tx chain shorter than the header")
    first = views[0]
    if len(first) >= hdr_len:
        raw = bytes(first[:hdr_len])                       # the one copy of the header
    else:
        raw = b"".join(bytes(v) for v in slice_views(views, 0, hdr_len))
    hdr = wire.unpack(raw)
    if hdr.len > VIRTIO_VSOCK_MAX_PKT_BUF_SIZE:
        raise VsockPacketError("tx hdr.len larger than 64 KiB", hdr)
    if hdr.len > total - hdr_len:
        raise VsockPacketError("tx hdr.len larger than the buffer", hdr)
    return TxPacket(hdr, slice_views(views, hdr_len, hdr.len))


class RxBuffer:
    """One rx chain being filled with one packet (§5.10.6.4).

    ``capacity`` is how many payload bytes fit after the header (0 for a
    header-only buffer), capped at VIRTIO_VSOCK_MAX_PKT_BUF_SIZE.  A chain
    whose writable part is shorter than a header is ``usable == False``:
    the device returns it with ``used.len = 0`` (Linux drops used.len < 44).
    """

    def __init__(self, chain: DescriptorChain, wire: WireFormat = VIRTIO) -> None:
        self.chain = chain
        self.head = chain.head
        self._wire = wire
        self._hdr_len = hdr_len = wire.hdr_len
        self._views = chain.writable_views()
        self.usable = chain.writable_len >= hdr_len
        self.capacity = (min(chain.writable_len - hdr_len, VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
                         if self.usable else 0)
        #: the header written by :meth:`write_header`, for metrics and tests
        self.hdr: VsockHeader | None = None
        # the first descriptor, if the whole header fits in it (both Linux layouts): one pack_into
        first = self._views[0] if self._views else None
        self._hdr_view = first if first is not None and len(first) >= hdr_len else None
        self._payload: list[memoryview] | None = None   # all payload views, made on first use

    def payload_views(self, limit: int) -> list[memoryview]:
        """Views of the first ``min(limit, capacity)`` payload bytes (in guest RAM).
        The caller must not modify the list (the whole-payload one is kept)."""
        if limit >= self.capacity:
            views = self._payload
            if views is None:
                views = self._payload = slice_views(self._views, self._hdr_len, self.capacity)
            return views
        return slice_views(self._views, self._hdr_len, limit)

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
        """Write the header at offset 0; returns ``used.len`` = header + hdr.len bytes."""
        if self._hdr_view is not None:
            self._wire.pack_into(self._hdr_view, hdr)
        else:                                   # the header itself split over descriptors
            raw = memoryview(self._wire.encode(hdr))
            done = 0
            for view in slice_views(self._views, 0, self._hdr_len):
                view[:] = raw[done:done + len(view)]
                done += len(view)
        self.hdr = hdr
        return self._hdr_len + hdr.len
