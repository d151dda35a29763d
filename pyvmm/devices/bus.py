"""The I/O bus: which device answers an address, for port I/O and for MMIO.

This module owns the *address decoding* step of every device access and
nothing else.  When a vCPU exits with ``KVM_EXIT_IO`` or ``KVM_EXIT_MMIO``,
the machine calls :meth:`Bus.read` or :meth:`Bus.write` with the guest's
address; the bus finds the device whose range ``[base, base + length)``
contains it and calls that device with an *offset* relative to its base, so
a device never knows where it was mapped (compare Firecracker
``vstate/bus.rs`` and sysprog21/kvm-host ``bus.c``).  The same class serves
both address spaces; they differ only in what an unmapped read returns:

* **Port I/O** (``unmapped_read_value=0xFF``): on the ISA bus nobody drives
  the data lines when no device decodes a port, and the pull-ups make them
  read as all ones.  Guests rely on this: Linux's 8250 driver declares "no
  UART here" when LSR reads 0xFF ("LSR safety check"), and its IER probe
  fails on a floating bus.
* **MMIO** (``unmapped_read_value=0x00``): what a virtio-mmio driver finds
  when it reads the magic value of an empty slot; anything but
  ``"virt"`` means "no device".

Rules for an access the bus cannot route (no device, or an access that
*straddles* the end of a device, e.g. a 2-byte read of the last port of a
range): a read returns ``size`` copies of the unmapped value, a write is
dropped, and the address is logged once at DEBUG level on the logger
``pyvmm.bus``.  The set of already-logged addresses is capped at
:data:`MAX_LOGGED_ADDRESSES`, so a guest scanning the whole port or MMIO
space cannot make pyvmm's memory grow without bound; past the cap, one last
message says that logging of new addresses has stopped.

A device raising an exception is a pyvmm bug, not a guest error: the bus
lets it propagate.  Devices must answer every offset and value the guest can
produce without raising (see :class:`BusDevice`).  A device that returns a
wrong number of bytes from ``read`` breaks the contract with the vCPU loop
(which copies exactly ``size`` bytes into ``kvm_run``), so the bus raises
:class:`BusError` rather than let a short read pass silently.

Lookup is ``bisect`` over the sorted base addresses: O(log n) per access.
Ranges are inserted while the machine is being built; reads and writes
after that do not mutate the range table, so vCPU threads may share one bus.
(The "logged once" set may be touched by several vCPU threads at a time;
``set.add`` is atomic under the GIL, and a race can at worst log an address
twice or overshoot the cap by one entry per thread.)
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

from ..errors import PyvmmError

__all__ = [
    "Bus",
    "BusDevice",
    "BusError",
    "BusRange",
    "MAX_LOGGED_ADDRESSES",
    "MMIO_UNMAPPED_READ_VALUE",
    "PIO_UNMAPPED_READ_VALUE",
]

logger = logging.getLogger("pyvmm.bus")

#: an ISA bus floats high: an unmapped port reads as 0xFF
PIO_UNMAPPED_READ_VALUE = 0xFF
#: an unmapped MMIO address reads as zeros
MMIO_UNMAPPED_READ_VALUE = 0x00
#: how many distinct unmapped addresses a bus remembers having logged
MAX_LOGGED_ADDRESSES = 1024


@runtime_checkable
class BusDevice(Protocol):
    """What a bus needs from a device: the consumer-side interface.

    ``offset`` is relative to the base the device was inserted at and lies in
    ``[0, length)``; the bus never hands a device an access that runs past its
    end.  A device must nevertheless not raise for any offset, size or value
    a guest can produce, since it may be called directly (tests, another bus).
    """

    def read(self, offset: int, size: int) -> bytes:
        """Return exactly ``size`` bytes read at ``offset``."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Accept ``data`` written at ``offset``."""
        ...


class BusError(PyvmmError):
    """A device broke the :class:`BusDevice` contract (a pyvmm bug)."""


@dataclass(frozen=True)
class BusRange:
    """One device mapped at ``[base, base + length)``."""

    base: int
    length: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        """The first address after the range."""
        return self.base + self.length

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.base <= addr < self.end


class Bus:
    """An address space made of non-overlapping device ranges.

    >>> pio = Bus(name="pio", unmapped_read_value=PIO_UNMAPPED_READ_VALUE)
    >>> mmio = Bus(name="mmio", unmapped_read_value=MMIO_UNMAPPED_READ_VALUE)
    """

    def __init__(self, *, name: str = "pio",
                 unmapped_read_value: int = PIO_UNMAPPED_READ_VALUE) -> None:
        if not 0 <= unmapped_read_value <= 0xFF:
            raise ValueError(f"unmapped_read_value {unmapped_read_value:#x} is not a byte")
        self.name = name
        self.unmapped_read_value = unmapped_read_value
        # Parallel lists sorted by base: _bases for bisect, _ranges for the rest.
        self._bases: list[int] = []
        self._ranges: list[BusRange] = []
        self._logged: set[int] = set()
        self._logging_capped = False

    # --- building the address space ------------------------------------------

    def insert(self, base: int, length: int, device: BusDevice, name: str) -> BusRange:
        """Map ``device`` at ``[base, base + length)`` under ``name``.

        Raises ``ValueError`` for a negative base, a length that is not
        positive, or a range that overlaps one already inserted.
        """
        if length <= 0:
            raise ValueError(f"{self.name} bus: device {name!r} has length {length}; must be > 0")
        if base < 0:
            raise ValueError(f"{self.name} bus: device {name!r} has negative base {base:#x}")
        new = BusRange(base, length, device, name)
        i = bisect.bisect_right(self._bases, base)
        # Only the neighbours can overlap: ranges are disjoint and sorted.
        if i > 0 and self._ranges[i - 1].end > base:
            other = self._ranges[i - 1]
        elif i < len(self._ranges) and self._ranges[i].base < new.end:
            other = self._ranges[i]
        else:
            other = None
        if other is not None:
            raise ValueError(
                f"{self.name} bus: {name!r} [{base:#x}, {new.end:#x}) overlaps "
                f"{other.name!r} [{other.base:#x}, {other.end:#x})")
        self._bases.insert(i, base)
        self._ranges.insert(i, new)
        return new

    def find(self, addr: int) -> BusRange | None:
        """The range containing ``addr``, or ``None``."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.end:
                return r
        return None

    def __iter__(self) -> Iterator[BusRange]:
        """The ranges in address order."""
        return iter(tuple(self._ranges))

    def __len__(self) -> int:
        return len(self._ranges)

    # --- accesses from the guest ---------------------------------------------

    def read(self, addr: int, size: int) -> bytes:
        """Read ``size`` bytes at ``addr``; unmapped bytes read as the float value."""
        if size <= 0:
            return b""
        r = self._route(addr, size, "read")
        if r is None:
            return bytes((self.unmapped_read_value,)) * size
        data = r.device.read(addr - r.base, size)
        if len(data) != size:
            raise BusError(
                f"{self.name} bus: device {r.name!r} returned {len(data)} bytes "
                f"for a {size}-byte read at {addr:#x}")
        return bytes(data)

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr``; a write nobody decodes is dropped."""
        if not data:
            return
        r = self._route(addr, len(data), "write")
        if r is not None:
            r.device.write(addr - r.base, data)

    def _route(self, addr: int, size: int, kind: str) -> BusRange | None:
        r = self.find(addr)
        if r is not None and addr + size <= r.end:
            return r
        self._log_unmapped(addr, size, kind, r)
        return None

    def _log_unmapped(self, addr: int, size: int, kind: str, r: BusRange | None) -> None:
        if addr in self._logged or self._logging_capped:
            return
        if len(self._logged) >= MAX_LOGGED_ADDRESSES:
            self._logging_capped = True
            logger.debug("%s bus: %d unmapped addresses logged; not logging new ones",
                         self.name, MAX_LOGGED_ADDRESSES)
            return
        self._logged.add(addr)
        if r is None:
            logger.debug("%s bus: unmapped %d-byte %s at %#x", self.name, size, kind, addr)
        else:
            logger.debug("%s bus: %d-byte %s at %#x straddles the end of %r [%#x, %#x)",
                         self.name, size, kind, addr, r.name, r.base, r.end)
