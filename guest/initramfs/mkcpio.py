#!/usr/bin/env python3
"""Write an uncompressed newc cpio archive from a gen_init_cpio-style file list.

Owns: packing pyvmm's initramfs (called by guest/initramfs/build.sh). It exists so that the
archive can hold device nodes (/dev/console) and root-owned files without running anything as
root or calling mknod(2) on the host: the list *describes* each entry (type, mode, uid, gid,
device numbers) and this script writes the headers directly, like the kernel's own
usr/gen_init_cpio.c, whose list syntax it accepts (the subset below).

List syntax (one entry per line, '#' starts a comment; ${VAR} in a source path is expanded
from the environment, as gen_init_cpio does):

    dir   <name> <mode> <uid> <gid>
    file  <name> <source path> <mode> <uid> <gid>
    slink <name> <target> <mode> <uid> <gid>
    nod   <name> <mode> <uid> <gid> <c|b> <major> <minor>

Format (Documentation/driver-api/early-userspace/buffer-format.rst, "newc"): each entry is a
110-byte ASCII header -- magic "070701" then 13 fields of 8 hex digits -- followed by the
NUL-terminated name padded to a multiple of 4, then the data padded to a multiple of 4; the
archive ends with an entry named "TRAILER!!!". The kernel unpacks entries in order and does not
create missing parents, so this script rejects an entry whose parent directory has not been
listed before it. All mtimes are 0, so the same inputs give a byte-identical archive.

Usage: mkcpio.py LIST OUTPUT
"""
import os
import stat
import sys

__all__ = ["write_cpio"]

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _header(ino, mode, uid, gid, nlink, filesize, rdevmajor, rdevminor, namesize):
    fields = (ino, mode, uid, gid, nlink, 0, filesize,  # ino mode uid gid nlink mtime filesize
              0, 0, rdevmajor, rdevminor, namesize, 0)  # devmajor devminor rdevmajor rdevminor namesize check
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def _pad4(n):
    return b"\0" * (-n % 4)


def _entry(out, ino, name, mode, uid, gid, data=b"", rdev=(0, 0)):
    nlink = 2 if stat.S_ISDIR(mode) else 1
    bname = name.encode() + b"\0"
    hdr = _header(ino, mode, uid, gid, nlink, len(data), rdev[0], rdev[1], len(bname))
    out.write(hdr + bname + _pad4(len(hdr) + len(bname)))
    out.write(data + _pad4(len(data)))


def write_cpio(lines, out):
    """Write the entries described by `lines` (list syntax above) to the binary stream `out`."""
    seen, dirs = set(), {""}  # archive names have no leading '/'; "" is the root
    for lineno, raw in enumerate(lines, 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        kind, name = words[0], words[1].strip("/") if len(words) > 1 else ""
        where = f"line {lineno}: {raw.strip()!r}"
        try:
            if kind == "dir":
                mode, uid, gid = int(words[2], 8), int(words[3]), int(words[4])
                entry = dict(mode=stat.S_IFDIR | mode, uid=uid, gid=gid)
            elif kind == "file":
                src = os.path.expandvars(words[2])
                mode, uid, gid = int(words[3], 8), int(words[4]), int(words[5])
                with open(src, "rb") as f:
                    entry = dict(mode=stat.S_IFREG | mode, uid=uid, gid=gid, data=f.read())
            elif kind == "slink":
                mode, uid, gid = int(words[3], 8), int(words[4]), int(words[5])
                entry = dict(mode=stat.S_IFLNK | mode, uid=uid, gid=gid, data=words[2].encode())
            elif kind == "nod":
                mode, uid, gid = int(words[2], 8), int(words[3]), int(words[4])
                ftype = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[words[5]]
                entry = dict(mode=ftype | mode, uid=uid, gid=gid,
                             rdev=(int(words[6]), int(words[7])))
            else:
                raise ValueError(f"unknown entry type {kind!r}")
        except (IndexError, KeyError, ValueError, OSError) as e:
            raise SystemExit(f"mkcpio: {where}: {e}")
        if name in seen:
            raise SystemExit(f"mkcpio: {where}: duplicate entry")
        if os.path.dirname(name) not in dirs:
            raise SystemExit(f"mkcpio: {where}: parent directory not listed before it")
        seen.add(name)
        if kind == "dir":
            dirs.add(name)
        _entry(out, len(seen) + 720, name, **entry)  # inode numbers only need to be unique
    _entry(out, 0, TRAILER, 0, 0, 0)


def main(argv):
    if len(argv) != 3:
        raise SystemExit(__doc__.rsplit("Usage: ", 1)[1])
    with open(argv[1]) as lst, open(argv[2], "wb") as out:
        write_cpio(lst, out)


if __name__ == "__main__":
    main(sys.argv)
