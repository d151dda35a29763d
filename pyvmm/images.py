"""Where the built guest images live: the cache that ``make kernel`` / ``make guest`` fill.

``$PYVMM_CACHE`` (default ``~/.cache/pyvmm``) holds one directory per kind
of artefact, each with content-keyed builds and a ``current`` symlink to the
newest valid one::

    $PYVMM_CACHE/kernel/current/{vmlinux,bzImage}
    $PYVMM_CACHE/initramfs/current/initramfs.cpio
    $PYVMM_CACHE/freestanding/current/pyvmm-test-guest.elf
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


def default_initramfs(required: bool = True) -> Path | None:
    return _image("initramfs", "initramfs.cpio", "make guest", required)


def freestanding_guest(required: bool = True) -> Path | None:
    return _image("freestanding", "pyvmm-test-guest.elf", "make guest", required)
