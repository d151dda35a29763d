"""Loaders, zero page, PVH start info, e820, command line, MP table, x86 entry state."""

import ctypes
import struct

import pytest

from pyvmm import images, layout
from pyvmm.boot import bootinfo, mptable, params, x86
from pyvmm.boot.cmdline import Cmdline
from pyvmm.boot.loader import EntryMode, load_initrd, load_kernel
from pyvmm.errors import ConfigError, LoaderError
from pyvmm.memory import GuestMemory

MEM = 64 * layout.MiB


@pytest.fixture
def mem():
    m = GuestMemory(MEM)
    yield m
    m.close()


# --- hand-made images ---------------------------------------------------------------
def make_elf(segments, entry, pvh_entry=None, machine=62, etype=2, cls=2):
    """An ELF64 with PT_LOAD (paddr, data, memsz) segments and optionally a PVH note."""
    phdrs, blobs = [], []
    note = b""
    if pvh_entry is not None:
        note = struct.pack("<III", 4, 4, params.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + \
            struct.pack("<I", pvh_entry)
    nph = len(segments) + (1 if note else 0)
    offset = 64 + 56 * nph
    for paddr, data, memsz in segments:
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 5, offset, paddr, paddr, len(data), memsz, 0x1000))
        blobs.append(data)
        offset += len(data)
    if note:
        phdrs.append(struct.pack("<IIQQQQQQ", 4, 4, offset, 0, 0, len(note), len(note), 4))
        blobs.append(note)
    ident = b"\x7fELF" + bytes([cls, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, etype, machine, 1, entry, 64, 0, 0, 64,
                       56, nph, 64, 0, 0)
    return ehdr + b"".join(phdrs) + b"".join(blobs)


def make_bzimage(payload=b"\x90" * 4096, version=0x020F, xloadflags=params.XLF_KERNEL_64,
                 setup_sects=4, init_size=0x100000, boot_flag=0xAA55, loadflags=params.LOADED_HIGH):
    setup = bytearray((setup_sects + 1) * 512)
    hdr = params.setup_header(setup_sects=setup_sects, boot_flag=boot_flag,
                              header=params.HDRS_MAGIC, version=version, loadflags=loadflags,
                              xloadflags=xloadflags, init_size=init_size, cmdline_size=2047,
                              initrd_addr_max=0x7FFFFFFF, kernel_alignment=0x200000)
    setup[0x1F1:0x1F1 + ctypes.sizeof(hdr)] = bytes(hdr)
    return bytes(setup) + payload


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_elf_vmlinux_loads_by_physical_address(mem, tmp_path):
    img = make_elf([(0x1000000, b"\xAA" * 100, 0x2000), (0x1100000, b"\xBB" * 8, 8)], 0x1000000)
    mem.fill(0x1000000, 0x2000, 0x55)
    k = load_kernel(mem, write(tmp_path, "vmlinux", img))
    assert (k.format, k.mode, k.entry) == ("vmlinux", EntryMode.LINUX_64, 0x1000000)
    assert mem.read(0x1000000, 100) == b"\xAA" * 100
    assert mem.read(0x1000000 + 100, 0x2000 - 100) == bytes(0x2000 - 100)   # bss zeroed
    assert (k.start, k.end) == (0x1000000, 0x1100008)


def test_pvh_note_selects_32bit_entry(mem, tmp_path):
    img = make_elf([(0x100000, b"\xF4" * 64, 64)], 0x100000, pvh_entry=0x100010)
    k = load_kernel(mem, write(tmp_path, "pvh.elf", img))
    assert (k.format, k.mode, k.entry) == ("pvh-elf", EntryMode.PVH_32, 0x100010)


@pytest.mark.parametrize("kwargs,message", [
    (dict(machine=3), "not x86-64"),
    (dict(etype=3), "not an executable"),
    (dict(cls=1), "64-bit"),
])
def test_elf_wrong_kind(mem, tmp_path, kwargs, message):
    img = make_elf([(0x100000, b"x", 1)], 0x100000, **kwargs)
    with pytest.raises(LoaderError, match=message):
        load_kernel(mem, write(tmp_path, "bad.elf", img))


@pytest.mark.parametrize("segments,entry,message", [
    ([(0x1000, b"x", 1)], 0x1000, "below 1 MiB"),
    ([(MEM - 4, b"x", 16)], MEM - 4, "does not fit"),
    ([(0x100000, b"x", 1)], 0x200000, "entry point"),
])
def test_elf_bad_segments(mem, tmp_path, segments, entry, message):
    with pytest.raises(LoaderError, match=message):
        load_kernel(mem, write(tmp_path, "bad.elf", make_elf(segments, entry)))


def test_elf_truncated(mem, tmp_path):
    img = make_elf([(0x100000, b"y" * 4096, 4096)], 0x100000)
    for cut in (10, 64 + 20, len(img) - 100):
        with pytest.raises(LoaderError):
            load_kernel(mem, write(tmp_path, f"cut{cut}", img[:cut]))


def test_bzimage_loads_protected_mode_part(mem, tmp_path):
    payload = bytes(range(256)) * 16
    k = load_kernel(mem, write(tmp_path, "bzImage", make_bzimage(payload)))
    assert (k.format, k.mode) == ("bzImage", EntryMode.LINUX_64)
    assert k.entry == layout.HIMEM_START + 0x200
    assert mem.read(layout.HIMEM_START, len(payload)) == payload
    assert k.end == layout.HIMEM_START + 0x100000     # init_size counts
    assert k.setup_header.version == 0x020F


@pytest.mark.parametrize("kwargs,message", [
    (dict(version=0x0206), "older than 2.12"),
    (dict(xloadflags=0), "no 64-bit entry"),
    (dict(boot_flag=0x1234), "boot_flag"),
    (dict(loadflags=0), "not loaded high"),
    (dict(init_size=MEM), "init_size"),
])
def test_bzimage_refused(mem, tmp_path, kwargs, message):
    with pytest.raises(LoaderError, match=message):
        load_kernel(mem, write(tmp_path, "bz", make_bzimage(**kwargs)))


def test_bzimage_truncated(mem, tmp_path):
    img = make_bzimage()
    with pytest.raises(LoaderError, match="truncated"):
        load_kernel(mem, write(tmp_path, "bz", img[:0x230]))
    with pytest.raises(LoaderError, match="truncated"):
        load_kernel(mem, write(tmp_path, "bz", img[:5 * 512]))


@pytest.mark.parametrize("data,message", [
    (b"", "too short"), (b"hello world", "too short"), (b"\0" * 4096, "neither"),
])
def test_not_a_kernel(mem, tmp_path, data, message):
    with pytest.raises(LoaderError, match=message):
        load_kernel(mem, write(tmp_path, "junk", data))


def test_missing_and_unreadable(mem, tmp_path):
    with pytest.raises(LoaderError, match="does not exist"):
        load_kernel(mem, str(tmp_path / "nope"))
    with pytest.raises(LoaderError, match="directory"):
        load_kernel(mem, str(tmp_path))


def test_initrd_goes_high_and_aligned(mem, tmp_path):
    path = write(tmp_path, "initrd", b"I" * 10000)
    addr, size = load_initrd(mem, path, kernel_end=0x2000000)
    assert size == 10000 and addr % layout.PAGE_SIZE == 0
    assert addr + size <= MEM and addr + size > MEM - 2 * layout.PAGE_SIZE
    assert mem.read(addr, size) == b"I" * 10000
    addr2, _ = load_initrd(mem, path, kernel_end=0x2000000, max_addr=0x3000000)
    assert addr2 + size <= 0x3000000


def test_initrd_that_does_not_fit(mem, tmp_path):
    path = write(tmp_path, "initrd", b"I" * (8 * layout.MiB))
    with pytest.raises(LoaderError, match="does not fit"):
        load_initrd(mem, path, kernel_end=MEM - 4 * layout.MiB)
    with pytest.raises(LoaderError, match="empty"):
        load_initrd(mem, write(tmp_path, "empty", b""), kernel_end=0)


# --- the real built images (skipped only before 'make kernel') -----------------------
def _built(fn):
    path = fn(required=False)
    if path is None:
        pytest.skip("the guest kernel is not built yet (make kernel)")
    return str(path)


def test_real_vmlinux(mem):
    k = load_kernel(mem, _built(images.default_kernel))
    assert k.format == "vmlinux" and k.entry == 0x1000000 and k.mode is EntryMode.LINUX_64


def test_real_bzimage(mem):
    k = load_kernel(mem, _built(images.default_bzimage))
    assert k.format == "bzImage" and k.setup_header.version >= 0x020C
    assert k.setup_header.xloadflags & params.XLF_KERNEL_64


# --- zero page, PVH, e820 -------------------------------------------------------------
def test_struct_layouts():
    assert ctypes.sizeof(params.boot_params) == 4096
    assert ctypes.sizeof(params.setup_header) == 0x7B
    assert params.boot_params.hdr.offset == 0x1F1
    assert params.boot_params.e820_entries.offset == 0x1E8
    assert params.boot_params.e820_table.offset == 0x2D0
    assert params.boot_params.ext_cmd_line_ptr.offset == 0xC8
    assert params.setup_header.cmd_line_ptr.offset + 0x1F1 == 0x228
    assert params.setup_header.init_size.offset + 0x1F1 == 0x260
    assert ctypes.sizeof(params.hvm_start_info) == 56
    assert ctypes.sizeof(params.hvm_memmap_table_entry) == 24


def test_e820_map():
    ranges = bootinfo.e820_map(MEM)
    assert ranges[0] == (0, layout.EBDA_START, 1)
    assert ranges[-1] == (layout.HIMEM_START, MEM - layout.HIMEM_START, 1)
    ram = [r for r in ranges if r[2] == 1]
    assert all(not (a <= layout.MPTABLE_START < a + s) for a, s, _ in ram)


def test_zero_page_for_vmlinux(mem, tmp_path):
    k = load_kernel(mem, write(tmp_path, "v", make_elf([(0x1000000, b"k", 1)], 0x1000000)))
    cmd = b"console=ttyS0\0"
    bootinfo.write_cmdline(mem, cmd)
    bootinfo.write_zero_page(mem, k, cmd, (0x3000000, 1234))
    bp = mem.read_obj(layout.ZERO_PAGE_START, params.boot_params)
    assert bp.hdr.header == params.HDRS_MAGIC and bp.hdr.boot_flag == 0xAA55
    assert bp.hdr.type_of_loader == 0xFF and bp.hdr.loadflags & params.LOADED_HIGH
    assert (bp.hdr.cmd_line_ptr, bp.hdr.cmdline_size) == (layout.CMDLINE_START, len(cmd) - 1)
    assert (bp.hdr.ramdisk_image, bp.hdr.ramdisk_size) == (0x3000000, 1234)
    assert bp.e820_entries == 3 and bp.e820_table[2].size == MEM - layout.HIMEM_START
    assert mem.read(layout.CMDLINE_START, len(cmd)) == cmd


def test_zero_page_respects_bzimage_cmdline_size(mem, tmp_path):
    k = load_kernel(mem, write(tmp_path, "bz", make_bzimage()))
    with pytest.raises(LoaderError, match="cmdline_size"):
        bootinfo.write_zero_page(mem, k, b"x" * 3000 + b"\0", None)


def test_pvh_start_info(mem):
    bootinfo.write_pvh_start_info(mem, (0x3000000, 4096))
    info = mem.read_obj(layout.PVH_INFO_START, params.hvm_start_info)
    assert info.magic == params.XEN_HVM_START_MAGIC_VALUE and info.version == 1
    assert info.cmdline_paddr == layout.CMDLINE_START
    assert info.memmap_entries == 3 and info.nr_modules == 1
    mod = mem.read_obj(info.modlist_paddr, params.hvm_modlist_entry)
    assert (mod.paddr, mod.size) == (0x3000000, 4096)
    last = mem.read_obj(info.memmap_paddr + 2 * 24, params.hvm_memmap_table_entry)
    assert (last.addr, last.type) == (layout.HIMEM_START, 1)


# --- command line -----------------------------------------------------------------------
def test_cmdline_builder():
    c = Cmdline(200)
    c.insert("console", "ttyS0").insert("quiet").insert("pyvmm.run", "hello world")
    c.add_virtio_mmio_device(0x1000, 0xD0000000, 5)
    c.add_virtio_mmio_device(0x200, 0xD0001000, 6, device_id=3)
    assert str(c) == ('console=ttyS0 quiet pyvmm.run="hello world" '
                      'virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=512@0xd0001000:6:3')
    assert c.as_bytes().endswith(b"\0")
    assert c.has("quiet") and c.has("console") and not c.has("cons")


@pytest.mark.parametrize("key,value", [("a b", None), ("", None), ("k", 'x"y'), ("k", "\x01"),
                                       ("k=v", None), ("ключ", None)])
def test_cmdline_rejects(key, value):
    with pytest.raises(ConfigError):
        Cmdline(100).insert(key, value)


def test_cmdline_capacity_counts_the_nul():
    c = Cmdline(6)
    c.insert("abcde")             # 5 + NUL = 6
    with pytest.raises(ConfigError, match="limit"):
        c.insert("x")


# --- MP table -----------------------------------------------------------------------------
@pytest.mark.parametrize("cpus", [1, 2, 8, mptable.MAX_CPUS])
def test_mptable_checksums_and_cpus(cpus):
    blob = mptable.build(cpus)
    mpf = mptable.mpf_intel.from_buffer_copy(blob)
    assert mpf.signature == b"_MP_" and sum(blob[:16]) & 0xFF == 0
    table = blob[16:]
    hdr = mptable.mpc_table.from_buffer_copy(table)
    assert hdr.signature == b"PCMP" and hdr.length == len(table)
    assert sum(table) & 0xFF == 0
    assert mpf.physptr == layout.MPTABLE_START + 16
    procs = [table[44 + 20 * i] for i in range(cpus)]
    assert procs == [mptable.MP_PROCESSOR] * cpus
    first = mptable.mpc_cpu.from_buffer_copy(table, 44)
    assert first.cpuflag == mptable.CPU_ENABLED | mptable.CPU_BOOTPROCESSOR
    assert layout.MPTABLE_START + len(blob) <= layout.LEGACY_HOLE_START


@pytest.mark.parametrize("cpus", [0, mptable.MAX_CPUS + 1])
def test_mptable_refuses(cpus):
    with pytest.raises(ConfigError):
        mptable.build(cpus)


# --- x86 entry state ----------------------------------------------------------------
def test_gdt_entries_decode():
    code = x86.gdt_entry(x86.GDT_CODE64, 0, 0xFFFFF)
    seg = x86.segment_from_gdt(code, x86.BOOT_CS)
    assert (seg.selector, seg.l, seg.db, seg.g, seg.present, seg.type, seg.limit) == \
        (0x10, 1, 0, 1, 1, 0xB, 0xFFFFFFFF)
    data = x86.segment_from_gdt(x86.gdt_entry(x86.GDT_DATA, 0, 0xFFFFF), x86.BOOT_DS)
    assert (data.selector, data.db, data.s, data.type) == (0x18, 1, 1, 3)
    assert x86.gdt_entry(x86.GDT_CODE64, 0, 0xFFFFF) == 0x00AF9B000000FFFF


def test_page_tables_identity_map(mem):
    x86.write_identity_page_tables(mem)
    pml4 = mem.read_u64(layout.PML4_START)
    pdpt = pml4 & ~0xFFF
    for gib in range(layout.IDENTITY_MAP_GIB):
        pd = mem.read_u64(pdpt + 8 * gib) & ~0xFFF
        for i in (0, 1, 511):
            entry = mem.read_u64(pd + 8 * i)
            assert entry & x86.PTE_PS and entry & x86.PTE_PRESENT
            assert entry & ~0xFFF == (gib << 30) + (i << 21)


def test_sregs_for_both_modes():
    from pyvmm.kvm import abi
    gdt = [x86.gdt_entry(f, 0, 0xFFFFF) if f else 0 for _, f in x86.BOOT_GDT]
    lm = x86.boot_sregs(abi.kvm_sregs(), gdt, long_mode=True)
    assert lm.cr0 & x86.X86_CR0_PG and lm.efer & x86.EFER_LMA and lm.cs.l == 1
    assert lm.cs.selector == 0x10 and lm.ds.selector == 0x18       # __BOOT_CS / __BOOT_DS
    pm = x86.boot_sregs(abi.kvm_sregs(), gdt, long_mode=False)
    assert pm.cr0 == x86.X86_CR0_PE | x86.X86_CR0_ET and pm.efer == 0 and pm.cr4 == 0
    assert pm.cs.db == 1 and pm.cs.l == 0
    assert x86.boot_regs(0x1234, False).rbx == layout.PVH_INFO_START
    assert x86.boot_regs(0x1234, True).rsi == layout.ZERO_PAGE_START


def test_cpuid_sets_hypervisor_bit_and_signature():
    from pyvmm.kvm import abi
    supported = [abi.kvm_cpuid_entry2(function=1, ecx=0x1, ebx=0x00000800),
                 abi.kvm_cpuid_entry2(function=0xB, edx=0)]
    out = {e.function: e for e in x86.guest_cpuid(supported, vcpu_index=3, vcpu_count=4)}
    assert out[1].ecx & x86.CPUID_HYPERVISOR_BIT and out[1].ecx & 1
    assert out[1].ebx >> 24 == 3 and (out[1].ebx >> 16) & 0xFF == 4
    assert out[1].edx & x86.CPUID_HTT_BIT
    assert out[0xB].edx == 3
    sig = out[x86.KVM_CPUID_SIGNATURE]
    assert struct.pack("<III", sig.ebx, sig.ecx, sig.edx) == x86.KVM_SIGNATURE
    assert x86.KVM_CPUID_FEATURES in out
    assert supported[0].ecx == 0x1      # the input is not modified
