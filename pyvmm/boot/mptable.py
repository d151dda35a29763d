"""The Intel MultiProcessor Specification (v1.4) table: how Linux finds the vCPUs.

With neither ACPI nor an MP table Linux sees one CPU and runs the PIC in
virtual-wire mode.  pyvmm writes, at ``layout.MPTABLE_START`` in the last KiB
of base memory (where ``arch/x86/kernel/mpparse.c`` ``smp_scan_config``
looks): the MP floating pointer ``_MP_``, then the ``PCMP`` configuration
table with one processor entry per vCPU (APIC ID = vCPU index, vCPU 0 the
boot processor), an ISA bus, the IOAPIC (ID = vCPU count) and an interrupt
entry routing each ISA IRQ 0..23 to the IOAPIC pin of the same number, plus
the local ExtINT (LINT0) and NMI (LINT1) entries.  Same shape as
Firecracker's ``arch/x86_64/mptable.rs``.  Struct names are Linux's
(``arch/x86/include/asm/mpspec_def.h``).
"""

from __future__ import annotations

import ctypes

from .. import layout
from ..errors import ConfigError
from ..memory import GuestMemory

u8, u16, u32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32


class _Packed(ctypes.LittleEndianStructure):
    _pack_ = 1


class mpf_intel(_Packed):
    _fields_ = [("signature", ctypes.c_char * 4), ("physptr", u32), ("length", u8),
                ("specification", u8), ("checksum", u8), ("feature1", u8), ("feature2", u8),
                ("feature3", u8), ("feature4", u8), ("feature5", u8)]


class mpc_table(_Packed):
    _fields_ = [("signature", ctypes.c_char * 4), ("length", u16), ("spec", u8),
                ("checksum", u8), ("oem", ctypes.c_char * 8), ("productid", ctypes.c_char * 12),
                ("oemptr", u32), ("oemsize", u16), ("oemcount", u16), ("lapic", u32),
                ("reserved", u32)]


class mpc_cpu(_Packed):
    _fields_ = [("type", u8), ("apicid", u8), ("apicver", u8), ("cpuflag", u8),
                ("cpufeature", u32), ("featureflag", u32), ("reserved", u32 * 2)]


class mpc_bus(_Packed):
    _fields_ = [("type", u8), ("busid", u8), ("bustype", ctypes.c_char * 6)]


class mpc_ioapic(_Packed):
    _fields_ = [("type", u8), ("apicid", u8), ("apicver", u8), ("flags", u8), ("apicaddr", u32)]


class mpc_intsrc(_Packed):
    _fields_ = [("type", u8), ("irqtype", u8), ("irqflag", u16), ("srcbus", u8),
                ("srcbusirq", u8), ("dstapic", u8), ("dstirq", u8)]


class mpc_lintsrc(_Packed):
    _fields_ = [("type", u8), ("irqtype", u8), ("irqflag", u16), ("srcbusid", u8),
                ("srcbusirq", u8), ("destapic", u8), ("destapiclint", u8)]


MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
mp_INT, mp_NMI, mp_SMI, mp_ExtINT = 0, 1, 2, 3
CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
MPC_APIC_USABLE = 1
APIC_VERSION = 0x14
CPU_STEPPING = 0x600
CPU_FEATURE_APIC = 0x200
CPU_FEATURE_FPU = 0x001
IRQ_MAX = 23
MP_SPEC_REV = 4            # version 1.4

#: the most vCPUs whose entries fit in the EBDA slot (and an 8-bit APIC ID space)
MAX_CPUS = 32


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build(cpus: int) -> bytes:
    """The floating pointer and configuration table for ``cpus`` vCPUs, as bytes."""
    if not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(f"the MP table describes 1 to {MAX_CPUS} vCPUs, not {cpus}")
    ioapic_id = cpus
    entries = []
    for i in range(cpus):
        entries.append(mpc_cpu(type=MP_PROCESSOR, apicid=i, apicver=APIC_VERSION,
                               cpuflag=CPU_ENABLED | (CPU_BOOTPROCESSOR if i == 0 else 0),
                               cpufeature=CPU_STEPPING,
                               featureflag=CPU_FEATURE_APIC | CPU_FEATURE_FPU))
    entries.append(mpc_bus(type=MP_BUS, busid=0, bustype=b"ISA   "))
    entries.append(mpc_ioapic(type=MP_IOAPIC, apicid=ioapic_id, apicver=APIC_VERSION,
                              flags=MPC_APIC_USABLE, apicaddr=layout.IOAPIC_START))
    for irq in range(IRQ_MAX + 1):
        entries.append(mpc_intsrc(type=MP_INTSRC, irqtype=mp_INT, irqflag=0, srcbus=0,
                                  srcbusirq=irq, dstapic=ioapic_id, dstirq=irq))
    entries.append(mpc_lintsrc(type=MP_LINTSRC, irqtype=mp_ExtINT, srcbusid=0, srcbusirq=0,
                               destapic=0, destapiclint=0))
    entries.append(mpc_lintsrc(type=MP_LINTSRC, irqtype=mp_NMI, srcbusid=0, srcbusirq=0,
                               destapic=0xFF, destapiclint=1))
    body = b"".join(bytes(e) for e in entries)

    table_addr = layout.MPTABLE_START + ctypes.sizeof(mpf_intel)
    header = mpc_table(signature=b"PCMP", length=ctypes.sizeof(mpc_table) + len(body),
                       spec=MP_SPEC_REV, oem=b"PYVMM   ", productid=b"000000000000",
                       oemcount=len(entries), lapic=layout.APIC_START)
    header.checksum = _checksum(bytes(header) + body)
    mpf = mpf_intel(signature=b"_MP_", physptr=table_addr, length=1, specification=MP_SPEC_REV)
    mpf.checksum = _checksum(bytes(mpf))
    blob = bytes(mpf) + bytes(header) + body
    if layout.MPTABLE_START + len(blob) > layout.LEGACY_HOLE_START:
        raise ConfigError(f"MP table for {cpus} vCPUs does not fit below 0xa0000")
    return blob


def write(memory: GuestMemory, cpus: int) -> None:
    memory.write(layout.MPTABLE_START, build(cpus))
