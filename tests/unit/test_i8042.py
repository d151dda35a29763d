"""The i8042 resets the machine on command 0xFE to port 0x64, and does nothing else."""

from __future__ import annotations

import logging

import pytest

from pyvmm import layout
from pyvmm.devices.bus import Bus
from pyvmm.devices.i8042 import (CMD_RESET_CPU, COMMAND_OFFSET, DATA_OFFSET,
                                 I8042_PORT_COUNT, I8042)


class Resets:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def machine():
    """An i8042 on a port bus at 0x60..0x64, as the machine maps it."""
    resets = Resets()
    bus = Bus(name="pio")
    kbd = I8042(resets)
    bus.insert(layout.I8042_DATA_PORT, I8042_PORT_COUNT, kbd, "i8042")
    return bus, kbd, resets


def test_offsets_match_the_layout_ports():
    assert layout.I8042_DATA_PORT + DATA_OFFSET == 0x60
    assert layout.I8042_DATA_PORT + COMMAND_OFFSET == layout.I8042_COMMAND_PORT == 0x64


def test_linux_reboot_k_resets_the_machine(machine):
    """arch/x86/kernel/reboot.c, BOOT_KBD: kb_wait() polls status bit 1
    (input buffer full) until clear, then outb(0xfe, 0x64)."""
    bus, kbd, resets = machine
    assert bus.read(0x64, 1)[0] & 0x02 == 0, "kb_wait() would spin"
    bus.write(0x64, bytes((CMD_RESET_CPU,)))
    assert resets.count == 1
    assert kbd.reset_requests == 1


def test_reset_fires_for_each_command_linux_repeats_it(machine):
    bus, _, resets = machine
    for _ in range(10):
        bus.write(0x64, b"\xfe")
    assert resets.count == 10


@pytest.mark.parametrize("port,value", [
    (0x64, 0xFF), (0x64, 0xAA), (0x64, 0x00), (0x64, 0xFD),   # other commands
    (0x60, 0xFE), (0x61, 0xFE), (0x62, 0xFE), (0x63, 0xFE),   # 0xFE elsewhere
])
def test_no_reset_for_anything_but_0xfe_to_0x64(machine, port, value):
    bus, _, resets = machine
    bus.write(port, bytes((value,)))
    assert resets.count == 0


def test_reads_return_zero_no_data_and_ready(machine):
    bus, _, _ = machine
    assert bus.read(0x64, 1) == b"\x00"
    assert bus.read(0x60, 1) == b"\x00"
    assert bus.read(0x61, 1) == b"\x00"
    assert bus.read(0x60, 4) == b"\x00" * 4


def test_other_commands_are_logged_once_per_value(caplog):
    caplog.set_level(logging.DEBUG, logger="pyvmm.i8042")
    kbd = I8042(Resets())
    for _ in range(3):
        kbd.write(COMMAND_OFFSET, b"\xaa")
        kbd.write(COMMAND_OFFSET, b"\x20")
    msgs = [r.getMessage() for r in caplog.records if r.name == "pyvmm.i8042"]
    assert len(msgs) == 2
    assert "0xaa" in msgs[0] and "0x20" in msgs[1]


def test_wide_write_uses_the_first_byte_and_odd_accesses_are_harmless():
    resets = Resets()
    kbd = I8042(resets)
    kbd.write(COMMAND_OFFSET, b"\xfe\x00")
    assert resets.count == 1
    kbd.write(COMMAND_OFFSET, b"\x00\xfe")
    kbd.write(COMMAND_OFFSET, b"")
    kbd.write(-5, b"\xfe")
    kbd.write(1 << 33, b"\xfe")
    assert resets.count == 1
    assert kbd.read(99, 2) == b"\x00\x00"
    assert kbd.read(0, -1) == b""
