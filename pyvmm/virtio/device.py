"""The contract between a virtio device and its transport.

This module owns what every virtio device has, whatever the transport
(virtio 1.2 §2 "Basic Facilities of a Virtio Device"): the device status
bits (§2.1), the device-independent feature bits (§6 "Reserved Feature
Bits"), device IDs (§5), the two reasons a device interrupts, and the
:class:`VirtioDevice` base class a device implements.  The transport
(``mmio.py``) drives it; a device never sees a register.

The calls a device receives, in order (§3.1.1 "Driver Requirements: Device
Initialization")::

    ack_features(f)        driver set FEATURES_OK and the transport accepted f
    read_config / write_config   any time (config space, §2.5)
    activate(memory, queues, interrupt)   driver set DRIVER_OK; queues are ready
    queue_notify(i)        driver kicked queue i (MMIO write or ioeventfd)
    reset()                driver wrote status 0; may come at any time

``reset()`` must return only once the device has stopped touching its
queues and calling ``interrupt`` (§2.4: no notifications or queue access
after the reset completes); the transport has already stopped the
:class:`~pyvmm.virtio.queue.Queue` objects so that a straggling job on the
I/O loop finds them empty.

The calls a device receives from the machine, which owns one
:class:`~pyvmm.virtio.eventloop.EventLoop` and its thread ("pyvmm-io") for
all the virtio devices it has::

    attach_loop(loop)      once, before the transport is built; host
                           resources are acquired here (ConfigError)
    add_reader(fd, cb)     one per queue: the queue's ioeventfd (KVM_IOEVENTFD
                           on QueueNotify, datamatch = queue index); cb reads
                           the eventfd and calls transport.queue_notify(q)
    start()                the machine starts (just before the loop thread)
    stop()                 the machine stops (the loop thread still runs)
    close()                after the loop thread is gone: release everything

The one loop thread runs every device's callbacks, one at a time, so a
device's loop-owned state needs no lock, and no device may block the loop.
Why a vCPU may wait for the loop (``activate``/``reset`` under the
transport's register lock) without deadlock: no loop callback, of any
device, takes a lock that a vCPU holds while it calls into a device (a
transport's register lock, the machine's bus lock).  The only transport code
a loop callback runs is ``transport.queue_notify`` (lock-free) and the
``interrupt``/queue-broken callables (the transport's small ISR lock, never
held while calling a device).  Waits for the loop are bounded
(:data:`~pyvmm.virtio.eventloop.LOOP_WAIT`).
"""

from __future__ import annotations

import abc
import contextlib
from enum import IntEnum, IntFlag
from typing import Callable, Iterator, Sequence

from ..errors import PyvmmError
from ..memory import GuestMemory
from .eventloop import EventLoop
from .queue import Queue

__all__ = [
    "DeviceStatus",
    "InterruptReason",
    "VIRTIO_ID_BLOCK",
    "VIRTIO_ID_CONSOLE",
    "VIRTIO_ID_NET",
    "VIRTIO_ID_RNG",
    "VIRTIO_ID_VSOCK",
    "VIRTIO_MMIO_INT_CONFIG",
    "VIRTIO_MMIO_INT_VRING",
    "VirtioDevice",
    "VirtioFeature",
    "feature_mask",
]


class DeviceStatus(IntFlag):
    """The device status field (§2.1), one byte."""
    ACKNOWLEDGE = 1          # the guest OS has noticed the device
    DRIVER = 2               # the guest OS knows how to drive it
    DRIVER_OK = 4            # the driver is set up: the device is live
    FEATURES_OK = 8          # feature negotiation is complete
    DEVICE_NEEDS_RESET = 64  # set by the device: it hit an unrecoverable error
    FAILED = 128             # set by the driver: it gave up on the device


class VirtioFeature(IntEnum):
    """Device-independent feature *bit numbers* (§6).  Bits 0-23 are device-specific."""
    VIRTIO_F_INDIRECT_DESC = 28
    VIRTIO_F_EVENT_IDX = 29
    VIRTIO_F_VERSION_1 = 32
    VIRTIO_F_ACCESS_PLATFORM = 33
    VIRTIO_F_RING_PACKED = 34
    VIRTIO_F_IN_ORDER = 35
    VIRTIO_F_ORDER_PLATFORM = 36
    VIRTIO_F_SR_IOV = 37
    VIRTIO_F_NOTIFICATION_DATA = 38
    VIRTIO_F_NOTIF_CONFIG_DATA = 39
    VIRTIO_F_RING_RESET = 40


def feature_mask(*bits: int) -> int:
    """The u64 with the given feature bit numbers set: ``feature_mask(VIRTIO_F_VERSION_1)``."""
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


# Device IDs (§5; Linux include/uapi/linux/virtio_ids.h)
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_VSOCK = 19


class InterruptReason(IntFlag):
    """Why a device interrupts: the bits of virtio-mmio InterruptStatus (§4.2.2).

    Named as in Linux ``include/uapi/linux/virtio_mmio.h``; a device passes
    them to the ``interrupt`` callable it got from ``activate``.
    """
    VIRTIO_MMIO_INT_VRING = 1 << 0   # used buffer notification
    VIRTIO_MMIO_INT_CONFIG = 1 << 1  # configuration change notification


VIRTIO_MMIO_INT_VRING = InterruptReason.VIRTIO_MMIO_INT_VRING
VIRTIO_MMIO_INT_CONFIG = InterruptReason.VIRTIO_MMIO_INT_CONFIG


class VirtioDevice(abc.ABC):
    """What a transport needs from a virtio device.

    Subclasses set the class (or instance) attributes and implement the
    three abstract methods.  Any transport-facing method may be called from
    the vCPU thread; it must not block (beyond a bounded wait for the I/O
    loop), and must not raise for any value the guest can produce (the
    transport catches and logs what escapes anyway, and marks the device
    DEVICE_NEEDS_RESET).  The machine-facing methods (:meth:`attach_loop`,
    :meth:`add_reader`, :meth:`start`, :meth:`stop`, :meth:`close`) have
    defaults that suit a device whose only host-side work is its queues.
    """

    #: VIRTIO_ID_*: what the driver binds to (e.g. VIRTIO_ID_VSOCK)
    device_id: int
    #: QueueSizeMax of each queue, by index (powers of two, <= 32768)
    queue_max_sizes: Sequence[int]
    #: the offered feature bits (u64); must include VIRTIO_F_VERSION_1
    device_features: int
    #: bytes of device-specific configuration space (at MMIO offset 0x100)
    config_size: int = 0
    #: the ConfigGeneration register (§2.5.1); change it with config_update()
    config_generation: int = 0
    #: the features the driver accepted, set by ack_features()
    acked_features: int = 0
    #: the machine's device I/O loop, set by attach_loop()
    loop: EventLoop | None = None

    # -- the machine's side ------------------------------------------------------------
    def attach_loop(self, loop: EventLoop) -> None:
        """Run on ``loop`` (the machine's, shared with its other virtio devices).

        Called once, before the transport exists and before the loop thread
        starts.  A device that needs host resources (sockets) acquires them
        here, raising ConfigError if it cannot.
        """
        if self.loop is not None:
            raise PyvmmError(f"{type(self).__name__} is already attached to an I/O loop")
        self.loop = loop

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Have the I/O loop thread call ``callback()`` when ``fd`` is readable:
        how the machine wires each queue's ioeventfd.  Any thread, before or
        after the loop thread starts; returns once registered."""
        self.loop.run_in_loop(self.loop.add_reader, fd, callback, wait=True)

    def remove_reader(self, fd: int) -> None:
        """Undo :meth:`add_reader` (any thread)."""
        self.loop.run_in_loop(self.loop.remove_reader, fd, wait=True)

    def start(self) -> None:
        """Begin host-side work (e.g. accept host connections); idempotent."""

    def stop(self) -> None:
        """End host-side work and drop host connections; idempotent.  The
        loop may still run: work on loop-owned state goes through it."""

    def close(self) -> None:
        """Release every host resource (the loop thread has stopped); idempotent."""
        self.stop()

    def ack_features(self, features: int) -> None:
        """The driver set FEATURES_OK with ``features`` (a subset of the offer)."""
        self.acked_features = features

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of config space at ``offset`` (the transport checked the range)."""
        return bytes(size)

    #: False: the config space is read-only (vsock's guest_cid); the transport
    #: counts and drops driver writes instead of calling :meth:`write_config`
    config_writable = False

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote config space (called only if :attr:`config_writable`)."""

    @contextlib.contextmanager
    def config_update(self) -> Iterator[None]:
        """Wrap a change of config space so a driver's read cannot tear (§2.5.1).

        The driver reads ConfigGeneration, the fields, ConfigGeneration again,
        and retries if the two differ.  Bumping the generation both before and
        after the change makes any read that overlaps it see two different
        values.  Afterwards send ``interrupt(VIRTIO_MMIO_INT_CONFIG)``.
        """
        self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
        try:
            yield
        finally:
            self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF

    def queue_required(self, index: int) -> bool:
        """Must queue ``index`` be ready at DRIVER_OK?  (All by default; a device
        whose driver may use fewer queues, as the draft vsock's pairs, says which.)"""
        return True

    @abc.abstractmethod
    def activate(self, memory: GuestMemory, queues: list[Queue],
                 interrupt: Callable[[int], None]) -> None:
        """DRIVER_OK: start serving.  ``queues[i]`` is queue i, ready and checked
        (None where ``queue_max_sizes[i]`` is 0, or the queue is optional
        (:meth:`queue_required`) and the driver did not make it ready).

        ``interrupt(VIRTIO_MMIO_INT_VRING)`` raises a used-buffer interrupt
        (call it after ``queue.needs_notification()`` said so);
        ``interrupt(VIRTIO_MMIO_INT_CONFIG)`` a configuration-change one.
        It is thread-safe and becomes a no-op after the next reset.
        """

    @abc.abstractmethod
    def queue_notify(self, index: int) -> None:
        """The driver made buffers available in queue ``index`` (< len(queues))."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything since construction; stop using queues and memory."""
