"""The bus routes each address to the device whose range holds it."""

from __future__ import annotations

import logging

import pytest

from pyvmm.devices.bus import (MAX_LOGGED_ADDRESSES, MMIO_UNMAPPED_READ_VALUE,
                               PIO_UNMAPPED_READ_VALUE, Bus, BusDevice, BusError)


class Recorder:
    """A device that logs every access and reads back a fixed pattern."""

    def __init__(self, fill: int = 0xA5) -> None:
        self.fill = fill
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return bytes((self.fill,)) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


def unmapped_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pyvmm.bus"]


def test_recorder_is_a_bus_device():
    assert isinstance(Recorder(), BusDevice)


def test_dispatch_passes_offset_relative_to_base():
    bus = Bus()
    com1, kbd = Recorder(0x11), Recorder(0x22)
    bus.insert(0x3F8, 8, com1, "com1")
    bus.insert(0x60, 5, kbd, "i8042")

    assert bus.read(0x3FD, 1) == b"\x11"
    bus.write(0x64, b"\xfe")
    assert bus.read(0x60, 1) == b"\x22"

    assert com1.reads == [(5, 1)]
    assert kbd.writes == [(4, b"\xfe")]
    assert kbd.reads == [(0, 1)]


def test_first_and_last_address_of_a_range_are_mapped_the_next_is_not():
    bus = Bus()
    dev = Recorder()
    bus.insert(0x100, 0x10, dev, "dev")
    assert bus.find(0x0FF) is None
    assert bus.find(0x100).device is dev
    assert bus.find(0x10F).device is dev
    assert bus.find(0x110) is None


def test_find_among_many_ranges_inserted_out_of_order():
    bus = Bus(name="mmio", unmapped_read_value=0)
    devices = {base: Recorder() for base in (0xD000_5000, 0xD000_0000, 0xD000_F000, 0xD000_1000)}
    for base, dev in devices.items():
        bus.insert(base, 0x1000, dev, f"virtio@{base:#x}")
    assert [r.base for r in bus] == sorted(devices)
    for base, dev in devices.items():
        assert bus.find(base + 0x70).device is dev
    assert bus.find(0xD000_2000) is None
    assert len(bus) == 4


@pytest.mark.parametrize("base,length", [
    (0x3F8, 8),     # identical
    (0x3F0, 9),     # ends inside
    (0x3FF, 2),     # starts on the last port
    (0x3FA, 1),     # inside
    (0x3F0, 0x20),  # encloses
])
def test_insert_rejects_overlap(base, length):
    bus = Bus()
    bus.insert(0x3F8, 8, Recorder(), "com1")
    with pytest.raises(ValueError, match="overlaps 'com1'"):
        bus.insert(base, length, Recorder(), "intruder")
    assert len(bus) == 1


def test_insert_accepts_adjacent_ranges():
    bus = Bus()
    bus.insert(0x3F8, 8, Recorder(), "com1")
    bus.insert(0x3F0, 8, Recorder(), "below")
    bus.insert(0x400, 8, Recorder(), "above")
    assert [r.name for r in bus] == ["below", "com1", "above"]


@pytest.mark.parametrize("length", [0, -1])
def test_insert_rejects_empty_range(length):
    with pytest.raises(ValueError, match="length"):
        Bus().insert(0x10, length, Recorder(), "empty")


def test_insert_rejects_negative_base():
    with pytest.raises(ValueError, match="negative"):
        Bus().insert(-1, 2, Recorder(), "neg")


def test_unmapped_read_floats_high_on_the_port_bus_and_reads_zero_on_mmio():
    pio = Bus(name="pio", unmapped_read_value=PIO_UNMAPPED_READ_VALUE)
    mmio = Bus(name="mmio", unmapped_read_value=MMIO_UNMAPPED_READ_VALUE)
    assert pio.read(0x2F8, 1) == b"\xff"
    assert pio.read(0xCFC, 4) == b"\xff" * 4
    assert mmio.read(0xD000_0000, 4) == b"\x00" * 4


def test_unmapped_write_is_dropped():
    bus = Bus()
    dev = Recorder()
    bus.insert(0x10, 1, dev, "dev")
    bus.write(0x11, b"\x01")
    assert dev.writes == []


def test_unmapped_address_is_logged_once(caplog):
    caplog.set_level(logging.DEBUG, logger="pyvmm.bus")
    bus = Bus(name="pio")
    for _ in range(3):
        bus.read(0x80, 1)
        bus.write(0x80, b"\x00")
    bus.read(0x81, 1)
    msgs = unmapped_messages(caplog)
    assert len(msgs) == 2
    assert "0x80" in msgs[0] and "pio" in msgs[0]
    assert "0x81" in msgs[1]


def test_access_straddling_the_end_of_a_device_is_unmapped_and_logged_once(caplog):
    caplog.set_level(logging.DEBUG, logger="pyvmm.bus")
    bus = Bus()
    dev = Recorder()
    bus.insert(0x3F8, 8, dev, "com1")
    assert bus.read(0x3FF, 2) == b"\xff\xff"
    bus.write(0x3FE, b"\x00\x00\x00\x00")
    bus.read(0x3FF, 4)
    assert dev.reads == [] and dev.writes == []
    assert bus.read(0x3FE, 2) == b"\xa5\xa5"       # fits exactly: mapped
    msgs = unmapped_messages(caplog)
    assert len(msgs) == 2
    assert all("straddles" in m and "com1" in m for m in msgs)


def test_memory_of_logged_addresses_is_bounded(caplog):
    caplog.set_level(logging.DEBUG, logger="pyvmm.bus")
    bus = Bus()
    for port in range(0x10000):                     # a guest scanning every port
        bus.read(port, 1)
    assert len(bus._logged) == MAX_LOGGED_ADDRESSES
    msgs = unmapped_messages(caplog)
    assert len(msgs) == MAX_LOGGED_ADDRESSES + 1
    assert "not logging" in msgs[-1]
    bus.read(0x10000, 1)                            # still answers, no new log
    assert len(unmapped_messages(caplog)) == MAX_LOGGED_ADDRESSES + 1


def test_device_exceptions_propagate():
    class Broken(Recorder):
        def read(self, offset, size):
            raise RuntimeError("pyvmm bug")

    bus = Bus()
    bus.insert(0, 1, Broken(), "broken")
    with pytest.raises(RuntimeError, match="pyvmm bug"):
        bus.read(0, 1)


def test_device_returning_the_wrong_size_is_a_bus_error():
    class Short(Recorder):
        def read(self, offset, size):
            return b"\x00"

    bus = Bus()
    bus.insert(0, 4, Short(), "short")
    with pytest.raises(BusError, match="returned 1 bytes for a 4-byte read"):
        bus.read(0, 4)


def test_empty_accesses_reach_no_device():
    bus = Bus()
    dev = Recorder()
    bus.insert(0, 4, dev, "dev")
    assert bus.read(0, 0) == b""
    bus.write(0, b"")
    assert dev.reads == [] and dev.writes == []


def test_unmapped_read_value_must_be_a_byte():
    with pytest.raises(ValueError):
        Bus(unmapped_read_value=0x100)
