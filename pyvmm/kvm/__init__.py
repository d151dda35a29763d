"""Python bindings for the Linux KVM API, written here with ctypes.

``abi`` holds the structs and ioctl numbers of ``<linux/kvm.h>``; ``fd`` the
``Kvm``/``VmFd``/``VcpuFd`` wrappers; ``exits`` the typed vCPU exits; ``host``
tells hardware KVM from PVM.  Nothing above this package (devices, virtio,
vsock) imports it: only the boot code and the machine do.
"""

from .fd import Kvm, VcpuFd, VmFd
from . import abi, exits

__all__ = ["Kvm", "VmFd", "VcpuFd", "abi", "exits"]
