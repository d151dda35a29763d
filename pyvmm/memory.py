"""Guest physical memory: one anonymous mmap, seen as a numpy array.

This module owns the bytes of guest RAM and nothing else.  It does not know
about KVM: the machine registers :attr:`GuestMemory.host_address` with
``KVM_SET_USER_MEMORY_REGION``; devices and loaders only ever talk in guest
physical addresses (GPAs) through the checked accessors below.

Every accessor checks ``[gpa, gpa + length)`` against the region before it
touches a byte, so an address or length that comes from the guest (a
descriptor, a ring index turned into an address) can never reach outside
guest RAM: it raises :class:`GuestMemoryError` instead, which the caller logs
and answers as its spec says.  (Compare rust-vmm ``vm-memory``: ``Bytes``,
``read_obj``/``write_obj``, ``get_slice``.)

Zero-copy: :meth:`view` returns a writable ``memoryview`` of guest RAM that
can be handed straight to ``socket.recv_into`` / ``socket.send``.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

import numpy as np

from .errors import GuestMemoryError

__all__ = ["GuestMemory", "GuestMemoryError"]

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemory:
    """A contiguous range of guest RAM ``[base, base + size)``.

    ``size`` must be a multiple of the 4 KiB page size.  The backing store is
    an anonymous private mmap, so untouched pages cost nothing.
    """

    PAGE_SIZE = 4096

    def __init__(self, size: int, base: int = 0) -> None:
        if size <= 0 or size % self.PAGE_SIZE:
            raise ValueError(f"guest memory size {size:#x} is not a positive multiple of 4 KiB")
        if base % self.PAGE_SIZE or base < 0:
            raise ValueError(f"guest memory base {base:#x} is not page aligned")
        self.base = base
        self.size = size
        self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._mmap)
        #: the whole region as a flat uint8 array (index = gpa - base)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)
        self.host_address = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))

    @property
    def end(self) -> int:
        """First guest physical address past the region."""
        return self.base + self.size

    # -- bounds ---------------------------------------------------------------
    def contains(self, gpa: int, length: int = 1) -> bool:
        """True if ``[gpa, gpa + length)`` lies wholly inside guest RAM."""
        return length >= 0 and self.base <= gpa and gpa + length <= self.end

    def offset(self, gpa: int, length: int) -> int:
        """Checked translation of a GPA range to an offset in the region."""
        if not self.contains(gpa, length):
            raise GuestMemoryError(gpa, length, self.base, self.end)
        return gpa - self.base

    # -- zero-copy views ----------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of ``[gpa, gpa + length)`` (no copy)."""
        off = self.offset(gpa, length)
        return self._view[off:off + length]

    def ndarray(self, gpa: int, dtype, count: int) -> np.ndarray:
        """A numpy view of ``count`` items of ``dtype`` at ``gpa`` (no copy).

        Used for the virtqueue rings: a ring is a structured array in guest
        RAM that both sides read and write in place.
        """
        dt = np.dtype(dtype)
        off = self.offset(gpa, dt.itemsize * count)
        return np.ndarray((count,), dtype=dt, buffer=self._mmap, offset=off)

    # -- copies -----------------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        off = self.offset(gpa, length)
        return self._mmap[off:off + length]

    def write(self, gpa: int, data) -> None:
        data = memoryview(data).cast("B")
        off = self.offset(gpa, len(data))
        self._view[off:off + len(data)] = data

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        off = self.offset(gpa, length)
        self.array[off:off + length] = value

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack_from(self._mmap, self.offset(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return _U32.unpack_from(self._mmap, self.offset(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack_from(self._mmap, self.offset(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self._mmap, self.offset(gpa, 2), value)

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self._mmap, self.offset(gpa, 4), value)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self._mmap, self.offset(gpa, 8), value)

    def read_obj(self, gpa: int, ctype):
        """Copy a ctypes structure out of guest RAM (a snapshot: the guest
        can change the original afterwards without affecting the copy)."""
        return ctype.from_buffer_copy(self.read(gpa, ctypes.sizeof(ctype)))

    def write_obj(self, gpa: int, obj) -> None:
        self.write(gpa, bytes(obj))

    def close(self) -> None:
        """Release the mapping.  Views handed out earlier must be gone."""
        self.array = None
        self._view.release()
        self._mmap.close()

    def __repr__(self) -> str:
        return f"GuestMemory(base={self.base:#x}, size={self.size:#x})"
