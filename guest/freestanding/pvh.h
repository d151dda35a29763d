/*
 * pvh.h - the Xen PVH boot ABI as this guest consumes it.
 *
 * Source: xen/include/public/arch-x86/hvm/start_info.h (mirrored in Linux as
 * include/xen/interface/hvm/start_info.h and in QEMU as
 * include/hw/xen/start_info.h), and xen/include/public/elfnote.h for the
 * note number.  Field names are Xen's; offsets are in the comments.
 *
 * The loader finds the 32-bit entry point in an ELF note (name "Xen", type
 * XEN_ELFNOTE_PHYS32_ENTRY) and jumps there in 32-bit protected mode with
 * paging off, flat CS/DS/ES, and EBX = physical address of hvm_start_info
 * (Xen docs/misc/pvh.pandoc, "x86/HVM direct boot ABI").
 */
#ifndef PYVMM_GUEST_PVH_H
#define PYVMM_GUEST_PVH_H

#define XEN_ELFNOTE_PHYS32_ENTRY        18
#define XEN_HVM_START_MAGIC_VALUE       0x336ec578      /* "xEn3", 0x80 on 'E' */

#ifndef __ASSEMBLER__
#include <stdint.h>

struct hvm_start_info {
	uint32_t magic;                 /*  0 XEN_HVM_START_MAGIC_VALUE */
	uint32_t version;               /*  4 0, or 1 with the memmap fields */
	uint32_t flags;                 /*  8 SIF_xxx */
	uint32_t nr_modules;            /* 12 */
	uint64_t modlist_paddr;         /* 16 array of hvm_modlist_entry */
	uint64_t cmdline_paddr;         /* 24 NUL-terminated ASCII; 0 = none */
	uint64_t rsdp_paddr;            /* 32 ACPI RSDP; 0 = none */
	/* version >= 1 only: */
	uint64_t memmap_paddr;          /* 40 array of hvm_memmap_table_entry */
	uint32_t memmap_entries;        /* 48 */
	uint32_t reserved;              /* 52 must be zero */
};
_Static_assert(sizeof(struct hvm_start_info) == 56, "start_info.h layout");

/* Memory map entry types are the E820 ones: 1 RAM, 2 reserved, 3 ACPI, ... */
struct hvm_memmap_table_entry {
	uint64_t addr;                  /*  0 */
	uint64_t size;                  /*  8 */
	uint32_t type;                  /* 16 */
	uint32_t reserved;              /* 20 */
};
_Static_assert(sizeof(struct hvm_memmap_table_entry) == 24, "start_info.h layout");
#endif

#endif
