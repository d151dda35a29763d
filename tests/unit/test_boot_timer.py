"""The boot timer stamps each phase code with the time since the VMM started."""

from __future__ import annotations

import logging

from pyvmm import layout
from pyvmm.devices.boot_timer import MAX_RECORDS, BootRecord, BootTimer
from pyvmm.devices.bus import Bus


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_phases_are_recorded_with_seconds_since_start(caplog):
    caplog.set_level(logging.INFO, logger="pyvmm.boot_timer")
    clock = FakeClock(100.0)
    timer = BootTimer(clock=clock, start=99.5)
    bus = Bus(name="pio")
    bus.insert(layout.BOOT_TIMER_PORT, 1, timer, "boot-timer")

    clock.now = 100.25
    bus.write(0x440, b"\x01")
    clock.now = 101.5
    bus.write(0x440, b"\x10")

    assert timer.records == ((0x01, 0.75), (0x10, 2.0))
    assert timer.records[1] == BootRecord(code=0x10, seconds=2.0)
    msgs = [r.getMessage() for r in caplog.records if r.name == "pyvmm.boot_timer"]
    assert msgs == ["boot timer: phase 0x01 at 0.750 s", "boot timer: phase 0x10 at 2.000 s"]


def test_start_defaults_to_the_clock_at_creation():
    clock = FakeClock(50.0)
    timer = BootTimer(clock=clock)
    clock.now = 53.0
    timer.write(0, b"\x81")
    assert timer.records == ((0x81, 3.0),)


def test_reads_float_high():
    timer = BootTimer(clock=FakeClock())
    assert timer.read(0, 1) == b"\xff"
    assert timer.read(0, 4) == b"\xff" * 4
    assert timer.read(0, -1) == b""


def test_only_one_byte_writes_at_offset_0_record():
    timer = BootTimer(clock=FakeClock())
    timer.write(0, b"\x01\x02")
    timer.write(0, b"")
    timer.write(1, b"\x01")
    timer.write(-1, b"\x01")
    assert timer.records == ()


def test_a_guest_writing_in_a_loop_cannot_grow_the_record_or_the_log(caplog):
    caplog.set_level(logging.INFO, logger="pyvmm.boot_timer")
    clock = FakeClock(0.0)
    timer = BootTimer(clock=clock, start=0.0)
    for i in range(MAX_RECORDS + 1000):
        clock.now = float(i)
        timer.write(0, bytes((i & 0xFF,)))
    assert len(timer.records) == MAX_RECORDS == 256
    assert timer.records[0] == (0x00, 0.0), "the first (boot) phases are kept"
    assert timer.records[-1] == (0xFF, 255.0)
    assert timer.dropped == 1000
    msgs = [r.getMessage() for r in caplog.records if r.name == "pyvmm.boot_timer"]
    assert len(msgs) == MAX_RECORDS + 1


def test_records_cannot_be_mutated_from_outside():
    timer = BootTimer(clock=FakeClock())
    timer.write(0, b"\x02")
    recs = timer.records
    assert isinstance(recs, tuple)
    timer.write(0, b"\x11")
    assert len(recs) == 1 and len(timer.records) == 2
