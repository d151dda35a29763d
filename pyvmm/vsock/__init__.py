"""virtio-vsock: the Socket Device (virtio 1.2 §5.10, device ID 19).

Layers, each importing only the ones above it (never :mod:`pyvmm.kvm`):

* :mod:`~pyvmm.vsock.packet` -- the 44-byte header, the VIRTIO_VSOCK_*
  constants, tx chains -> packets, rx buffers of either layout.
* :mod:`~pyvmm.vsock.connection` -- one connection's state machine and credit
  (Firecracker ``csm/connection.rs``), generic over a host stream.
* :mod:`~pyvmm.vsock.muxer` -- the connection table, routing, RSTs, the rx
  schedule (Firecracker ``unix/muxer.rs``).
* :mod:`~pyvmm.vsock.backend` -- the seam to the host ends: ``VsockBackend``
  (what the device asks of a host end) and ``VsockHost`` (what a host end may
  ask of the device), Firecracker's ``VsockBackend``.
* :mod:`~pyvmm.vsock.unix` -- two backends: Firecracker's Unix-socket
  protocol (``UnixBackend``: ``CONNECT <port>`` / ``OK <port>`` on
  ``uds_path``, ``<uds_path>_<port>``) and the Python API (``VsockApi``:
  ``connect`` / ``listen``).
* :mod:`~pyvmm.vsock.group` -- VM-to-VM: pyvmm processes sharing a group
  directory carry packets between their guests' CIDs (``VsockGroup``).
* :mod:`~pyvmm.vsock.device` -- ``VsockDevice``: virtqueues, config, features,
  the event queue; given its backends.  Its docstring is the machine's contract.

The device runs on the machine's device I/O loop
(:mod:`pyvmm.virtio.eventloop`), shared with its other virtio devices.
"""

from .backend import VsockBackend, VsockHost
from .device import VsockDevice
from .group import VsockGroup
from .wire import (VMADDR_CID_HOST, VirtioVsockOp, VirtioVsockSeqFlag, VirtioVsockShutdown,
                     VirtioVsockType, VsockHeader)
from .unix import UnixBackend, VsockApi, VsockListener, default_backends

__all__ = [
    "UnixBackend",
    "VMADDR_CID_HOST",
    "VirtioVsockOp",
    "VirtioVsockSeqFlag",
    "VirtioVsockShutdown",
    "VirtioVsockType",
    "VsockApi",
    "VsockBackend",
    "VsockDevice",
    "VsockGroup",
    "VsockHeader",
    "VsockHost",
    "VsockListener",
    "default_backends",
]
