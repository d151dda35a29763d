"""ioctl request numbers, computed the way ``<asm-generic/ioctl.h>`` does.

An ioctl request packs four fields into 32 bits::

     31 30 29            16 15       8 7        0
    +-----+----------------+----------+----------+
    | dir |      size      |   type   |    nr    |
    +-----+----------------+----------+----------+

``dir`` says which way the argument travels (none, write = user->kernel,
read = kernel->user), ``size`` is ``sizeof`` the argument struct, ``type`` is
the subsystem's magic byte (``KVMIO`` = 0xAE) and ``nr`` the command number.
pyvmm never writes an ioctl number in hex: each one is declared with the
macro and the ctypes struct it carries (see ``pyvmm.kvm.abi``), so a struct
with a wrong size gives a wrong number and the size tests catch it.
"""

from __future__ import annotations

import ctypes

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return ((direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _size(argtype) -> int:
    return argtype if isinstance(argtype, int) else ctypes.sizeof(argtype)


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, argtype) -> int:
    return _IOC(_IOC_READ, type_, nr, _size(argtype))


def _IOW(type_: int, nr: int, argtype) -> int:
    return _IOC(_IOC_WRITE, type_, nr, _size(argtype))


def _IOWR(type_: int, nr: int, argtype) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(argtype))
