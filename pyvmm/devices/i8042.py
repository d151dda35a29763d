"""The i8042 keyboard controller, reduced to the one thing guests need: reset.

This module owns ports 0x60-0x64 (``I8042_DATA_PORT`` .. ``I8042_COMMAND_PORT``
in :mod:`pyvmm.layout`), mapped as one device of length 5 as Firecracker
does: offset 0 is the data port 0x60, offset 4 the status (read) / command
(write) port 0x64.  Offsets 1-3 (ports 0x61-0x63) read as 0 and ignore
writes; KVM's in-kernel PIT answers port 0x61 itself.

On a PC the i8042 (Intel 8042 / "keyboard controller") drives the CPU's
reset line from its output port bit 0.  Command 0xFE written to port 0x64 is
"pulse output port bit 0 low", i.e. reset the CPU: that is how Linux reboots
with ``reboot=k`` (``arch/x86/kernel/reboot.c``, ``native_machine_emergency_restart``,
case BOOT_KBD: ten times ``kb_wait(); outb(0xfe, 0x64);``) and how
freestanding test guests ask pyvmm to stop.  Here it calls ``on_reset()``.
Because Linux repeats the command, ``on_reset`` may be called several times
and must be idempotent (e.g. set a flag and let the vCPU loop stop).

There is no keyboard: the status register reads 0 (bit 0 OBF "output buffer
full" clear: no data; bit 1 IBF "input buffer full" clear: ready for a
command, which is what ``kb_wait()`` polls for) and the data port reads 0.
Other commands are accepted and ignored; each distinct command value is
logged once (there are only 256), and writes to the data port are logged
once in all.  Linux's i8042 driver then finds no controller (its self-test
gets no reply) and carries on without a keyboard.
"""

from __future__ import annotations

import logging
from typing import Callable

__all__ = ["I8042", "CMD_RESET_CPU", "DATA_OFFSET", "COMMAND_OFFSET", "I8042_PORT_COUNT"]

logger = logging.getLogger("pyvmm.i8042")

#: offset of the data port (0x60) from the device's base
DATA_OFFSET = 0
#: offset of the status/command port (0x64) from the device's base
COMMAND_OFFSET = 4
#: ports 0x60..0x64
I8042_PORT_COUNT = 5
#: "pulse output line 0": resets the CPU
CMD_RESET_CPU = 0xFE


class I8042:
    """A keyboard controller with no keyboard whose only job is CPU reset."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._logged_commands: set[int] = set()
        self._logged_data_write = False
        #: how many reset commands the guest has sent
        self.reset_requests = 0

    def read(self, offset: int, size: int) -> bytes:
        """Status, data and the ports between all read as 0."""
        return bytes(max(size, 0))

    def write(self, offset: int, data: bytes) -> None:
        """Act on a command byte written to port 0x64; ignore everything else.

        Only the first byte of a multi-byte write is considered.
        """
        if not data:
            return
        value = data[0]
        if offset == COMMAND_OFFSET:
            if value == CMD_RESET_CPU:
                self.reset_requests += 1
                if self.reset_requests == 1:
                    logger.info("i8042: guest requested CPU reset (command 0xfe)")
                self._on_reset()
            elif value not in self._logged_commands:
                self._logged_commands.add(value)
                logger.debug("i8042: ignoring command %#04x", value)
        elif offset == DATA_OFFSET and not self._logged_data_write:
            self._logged_data_write = True
            logger.debug("i8042: ignoring data port write %#04x (no keyboard)", value)
