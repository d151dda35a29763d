"""vsock wire formats: the packet header, its values, and the queue roles, as VALUES.

pyvmm speaks two vsock protocols over the same transport, queues, data path and
host ends; what differs between them is in this module, once each:

=====================  =======================================  =======================================
                       :data:`VIRTIO` (``proto=virtio``)         :data:`RFC2013` (``proto=rfc2013``)
=====================  =======================================  =======================================
source                 virtio 1.2 §5.10 "Socket Device";        the 2013 RFC "Introduce VM Sockets virtio
                       Linux ``uapi/linux/virtio_vsock.h``      transport" (``docs/vsock-draft-vs-spec.md``)
device ID              19                                        13 (since 2014 the spec's memory balloon)
queues                 0 rx, 1 tx, 2 event                       0 controlq; 2i+1 rx i, 2i+2 tx i (i < N)
config                 ``le64 guest_cid``                        ``le32 guest_cid; le32 max_virtqueue_pairs``
header                 44 bytes, see :data:`HDR`                 39 bytes, see :data:`RFC2013_HDR`
handshake              REQUEST, RESPONSE                         REQUEST, NEGOTIATE, OFFER, ATTACH
credit counters        u32 (wrapping)                            u64
credit request         VIRTIO_VSOCK_OP_CREDIT_REQUEST            none: a sender without credit waits
types                  STREAM, SEQPACKET (feature bit)           STREAM, DGRAM
=====================  =======================================  =======================================

The rest of pyvmm works on ONE in-memory header, :class:`VsockHeader`, whose
``op``/``type``/``flags`` hold *canonical* values: the standard's own numbers
(:data:`OP_RW` = VIRTIO_VSOCK_OP_RW = 5, ...), plus the draft's ops and type
that the standard lacks, numbered above 0xFFFF (:data:`OP_NEGOTIATE`,
:data:`OP_OFFER`, :data:`OP_ATTACH`, :data:`DGRAM`) so that no standard
header, whose ``op``/``type`` are u16, can ever carry them.  A
:class:`WireFormat` turns guest bytes into that header and back:
:meth:`WireFormat.unpack` / :meth:`WireFormat.pack_into`.  The standard
format is the identity (one ``struct`` call each way, no mapping: the hot
path pays nothing for the second protocol); the draft's maps its u8 op and
type numbers to canonical ones and an unknown number to a value no rule
accepts (:data:`UNKNOWN`), which the muxer and connections answer as any
unknown op or type.

The connection state machine is given the wire's :attr:`WireFormat.handshake`
(the alternating sequence of ops that opens a connection: the initiator sends
the even-numbered ones, the other side the odd-numbered ones, and whoever sends
the last is connected when it goes out, the other when it arrives),
:attr:`~WireFormat.counter_mask` and :attr:`~WireFormat.op_credit_request`;
the device is given the queue roles (:meth:`WireFormat.queue_roles`) and the
config layout; the muxer the types and the pair rule (:meth:`WireFormat.lane`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Callable, NamedTuple

__all__ = [
    "DGRAM",
    "DGRAM_MAX_PAYLOAD",
    "HDR",
    "OP_ATTACH",
    "OP_NEGOTIATE",
    "OP_OFFER",
    "RFC2013",
    "RFC2013_HDR",
    "UNKNOWN",
    "VIRTIO",
    "VIRTIO_VSOCK_HDR_LEN",
    "VIRTIO_VSOCK_MAX_PKT_BUF_SIZE",
    "VMADDR_CID_HOST",
    "VMADDR_PORT_ANY",
    "VirtioVsockEventId",
    "VirtioVsockFeature",
    "VirtioVsockOp",
    "VirtioVsockSeqFlag",
    "VirtioVsockShutdown",
    "VirtioVsockType",
    "VsockHeader",
    "WireFormat",
    "WIRE_FORMATS",
]


# -- the standard's values (names verbatim from the spec / Linux) -----------------------------
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
    bit numbers as VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE (0) / _F_SEND (1).  The
    draft's ``shut`` byte has the same two bits.
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


#: The canonical values as plain ints, for the per-packet code.  IntEnum/IntFlag arithmetic
#: builds a new enum object for every ``&``, ``|`` and ``~`` (``bench/micro_vsock.py
#: --profile``: about 15 such operations per packet cost more CPU than the packet's sendmsg).
#: The enums stay the names at the API, in logs and in tests.
OP_INVALID = int(VirtioVsockOp.VIRTIO_VSOCK_OP_INVALID)
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
#: the draft's ops and type the standard does not have, as canonical values above any u16
OP_NEGOTIATE = 0x1_0002          # the listener's answer to REQUEST, with its credit
OP_OFFER = 0x1_0003              # the initiator's answer to NEGOTIATE, with its credit
OP_ATTACH = 0x1_0004             # the listener's last word: established
DGRAM = 0x1_0002                 # a type: one datagram per packet, no connection
#: what a draft op or type number nobody defined becomes (``UNKNOWN | number``): no rule accepts it
UNKNOWN = 0x2_0000

#: the well-known host CID (``VMADDR_CID_HOST``, ``include/uapi/linux/vm_sockets.h``)
VMADDR_CID_HOST = 2
#: "any port" (``VMADDR_PORT_ANY``, -1 as a u32): a datagram source nobody can answer
VMADDR_PORT_ANY = 0xFFFF_FFFF
#: ``sizeof(struct virtio_vsock_hdr)``
VIRTIO_VSOCK_HDR_LEN = 44
#: the largest payload Linux puts in one packet (``VIRTIO_VSOCK_MAX_PKT_BUF_SIZE``)
VIRTIO_VSOCK_MAX_PKT_BUF_SIZE = 64 * 1024
#: the largest datagram (draft mode): one receive buffer of the 2013 code, 4 KiB
DGRAM_MAX_PAYLOAD = 4096
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF

#: ``struct virtio_vsock_hdr``, packed little-endian (§5.10.6)::
#:
#:   off size field       off size field
#:     0    8 src_cid      28    2 type
#:     8    8 dst_cid      30    2 op
#:    16    4 src_port     32    4 flags (SHUTDOWN: RCV/SEND; SEQPACKET RW: EOM/EOR)
#:    20    4 dst_port     36    4 buf_alloc
#:    24    4 len          40    4 fwd_cnt
HDR = struct.Struct("<QQIIIHHIII")
#: the draft's header, packed little-endian, 39 bytes (note the order and the widths)::
#:
#:   off size field       off size field
#:     0    4 src_cid      20    1 type   (1 STREAM, 2 DGRAM)
#:     4    4 src_port     21    1 op     (1 REQUEST 2 NEGOTIATE 3 OFFER 4 ATTACH
#:     8    4 dst_cid                      5 RW 6 CREDIT 7 RST 8 SHUTDOWN)
#:    12    4 dst_port     22    1 shut   (SHUTDOWN: 1 receive, 2 transmit)
#:    16    4 len          23    8 fwd_cnt
#:                         31    8 buf_alloc
RFC2013_HDR = struct.Struct("<IIIIIBBBQQ")


#: op names for logs (canonical values)
_OP_NAMES = {int(op): op.name.removeprefix("VIRTIO_VSOCK_OP_") for op in VirtioVsockOp}
_OP_NAMES.update({OP_NEGOTIATE: "NEGOTIATE", OP_OFFER: "OFFER", OP_ATTACH: "ATTACH"})


class VsockHeader(NamedTuple):
    """One packet header in canonical form, as Python ints (the standard's field
    names; see the module docstring for the values of ``op``/``type``)."""
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
        """A standard (44-byte) header."""
        return cls._make(HDR.unpack_from(data, 0))

    def pack(self) -> bytes:
        """As a standard (44-byte) header."""
        return HDR.pack(*self)

    def describe(self) -> str:
        """A short text for logs (values from the guest: never used as a log *reason*)."""
        op = _OP_NAMES.get(self.op) or f"op{self.op & 0xFFFF}"
        return (f"{op} {self.src_cid}:{self.src_port}->{self.dst_cid}:{self.dst_port} "
                f"type={self.type & 0xFFFF} len={self.len} flags={self.flags:#x} "
                f"buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt}")


# -- the two formats ---------------------------------------------------------------------------
#: queue roles, see :meth:`WireFormat.queue_roles`
RX, TX, EVENT, CONTROL = "rx", "tx", "event", "control"


@dataclass(frozen=True)
class WireFormat:
    """Everything a vsock protocol's bytes and queues look like (module docstring)."""

    #: ``--vsock CID,proto=NAME``
    name: str
    #: the virtio device ID
    device_id: int
    #: header size on the wire
    hdr_len: int
    #: guest bytes -> canonical header: ``unpack(buffer) -> VsockHeader`` (first hdr_len bytes)
    unpack: Callable[[object], VsockHeader]
    #: canonical header -> guest bytes: ``pack_into(buffer, hdr)`` at offset 0
    pack_into: Callable[[object, VsockHeader], None]
    #: the ops that open a connection, in order (module docstring)
    handshake: tuple[int, ...]
    #: credit counters wrap at this mask + 1
    counter_mask: int
    #: the op that asks the peer for its credit, or None (the sender waits)
    op_credit_request: int | None
    #: connection types the protocol always has (SEQPACKET also needs its feature bit)
    stream_types: frozenset[int]
    #: whether the protocol has datagrams (type :data:`DGRAM`)
    datagrams: bool
    #: whether queue pairs exist (``pairs=N``): the controlq + pairs layout
    multiqueue: bool

    def queue_roles(self, pairs: int = 1) -> tuple[tuple[str, int], ...]:
        """``(role, lane)`` of each virtqueue by index: the standard's rx/tx/event
        (§5.10.2), or the draft's controlq and ``pairs`` rx/tx pairs."""
        if not self.multiqueue:
            return ((RX, 0), (TX, 0), (EVENT, 0))
        roles: list[tuple[str, int]] = [(CONTROL, 0)]
        for lane in range(pairs):
            roles += [(RX, lane), (TX, lane)]
        return tuple(roles)

    @staticmethod
    def lane(port_a: int, port_b: int, lanes: int) -> int:
        """The queue pair of a connection or datagram between two ports: ``(a XOR b) mod
        lanes`` (pyvmm's rule: commutative, so both ends compute the same; the 2013
        code had one pair and no rule)."""
        return (port_a ^ port_b) % lanes

    def encode(self, hdr: VsockHeader) -> bytes:
        """``hdr`` as wire bytes (tests, logs)."""
        buf = bytearray(self.hdr_len)
        self.pack_into(buf, hdr)
        return bytes(buf)


def _virtio_pack_into(buf, hdr: VsockHeader, _pack_into=HDR.pack_into) -> None:
    _pack_into(buf, 0, *hdr)


def _virtio_unpack(buf, _make=VsockHeader._make, _unpack_from=HDR.unpack_from) -> VsockHeader:
    return _make(_unpack_from(buf, 0))


VIRTIO = WireFormat(
    name="virtio", device_id=19, hdr_len=HDR.size, unpack=_virtio_unpack, pack_into=_virtio_pack_into,
    handshake=(OP_REQUEST, OP_RESPONSE), counter_mask=_U32, op_credit_request=OP_CREDIT_REQUEST,
    stream_types=frozenset({STREAM, SEQPACKET}), datagrams=False, multiqueue=False)

# The draft's numbers <-> canonical values.
_RFC2013_OPS = (OP_INVALID, OP_REQUEST, OP_NEGOTIATE, OP_OFFER, OP_ATTACH, OP_RW, OP_CREDIT_UPDATE,
                OP_RST, OP_SHUTDOWN)
_RFC2013_OP_NUMBER = {canonical: number for number, canonical in enumerate(_RFC2013_OPS)}
_RFC2013_TYPES = (UNKNOWN, STREAM, DGRAM)
_RFC2013_TYPE_NUMBER = {STREAM: 1, DGRAM: 2}


def _rfc2013_unpack(buf) -> VsockHeader:
    src_cid, src_port, dst_cid, dst_port, length, vtype, op, shut, fwd_cnt, buf_alloc = \
        RFC2013_HDR.unpack_from(buf, 0)
    return VsockHeader(src_cid, dst_cid, src_port, dst_port, length,
                       _RFC2013_TYPES[vtype] if 0 < vtype < 3 else UNKNOWN | vtype,
                       _RFC2013_OPS[op] if op < 9 else UNKNOWN | op,
                       shut, buf_alloc, fwd_cnt)


def _rfc2013_pack_into(buf, hdr: VsockHeader) -> None:
    # an UNKNOWN type or op goes back as the number it came as (an RST echoes the packet's
    # type; pyvmm never sends an unknown op, but a test driver may)
    RFC2013_HDR.pack_into(buf, 0, hdr.src_cid, hdr.src_port, hdr.dst_cid, hdr.dst_port, hdr.len,
                          _RFC2013_TYPE_NUMBER.get(hdr.type, hdr.type & 0xFF),
                          _RFC2013_OP_NUMBER.get(hdr.op, hdr.op & 0xFF), hdr.flags, hdr.fwd_cnt,
                          hdr.buf_alloc)


RFC2013 = WireFormat(
    name="rfc2013", device_id=13, hdr_len=RFC2013_HDR.size, unpack=_rfc2013_unpack,
    pack_into=_rfc2013_pack_into, handshake=(OP_REQUEST, OP_NEGOTIATE, OP_OFFER, OP_ATTACH),
    counter_mask=_U64, op_credit_request=None, stream_types=frozenset({STREAM}), datagrams=True,
    multiqueue=True)

#: by ``proto=`` name
WIRE_FORMATS = {w.name: w for w in (VIRTIO, RFC2013)}
