"""Decoding the kvm_run union into typed exits, and dispatching them to the buses (no KVM)."""


import pytest

from pyvmm.devices.bus import Bus
from pyvmm.kvm import abi, exits
from pyvmm.machine import handle_exit


@pytest.fixture
def page():
    buf = bytearray(12288)
    run = abi.kvm_run.from_buffer(buf)
    yield run, memoryview(buf)


def test_io_out(page):
    run, mem = page
    run.exit_reason = abi.KvmExitReason.KVM_EXIT_IO
    run.exit.io.direction, run.exit.io.size, run.exit.io.port = abi.KVM_EXIT_IO_OUT, 1, 0x3F8
    run.exit.io.count, run.exit.io.data_offset = 3, 4096
    mem[4096:4099] = b"abc"
    e = exits.decode(run, mem)
    assert e == exits.IoOut(0x3F8, 1, 3, b"abc")


def test_io_in_gives_a_writable_view_into_the_page(page):
    run, mem = page
    run.exit_reason = abi.KvmExitReason.KVM_EXIT_IO
    run.exit.io.direction, run.exit.io.size, run.exit.io.port = abi.KVM_EXIT_IO_IN, 2, 0x60
    run.exit.io.count, run.exit.io.data_offset = 1, 4096
    e = exits.decode(run, mem)
    assert isinstance(e, exits.IoIn) and (e.port, e.size, len(e.data)) == (0x60, 2, 2)
    e.data[:] = b"\x12\x34"
    assert bytes(mem[4096:4098]) == b"\x12\x34"


def test_io_data_outside_the_page_is_not_trusted(page):
    run, mem = page
    run.exit_reason = abi.KvmExitReason.KVM_EXIT_IO
    run.exit.io.size, run.exit.io.count, run.exit.io.data_offset = 4, 10, 12280
    assert isinstance(exits.decode(run, mem), exits.Other)


def test_mmio_read_and_write(page):
    run, mem = page
    run.exit_reason = abi.KvmExitReason.KVM_EXIT_MMIO
    run.exit.mmio.phys_addr, run.exit.mmio.len, run.exit.mmio.is_write = 0xD0000000, 4, 1
    run.exit.mmio.data[:4] = [1, 2, 3, 4]
    assert exits.decode(run, mem) == exits.MmioWrite(0xD0000000, b"\x01\x02\x03\x04")
    run.exit.mmio.is_write = 0
    e = exits.decode(run, mem)
    e.data[:] = b"virt"
    assert bytes(run.exit.mmio.data[:4]) == b"virt"


def test_internal_error_with_instruction_bytes(page):
    run, mem = page
    run.exit_reason = abi.KvmExitReason.KVM_EXIT_INTERNAL_ERROR
    ef = run.exit.emulation_failure
    ef.suberror, ef.ndata = abi.KvmInternalError.KVM_INTERNAL_ERROR_EMULATION, 4
    ef.flags = abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    ef.insn_size = 3
    ef.insn_bytes[:3] = [0x0F, 0x01, 0xCA]
    e = exits.decode(run, mem)
    assert isinstance(e, exits.InternalError)
    assert e.insn_bytes == b"\x0f\x01\xca" and e.suberror_name == "KVM_INTERNAL_ERROR_EMULATION"


@pytest.mark.parametrize("reason,cls", [
    (abi.KvmExitReason.KVM_EXIT_HLT, exits.Hlt), (abi.KvmExitReason.KVM_EXIT_SHUTDOWN, exits.Shutdown),
    (abi.KvmExitReason.KVM_EXIT_INTR, exits.Interrupted), (abi.KvmExitReason.KVM_EXIT_FAIL_ENTRY, exits.FailEntry),
    (abi.KvmExitReason.KVM_EXIT_SYSTEM_EVENT, exits.SystemEvent), (99, exits.Other),
])
def test_other_reasons(page, reason, cls):
    run, mem = page
    run.exit_reason = reason
    assert isinstance(exits.decode(run, mem), cls)


class Recorder:
    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return bytes([offset + 1] * size)

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


def test_handle_exit_dispatch():
    pio, mmio = Bus(name="pio"), Bus(name="mmio", unmapped_read_value=0)
    dev, mdev = Recorder(), Recorder()
    pio.insert(0x3F8, 8, dev, "uart")
    mmio.insert(0xD0000000, 0x1000, mdev, "virtio")
    assert handle_exit(exits.IoOut(0x3F8, 1, 2, b"hi"), pio, mmio)
    assert dev.writes == [(0, b"h"), (0, b"i")]          # rep outsb: one write per item
    buf = bytearray(2)
    assert handle_exit(exits.IoIn(0x3FD, 1, 2, memoryview(buf)), pio, mmio)
    assert buf == b"\x06\x06"
    mbuf = bytearray(4)
    assert handle_exit(exits.MmioRead(0xD0000004, memoryview(mbuf)), pio, mmio)
    assert mbuf == b"\x05" * 4
    assert handle_exit(exits.MmioWrite(0xD0000050, b"\x01\0\0\0"), pio, mmio)
    assert mdev.writes == [(0x50, b"\x01\0\0\0")]
    assert not handle_exit(exits.Shutdown(), pio, mmio)
