"""What the guest is told at entry: the e820 memory map, the command line, the
initrd, in the zero page (Linux boot protocol) or ``hvm_start_info`` (PVH).

Positions come from :mod:`pyvmm.layout`.  The e820 map describes RAM as two
ranges, ``[0, EBDA_START)`` and ``[HIMEM_START, end of RAM)``; the EBDA (where
the MP table lives) and the legacy VGA/BIOS hole are reserved.
"""

from __future__ import annotations

import ctypes

from .. import layout
from ..errors import LoaderError
from ..memory import GuestMemory
from . import params
from .loader import LoadedKernel

E820 = params.E820Type


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """``(addr, size, type)`` ranges for a guest with ``mem_size`` bytes of RAM at 0."""
    return [
        (0, layout.EBDA_START, E820.E820_TYPE_RAM),
        (layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START, E820.E820_TYPE_RESERVED),
        (layout.HIMEM_START, mem_size - layout.HIMEM_START, E820.E820_TYPE_RAM),
    ]


def write_cmdline(memory: GuestMemory, cmdline: bytes) -> None:
    if len(cmdline) > layout.CMDLINE_MAX_SIZE:
        raise LoaderError(f"kernel command line of {len(cmdline)} bytes exceeds "
                          f"{layout.CMDLINE_MAX_SIZE}")
    memory.write(layout.CMDLINE_START, cmdline)


def write_zero_page(memory: GuestMemory, kernel: LoadedKernel, cmdline: bytes,
                    initrd: tuple[int, int] | None) -> params.boot_params:
    """Build ``struct boot_params`` at ZERO_PAGE_START (boot.rst, "64-bit BOOT PROTOCOL")."""
    bp = params.boot_params()
    if kernel.setup_header is not None:            # bzImage: start from its own header
        bp.hdr = kernel.setup_header
        if kernel.setup_header.cmdline_size and len(cmdline) > kernel.setup_header.cmdline_size + 1:
            raise LoaderError(f"kernel command line of {len(cmdline) - 1} bytes exceeds the "
                              f"kernel's cmdline_size of {kernel.setup_header.cmdline_size}")
    else:                                          # vmlinux: synthesise the fields it reads
        bp.hdr.boot_flag = params.BOOT_FLAG_MAGIC
        bp.hdr.header = params.HDRS_MAGIC
        bp.hdr.version = 0x020F
        bp.hdr.kernel_alignment = 0x1000000
    hdr = bp.hdr
    hdr.type_of_loader = params.LOADER_TYPE_UNDEFINED
    hdr.loadflags |= params.LOADED_HIGH | params.CAN_USE_HEAP
    hdr.heap_end_ptr = 0xFE00 - 0x200
    hdr.cmd_line_ptr = layout.CMDLINE_START
    hdr.cmdline_size = len(cmdline) - 1
    if initrd is not None:
        hdr.ramdisk_image, hdr.ramdisk_size = initrd
    entries = e820_map(memory.size)
    for i, (addr, size, typ) in enumerate(entries):
        bp.e820_table[i] = params.boot_e820_entry(addr, size, typ)
    bp.e820_entries = len(entries)
    memory.write(layout.ZERO_PAGE_START, bytes(bp))
    return bp


def write_pvh_start_info(memory: GuestMemory, initrd: tuple[int, int] | None) -> None:
    """Build ``struct hvm_start_info`` (version 1, with the memory map) at PVH_INFO_START."""
    entries = e820_map(memory.size)
    info = params.hvm_start_info(magic=params.XEN_HVM_START_MAGIC_VALUE, version=1,
                                 cmdline_paddr=layout.CMDLINE_START,
                                 memmap_paddr=layout.PVH_MEMMAP_START,
                                 memmap_entries=len(entries))
    addr = layout.PVH_MEMMAP_START
    for base, size, typ in entries:
        memory.write_obj(addr, params.hvm_memmap_table_entry(base, size, typ))
        addr += ctypes.sizeof(params.hvm_memmap_table_entry)
    if initrd is not None:
        info.nr_modules = 1
        info.modlist_paddr = addr
        memory.write_obj(addr, params.hvm_modlist_entry(paddr=initrd[0], size=initrd[1]))
    memory.write_obj(layout.PVH_INFO_START, info)
