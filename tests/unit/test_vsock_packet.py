"""pyvmm.vsock.packet: the header layout, tx chain parsing, rx buffer layouts."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.vsock.packet import RxBuffer, VsockPacketError, parse_tx_chain, slice_views
from pyvmm.vsock.wire import HDR, VIRTIO_VSOCK_HDR_LEN, VIRTIO_VSOCK_MAX_PKT_BUF_SIZE, VirtioVsockOp, VsockHeader
from vsock_guest import FakeChain


H = VsockHeader(3, 2, 1000, 52, 5, 1, VirtioVsockOp.VIRTIO_VSOCK_OP_RW, 0, 262144, 17)


def test_header_layout_is_the_kernel_struct():
    assert HDR.size == VIRTIO_VSOCK_HDR_LEN == 44
    raw = H.pack()
    # offsets of struct virtio_vsock_hdr (packed, little-endian)
    assert struct.unpack_from("<Q", raw, 0)[0] == 3
    assert struct.unpack_from("<Q", raw, 8)[0] == 2
    assert struct.unpack_from("<I", raw, 16)[0] == 1000
    assert struct.unpack_from("<I", raw, 20)[0] == 52
    assert struct.unpack_from("<I", raw, 24)[0] == 5
    assert struct.unpack_from("<H", raw, 28)[0] == 1
    assert struct.unpack_from("<H", raw, 30)[0] == 5
    assert struct.unpack_from("<I", raw, 36)[0] == 262144
    assert struct.unpack_from("<I", raw, 40)[0] == 17
    assert VsockHeader.unpack(raw) == H


@given(st.binary(min_size=5, max_size=5), st.lists(st.integers(1, 60), min_size=0, max_size=6))
def test_parse_any_chain_shape(payload, cuts):
    data = H.pack() + payload
    points = sorted({min(c, len(data) - 1) for c in cuts})
    parts = [data[a:b] for a, b in zip([0] + points, points + [len(data)]) if b > a]
    pkt = parse_tx_chain(FakeChain(parts))
    assert pkt.hdr == H
    assert pkt.payload_bytes() == payload


def test_header_is_copied_once():
    chain = FakeChain([H.pack(), b"hello"])
    pkt = parse_tx_chain(chain)
    chain._r[0][24:28] = struct.pack("<I", 9999)     # the guest rewrites its buffer afterwards
    assert pkt.hdr.len == 5


def test_short_header():
    with pytest.raises(VsockPacketError) as e:
        parse_tx_chain(FakeChain([H.pack()[:43]]))
    assert e.value.reason == "tx chain shorter than the header" and e.value.hdr is None


def test_len_larger_than_buffer():
    with pytest.raises(VsockPacketError) as e:
        parse_tx_chain(FakeChain([H.pack(), b"1234"]))
    assert e.value.reason == "tx hdr.len larger than the buffer" and e.value.hdr == H


def test_len_larger_than_64k():
    h = H._replace(len=VIRTIO_VSOCK_MAX_PKT_BUF_SIZE + 1)
    with pytest.raises(VsockPacketError) as e:
        parse_tx_chain(FakeChain([h.pack(), bytes(h.len)]))
    assert e.value.reason == "tx hdr.len larger than 64 KiB"


def test_buffer_longer_than_len_uses_len():
    pkt = parse_tx_chain(FakeChain([H.pack(), b"hello, and garbage"]))
    assert pkt.payload_bytes() == b"hello"


@pytest.mark.parametrize("writable,capacity", [
    ([44, 4096], 4096),                 # Linux <= 6.1
    ([44 + 4096], 4096),                # Linux 6.2+
    ([44 + 3776], 3776),                # SKB_WITH_OVERHEAD(4096)-ish: never assume 4096
    ([10, 30, 4, 100, 100], 200),       # anything else
    ([44], 0),                          # header only
    ([44, 1 << 20], VIRTIO_VSOCK_MAX_PKT_BUF_SIZE),
])
def test_rx_layouts(writable, capacity):
    chain = FakeChain(writable=writable)
    rx = RxBuffer(chain)
    assert rx.usable and rx.capacity == capacity
    data = bytes(range(256)) * (capacity // 256 + 1)
    n = rx.write_payload(data[:capacity])
    used = rx.write_header(H._replace(len=n))
    assert used == 44 + n
    out = chain.written(used)
    assert VsockHeader.unpack(out).len == n and out[44:] == data[:n]


def test_rx_buffer_too_short():
    assert not RxBuffer(FakeChain(writable=[43])).usable


def test_slice_views():
    views = [memoryview(b"abc"), memoryview(b"defg"), memoryview(b"h")]
    assert b"".join(slice_views(views, 2, 4)) == b"cdef"
    assert b"".join(slice_views(views, 0, 100)) == b"abcdefgh"
    assert slice_views(views, 8, 3) == []
