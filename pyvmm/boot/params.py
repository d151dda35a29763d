"""Boot-information structures a loader hands to the guest.

Two ABIs, both little-endian and packed:

* the Linux x86 boot protocol's ``struct boot_params`` ("zero page") with its
  ``struct setup_header`` (``arch/x86/include/uapi/asm/bootparam.h``,
  ``Documentation/arch/x86/boot.rst``) and the e820 memory map in it;
* the Xen PVH boot ABI's ``struct hvm_start_info``
  (``xen/include/public/arch-x86/hvm/start_info.h``), used for ELF images
  that carry a ``XEN_ELFNOTE_PHYS32_ENTRY`` note (pyvmm's freestanding guest).

Field names are the kernel's and Xen's.  Offsets are pinned in the tests.
"""

from __future__ import annotations

import ctypes
import enum

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class _Packed(ctypes.LittleEndianStructure):
    _pack_ = 1


class setup_header(_Packed):
    _fields_ = [
        ("setup_sects", u8), ("root_flags", u16), ("syssize", u32), ("ram_size", u16),
        ("vid_mode", u16), ("root_dev", u16), ("boot_flag", u16), ("jump", u16),
        ("header", u32), ("version", u16), ("realmode_swtch", u32), ("start_sys_seg", u16),
        ("kernel_version", u16), ("type_of_loader", u8), ("loadflags", u8),
        ("setup_move_size", u16), ("code32_start", u32), ("ramdisk_image", u32),
        ("ramdisk_size", u32), ("bootsect_kludge", u32), ("heap_end_ptr", u16),
        ("ext_loader_ver", u8), ("ext_loader_type", u8), ("cmd_line_ptr", u32),
        ("initrd_addr_max", u32), ("kernel_alignment", u32), ("relocatable_kernel", u8),
        ("min_alignment", u8), ("xloadflags", u16), ("cmdline_size", u32),
        ("hardware_subarch", u32), ("hardware_subarch_data", u64), ("payload_offset", u32),
        ("payload_length", u32), ("setup_data", u64), ("pref_address", u64),
        ("init_size", u32), ("handover_offset", u32), ("kernel_info_offset", u32),
    ]


class boot_e820_entry(_Packed):
    _fields_ = [("addr", u64), ("size", u64), ("type", u32)]


class E820Type(enum.IntEnum):
    E820_TYPE_RAM = 1
    E820_TYPE_RESERVED = 2
    E820_TYPE_ACPI = 3
    E820_TYPE_NVS = 4
    E820_TYPE_UNUSABLE = 5


E820_MAX_ENTRIES_ZEROPAGE = 128
EDD_MBR_SIG_MAX = 16
EDDMAXNR = 6
SETUP_HEADER_OFFSET = 0x1F1


class boot_params(_Packed):
    """The 4 KiB zero page.  Sub-structs pyvmm leaves zero are opaque bytes."""
    _fields_ = [
        ("screen_info", u8 * 0x40),                 # 0x000
        ("apm_bios_info", u8 * 0x14),               # 0x040
        ("_pad2", u8 * 4),                          # 0x054
        ("tboot_addr", u64),                        # 0x058
        ("ist_info", u8 * 0x10),                    # 0x060
        ("acpi_rsdp_addr", u64),                    # 0x070
        ("_pad3", u8 * 8),                          # 0x078
        ("hd0_info", u8 * 16),                      # 0x080
        ("hd1_info", u8 * 16),                      # 0x090
        ("sys_desc_table", u8 * 0x10),              # 0x0a0
        ("olpc_ofw_header", u8 * 0x10),             # 0x0b0
        ("ext_ramdisk_image", u32),                 # 0x0c0
        ("ext_ramdisk_size", u32),                  # 0x0c4
        ("ext_cmd_line_ptr", u32),                  # 0x0c8
        ("_pad4", u8 * 112),                        # 0x0cc
        ("cc_blob_address", u32),                   # 0x13c
        ("edid_info", u8 * 0x80),                   # 0x140
        ("efi_info", u8 * 0x20),                    # 0x1c0
        ("alt_mem_k", u32),                         # 0x1e0
        ("scratch", u32),                           # 0x1e4
        ("e820_entries", u8),                       # 0x1e8
        ("eddbuf_entries", u8),                     # 0x1e9
        ("edd_mbr_sig_buf_entries", u8),            # 0x1ea
        ("kbd_status", u8),                         # 0x1eb
        ("secure_boot", u8),                        # 0x1ec
        ("_pad5", u8 * 2),                          # 0x1ed
        ("sentinel", u8),                           # 0x1ef
        ("_pad6", u8 * 1),                          # 0x1f0
        ("hdr", setup_header),                      # 0x1f1
        ("_pad7", u8 * (0x290 - 0x1F1 - 0x7B)),
        ("edd_mbr_sig_buffer", u32 * EDD_MBR_SIG_MAX),            # 0x290
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", u8 * 48),                         # 0xcd0
        ("eddbuf", u8 * (82 * EDDMAXNR)),           # 0xd00
        ("_pad9", u8 * 276),                        # 0xeec
    ]


# setup_header magic values and flags (boot.rst)
HDRS_MAGIC = 0x53726448          # "HdrS"
BOOT_FLAG_MAGIC = 0xAA55
LOADED_HIGH = 1 << 0             # loadflags: protected-mode code loaded at 0x100000
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0           # xloadflags: has the 64-bit entry at +0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
LOADER_TYPE_UNDEFINED = 0xFF     # type_of_loader: "undefined" boot loader


# --- Xen PVH ----------------------------------------------------------------
XEN_HVM_START_MAGIC_VALUE = 0x336EC578
XEN_ELFNOTE_PHYS32_ENTRY = 18


class hvm_start_info(_Packed):
    _fields_ = [("magic", u32), ("version", u32), ("flags", u32), ("nr_modules", u32),
                ("modlist_paddr", u64), ("cmdline_paddr", u64), ("rsdp_paddr", u64),
                ("memmap_paddr", u64), ("memmap_entries", u32), ("reserved", u32)]


class hvm_modlist_entry(_Packed):
    _fields_ = [("paddr", u64), ("size", u64), ("cmdline_paddr", u64), ("reserved", u64)]


class hvm_memmap_table_entry(_Packed):
    _fields_ = [("addr", u64), ("size", u64), ("type", u32), ("reserved", u32)]
