"""GuestMemory: every access is bounds-checked; views are zero-copy."""

import ctypes

import numpy as np
import pytest

from pyvmm.errors import GuestMemoryError
from pyvmm.memory import GuestMemory


@pytest.fixture
def mem():
    m = GuestMemory(64 * 1024, base=0x10000)
    yield m
    m.close()


def test_read_write_roundtrip(mem):
    mem.write(0x10000, b"hello")
    assert mem.read(0x10000, 5) == b"hello"
    mem.write_u16(0x10010, 0xBEEF)
    mem.write_u32(0x10020, 0xDEADBEEF)
    mem.write_u64(0x10030, 0x0123456789ABCDEF)
    assert (mem.read_u16(0x10010), mem.read_u32(0x10020), mem.read_u64(0x10030)) == \
        (0xBEEF, 0xDEADBEEF, 0x0123456789ABCDEF)
    assert mem.read(0x10020, 4) == b"\xef\xbe\xad\xde"     # little-endian


@pytest.mark.parametrize("gpa,length", [
    (0x0, 1),                  # below the region
    (0xFFFF, 2),               # straddles the start
    (0x10000 + 64 * 1024, 1),  # just past the end
    (0x10000 + 64 * 1024 - 1, 2),
    (0x10000, 64 * 1024 + 1),
    (0x10000, -1),
    (2**64 - 1, 1),
])
def test_out_of_bounds_is_refused(mem, gpa, length):
    for access in (lambda: mem.read(gpa, length), lambda: mem.view(gpa, length),
                   lambda: mem.write(gpa, b"x" * max(length, 0)) if length >= 0 else mem.view(gpa, length)):
        with pytest.raises(GuestMemoryError):
            access()
    assert not mem.contains(gpa, length)


def test_last_byte_is_accessible(mem):
    mem.write(mem.end - 1, b"z")
    assert mem.read(mem.end - 1, 1) == b"z"
    with pytest.raises(GuestMemoryError):
        mem.read_u16(mem.end - 1)


def test_view_is_zero_copy(mem):
    v = mem.view(0x10100, 4)
    v[:] = b"abcd"
    assert mem.read(0x10100, 4) == b"abcd"
    assert mem.array[0x100:0x104].tobytes() == b"abcd"


def test_ndarray_view(mem):
    dt = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
    ring = mem.ndarray(0x11000, dt, 4)
    ring[1]["len"] = 77
    assert mem.read_u32(0x11000 + 16 + 8) == 77
    with pytest.raises(GuestMemoryError):
        mem.ndarray(mem.end - 16, dt, 2)


def test_objects(mem):
    class S(ctypes.LittleEndianStructure):
        _pack_ = 1
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint8)]
    mem.write_obj(0x10200, S(7, 9))
    got = mem.read_obj(0x10200, S)
    mem.write_u32(0x10200, 8)
    assert (got.a, got.b) == (7, 9)         # a copy, not a view


def test_bad_geometry():
    with pytest.raises(ValueError):
        GuestMemory(1000)
    with pytest.raises(ValueError):
        GuestMemory(4096, base=1)
