"""pyvmm: a virtual machine monitor in Python on Linux KVM.

Layers, each importing only the ones before it::

    kvm (ctypes bindings) -> memory -> virtio (queues, mmio transport) -> devices
    -> boot (loaders, x86 entry state) -> machine (VM, vCPU threads) -> cli

Devices and virtio never import ``kvm``: they are tested with no KVM at all.
"""

__version__ = "0.1.0"
