"""Kernel and initrd loaders: put an image into guest memory and say where to enter it.

Three kinds of kernel image are recognised by their magic numbers:

* **ELF ``vmlinux``** (``\\x7fELF``, ELF64, x86-64, ET_EXEC): each ``PT_LOAD``
  segment is copied to its *physical* address ``p_paddr``, the bss tail
  (``p_memsz - p_filesz``) zeroed, and the kernel is entered in 64-bit mode
  at ``e_entry`` (for x86-64 vmlinux that is ``phys_startup_64``) with a
  zero page pyvmm synthesises.  Uncompressed: no decompressor runs, which
  matters on PVM where the guest's CPL0 code is emulated.
* **ELF with a PVH note** (``XEN_ELFNOTE_PHYS32_ENTRY``): loaded the same way
  but entered in 32-bit protected mode at the note's address with
  ``hvm_start_info`` in EBX (pyvmm's freestanding guest; QEMU boots it too).
* **bzImage** (``HdrS`` at 0x202, boot protocol >= 2.12 with
  ``XLF_KERNEL_64``): the real-mode setup is skipped, the protected-mode
  part (from ``(setup_sects + 1) * 512``) is loaded at 1 MiB and entered at
  its 64-bit entry, load address + 0x200; the zero page starts from the
  image's own setup header (``Documentation/arch/x86/boot.rst``).

Every offset and size read from the file is checked against the file and
against guest memory; a bad image raises :class:`~pyvmm.errors.LoaderError`
with one line that says what is wrong.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from dataclasses import dataclass

from .. import layout
from ..errors import GuestMemoryError, LoaderError
from ..memory import GuestMemory
from . import params


class EntryMode(enum.Enum):
    LINUX_64 = "64-bit Linux boot protocol"
    PVH_32 = "32-bit PVH entry"


@dataclass(frozen=True)
class LoadedKernel:
    path: str
    format: str                  # "vmlinux", "pvh-elf" or "bzImage"
    entry: int                   # guest physical entry point
    mode: EntryMode
    start: int                   # lowest guest physical address written
    end: int                     # first address past the image (incl. bss / init_size)
    setup_header: params.setup_header | None   # from a bzImage; else None


# --- ELF -----------------------------------------------------------------------
ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4

_Elf64_Ehdr = struct.Struct("<16sHHIQQQIHHHHHH")   # e_ident .. e_shstrndx, 64 bytes
_Elf64_Phdr = struct.Struct("<IIQQQQQQ")            # p_type .. p_align, 56 bytes
_Elf64_Nhdr = struct.Struct("<III")                 # n_namesz, n_descsz, n_type


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _pvh_entry(image: bytes, offset: int, size: int) -> int | None:
    """Walk one PT_NOTE segment; return the XEN_ELFNOTE_PHYS32_ENTRY address if present."""
    pos, end = offset, offset + size
    while pos + _Elf64_Nhdr.size <= end:
        namesz, descsz, ntype = _Elf64_Nhdr.unpack_from(image, pos)
        name_at = pos + _Elf64_Nhdr.size
        desc_at = name_at + _align4(namesz)
        nxt = desc_at + _align4(descsz)
        if nxt > end:
            raise LoaderError("ELF note runs past its PT_NOTE segment")
        if image[name_at:name_at + namesz].rstrip(b"\0") == b"Xen" and \
                ntype == params.XEN_ELFNOTE_PHYS32_ENTRY:
            if descsz == 4:
                return struct.unpack_from("<I", image, desc_at)[0]
            if descsz == 8:
                return struct.unpack_from("<Q", image, desc_at)[0]
            raise LoaderError(f"PVH entry note has a {descsz}-byte descriptor")
        pos = nxt
    return None


def _load_elf(memory: GuestMemory, path: str, image: bytes) -> LoadedKernel:
    if len(image) < _Elf64_Ehdr.size:
        raise LoaderError(f"{path}: truncated ELF header ({len(image)} bytes)")
    (ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, *_rest) = _Elf64_Ehdr.unpack_from(image)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise LoaderError(f"{path}: not a 64-bit little-endian ELF")
    if e_machine != EM_X86_64:
        raise LoaderError(f"{path}: ELF machine {e_machine} is not x86-64 ({EM_X86_64})")
    if e_type != ET_EXEC:
        raise LoaderError(f"{path}: ELF type {e_type} is not an executable (ET_EXEC)")
    if e_phentsize != _Elf64_Phdr.size or e_phnum == 0:
        raise LoaderError(f"{path}: ELF has no usable program headers")
    if e_phoff + e_phnum * e_phentsize > len(image):
        raise LoaderError(f"{path}: ELF program headers run past the end of the file")

    pvh = None
    segments = []
    for i in range(e_phnum):
        p_type, _pflags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = \
            _Elf64_Phdr.unpack_from(image, e_phoff + i * e_phentsize)
        if p_type == PT_NOTE:
            if p_offset + p_filesz > len(image):
                raise LoaderError(f"{path}: PT_NOTE segment runs past the end of the file")
            pvh = _pvh_entry(image, p_offset, p_filesz) if pvh is None else pvh
        elif p_type == PT_LOAD and p_memsz:
            if p_filesz > p_memsz or p_offset + p_filesz > len(image):
                raise LoaderError(f"{path}: PT_LOAD segment {i} is truncated or malformed")
            segments.append((p_paddr, p_offset, p_filesz, p_memsz))
    if not segments:
        raise LoaderError(f"{path}: ELF has no PT_LOAD segment")

    for p_paddr, p_offset, p_filesz, p_memsz in segments:
        if p_paddr < layout.HIMEM_START:
            raise LoaderError(f"{path}: segment at {p_paddr:#x} is below 1 MiB, "
                              "where pyvmm keeps its boot structures")
        if not memory.contains(p_paddr, p_memsz):
            raise LoaderError(f"{path}: segment [{p_paddr:#x}, +{p_memsz:#x}) does not fit in "
                              f"{memory.size // layout.MiB} MiB of guest memory (raise --mem)")
        memory.write(p_paddr, image[p_offset:p_offset + p_filesz])
        memory.fill(p_paddr + p_filesz, p_memsz - p_filesz)

    start = min(s[0] for s in segments)
    end = max(s[0] + s[3] for s in segments)
    entry, mode, fmt = e_entry, EntryMode.LINUX_64, "vmlinux"
    if pvh is not None:
        entry, mode, fmt = pvh, EntryMode.PVH_32, "pvh-elf"
    if not start <= entry < end:
        raise LoaderError(f"{path}: entry point {entry:#x} is outside the loaded image "
                          f"[{start:#x}, {end:#x})")
    return LoadedKernel(path, fmt, entry, mode, start, end, None)


# --- bzImage -------------------------------------------------------------------
BZIMAGE_MIN_VERSION = 0x020C      # 2.12: xloadflags and the 64-bit entry point


def _load_bzimage(memory: GuestMemory, path: str, image: bytes) -> LoadedKernel:
    hdr_end = params.SETUP_HEADER_OFFSET + ctypes.sizeof(params.setup_header)
    if len(image) < hdr_end:
        raise LoaderError(f"{path}: truncated bzImage setup header ({len(image)} bytes)")
    hdr = params.setup_header.from_buffer_copy(image, params.SETUP_HEADER_OFFSET)
    if hdr.boot_flag != params.BOOT_FLAG_MAGIC:
        raise LoaderError(f"{path}: bzImage boot_flag is {hdr.boot_flag:#x}, not 0xaa55")
    if hdr.version < BZIMAGE_MIN_VERSION:
        raise LoaderError(f"{path}: boot protocol {hdr.version >> 8}.{hdr.version & 0xff} "
                          "is older than 2.12 (no 64-bit entry point)")
    if not hdr.xloadflags & params.XLF_KERNEL_64:
        raise LoaderError(f"{path}: bzImage has no 64-bit entry point (XLF_KERNEL_64 clear)")
    if not hdr.loadflags & params.LOADED_HIGH:
        raise LoaderError(f"{path}: zImage (not loaded high) is not supported")
    setup_sects = hdr.setup_sects or 4          # 0 means 4, for ancient kernels (boot.rst)
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(image):
        raise LoaderError(f"{path}: bzImage is truncated: setup is {setup_size} bytes, "
                          f"the file {len(image)}")
    payload = memoryview(image)[setup_size:]
    load_addr = layout.HIMEM_START
    # init_size: the memory the kernel needs from its load address while it
    # decompresses and runs; it must all be RAM.
    need = max(len(payload), hdr.init_size)
    if not memory.contains(load_addr, need):
        raise LoaderError(f"{path}: kernel needs {need:#x} bytes from {load_addr:#x} "
                          f"(init_size), more than {memory.size // layout.MiB} MiB of guest "
                          "memory (raise --mem)")
    memory.write(load_addr, payload)
    return LoadedKernel(path, "bzImage", load_addr + 0x200, EntryMode.LINUX_64,
                        load_addr, load_addr + need, hdr)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise LoaderError(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        raise LoaderError(f"{what} {path!r} is a directory") from None
    except OSError as e:
        raise LoaderError(f"{what} {path!r} cannot be read: {e.strerror}") from None


def load_kernel(memory: GuestMemory, path: str) -> LoadedKernel:
    """Recognise ``path`` by its magic and load it into ``memory``."""
    image = _read(path, "kernel")
    if image[:4] == ELFMAG:
        return _load_elf(memory, path, image)
    if image[0x202:0x206] == struct.pack("<I", params.HDRS_MAGIC):
        return _load_bzimage(memory, path, image)
    if len(image) < 0x206:
        raise LoaderError(f"{path}: file too short ({len(image)} bytes) to be a kernel image")
    raise LoaderError(f"{path}: neither an ELF vmlinux nor a bzImage (no ELF or HdrS magic)")


def load_initrd(memory: GuestMemory, path: str, kernel_end: int,
                max_addr: int | None = None) -> tuple[int, int]:
    """Copy the initrd as high in RAM as it fits (below ``max_addr``), page aligned.

    Returns ``(address, size)``.  ``max_addr`` is the boot protocol's
    ``initrd_addr_max`` + 1 when the kernel states one.
    """
    data = _read(path, "initrd")
    if not data:
        raise LoaderError(f"initrd {path!r} is empty")
    top = memory.end if max_addr is None else min(memory.end, max_addr)
    addr = (top - len(data)) & ~(layout.PAGE_SIZE - 1)
    lowest = (kernel_end + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1)
    if addr < lowest:
        raise LoaderError(f"initrd {path!r} ({len(data) / layout.MiB:.1f} MiB) does not fit "
                          f"between the kernel's end ({kernel_end:#x}) and the top of guest "
                          f"memory ({top:#x}); raise --mem")
    try:
        memory.write(addr, data)
    except GuestMemoryError as e:      # cannot happen after the checks above; say so if it does
        raise LoaderError(f"initrd {path!r}: {e}") from None
    return addr, len(data)
