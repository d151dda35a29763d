"""Emulated devices and the bus that routes guest accesses to them.

Every device here is a pure state machine behind two methods,
``read(offset, size) -> bytes`` and ``write(offset, data)`` (the
:class:`~pyvmm.devices.bus.BusDevice` protocol), tested without KVM.  Devices
never import :mod:`pyvmm.kvm`: the machine connects their interrupt callables
to KVM and inserts them into a :class:`~pyvmm.devices.bus.Bus`.

* :mod:`.bus` -- address decoding for the port-I/O and MMIO address spaces.
* :mod:`.serial` -- COM1, a 16550A UART (PC16550D datasheet).
* :mod:`.i8042` -- the keyboard controller, for ``reboot=k`` (command 0xFE).
* :mod:`.boot_timer` -- the port guests write boot-phase codes to.
"""

from __future__ import annotations

from .boot_timer import BootTimer
from .bus import Bus, BusDevice, BusError, BusRange
from .i8042 import I8042
from .serial import Serial

__all__ = ["Bus", "BusDevice", "BusError", "BusRange", "Serial", "I8042", "BootTimer"]
