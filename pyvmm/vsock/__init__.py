"""virtio-vsock: the Socket Device (virtio 1.2 §5.10, device ID 19).

Layers, each importing only the ones above it (never :mod:`pyvmm.kvm`):

* :mod:`~pyvmm.vsock.packet` -- the 44-byte header, the VIRTIO_VSOCK_*
  constants, tx chains -> packets, rx buffers of either layout.
* :mod:`~pyvmm.vsock.connection` -- one connection's state machine and credit
  (Firecracker ``csm/connection.rs``), generic over a host stream.
* :mod:`~pyvmm.vsock.eventloop` -- the device thread's selectors loop.
* :mod:`~pyvmm.vsock.muxer` -- the connection table, routing, RSTs, the rx
  schedule (Firecracker ``unix/muxer.rs``).
* :mod:`~pyvmm.vsock.unix` -- the host end: Firecracker's Unix-socket
  protocol (``CONNECT <port>`` / ``OK <port>`` on ``uds_path``,
  ``<uds_path>_<port>``) and the Python API (``connect`` / ``listen``).
* :mod:`~pyvmm.vsock.device` -- ``VsockDevice``: virtqueues, config, features,
  the event queue, the device thread.  Its docstring is the machine's contract.
"""

from .device import VsockDevice
from .packet import (VMADDR_CID_HOST, VirtioVsockOp, VirtioVsockSeqFlag, VirtioVsockShutdown,
                     VirtioVsockType, VsockHeader)
from .unix import VsockApi, VsockListener

__all__ = [
    "VMADDR_CID_HOST",
    "VirtioVsockOp",
    "VirtioVsockSeqFlag",
    "VirtioVsockShutdown",
    "VirtioVsockType",
    "VsockApi",
    "VsockDevice",
    "VsockHeader",
    "VsockListener",
]
