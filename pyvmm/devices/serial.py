"""A 16550A UART (the PC's COM1) as a pure register state machine.

This module owns the eight registers of one UART and the receive FIFO behind
them.  It knows nothing about KVM, ports or threads of the machine: the guest
side is :meth:`Serial.read` / :meth:`Serial.write` at an offset 0-7 from the
UART's base (the bus strips COM1_PORT), the host side is
:meth:`Serial.enqueue_raw_bytes` (bytes typed on the console) and the ``out``
stream (bytes the guest prints), and the interrupt line is one callable,
``interrupt()``.  The model is rust-vmm ``vm-superio/src/serial.rs``.

Reference: National Semiconductor (now TI) *PC16550D Universal Asynchronous
Receiver/Transmitter with FIFOs*, datasheet, Table II "Summary of
Registers" and Table IV "Interrupt Control Functions".  Register names below
are the datasheet's::

    offset  DLAB=0 read   DLAB=0 write   DLAB=1
    0       RBR           THR            DLL  divisor latch, low byte
    1       IER           IER            DLM  divisor latch, high byte
    2       IIR           FCR            (IIR / FCR: DLAB does not matter)
    3       LCR           LCR
    4       MCR           MCR
    5       LSR           (ignored)
    6       MSR           (ignored)
    7       SCR           SCR

Interrupts (IIR bits 3-0, highest priority first; Table IV)::

    0110  receiver line status  OE (only source here)   reset: read LSR
    0100  received data avail.  RX FIFO not empty       reset: RBR read empties it
    0010  THR empty             THR empty and ETBEI     reset: read IIR (if this
                                                        is the one it reports) or
                                                        write THR
    0000  modem status          DCTS, DDSR, TERI, DDCD  reset: read MSR
    0001  none pending

Each source is gated by its IER bit (ELSI, ERBFI, ETBEI, EDSSI).  With FIFOs
enabled (FCR bit 0), IIR bits 7-6 read 0b11: that is how Linux's 8250
``autoconfig()`` tells a 16550A from a 16450/16550.

What the virtual UART simplifies, and why it is safe:

* **The transmitter is instantaneous.**  A byte written to THR goes to
  ``out`` at once, so LSR.THRE and LSR.TEMT are always 1 and a THRE
  interrupt is re-armed right after each THR write.  No baud-rate timing:
  DLL/DLM, LCR word length/parity/stop bits are stored and read back only.
* **Receive trigger level is 1.**  The FCR RCVR trigger bits (7-6) are
  accepted and ignored and the character-timeout indication (IIR 0x0C)
  is never reported: without a time base, "data available" is raised as soon
  as one byte waits, which every driver handles like a timeout.
* **The receive FIFO holds 64 bytes** (vm-superio's cap) whether FIFOs are
  enabled or not; a real 16550A holds 16, or 1 in 16450 mode.  Drivers poll
  LSR.DR, so the deeper FIFO is invisible to them; only a full FIFO-size
  probe (``size_fifo()``, CONFIG_SERIAL_8250_16550A_VARIANTS) would count 64.
* **No parity/framing/break errors.**  Only OE exists: in loopback mode a
  THR byte that finds the FIFO full is dropped and sets LSR.OE.  Host input
  never overruns, because :meth:`enqueue_raw_bytes` accepts only what fits.
* **The modem inputs are a connected null modem**: MSR reads DCD|DSR|CTS
  (0xB0), as in vm-superio.  In loopback mode (MCR.LOOP) the datasheet wires
  DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD, so MSR reads back the MCR
  bits, which is what Linux's autoconfig loop test
  (MCR = LOOP|RTS|OUT2, expects MSR & 0xF0 == 0x90) checks.  Changes of these
  inputs set the MSR delta bits (DCTS, DDSR, DDCD; TERI on RI going 1->0).
* **OUT2 does not gate the interrupt.**  On a PC board OUT2 enables the
  UART's IRQ driver; here ``interrupt()`` fires regardless (like QEMU and
  Firecracker), so a freestanding guest that forgets OUT2 still works.

The interrupt callable is an *edge*: the machine wires it to an irqfd or a
KVM_IRQ_LINE pulse.  It is called when an enabled interrupt source becomes
pending that was not pending before: data arriving into an empty FIFO with
ERBFI set, ETBEI being set (the THR is always empty), every THR write while
ETBEI is set (the write clears THRE and the instantaneous transmitter sets it
again, as on a real chip whose transmitter is idle), OE with ELSI, an MSR
delta with EDSSI, and enabling an IER bit whose condition already holds.
That is a superset of the rising edges of the chip's INTR pin: a spurious
pulse costs the guest one IIR read, a missed one would hang its console.

Guest output: ``out`` is either a binary stream (``sys.stdout.buffer``, a
``BytesIO``) or a callable taking ``bytes``.  For a stream every THR byte is
written and then flushed, i.e. one write(2) per guest byte.  That is the
price of a live console (a shell prompt has no newline to flush on), and it
is small next to the VM exit that delivered the byte: each ``outb`` already
costs a KVM_RUN round trip and a Python dispatch.  A caller that wants
batching passes a callable and flushes on its own schedule.  An ``OSError``
from ``out`` (a closed pipe, a full non-blocking stdout) loses that byte,
counts it in ``tx_lost_bytes`` and is logged once: the guest cannot be
blocked or crash the VMM through its console.

Threads: the vCPU thread calls read/write while the host's input loop calls
enqueue_raw_bytes, so every public method takes one lock.  The callbacks
(``interrupt``, ``on_rx_drained``) are called after the lock is released.

Security (vm-superio threat model, CVE-2020-27173): nothing the guest or
the host does makes the FIFO exceed 64 bytes, and no value of an offset,
size or data byte raises.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import BinaryIO, Callable, Union

__all__ = [
    "Serial", "FIFO_SIZE", "SerialOutput",
    # register offsets
    "RBR", "THR", "DLL", "IER", "DLM", "IIR", "FCR", "LCR", "MCR", "LSR", "MSR", "SCR",
    # register bits
    "IER_ERBFI", "IER_ETBEI", "IER_ELSI", "IER_EDSSI",
    "IIR_NO_INT", "IIR_MSI", "IIR_THRI", "IIR_RDI", "IIR_RLSI", "IIR_FIFO_ENABLED",
    "FCR_FIFO_ENABLE", "FCR_RCVR_RESET", "FCR_XMIT_RESET",
    "LCR_DLAB",
    "MCR_DTR", "MCR_RTS", "MCR_OUT1", "MCR_OUT2", "MCR_LOOP",
    "LSR_DR", "LSR_OE", "LSR_THRE", "LSR_TEMT",
    "MSR_DCTS", "MSR_DDSR", "MSR_TERI", "MSR_DDCD", "MSR_CTS", "MSR_DSR", "MSR_RI", "MSR_DCD",
]

logger = logging.getLogger("pyvmm.serial")

#: bytes the receive FIFO can hold (vm-superio's cap; see the module docstring)
FIFO_SIZE = 64

# --- register offsets (datasheet Table II) ----------------------------------
RBR = 0     #: Receiver Buffer Register (read, DLAB=0)
THR = 0     #: Transmitter Holding Register (write, DLAB=0)
DLL = 0     #: Divisor Latch LS (DLAB=1)
IER = 1     #: Interrupt Enable Register (DLAB=0)
DLM = 1     #: Divisor Latch MS (DLAB=1)
IIR = 2     #: Interrupt Identification Register (read)
FCR = 2     #: FIFO Control Register (write)
LCR = 3     #: Line Control Register
MCR = 4     #: MODEM Control Register
LSR = 5     #: Line Status Register
MSR = 6     #: MODEM Status Register
SCR = 7     #: Scratch Register

# --- IER bits -----------------------------------------------------------------
IER_ERBFI = 0x01    #: Enable Received Data Available Interrupt
IER_ETBEI = 0x02    #: Enable Transmitter Holding Register Empty Interrupt
IER_ELSI = 0x04     #: Enable Receiver Line Status Interrupt
IER_EDSSI = 0x08    #: Enable MODEM Status Interrupt
_IER_MASK = 0x0F    # bits 7-4 are always 0

# --- IIR values ---------------------------------------------------------------
IIR_NO_INT = 0x01   #: "0" if interrupt pending: bit 0 = 1 means none
IIR_MSI = 0x00      #: MODEM status
IIR_THRI = 0x02     #: Transmitter Holding Register Empty
IIR_RDI = 0x04      #: Received Data Available
IIR_RLSI = 0x06     #: Receiver Line Status
IIR_FIFO_ENABLED = 0xC0     #: bits 7-6 set when FCR bit 0 is 1

# --- FCR bits -----------------------------------------------------------------
FCR_FIFO_ENABLE = 0x01
FCR_RCVR_RESET = 0x02
FCR_XMIT_RESET = 0x04

# --- LCR bits -----------------------------------------------------------------
LCR_DLAB = 0x80     #: Divisor Latch Access Bit

# --- MCR bits -----------------------------------------------------------------
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
_MCR_MASK = 0x1F    # bits 7-5 are permanently 0

# --- LSR bits -----------------------------------------------------------------
LSR_DR = 0x01       #: Data Ready
LSR_OE = 0x02       #: Overrun Error
LSR_THRE = 0x20     #: Transmitter Holding Register Empty
LSR_TEMT = 0x40     #: Transmitter Empty

# --- MSR bits -----------------------------------------------------------------
MSR_DCTS = 0x01     #: Delta Clear to Send
MSR_DDSR = 0x02     #: Delta Data Set Ready
MSR_TERI = 0x04     #: Trailing Edge Ring Indicator
MSR_DDCD = 0x08     #: Delta Data Carrier Detect
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
#: the modem inputs outside loopback: a connected, ready peer
_MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS

# 9600 baud with the PC's 1.8432 MHz clock (1843200 / 16 / 12); the datasheet
# leaves the divisor latch undefined after reset.
_DEFAULT_DIVISOR = 12

# Interrupt sources as bits of a "pending" mask, highest priority first.
_SRC_RLS = 0x8
_SRC_RDA = 0x4
_SRC_THRE = 0x2
_SRC_MS = 0x1
_PRIORITY = ((_SRC_RLS, IIR_RLSI), (_SRC_RDA, IIR_RDI), (_SRC_THRE, IIR_THRI), (_SRC_MS, IIR_MSI))

SerialOutput = Union[BinaryIO, Callable[[bytes], object]]


class Serial:
    """One 16550A UART.

    ``out`` receives guest output (a binary stream, flushed after each byte,
    or a callable taking ``bytes``); ``interrupt`` is pulsed when an
    interrupt becomes pending; ``on_rx_drained``, if given, is called when a
    guest access leaves the receive FIFO empty and accepting input again,
    so a host that saw :meth:`enqueue_raw_bytes` accept less than it offered
    knows when to retry.
    """

    def __init__(self, out: SerialOutput, interrupt: Callable[[], None], *,
                 on_rx_drained: Callable[[], None] | None = None) -> None:
        write = getattr(out, "write", None)
        if callable(write):
            self._out_write: Callable[[bytes], object] = write
            self._out_flush: Callable[[], object] | None = getattr(out, "flush", None)
        elif callable(out):
            self._out_write = out
            self._out_flush = None
        else:
            raise TypeError("out must be a binary stream or a callable taking bytes")
        self._interrupt = interrupt
        self._on_rx_drained = on_rx_drained
        self._lock = threading.Lock()

        # Registers, at their datasheet reset values (Table III) unless noted.
        self._dll = _DEFAULT_DIVISOR & 0xFF
        self._dlm = _DEFAULT_DIVISOR >> 8
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._fifo_enabled = False      # FCR bit 0
        self._rx: deque[int] = deque()  # RBR + receive FIFO, oldest first
        self._thre_pending = False      # the THRE interrupt is latched
        self._lsr_errors = 0            # LSR.OE until LSR is read
        self._msr_delta = 0             # MSR bits 3-0 until MSR is read

        #: bytes written to THR and delivered to ``out``
        self.tx_bytes = 0
        #: bytes written to THR that ``out`` failed to take
        self.tx_lost_bytes = 0
        #: bytes the host put into the receive FIFO
        self.rx_bytes = 0
        self._warned_tx_lost = False

    # --- guest side: the BusDevice interface ------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Read the register at ``offset``.

        Registers are one byte wide.  An access of ``size`` > 1 reads the
        register at ``offset`` (with its side effects) followed by
        ``size - 1`` zero bytes; ``size`` <= 0 reads nothing.
        """
        if size <= 0:
            return b""
        with self._lock:
            before = self._pending()
            cap_before = self._capacity()
            value = self._read_register(offset)
            fire = bool(self._pending() & ~before)
            drained = cap_before < FIFO_SIZE and self._capacity() == FIFO_SIZE
        self._notify(fire, drained)
        return bytes((value,)) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data[0]`` to the register at ``offset``; further bytes are ignored."""
        if not data:
            return
        value = data[0]
        with self._lock:
            before = self._pending()
            cap_before = self._capacity()
            if offset == THR and not self._dlab:
                # Writing THR resets a pending THRE interrupt; the byte is
                # then "sent" at once and THRE sets again.
                before &= ~_SRC_THRE
            self._write_register(offset, value)
            fire = bool(self._pending() & ~before)
            drained = cap_before < FIFO_SIZE and self._capacity() == FIFO_SIZE
        self._notify(fire, drained)

    # --- host side ----------------------------------------------------------------

    def enqueue_raw_bytes(self, data: bytes) -> int:
        """Put host input into the receive FIFO; return how many bytes fit.

        Accepts at most :meth:`fifo_capacity` bytes from the front of
        ``data``; the rest is the caller's to offer again later (see
        ``on_rx_drained``).  In loopback mode the receiver is disconnected
        from the line and nothing is accepted.
        """
        with self._lock:
            n = min(self._capacity(), len(data))
            if n <= 0:
                return 0
            before = self._pending()
            self._rx.extend(data[:n])
            self.rx_bytes += n
            fire = bool(self._pending() & ~before)
        self._notify(fire, False)
        return n

    def fifo_capacity(self) -> int:
        """How many bytes :meth:`enqueue_raw_bytes` would accept now."""
        with self._lock:
            return self._capacity()

    @property
    def interrupt_pending(self) -> bool:
        """The chip's INTR pin: an enabled interrupt source is pending.

        For a machine that wires the UART as a level-triggered line, and
        for tests; reading it has no side effects.
        """
        with self._lock:
            return bool(self._pending())

    # --- register file ---------------------------------------------------------------

    @property
    def _dlab(self) -> bool:
        return bool(self._lcr & LCR_DLAB)

    @property
    def _loop(self) -> bool:
        return bool(self._mcr & MCR_LOOP)

    def _capacity(self) -> int:
        return 0 if self._loop else FIFO_SIZE - len(self._rx)

    def _read_register(self, offset: int) -> int:
        if offset == RBR:
            if self._dlab:
                return self._dll
            # Reading RBR when empty returns 0, like vm-superio; real chips
            # return the stale last byte.
            return self._rx.popleft() if self._rx else 0
        if offset == IER:
            return self._dlm if self._dlab else self._ier
        if offset == IIR:
            return self._read_iir()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            lsr = LSR_THRE | LSR_TEMT | self._lsr_errors
            if self._rx:
                lsr |= LSR_DR
            self._lsr_errors = 0                # reading LSR resets OE
            return lsr
        if offset == MSR:
            msr = self._modem_inputs() | self._msr_delta
            self._msr_delta = 0                 # reading MSR resets the deltas
            return msr
        if offset == SCR:
            return self._scr
        return 0                                # not a UART register

    def _read_iir(self) -> int:
        iir = IIR_NO_INT
        pending = self._pending()
        for source, code in _PRIORITY:
            if pending & source:
                iir = code
                if source == _SRC_THRE:
                    # Reading IIR resets THRE when it is the source reported.
                    self._thre_pending = False
                break
        if self._fifo_enabled:
            iir |= IIR_FIFO_ENABLED
        return iir

    def _write_register(self, offset: int, value: int) -> None:
        if offset == THR:
            if self._dlab:
                self._dll = value
            else:
                self._transmit(value)
        elif offset == IER:
            if self._dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        # LSR, MSR and offsets outside the UART: writes are ignored.

    def _transmit(self, value: int) -> None:
        if self._loop:
            # Loopback: the transmitter shift register feeds the receiver.
            if len(self._rx) < FIFO_SIZE:
                self._rx.append(value)
            else:
                self._lsr_errors |= LSR_OE      # overrun: the byte is lost
        else:
            self._emit(bytes((value,)))
        # The transmitter is instantaneous: THR is empty again.
        self._thre_pending = bool(self._ier & IER_ETBEI)

    def _write_ier(self, value: int) -> None:
        value &= _IER_MASK
        rising = value & ~self._ier
        self._ier = value
        if not value & IER_ETBEI:
            self._thre_pending = False
        elif rising & IER_ETBEI:
            self._thre_pending = True           # THR is always empty

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_FIFO_ENABLE)
        if enable != self._fifo_enabled:
            self._rx.clear()                    # changing mode clears the FIFOs
            self._fifo_enabled = enable
        if enable and value & FCR_RCVR_RESET:
            self._rx.clear()
        # XMIT reset: the transmit FIFO is always empty.  DMA mode and the
        # RCVR trigger level are accepted and ignored (module docstring).

    def _write_mcr(self, value: int) -> None:
        old = self._modem_inputs()
        self._mcr = value & _MCR_MASK
        new = self._modem_inputs()
        delta = ((old ^ new) >> 4) & (MSR_DCTS | MSR_DDSR | MSR_DDCD)
        if old & MSR_RI and not new & MSR_RI:
            delta |= MSR_TERI
        self._msr_delta |= delta

    def _modem_inputs(self) -> int:
        """MSR bits 7-4: CTS, DSR, RI, DCD."""
        if not self._loop:
            return _MSR_CONNECTED
        mcr = self._mcr
        msr = 0
        if mcr & MCR_RTS:
            msr |= MSR_CTS
        if mcr & MCR_DTR:
            msr |= MSR_DSR
        if mcr & MCR_OUT1:
            msr |= MSR_RI
        if mcr & MCR_OUT2:
            msr |= MSR_DCD
        return msr

    def _pending(self) -> int:
        """The enabled interrupt sources whose condition holds, as _SRC_* bits."""
        ier = self._ier
        pending = 0
        if ier & IER_ELSI and self._lsr_errors:
            pending |= _SRC_RLS
        if ier & IER_ERBFI and self._rx:
            pending |= _SRC_RDA
        if self._thre_pending:
            pending |= _SRC_THRE
        if ier & IER_EDSSI and self._msr_delta:
            pending |= _SRC_MS
        return pending

    # --- the outside world -----------------------------------------------------------

    def _emit(self, byte: bytes) -> None:
        try:
            self._out_write(byte)
            if self._out_flush is not None:
                self._out_flush()
        except OSError as e:
            self.tx_lost_bytes += 1
            if not self._warned_tx_lost:
                self._warned_tx_lost = True
                logger.warning("serial output failed, dropping guest output: %s", e)
            return
        self.tx_bytes += 1

    def _notify(self, fire: bool, drained: bool) -> None:
        if fire:
            self._interrupt()
        if drained and self._on_rx_drained is not None:
            self._on_rx_drained()
