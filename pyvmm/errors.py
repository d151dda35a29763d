"""The exceptions pyvmm raises, in one place.

``PyvmmError`` is the root.  ``ConfigError`` is a problem with what the user
asked for (a missing kernel, ``--mem`` out of range): the CLI prints its
message on one line and exits with status 2, never a traceback.
"""

from __future__ import annotations


class PyvmmError(Exception):
    """Base class of every error pyvmm raises on purpose."""


class ConfigError(PyvmmError):
    """The user's request cannot be carried out (bad file, bad option)."""


class KvmError(PyvmmError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        import os
        self.ioctl = ioctl
        self.errno = errno
        msg = f"{ioctl} failed: {os.strerror(errno)} (errno {errno})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class GuestMemoryError(PyvmmError):
    """A guest physical address range lies outside guest RAM."""

    def __init__(self, gpa: int, length: int, base: int, end: int) -> None:
        self.gpa = gpa
        self.length = length
        super().__init__(
            f"guest range [{gpa:#x}, +{length:#x}) is outside guest memory [{base:#x}, {end:#x})")


class LoaderError(ConfigError):
    """A kernel or initrd image cannot be loaded (wrong format, truncated, too big)."""
