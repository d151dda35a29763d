"""The 16550A UART, driven the way guests drive it.

The probe sequences are replayed from the Linux 6.1 driver source,
``drivers/tty/serial/8250/8250_port.c``: ``autoconfig()``,
``autoconfig_16550a()``, ``autoconfig_8250()``, ``size_fifo()`` and
``serial8250_do_startup()``.  Line references are to that file.
"""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.devices.serial import (
    DLL, DLM, FCR, FCR_FIFO_ENABLE, FCR_RCVR_RESET, FCR_XMIT_RESET, FIFO_SIZE, IER,
    IER_EDSSI, IER_ELSI, IER_ERBFI, IER_ETBEI, IIR, IIR_FIFO_ENABLED, IIR_MSI, IIR_NO_INT,
    IIR_RDI, IIR_RLSI, IIR_THRI, LCR, LCR_DLAB, LSR, LSR_DR, LSR_OE, LSR_TEMT, LSR_THRE,
    MCR, MCR_DTR, MCR_LOOP, MCR_OUT1, MCR_OUT2, MCR_RTS, MSR, MSR_CTS, MSR_DCD, MSR_DCTS,
    MSR_DDCD, MSR_DDSR, MSR_DSR, MSR_RI, MSR_TERI, RBR, SCR, THR, Serial)

UART_EFR = 2                    # EFR shares offset 2 with IIR/FCR on 16650s
UART_LCR_CONF_MODE_A = 0x80     # = DLAB
UART_LCR_CONF_MODE_B = 0xBF
UART_IER_UUE = 0x40             # XScale "UART unit enable"
UART_FCR7_64BYTE = 0x20         # TI16C750 64-byte FIFO mode
UART_LCR_WLEN8 = 0x03


class Guest:
    """A UART plus what the guest and the host see of it."""

    def __init__(self, out=None) -> None:
        self.out = io.BytesIO() if out is None else out
        self.pulses = 0
        self.drained = 0
        self.uart = Serial(self.out, self._pulse, on_rx_drained=self._drained)

    def _pulse(self) -> None:
        self.pulses += 1

    def _drained(self) -> None:
        self.drained += 1

    def outb(self, offset: int, value: int) -> None:
        self.uart.write(offset, bytes((value,)))

    def inb(self, offset: int) -> int:
        data = self.uart.read(offset, 1)
        assert len(data) == 1
        return data[0]

    def output(self) -> bytes:
        return self.out.getvalue()


@pytest.fixture
def g() -> Guest:
    return Guest()


# --- the Linux 8250 probe, replayed ------------------------------------------

def test_linux_autoconfig_detects_a_16550a(g):
    """``autoconfig()`` (8250_port.c:1194), with the loopback test enabled.

    On x86 the legacy COM ports carry UPF_SKIP_TEST, so Linux skips the
    loop test for COM1; other probes (PnP, ``8250.*`` options) run it.
    """
    # IER existence test: IER must hold 0 and then 0x0F.
    scratch = g.inb(IER)
    g.outb(IER, 0)
    scratch2 = g.inb(IER) & 0x0F
    g.outb(IER, 0x0F)
    scratch3 = g.inb(IER) & 0x0F
    g.outb(IER, scratch)
    assert (scratch2, scratch3) == (0, 0x0F), "IER test failed"

    save_mcr = g.inb(MCR)
    save_lcr = g.inb(LCR)

    # Loopback test: MCR = LOOP | OUT2 | RTS must read back as DCD | CTS.
    g.outb(MCR, MCR_LOOP | 0x0A)
    status1 = g.inb(MSR) & 0xF0
    g.outb(MCR, save_mcr)
    assert status1 == 0x90, "LOOP test failed"

    # Zero the EFR of a 16650 (on a 16550A this write is FCR = 0), then
    # enable the FIFO and look at IIR bits 7-6.
    g.outb(LCR, UART_LCR_CONF_MODE_B)
    g.outb(UART_EFR, 0)
    g.outb(LCR, 0)
    g.outb(FCR, FCR_FIFO_ENABLE)
    scratch = g.inb(IIR)
    assert scratch >> 6 == 3, "not a 16550A"
    g.outb(LCR, save_lcr)

    # "Reset the UART": restore MCR, serial8250_clear_fifos(), read RX, clear IER.
    g.outb(MCR, save_mcr)
    g.outb(FCR, FCR_FIFO_ENABLE)
    g.outb(FCR, FCR_FIFO_ENABLE | FCR_RCVR_RESET | FCR_XMIT_RESET)
    g.outb(FCR, 0)
    g.inb(RBR)
    g.outb(IER, 0)

    assert g.output() == b""
    assert g.inb(LSR) == LSR_THRE | LSR_TEMT
    assert g.inb(IIR) == IIR_NO_INT


def test_linux_16550a_variant_probes_find_a_plain_16550a(g):
    """``autoconfig_16550a()`` (8250_port.c:1027) with
    CONFIG_SERIAL_8250_16550A_VARIANTS=y: no EFR, not a NatSemi, not a
    TI16750, not an XScale.  (Debian's config leaves the option off and
    returns before these probes.)"""
    g.outb(FCR, FCR_FIFO_ENABLE)
    # EFRv1: EFR reads as 0 with DLAB set only on ST16C650V1.
    g.outb(LCR, UART_LCR_CONF_MODE_A)
    assert g.inb(UART_EFR) != 0
    # EFRv2: EFR reads as 0 with LCR = 0xBF on ST16C650V2, TI16C752...
    g.outb(LCR, UART_LCR_CONF_MODE_B)
    assert g.inb(UART_EFR) != 0

    # NatSemi SuperIO: EXCR1 at offset 2 in bank 2 (LCR 0xE0) mirrors MCR.LOOP.
    g.outb(LCR, 0)
    status1 = g.inb(MCR)
    g.outb(LCR, 0xE0)
    status2 = g.inb(2)
    assert not (status2 ^ status1) & MCR_LOOP
    g.outb(LCR, 0)
    g.outb(MCR, status1 ^ MCR_LOOP)
    g.outb(LCR, 0xE0)
    status2 = g.inb(2)
    g.outb(LCR, 0)
    g.outb(MCR, status1)
    assert not (status2 ^ status1) & MCR_LOOP, "looks like a NatSemi"

    # TI16750: IIR bit 5 follows FCR7_64BYTE only with DLAB set.
    g.outb(LCR, 0)
    g.outb(FCR, FCR_FIFO_ENABLE | UART_FCR7_64BYTE)
    s1 = g.inb(IIR) >> 5
    g.outb(FCR, FCR_FIFO_ENABLE)
    g.outb(LCR, UART_LCR_CONF_MODE_A)
    g.outb(FCR, FCR_FIFO_ENABLE | UART_FCR7_64BYTE)
    s2 = g.inb(IIR) >> 5
    g.outb(FCR, FCR_FIFO_ENABLE)
    g.outb(LCR, 0)
    assert (s1, s2) == (6, 6)

    # XScale: IER bit 6 (UUE) must not stick.
    iersave = g.inb(IER)
    g.outb(IER, iersave & ~UART_IER_UUE)
    assert not g.inb(IER) & UART_IER_UUE
    g.outb(IER, iersave | UART_IER_UUE)
    assert not g.inb(IER) & UART_IER_UUE, "looks like an XScale"
    g.outb(IER, iersave)


def test_linux_size_fifo_counts_the_64_byte_receive_fifo(g):
    """``size_fifo()`` (8250_port.c:839): 256 bytes through loopback at divisor 1."""
    old_lcr = g.inb(LCR)
    g.outb(LCR, 0)
    old_fcr = g.inb(FCR)                    # reads IIR, as the driver does
    old_mcr = g.inb(MCR)
    g.outb(FCR, FCR_FIFO_ENABLE | FCR_RCVR_RESET | FCR_XMIT_RESET)
    g.outb(MCR, MCR_LOOP)
    g.outb(LCR, UART_LCR_CONF_MODE_A)
    old_dl = g.inb(DLL) | g.inb(DLM) << 8
    g.outb(DLL, 1)
    g.outb(DLM, 0)
    g.outb(LCR, UART_LCR_WLEN8)
    for count in range(256):
        g.outb(THR, count)
    count = 0
    while g.inb(LSR) & LSR_DR and count < 256:
        assert g.inb(RBR) == count          # in order, the overflow dropped
        count += 1
    g.outb(FCR, old_fcr)
    g.outb(MCR, old_mcr)
    g.outb(LCR, UART_LCR_CONF_MODE_A)
    g.outb(DLL, old_dl & 0xFF)
    g.outb(DLM, old_dl >> 8)
    g.outb(LCR, old_lcr)

    assert count == FIFO_SIZE == 64
    assert g.output() == b"", "loopback bytes must not reach the console"
    assert g.uart.tx_bytes == 0


def test_scratch_register_holds_what_is_written(g):
    """``autoconfig_8250()`` tells a 16450 (has SCR) from an 8250 this way."""
    g.outb(SCR, 0xA5)
    assert g.inb(SCR) == 0xA5
    g.outb(SCR, 0x5A)
    assert g.inb(SCR) == 0x5A


def test_linux_startup_thre_tests_find_no_bugs(g):
    """``serial8250_do_startup()`` (8250_port.c:2199): the LSR safety check,
    the THRE re-assert test (UART_BUG_THRE) and the TX-enable test
    (UART_BUG_TXEN)."""
    # serial8250_clear_fifos(), then "clear the interrupt registers".
    g.outb(FCR, FCR_FIFO_ENABLE)
    g.outb(FCR, FCR_FIFO_ENABLE | FCR_RCVR_RESET | FCR_XMIT_RESET)
    g.outb(FCR, 0)
    for reg in (LSR, RBR, IIR, MSR):
        g.inb(reg)
    assert g.inb(LSR) != 0xFF, "LSR safety check engaged"

    # A real 16550 reasserts THRE each time ETBEI is enabled.
    g.outb(IER, IER_ETBEI)
    iir1 = g.inb(IIR)
    g.outb(IER, 0)
    g.outb(IER, IER_ETBEI)
    iir = g.inb(IIR)
    g.outb(IER, 0)
    assert not (not iir1 & IIR_NO_INT and iir & IIR_NO_INT), "UART_BUG_THRE"
    assert iir1 == iir == IIR_THRI

    g.outb(LCR, UART_LCR_WLEN8)
    g.outb(MCR, MCR_DTR | MCR_RTS | MCR_OUT2)
    g.outb(IER, IER_ETBEI)
    lsr = g.inb(LSR)
    iir = g.inb(IIR)
    g.outb(IER, 0)
    assert not (lsr & LSR_TEMT and iir & IIR_NO_INT), "UART_BUG_TXEN"


# --- registers -----------------------------------------------------------------

def test_reset_values(g):
    """Datasheet Table III: IER, LCR, MCR 0; IIR 0x01; LSR THRE|TEMT."""
    assert [g.inb(r) for r in (IER, IIR, LCR, MCR, LSR)] == [0, IIR_NO_INT, 0, 0, 0x60]
    assert g.inb(MSR) == MSR_DCD | MSR_DSR | MSR_CTS


def test_divisor_latch_does_not_clobber_thr_or_ier(g):
    g.outb(IER, IER_ERBFI)
    g.outb(LCR, LCR_DLAB | UART_LCR_WLEN8)
    g.outb(DLL, 0x01)                       # 115200 baud
    g.outb(DLM, 0x02)
    assert (g.inb(DLL), g.inb(DLM)) == (0x01, 0x02)
    g.outb(LCR, UART_LCR_WLEN8)
    assert g.inb(IER) == IER_ERBFI
    assert g.output() == b""
    g.outb(THR, ord("A"))
    g.outb(IER, IER_ERBFI | IER_ETBEI)
    assert g.output() == b"A"
    g.outb(LCR, LCR_DLAB)
    assert (g.inb(DLL), g.inb(DLM)) == (0x01, 0x02)


def test_dlab_does_not_hide_iir_fcr_lcr_or_scr(g):
    g.outb(LCR, LCR_DLAB)
    g.outb(FCR, FCR_FIFO_ENABLE)
    assert g.inb(IIR) == IIR_FIFO_ENABLED | IIR_NO_INT
    g.outb(SCR, 0x42)
    assert g.inb(SCR) == 0x42
    assert g.inb(LCR) == LCR_DLAB


def test_ier_and_mcr_reserved_bits_read_as_zero(g):
    g.outb(IER, 0xFF)
    assert g.inb(IER) == 0x0F
    g.outb(MCR, 0xE3)
    assert g.inb(MCR) == 0x03


def test_lsr_and_msr_ignore_writes(g):
    g.outb(LSR, 0x00)
    g.outb(MSR, 0x00)
    assert g.inb(LSR) == LSR_THRE | LSR_TEMT
    assert g.inb(MSR) == MSR_DCD | MSR_DSR | MSR_CTS


def test_fcr_fifo_enable_shows_in_iir_bits_7_6(g):
    assert g.inb(IIR) & 0xC0 == 0
    g.outb(FCR, FCR_FIFO_ENABLE)
    assert g.inb(IIR) & 0xC0 == 0xC0
    g.outb(FCR, 0)
    assert g.inb(IIR) & 0xC0 == 0


def test_fcr_rcvr_reset_and_mode_changes_clear_the_receive_fifo(g):
    g.outb(FCR, FCR_FIFO_ENABLE)
    g.uart.enqueue_raw_bytes(b"abc")
    g.outb(FCR, FCR_FIFO_ENABLE | FCR_RCVR_RESET)
    assert not g.inb(LSR) & LSR_DR
    g.uart.enqueue_raw_bytes(b"abc")
    g.outb(FCR, FCR_FIFO_ENABLE | 0x80)     # trigger level only: data stays
    assert g.inb(LSR) & LSR_DR
    g.outb(FCR, 0)                          # leaving FIFO mode clears it
    assert not g.inb(LSR) & LSR_DR
    assert g.uart.fifo_capacity() == FIFO_SIZE


# --- transmit --------------------------------------------------------------------

def test_thr_bytes_reach_the_output_in_order_and_are_counted(g):
    for b in b"hello\r\n":
        g.outb(THR, b)
    assert g.output() == b"hello\r\n"
    assert g.uart.tx_bytes == 7
    assert g.inb(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


def test_each_byte_is_flushed_so_the_console_is_live():
    class CountingStream(io.BytesIO):
        flushes = 0

        def flush(self):
            self.flushes += 1
            super().flush()

    g = Guest(CountingStream())
    g.outb(THR, ord("$"))
    g.outb(THR, ord(" "))
    assert g.output() == b"$ "
    assert g.out.flushes == 2


def test_output_may_be_a_callable():
    chunks: list[bytes] = []
    uart = Serial(chunks.append, lambda: None)
    uart.write(THR, b"o")
    uart.write(THR, b"k")
    assert chunks == [b"o", b"k"]


def test_failing_output_loses_the_byte_but_not_the_guest():
    class Broken(io.RawIOBase):
        def write(self, b):
            raise BrokenPipeError(32, "Broken pipe")

    g = Guest(Broken())
    g.outb(IER, IER_ETBEI)
    g.inb(IIR)
    g.outb(THR, ord("x"))
    g.outb(THR, ord("y"))
    assert (g.uart.tx_bytes, g.uart.tx_lost_bytes) == (0, 2)
    assert g.inb(IIR) == IIR_THRI           # the driver still gets its interrupt


def test_out_must_be_a_stream_or_callable():
    with pytest.raises(TypeError):
        Serial(42, lambda: None)


# --- interrupts ----------------------------------------------------------------

def test_enabling_etbei_raises_thre_at_once(g):
    g.outb(IER, IER_ETBEI)
    assert g.pulses == 1
    assert g.inb(IIR) == IIR_THRI
    assert g.inb(IIR) == IIR_NO_INT, "reading IIR resets THRE"
    g.outb(IER, IER_ETBEI)                  # already enabled: no new edge
    assert g.pulses == 1
    assert g.inb(IIR) == IIR_NO_INT


def test_each_thr_write_with_etbei_raises_thre_again(g):
    g.outb(IER, IER_ETBEI)
    g.inb(IIR)
    g.outb(THR, ord("a"))
    assert g.pulses == 2
    g.outb(THR, ord("b"))                   # even without an IIR read between
    assert g.pulses == 3
    assert g.inb(IIR) == IIR_THRI
    g.outb(IER, 0)
    g.outb(THR, ord("c"))
    assert g.pulses == 3
    assert g.inb(IIR) == IIR_NO_INT


def test_clearing_etbei_withdraws_a_pending_thre(g):
    g.outb(IER, IER_ETBEI)
    g.outb(IER, 0)
    assert g.inb(IIR) == IIR_NO_INT
    assert not g.uart.interrupt_pending


def test_received_data_interrupt(g):
    g.outb(IER, IER_ERBFI)
    assert g.pulses == 0
    assert g.uart.enqueue_raw_bytes(b"ab") == 2
    assert g.pulses == 1
    assert g.uart.enqueue_raw_bytes(b"c") == 1
    assert g.pulses == 1, "still pending: no new edge"
    assert g.inb(IIR) == IIR_RDI
    assert bytes(g.inb(RBR) for _ in range(3)) == b"abc"
    assert g.inb(IIR) == IIR_NO_INT
    assert g.uart.rx_bytes == 3
    g.uart.enqueue_raw_bytes(b"d")
    assert g.pulses == 2


def test_enabling_erbfi_with_data_waiting_interrupts(g):
    g.uart.enqueue_raw_bytes(b"x")
    assert g.pulses == 0
    g.outb(IER, IER_ERBFI)
    assert g.pulses == 1
    assert g.inb(IIR) == IIR_RDI


def test_iir_reports_sources_in_priority_order(g):
    """Table IV: line status > received data > THR empty > modem status."""
    g.outb(FCR, FCR_FIFO_ENABLE)
    g.outb(IER, IER_ERBFI | IER_ETBEI | IER_ELSI | IER_EDSSI)
    g.outb(MCR, MCR_LOOP)                   # CTS, DSR, DCD drop: MSR deltas
    for i in range(FIFO_SIZE + 1):          # the 65th byte overruns
        g.outb(THR, i)
    fifo = IIR_FIFO_ENABLED

    assert g.inb(IIR) == fifo | IIR_RLSI
    assert g.inb(LSR) == LSR_OE | LSR_DR | LSR_THRE | LSR_TEMT
    assert g.inb(LSR) & LSR_OE == 0, "reading LSR resets OE"

    assert g.inb(IIR) == fifo | IIR_RDI
    for i in range(FIFO_SIZE):
        assert g.inb(RBR) == i

    assert g.inb(IIR) == fifo | IIR_THRI
    assert g.inb(IIR) == fifo | IIR_MSI
    assert g.inb(MSR) == MSR_DCTS | MSR_DDSR | MSR_DDCD
    assert g.inb(IIR) == fifo | IIR_NO_INT
    assert not g.uart.interrupt_pending


def test_reading_iir_does_not_reset_thre_hidden_behind_a_higher_source(g):
    g.outb(IER, IER_ERBFI | IER_ETBEI)
    g.uart.enqueue_raw_bytes(b"z")
    assert g.inb(IIR) == IIR_RDI
    g.inb(RBR)
    assert g.inb(IIR) == IIR_THRI


# --- receive -------------------------------------------------------------------

def test_receive_fifo_caps_at_64_and_enqueue_returns_the_accepted_count(g):
    data = bytes(range(100))
    assert g.uart.enqueue_raw_bytes(data) == 64
    assert g.uart.fifo_capacity() == 0
    assert g.uart.enqueue_raw_bytes(data[64:]) == 0
    assert bytes(g.inb(RBR) for _ in range(10)) == data[:10]
    assert g.uart.fifo_capacity() == 10
    assert g.uart.enqueue_raw_bytes(data[64:]) == 10
    rest = bytes(g.inb(RBR) for _ in range(64))
    assert rest == data[10:74]
    assert not g.inb(LSR) & LSR_DR
    assert g.uart.rx_bytes == 74


def test_enqueue_accepts_any_bytes_like(g):
    assert g.uart.enqueue_raw_bytes(memoryview(b"mv")) == 2
    assert g.uart.enqueue_raw_bytes(bytearray(b"ba")) == 2
    assert g.uart.enqueue_raw_bytes(b"") == 0
    assert bytes(g.inb(RBR) for _ in range(4)) == b"mvba"


def test_reading_an_empty_rbr_returns_0(g):
    assert g.inb(RBR) == 0
    assert g.inb(RBR) == 0
    assert g.inb(LSR) & LSR_DR == 0
    assert g.drained == 0


def test_host_is_told_when_the_guest_drains_the_fifo(g):
    g.uart.enqueue_raw_bytes(b"xy")
    g.inb(RBR)
    assert g.drained == 0
    g.inb(RBR)
    assert g.drained == 1
    g.uart.enqueue_raw_bytes(b"q")
    g.outb(FCR, FCR_FIFO_ENABLE | FCR_RCVR_RESET)
    assert g.drained == 2


# --- loopback ----------------------------------------------------------------------

@pytest.mark.parametrize("mcr", range(16))
def test_loopback_msr_reflects_mcr(g, mcr):
    """MCR bit 4: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD."""
    g.outb(MCR, MCR_LOOP | mcr)
    expect = ((MSR_DSR if mcr & MCR_DTR else 0) | (MSR_CTS if mcr & MCR_RTS else 0)
              | (MSR_RI if mcr & MCR_OUT1 else 0) | (MSR_DCD if mcr & MCR_OUT2 else 0))
    assert g.inb(MSR) & 0xF0 == expect


def test_loopback_msr_deltas_and_trailing_edge_of_ri(g):
    g.outb(MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT1 | MCR_OUT2)
    g.inb(MSR)                              # entering loopback set deltas; clear them
    assert g.inb(MSR) & 0x0F == 0
    g.outb(MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT2)     # RI 1 -> 0
    assert g.inb(MSR) & 0x0F == MSR_TERI
    g.outb(MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT1 | MCR_OUT2)  # RI 0 -> 1
    assert g.inb(MSR) & 0x0F == 0, "TERI only on the trailing edge"


def test_loopback_turns_thr_into_received_data(g):
    g.outb(IER, IER_ERBFI)
    g.outb(MCR, MCR_LOOP)
    g.outb(THR, 0x55)
    assert g.pulses == 1
    assert g.inb(LSR) & LSR_DR
    assert g.inb(RBR) == 0x55
    assert g.output() == b""


def test_loopback_disconnects_host_input_until_it_ends(g):
    g.outb(MCR, MCR_LOOP)
    assert g.uart.fifo_capacity() == 0
    assert g.uart.enqueue_raw_bytes(b"lost?") == 0
    g.outb(MCR, 0)
    assert g.drained == 1, "the host may offer its input again"
    assert g.uart.enqueue_raw_bytes(b"ok") == 2


# --- odd accesses -------------------------------------------------------------------

def test_wide_accesses_handle_the_first_byte(g):
    g.uart.write(THR, b"AB")
    assert g.output() == b"A"
    assert g.uart.read(LSR, 2) == bytes((LSR_THRE | LSR_TEMT, 0))
    assert g.uart.read(LSR, 0) == b""
    g.uart.write(SCR, b"")
    assert g.inb(SCR) == 0


@pytest.mark.parametrize("offset", [-1, 8, 0x3F8, 1 << 40])
def test_offsets_outside_the_uart_read_0_and_ignore_writes(g, offset):
    g.outb(offset, 0x41)
    assert g.inb(offset) == 0
    assert g.output() == b""
    assert [g.inb(r) for r in (IER, LCR, MCR, SCR)] == [0, 0, 0, 0]


ops = st.one_of(
    st.tuples(st.just("w"), st.integers(-1, 9), st.binary(min_size=0, max_size=3)),
    st.tuples(st.just("r"), st.integers(-1, 9), st.integers(-1, 4)),
    st.tuples(st.just("in"), st.just(0), st.binary(min_size=0, max_size=100)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=200))
def test_random_register_traffic_never_raises_and_keeps_the_fifo_bounded(seq):
    """Whatever the guest writes: no exception, FIFO <= 64, reads sized right,
    and no enabled interrupt is ever pending without a pulse since the last
    time none was pending (a missed edge would hang a guest)."""
    g = Guest()
    pulses_when_idle = 0
    for kind, offset, arg in seq:
        if kind == "w":
            g.uart.write(offset, arg)
        elif kind == "r":
            assert len(g.uart.read(offset, arg)) == max(arg, 0)
        else:
            n = g.uart.enqueue_raw_bytes(arg)
            assert 0 <= n <= len(arg)
        assert 0 <= g.uart.fifo_capacity() <= FIFO_SIZE
        assert len(g.uart._rx) <= FIFO_SIZE
        if g.uart.interrupt_pending:
            assert g.pulses > pulses_when_idle
        else:
            pulses_when_idle = g.pulses
    assert g.uart.tx_bytes == len(g.output())
