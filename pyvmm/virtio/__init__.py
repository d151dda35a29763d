"""virtio: split virtqueues, the virtio-mmio transport, the device contract, the I/O loop.

The package implements the device side of virtio 1.2 (OASIS, "Virtual I/O
Device (VIRTIO) Version 1.2") for pyvmm's devices.  It never imports the KVM
layer; it is tested against :mod:`pyvmm.virtio.mock`, a driver-side fake.

* :mod:`~pyvmm.virtio.queue` -- split virtqueues (§2.7): ``Queue``,
  ``DescriptorChain``, notification suppression, guest-input checks.
* :mod:`~pyvmm.virtio.device` -- ``VirtioDevice`` (what a device implements,
  for the transport and for the machine), status bits (§2.1), feature bits
  (§6), device IDs (§5).
* :mod:`~pyvmm.virtio.eventloop` -- ``EventLoop``: the machine's one device
  I/O loop and its thread, "pyvmm-io", shared by all its virtio devices.
* :mod:`~pyvmm.virtio.mmio` -- ``MmioTransport``, the virtio-mmio v2 register
  file (§4.2) as a state machine; a bus device.
* :mod:`~pyvmm.virtio.mock` -- ``MockDriver``: replays the Linux probe and
  fills/collects queues, for tests.
"""

from .device import (VIRTIO_ID_VSOCK, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, DeviceStatus,
                     InterruptReason, VirtioDevice, VirtioFeature, feature_mask)
from .eventloop import IO_THREAD_NAME, EventLoop
from .mmio import NOTIFY_OFFSET, MmioTransport
from .queue import DescriptorChain, Queue, QueueError

__all__ = [
    "DescriptorChain",
    "DeviceStatus",
    "EventLoop",
    "IO_THREAD_NAME",
    "InterruptReason",
    "MmioTransport",
    "NOTIFY_OFFSET",
    "Queue",
    "QueueError",
    "VIRTIO_ID_VSOCK",
    "VIRTIO_MMIO_INT_CONFIG",
    "VIRTIO_MMIO_INT_VRING",
    "VirtioDevice",
    "VirtioFeature",
    "feature_mask",
]
