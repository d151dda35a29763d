"""Where the built guest images live: the cache that ``make kernel`` / ``make guest`` fill.

``$PYVMM_CACHE`` (default ``~/.cache/pyvmm``) holds one directory per kind
of artefact, each with content-keyed builds and a ``current`` symlink to the
newest valid one::

    $PYVMM_CACHE/kernel/current/{vmlinux,bzImage}         Linux 6.1, the default
    $PYVMM_CACHE/kernel-6.12/current/{vmlinux,bzImage}    Linux 6.12 (make kernel-6.12)
    $PYVMM_CACHE/initramfs/current/initramfs.cpio
    $PYVMM_CACHE/rootfs/current/rootfs.img             the initramfs's files on ext4 (make rootfs)
    $PYVMM_CACHE/freestanding/current/pyvmm-test-guest.elf
    $PYVMM_CACHE/vsock-test/current/vsock-test.cpio     (make vsock-test: the kernel's
        vsock_test from two kernel generations, a cpio to append to the initramfs)
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def cache_dir() -> Path:
    env = os.environ.get("PYVMM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyvmm"


def _image(kind: str, name: str, build_hint: str, required: bool) -> Path | None:
    path = cache_dir() / kind / "current" / name
    if path.is_file():
        return path
    if required:
        raise ConfigError(f"no default {name} in {path.parent}; build it with: {build_hint}")
    return None


def default_kernel(required: bool = True) -> Path | None:
    """The uncompressed vmlinux (fast to boot: no decompressor runs)."""
    return _image("kernel", "vmlinux", "make kernel", required)


def default_bzimage(required: bool = True) -> Path | None:
    return _image("kernel", "bzImage", "make kernel", required)


def kernel_6_12(required: bool = True) -> Path | None:
    """The Linux 6.12 vmlinux: the second guest kernel, for what needs the newer guest driver
    (the kernel's own vsock_test of 6.12); kernels/README.md says how the two differ."""
    return _image("kernel-6.12", "vmlinux", "make kernel-6.12", required)


def bzimage_6_12(required: bool = True) -> Path | None:
    return _image("kernel-6.12", "bzImage", "make kernel-6.12", required)


def default_initramfs(required: bool = True) -> Path | None:
    return _image("initramfs", "initramfs.cpio", "make guest", required)


def default_rootfs(required: bool = True) -> Path | None:
    """The ext4 image of the initramfs's files, to boot with ``root=/dev/vda``.  The pristine
    base: boot it read-only, a copy, or a qcow2 overlay on it, never the file itself."""
    return _image("rootfs", "rootfs.img", "make rootfs", required)


def freestanding_guest(required: bool = True) -> Path | None:
    return _image("freestanding", "pyvmm-test-guest.elf", "make guest", required)


def vsock_test_cpio(required: bool = True) -> Path | None:
    """A newc cpio holding /usr/bin/vsock_test-6.1, /usr/bin/vsock_test-6.12 (and the other
    tools/testing/vsock programs, guest/vsock_test/README.md), to be concatenated after the
    default initramfs: the kernel unpacks one archive after the other."""
    return _image("vsock-test", "vsock-test.cpio", "make vsock-test", required)


def vsockify_cpio(required: bool = True) -> Path | None:
    """A newc cpio holding libvsockify.so (unmodified TCP programs over vsock), the ``vsockify``
    wrapper and dynamically linked Debian programs (dropbear, dbclient, dropbearkey, wget) with
    their libraries, to be concatenated after the default initramfs (guest/vsockify/README.md)."""
    return _image("vsockify", "vsockify.cpio", "make vsockify", required)


def vsockify_host_key(required: bool = True) -> Path | None:
    """The public half of the dropbear host key in :func:`vsockify_cpio`, one OpenSSH
    ``ssh-ed25519 AAAA...`` line: what a client's known_hosts should hold for that guest."""
    return _image("vsockify", "host_key.pub", "make vsockify", required)
