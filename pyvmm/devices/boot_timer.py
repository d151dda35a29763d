"""The boot-timer port: guests stamp boot phases, pyvmm records when.

This module owns one write-only I/O port, ``BOOT_TIMER_PORT`` (0x440, unused
on PC hardware; see :mod:`pyvmm.layout`).  A guest that writes a one-byte
*phase code* there with ``outb`` makes pyvmm record
``(code, seconds since the VMM started)`` and log
``boot timer: phase 0x.. at N.NNN s`` on the logger ``pyvmm.boot_timer``.
Firecracker has the same device (its "boot timer" at 0x3f0 in MMIO space,
written by its test init); a port is simpler for freestanding payloads.

Phase codes (a convention between pyvmm and its guests, not hardware):

    ====  ===============================================
    0x01  freestanding payload: entry point reached
    0x02  freestanding payload: CPL3 ``main`` reached
    0x10  Linux: userspace ``/init`` started
    0x11  Linux: ``/init`` ready (services up)
    0x80+ free for tests
    ====  ===============================================

Only a 1-byte write at offset 0 records; wider or misplaced writes are
ignored (logged once).  Reads return 0xFF, like an unmapped ISA port.

The record is bounded: the first :data:`MAX_RECORDS` phases are kept (boot
phases happen once, at the start) and later writes are counted in
:attr:`BootTimer.dropped` and logged once, so a guest writing in a loop
cannot grow pyvmm's memory or its log.

Time comes from an injectable ``clock`` (default :func:`time.monotonic`) and
is measured from ``start`` (default: ``clock()`` when the device is made;
the machine passes the VMM's own start time).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, NamedTuple

__all__ = ["BootTimer", "BootRecord", "MAX_RECORDS",
           "PHASE_FREESTANDING_ENTRY", "PHASE_FREESTANDING_MAIN",
           "PHASE_INIT_START", "PHASE_INIT_READY", "PHASE_TEST_BASE"]

logger = logging.getLogger("pyvmm.boot_timer")

MAX_RECORDS = 256

PHASE_FREESTANDING_ENTRY = 0x01
PHASE_FREESTANDING_MAIN = 0x02
PHASE_INIT_START = 0x10
PHASE_INIT_READY = 0x11
PHASE_TEST_BASE = 0x80


class BootRecord(NamedTuple):
    """One phase code and when it was written."""

    code: int
    seconds: float


class BootTimer:
    """The device at BOOT_TIMER_PORT (length 1)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 start: float | None = None) -> None:
        self._clock = clock
        self._start = clock() if start is None else start
        self._records: list[BootRecord] = []
        #: phase writes not recorded because MAX_RECORDS was reached
        self.dropped = 0
        self._logged_bad_write = False

    @property
    def records(self) -> tuple[BootRecord, ...]:
        """The recorded phases, oldest first."""
        return tuple(self._records)

    def read(self, offset: int, size: int) -> bytes:
        """The port is write-only: reads float high."""
        return b"\xff" * max(size, 0)

    def write(self, offset: int, data: bytes) -> None:
        """Record a 1-byte phase code written at offset 0."""
        if offset != 0 or len(data) != 1:
            if not self._logged_bad_write:
                self._logged_bad_write = True
                logger.debug("boot timer: ignoring %d-byte write at offset %d",
                             len(data), offset)
            return
        if len(self._records) >= MAX_RECORDS:
            if self.dropped == 0:
                logger.warning("boot timer: %d phases recorded; ignoring further writes",
                               MAX_RECORDS)
            self.dropped += 1
            return
        code = data[0]
        seconds = self._clock() - self._start
        self._records.append(BootRecord(code, seconds))
        logger.info("boot timer: phase 0x%02x at %.3f s", code, seconds)
