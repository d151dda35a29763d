"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2 "Virtio Over MMIO").

This module owns the 4 KiB register window of one virtio device: the
register file of §4.2.2 as a state machine that drives a
:class:`~pyvmm.virtio.device.VirtioDevice` through the initialization
sequence of §3.1.1 (reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK,
queues, DRIVER_OK), and the InterruptStatus/InterruptACK pair.  It is a
bus device: ``read(offset, size) -> bytes`` / ``write(offset, data)``.
Compare kvmtool ``virtio/mmio-modern.c``: one ``match`` over the registers.

Register map (names of Linux ``include/uapi/linux/virtio_mmio.h``)::

    0x000 MagicValue R "virt"     0x050 QueueNotify W      0x0a0/4 QueueDevice W
    0x004 Version R = 2           0x060 InterruptStatus R  0x0ac SHMSel W
    0x008 DeviceID R              0x064 InterruptACK W     0x0b0/4 SHMLen R (-1)
    0x00c VendorID R              0x070 Status RW          0x0b8/c SHMBase R (-1)
    0x010 DeviceFeatures R        0x080/4 QueueDesc W      0x0c0 QueueReset RW (0)
    0x014 DeviceFeaturesSel W     0x090/4 QueueDriver W    0x0fc ConfigGeneration R
    0x020 DriverFeatures W        0x030 QueueSel W         0x100+ device config
    0x024 DriverFeaturesSel W     0x034 QueueSizeMax R     0x038 QueueSize W
    0x044 QueueReady RW

Where the spec leaves the device a choice, this is what pyvmm does.  Every
guest mistake is logged once per reason and counted in :attr:`errors`:

* Width: control registers take only aligned 32-bit accesses (§4.2.2.2);
  anything else reads zeros / is dropped.  Config space takes 1, 2, 4 or
  8-byte accesses inside ``device.config_size``; outside, zeros / dropped.
  Reading a write-only or undefined register gives 0; writing a read-only
  or undefined one is dropped.
* Features: FEATURES_OK is accepted only if the driver acked nothing the
  device did not offer and acked VIRTIO_F_VERSION_1; otherwise it reads back
  clear (§2.2.2 "MUST fail to set the FEATURES_OK device status bit").
  DriverFeatures writes after FEATURES_OK are dropped.
* Status: a write that would clear a set bit is dropped (§2.1.1); a bit set
  out of order (DRIVER before ACKNOWLEDGE, FEATURES_OK before DRIVER,
  DRIVER_OK before FEATURES_OK) is not taken; DEVICE_NEEDS_RESET belongs to
  the device.  Writing 0 resets: ``device.reset()``, every queue stopped and
  forgotten, InterruptStatus and all selectors cleared.
* Queues: QueueSize and the addresses are latched; ``QueueReady = 1``
  builds a :class:`~pyvmm.virtio.queue.Queue`, which checks size (a power of
  two <= QueueSizeMax), alignment and bounds.  A bad queue, or QueueReady=1
  before FEATURES_OK or after DRIVER_OK, is *refused*: QueueReady keeps
  reading 0 (deviating from "returns the last value written", because the
  queue is not live) and the device sets DEVICE_NEEDS_RESET (§2.1.2).
  Linux never reads QueueReady back after setting it, so the NEEDS_RESET
  bit is what it can notice.  Writes to a ready queue's registers are
  dropped (§4.2.2.2 "the driver MUST NOT access").
* DRIVER_OK activates the device only if every queue with QueueSizeMax > 0
  is ready and DEVICE_NEEDS_RESET is clear; otherwise NEEDS_RESET is set
  and a configuration-change interrupt sent (§2.1.2).  Only these devices
  exist in pyvmm, so optional queues are not modelled.
* QueueNotify before DRIVER_OK is dropped and counted
  (:attr:`notifies_before_driver_ok`; §2.1.2 "MUST NOT consume buffers
  before DRIVER_OK").  A notify for an absent queue is dropped.
* DEVICE_NEEDS_RESET is also set when a queue breaks (its available ring is
  corrupt) or a device method raises; with DRIVER_OK it comes with
  VIRTIO_MMIO_INT_CONFIG (§2.1.2).
* Offered: VERSION_1, INDIRECT_DESC, EVENT_IDX and device bits 0-23 only
  (checked at construction).  No shared memory regions (SHMLen/SHMBase read
  -1, §4.2.2); no VIRTIO_F_RING_RESET (QueueReset reads 0, writes dropped);
  no NOTIFICATION_DATA (QueueNotify carries the queue index).
* VendorID is 0x4D565950, "PYVM" in little-endian ASCII, as QEMU uses
  "QEMU" (0x554D4551) and kvmtool "LKVM".  Linux ignores it.

Wiring (what the machine does with this object):

* **irqfd**: ``irq_trigger()`` is called *after* InterruptStatus has the new
  bits, once per device ``interrupt()`` call (an edge, as Firecracker and
  kvmtool do).  The machine makes it write 1 to an eventfd registered with
  KVM_IRQFD for ``layout.mmio_device_irq(i)``.  Linux's handler reads
  InterruptStatus, ACKs the same bits, then scans every queue, so a
  coalesced or extra edge costs at most one spurious interrupt.
* **ioeventfd**: for each ``q in range(transport.num_queues)`` register
  KVM_IOEVENTFD at ``base + MmioTransport.NOTIFY_OFFSET``, 4 bytes,
  ``datamatch = q``.  When eventfd ``q`` fires, call
  ``transport.queue_notify(q)``, **not** ``device.queue_notify``: it applies
  the DRIVER_OK gate.  Without ioeventfd the guest's write reaches the same
  method through :meth:`write`.  A device whose work runs on the machine's
  I/O loop (:mod:`pyvmm.virtio.eventloop`) makes its ``queue_notify`` hand
  the work to that thread.

Threads: ``read``/``write`` (vCPU threads) are serialized by a lock, and
``activate``/``reset`` run under it, so ``device.reset()`` may wait for the
I/O thread as long as that never calls ``read``/``write``.  The ``interrupt``
callable and the queue-broken path use a separate small lock and never wait
for the vCPU.  Every activation has an *epoch*; an ``interrupt`` (or broken
queue) from an earlier epoch, i.e. from before a reset, is ignored.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

from ..memory import GuestMemory
from .device import (VIRTIO_MMIO_INT_CONFIG, DeviceStatus, InterruptReason, VirtioDevice,
                     VirtioFeature, feature_mask)
from .queue import VIRTQ_MAX_SIZE, GuestErrorLog, Queue, QueueError

__all__ = [
    "MmioReg",
    "MmioTransport",
    "NOTIFY_OFFSET",
    "TRANSPORT_FEATURES",
    "VIRTIO_MMIO_MAGIC",
    "VIRTIO_MMIO_VENDOR_ID",
    "VIRTIO_MMIO_VERSION_2",
]

logger = logging.getLogger("pyvmm.virtio")


class MmioReg(IntEnum):
    """Register offsets in the window (§4.2.2)."""
    VIRTIO_MMIO_MAGIC_VALUE = 0x000
    VIRTIO_MMIO_VERSION = 0x004
    VIRTIO_MMIO_DEVICE_ID = 0x008
    VIRTIO_MMIO_VENDOR_ID = 0x00C
    VIRTIO_MMIO_DEVICE_FEATURES = 0x010
    VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
    VIRTIO_MMIO_DRIVER_FEATURES = 0x020
    VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
    VIRTIO_MMIO_QUEUE_SEL = 0x030
    VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034      # QueueSizeMax
    VIRTIO_MMIO_QUEUE_NUM = 0x038          # QueueSize
    VIRTIO_MMIO_QUEUE_READY = 0x044
    VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
    VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
    VIRTIO_MMIO_INTERRUPT_ACK = 0x064
    VIRTIO_MMIO_STATUS = 0x070
    VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
    VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
    VIRTIO_MMIO_QUEUE_AVAIL_LOW = 0x090    # QueueDriver: the available ring
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH = 0x094
    VIRTIO_MMIO_QUEUE_USED_LOW = 0x0A0     # QueueDevice: the used ring
    VIRTIO_MMIO_QUEUE_USED_HIGH = 0x0A4
    VIRTIO_MMIO_SHM_SEL = 0x0AC
    VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
    VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
    VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
    VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
    VIRTIO_MMIO_QUEUE_RESET = 0x0C0
    VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
    VIRTIO_MMIO_CONFIG = 0x100


R = MmioReg
S = DeviceStatus
VIRTIO_MMIO_MAGIC = 0x74726976          # "virt"
VIRTIO_MMIO_VERSION_2 = 2
VIRTIO_MMIO_VENDOR_ID = 0x4D565950      # "PYVM"
NOTIFY_OFFSET = R.VIRTIO_MMIO_QUEUE_NOTIFY
WINDOW_SIZE = 0x1000
#: features this transport and queue.py implement; devices may add bits 0-23
TRANSPORT_FEATURES = feature_mask(VirtioFeature.VIRTIO_F_INDIRECT_DESC,
                                  VirtioFeature.VIRTIO_F_EVENT_IDX,
                                  VirtioFeature.VIRTIO_F_VERSION_1)
_DEVICE_SPECIFIC_FEATURES = (1 << 24) - 1
_VERSION_1 = feature_mask(VirtioFeature.VIRTIO_F_VERSION_1)
_INTERRUPT_BITS = int(InterruptReason.VIRTIO_MMIO_INT_VRING | InterruptReason.VIRTIO_MMIO_INT_CONFIG)
_WRITE_ONLY = frozenset({
    R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, R.VIRTIO_MMIO_DRIVER_FEATURES,
    R.VIRTIO_MMIO_DRIVER_FEATURES_SEL, R.VIRTIO_MMIO_QUEUE_SEL, R.VIRTIO_MMIO_QUEUE_NUM,
    R.VIRTIO_MMIO_QUEUE_NOTIFY, R.VIRTIO_MMIO_INTERRUPT_ACK, R.VIRTIO_MMIO_QUEUE_DESC_LOW,
    R.VIRTIO_MMIO_QUEUE_DESC_HIGH, R.VIRTIO_MMIO_QUEUE_AVAIL_LOW, R.VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    R.VIRTIO_MMIO_QUEUE_USED_LOW, R.VIRTIO_MMIO_QUEUE_USED_HIGH, R.VIRTIO_MMIO_SHM_SEL})
_READ_ONLY = frozenset({
    R.VIRTIO_MMIO_MAGIC_VALUE, R.VIRTIO_MMIO_VERSION, R.VIRTIO_MMIO_DEVICE_ID,
    R.VIRTIO_MMIO_VENDOR_ID, R.VIRTIO_MMIO_DEVICE_FEATURES, R.VIRTIO_MMIO_QUEUE_NUM_MAX,
    R.VIRTIO_MMIO_INTERRUPT_STATUS, R.VIRTIO_MMIO_SHM_LEN_LOW, R.VIRTIO_MMIO_SHM_LEN_HIGH,
    R.VIRTIO_MMIO_SHM_BASE_LOW, R.VIRTIO_MMIO_SHM_BASE_HIGH, R.VIRTIO_MMIO_CONFIG_GENERATION})
#: (bit, the bits that must already be set): the order of §3.1.1
_STATUS_ORDER = ((S.ACKNOWLEDGE, 0), (S.DRIVER, S.ACKNOWLEDGE), (S.FEATURES_OK, S.DRIVER),
                 (S.DRIVER_OK, S.FEATURES_OK), (S.FAILED, 0))


def _set_half(value: int, half: int, high: bool) -> int:
    """Replace the low or high 32 bits of a 64-bit register pair."""
    return (value & 0xFFFF_FFFF) | half << 32 if high else (value & ~0xFFFF_FFFF) | half


@dataclass
class _QueueRegs:
    """The driver-written registers of one queue, plus the live Queue once ready."""
    max_size: int
    errors: GuestErrorLog
    size: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    queue: Queue | None = None          # not None <=> QueueReady reads 1


class MmioTransport:
    """One virtio-mmio v2 device window; see the module docstring for the rules."""

    NOTIFY_OFFSET = NOTIFY_OFFSET

    def __init__(self, device: VirtioDevice, memory: GuestMemory,
                 irq_trigger: Callable[[], None] = lambda: None, *, name: str | None = None) -> None:
        offered = device.device_features
        if not offered & _VERSION_1:
            raise ValueError("a virtio-mmio v2 device must offer VIRTIO_F_VERSION_1")
        if offered & ~(TRANSPORT_FEATURES | _DEVICE_SPECIFIC_FEATURES):
            raise ValueError(f"device offers feature bits this transport does not implement: "
                             f"{offered & ~(TRANSPORT_FEATURES | _DEVICE_SPECIFIC_FEATURES):#x}")
        for m in device.queue_max_sizes:
            if m < 0 or m & (m - 1) or m > VIRTQ_MAX_SIZE:
                raise ValueError(f"queue max size {m} is not 0 or a power of two <= 32768")
        if not 0 <= device.config_size <= WINDOW_SIZE - R.VIRTIO_MMIO_CONFIG:
            raise ValueError(f"config space of {device.config_size} bytes does not fit the window")
        self.device = device
        self.memory = memory
        self._irq_trigger = irq_trigger
        self.name = name or f"virtio-mmio device {device.device_id}"
        #: guest mistakes on this window, by reason
        self.errors = GuestErrorLog(self.name)
        self._queue_errors = [GuestErrorLog(f"{self.name} queue {i}")
                              for i in range(len(device.queue_max_sizes))]
        self.notifies_before_driver_ok = 0
        #: exceptions that escaped the device (pyvmm bugs), by method name
        self.device_errors: dict[str, int] = {}
        self._lock = threading.RLock()          # register state (vCPU side)
        self._isr_lock = threading.Lock()       # InterruptStatus and the epoch
        self._epoch = 0
        self._interrupt_status = 0
        self._clear_registers()

    def _clear_registers(self) -> None:
        self._status = 0
        self._needs_reset = False               # DEVICE_NEEDS_RESET, settable from any thread
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self._acked_beyond_64 = False
        self.queue_sel = 0
        self.queues = [_QueueRegs(m, e) for m, e in zip(self.device.queue_max_sizes,
                                                        self._queue_errors)]
        self.activated = False

    # -- what the machine and tests look at -----------------------------------
    @property
    def num_queues(self) -> int:
        """How many QueueNotify values (= ioeventfd datamatches) are meaningful."""
        return len(self.queues)

    @property
    def status(self) -> int:
        return self._status | (S.DEVICE_NEEDS_RESET if self._needs_reset else 0)

    @property
    def interrupt_status(self) -> int:
        return self._interrupt_status

    def snapshot(self) -> dict:
        """The negotiated state as the driver left it: for metrics and tests."""
        from .device import DeviceStatus
        return {
            "device_id": self.device.device_id,
            "status": [f.name for f in DeviceStatus if f and self.status & f],
            "driver_features": self.driver_features,
            "activated": self.activated,
            "notifies_before_driver_ok": self.notifies_before_driver_ok,
            "guest_errors": self.errors.total(),
            "queues": [regs.queue.snapshot() if regs.queue is not None else None
                       for regs in self.queues],
        }

    # -- the bus interface ------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset >= R.VIRTIO_MMIO_CONFIG:
            return self._read_config(offset - R.VIRTIO_MMIO_CONFIG, size)
        if size != 4 or offset % 4:
            self.errors.report("control register access not 32-bit aligned", f"read {offset:#x}/{size}")
            return bytes(size)
        with self._lock:
            value = self._read_register(offset)
        return (value & 0xFFFF_FFFF).to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        if offset >= R.VIRTIO_MMIO_CONFIG:
            self._write_config(offset - R.VIRTIO_MMIO_CONFIG, bytes(data))
            return
        if len(data) != 4 or offset % 4:
            self.errors.report("control register access not 32-bit aligned", f"write {offset:#x}/{len(data)}")
            return
        value = int.from_bytes(data, "little")
        if offset == R.VIRTIO_MMIO_QUEUE_NOTIFY:
            self.queue_notify(value)            # outside the register lock: see "Threads"
            return
        with self._lock:
            self._write_register(offset, value)

    # -- registers --------------------------------------------------------------
    def _selected(self) -> _QueueRegs | None:
        if self.queue_sel < len(self.queues) and self.queues[self.queue_sel].max_size:
            return self.queues[self.queue_sel]
        return None

    def _read_register(self, offset: int) -> int:
        match offset:
            case R.VIRTIO_MMIO_MAGIC_VALUE:
                return VIRTIO_MMIO_MAGIC
            case R.VIRTIO_MMIO_VERSION:
                return VIRTIO_MMIO_VERSION_2
            case R.VIRTIO_MMIO_DEVICE_ID:
                return self.device.device_id
            case R.VIRTIO_MMIO_VENDOR_ID:
                return VIRTIO_MMIO_VENDOR_ID
            case R.VIRTIO_MMIO_DEVICE_FEATURES:
                sel = self.device_features_sel
                return self.device.device_features >> (32 * sel) if sel < 2 else 0
            case R.VIRTIO_MMIO_QUEUE_NUM_MAX:
                q = self._selected()
                return q.max_size if q else 0
            case R.VIRTIO_MMIO_QUEUE_READY:
                q = self._selected()
                return int(q is not None and q.queue is not None)
            case R.VIRTIO_MMIO_INTERRUPT_STATUS:
                return self._interrupt_status
            case R.VIRTIO_MMIO_STATUS:
                return self.status
            case (R.VIRTIO_MMIO_SHM_LEN_LOW | R.VIRTIO_MMIO_SHM_LEN_HIGH
                  | R.VIRTIO_MMIO_SHM_BASE_LOW | R.VIRTIO_MMIO_SHM_BASE_HIGH):
                return 0xFFFF_FFFF              # "a non-existent region": -1
            case R.VIRTIO_MMIO_QUEUE_RESET:
                return 0
            case R.VIRTIO_MMIO_CONFIG_GENERATION:
                return self.device.config_generation
        if offset in _WRITE_ONLY:
            self.errors.report("read of a write-only register", f"{R(offset).name}")
        else:
            self.errors.report("read of an undefined register", f"offset {offset:#x}")
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        match offset:
            case R.VIRTIO_MMIO_DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            case R.VIRTIO_MMIO_DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            case R.VIRTIO_MMIO_DRIVER_FEATURES:
                self._write_driver_features(value)
            case R.VIRTIO_MMIO_QUEUE_SEL:
                self.queue_sel = value
            case (R.VIRTIO_MMIO_QUEUE_NUM | R.VIRTIO_MMIO_QUEUE_DESC_LOW | R.VIRTIO_MMIO_QUEUE_DESC_HIGH
                  | R.VIRTIO_MMIO_QUEUE_AVAIL_LOW | R.VIRTIO_MMIO_QUEUE_AVAIL_HIGH
                  | R.VIRTIO_MMIO_QUEUE_USED_LOW | R.VIRTIO_MMIO_QUEUE_USED_HIGH):
                self._write_queue_register(offset, value)
            case R.VIRTIO_MMIO_QUEUE_READY:
                self._write_queue_ready(value)
            case R.VIRTIO_MMIO_INTERRUPT_ACK:
                if value & ~_INTERRUPT_BITS:
                    self.errors.report("InterruptACK with undefined bits", f"{value:#x}")
                with self._isr_lock:
                    self._interrupt_status &= ~value
            case R.VIRTIO_MMIO_STATUS:
                self._write_status(value)
            case R.VIRTIO_MMIO_SHM_SEL:
                pass                            # no regions: every id reads as absent
            case R.VIRTIO_MMIO_QUEUE_RESET:
                self.errors.report("QueueReset written without VIRTIO_F_RING_RESET")
            case _ if offset in _READ_ONLY:
                self.errors.report("write to a read-only register", f"{R(offset).name}")
            case _:
                self.errors.report("write to an undefined register", f"offset {offset:#x}")

    def _write_driver_features(self, value: int) -> None:
        if self._status & S.FEATURES_OK:
            self.errors.report("DriverFeatures written after FEATURES_OK")
            return
        sel = self.driver_features_sel
        if sel > 1:
            if value:
                self.errors.report("driver acked feature bits the device did not offer",
                                   f"window {sel}: {value:#x}")
                self._acked_beyond_64 = True
            return
        shift = 32 * sel
        self.driver_features = _set_half(self.driver_features, value, high=sel == 1)
        unoffered = value & ~(self.device.device_features >> shift) & 0xFFFF_FFFF
        if unoffered:
            self.errors.report("driver acked feature bits the device did not offer",
                               f"window {sel}: {unoffered:#x}")

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected()
        if q is None:
            self.errors.report("queue register written for an absent queue", f"QueueSel={self.queue_sel}")
        elif q.queue is not None:
            self.errors.report("queue register written while QueueReady is 1", f"{R(offset).name}")
        elif offset == R.VIRTIO_MMIO_QUEUE_NUM:
            q.size = value
        else:
            high = bool(offset & 4)
            match offset & ~4:
                case R.VIRTIO_MMIO_QUEUE_DESC_LOW:
                    q.desc = _set_half(q.desc, value, high)
                case R.VIRTIO_MMIO_QUEUE_AVAIL_LOW:
                    q.driver = _set_half(q.driver, value, high)
                case R.VIRTIO_MMIO_QUEUE_USED_LOW:
                    q.device = _set_half(q.device, value, high)

    def _write_queue_ready(self, value: int) -> None:
        q = self._selected()
        if q is None:
            self.errors.report("QueueReady written for an absent queue", f"QueueSel={self.queue_sel}")
            return
        if value == 0:                          # the driver stops using the queue
            if q.queue is not None:
                q.queue.stop()
                q.queue = None
            return
        if value != 1:
            self.errors.report("QueueReady written with a value other than 0 or 1", f"{value:#x}")
            return
        if q.queue is not None:
            return
        if not self._status & S.FEATURES_OK or self._status & S.DRIVER_OK:
            self.errors.report("QueueReady=1 refused: before FEATURES_OK or after DRIVER_OK")
            self._device_needs_reset(self._epoch)
            return
        features = self.driver_features
        try:
            q.queue = Queue(
                self.memory, q.size, q.desc, q.driver, q.device, max_size=q.max_size,
                event_idx=bool(features >> VirtioFeature.VIRTIO_F_EVENT_IDX & 1),
                indirect_desc=bool(features >> VirtioFeature.VIRTIO_F_INDIRECT_DESC & 1),
                index=self.queue_sel, errors=q.errors,
                on_broken=functools.partial(self._queue_broken, self._epoch))
        except QueueError as e:
            self.errors.report(f"QueueReady=1 refused: {e.reason}", str(e))
            self._device_needs_reset(self._epoch)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        if value & ~0xFF:
            self.errors.report("Status written with bits above the status byte", f"{value:#x}")
        # DEVICE_NEEDS_RESET is the device's bit; a driver doing read-modify-write
        # (Linux virtio_add_status) writes it back, which is harmless
        value &= 0xFF & ~S.DEVICE_NEEDS_RESET
        if self._status & ~value:
            self.errors.report("Status write would clear bits (dropped)",
                               f"{self._status:#x} -> {value:#x}")
            return
        for bit, needs in _STATUS_ORDER:
            if not value & bit or self._status & bit:
                continue
            if self._status & needs != needs:
                self.errors.report("Status bit set out of order (not taken)", f"{bit.name}")
                continue
            if bit == S.FEATURES_OK and not self._accept_features():
                continue
            self._status |= bit
            if bit == S.DRIVER_OK:
                self._driver_ok()
            elif bit == S.FAILED:
                logger.info("%s: the driver set FAILED", self.name)

    def _accept_features(self) -> bool:
        features = self.driver_features
        if features & ~self.device.device_features or self._acked_beyond_64:
            self.errors.report("FEATURES_OK refused: driver acked features the device did not offer",
                               f"{features:#x}")
            return False
        if not features & _VERSION_1:
            self.errors.report("FEATURES_OK refused: VIRTIO_F_VERSION_1 not acked", f"{features:#x}")
            return False
        self._device_call("ack_features", self.device.ack_features, features)
        return True

    def _driver_ok(self) -> None:
        if not self._needs_reset and any(q.max_size and q.queue is None and self.device.queue_required(i)
                                         for i, q in enumerate(self.queues)):
            self.errors.report("DRIVER_OK with a required queue not ready: device not activated")
            self._needs_reset = True
        if self._needs_reset:
            self._raise_interrupt(self._epoch, VIRTIO_MMIO_INT_CONFIG)
            return
        self.activated = True
        self._device_call("activate", self.device.activate, self.memory,
                          [q.queue for q in self.queues],
                          functools.partial(self._raise_interrupt, self._epoch))

    def _reset(self) -> None:
        """Status = 0 (§2.4, §4.2.2.1): everything back to its power-on value."""
        with self._isr_lock:
            self._epoch += 1
            self._interrupt_status = 0
        for q in self.queues:
            if q.queue is not None:
                q.queue.stop()
        self._device_call("reset", self.device.reset)
        self._clear_registers()

    # -- notifications both ways ----------------------------------------------
    def queue_notify(self, index: int) -> None:
        """QueueNotify (§4.2.3.3): the driver kicked queue ``index``.

        The entry point for both the MMIO write and an ioeventfd handler.
        """
        if not self.activated:
            self.notifies_before_driver_ok += 1
            self.errors.report("QueueNotify before DRIVER_OK (dropped)", f"queue {index}")
            return
        if not 0 <= index < len(self.queues) or self.queues[index].queue is None:
            self.errors.report("QueueNotify for an absent or stopped queue", f"value {index:#x}")
            return
        self._device_call("queue_notify", self.device.queue_notify, index)

    def _raise_interrupt(self, epoch: int, reasons: int) -> None:
        """The ``interrupt`` callable a device gets (bound to its epoch)."""
        with self._isr_lock:
            if epoch != self._epoch:
                return                          # from before a reset: the device must be quiet
            self._interrupt_status |= reasons & _INTERRUPT_BITS
        self._irq_trigger()

    def _queue_broken(self, epoch: int, reason: str) -> None:
        self._device_needs_reset(epoch)

    def _device_needs_reset(self, epoch: int) -> None:
        """Set DEVICE_NEEDS_RESET; with DRIVER_OK also notify the driver (§2.1.2)."""
        if epoch != self._epoch or self._needs_reset:
            return
        self._needs_reset = True
        logger.warning("%s: device needs reset", self.name)
        if self._status & S.DRIVER_OK:
            self._raise_interrupt(epoch, VIRTIO_MMIO_INT_CONFIG)

    # -- device config space (§4.2.2: 0x100+) -----------------------------------
    def _config_range_ok(self, offset: int, size: int, what: str) -> bool:
        if size in (1, 2, 4, 8) and offset + size <= self.device.config_size:
            return True
        self.errors.report(f"config {what} outside config space or of an odd size",
                           f"offset {offset:#x} size {size}")
        return False

    def _read_config(self, offset: int, size: int) -> bytes:
        if not self._config_range_ok(offset, size, "read"):
            return bytes(size)
        data = self._device_call("read_config", self.device.read_config, offset, size)
        if data is None or len(data) != size:   # a device bug; never hand the vCPU short data
            self.device_errors["read_config"] = self.device_errors.get("read_config", 0) + 1
            return bytes(size)
        return bytes(data)

    def _write_config(self, offset: int, data: bytes) -> None:
        if not self._config_range_ok(offset, len(data), "write"):
            return
        if not self.device.config_writable:
            self.errors.report("write to read-only device config space", f"offset {offset:#x}")
            return
        self._device_call("write_config", self.device.write_config, offset, data)

    def _device_call(self, what: str, fn: Callable, *args):
        """Call into the device; an exception is a pyvmm bug, never the vCPU's problem."""
        try:
            return fn(*args)
        except Exception:
            count = self.device_errors[what] = self.device_errors.get(what, 0) + 1
            if count == 1:
                logger.exception("%s: device %s raised; device needs reset", self.name, what)
            self._device_needs_reset(self._epoch)
            return None

    def __repr__(self) -> str:
        return (f"MmioTransport({self.name}, status={self.status:#x}, "
                f"interrupt_status={self._interrupt_status:#x})")
