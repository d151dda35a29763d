#!/usr/bin/env python3
"""Turn pyvmm's initramfs (a newc cpio) into an ext4 root file system image.

Owns: the conversion step of ``make rootfs`` (called by guest/rootfs/build.sh). The disk holds
exactly what the initramfs holds -- /init, busybox and its applets, the guest programs, the
device nodes -- so a guest booted with ``root=/dev/vda`` keeps the same /init contract
(guest/README.md). One entry is added: ``/sbin/init -> /init``, because the kernel runs
``/init`` only from an initramfs; from a disk it tries /sbin/init first
(init/main.c, kernel_init()).

How, without root on the host:

1. every directory, regular file and symlink of the archive is written to a staging
   directory (modes as in the archive, mtime 0);
2. ``mkfs.ext4 -d STAGING`` creates the file system from it (e2fsprogs' populate_fs);
3. ``debugfs -w`` then sets what an unprivileged builder cannot set on the host: owner and
   group as in the archive (0:0) and the archive's device nodes (``mknod``);
4. ``e2fsck -fn`` checks the result.

The image is sparse. Every mtime is 0, as in the archive; the file system's UUID is new on
each build (two copies of one image attached to one guest would otherwise be the same
file system to it, e.g. to ``root=UUID=``).

newc format: Documentation/driver-api/early-userspace/buffer-format.rst (a 110-byte ASCII
header -- "070701" and 13 fields of 8 hex digits -- the NUL-terminated name padded to 4, the
data padded to 4; "TRAILER!!!" ends it).

Usage: mkrootfs.py INITRAMFS.cpio OUTPUT.img SIZE_MIB
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Entry", "read_cpio", "make_rootfs"]

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_LEN = 110
LABEL = "pyvmm-root"
#: what the kernel runs from a disk root when init= is not given (it tries this first)
EXTRA_SYMLINKS = {"sbin/init": "/init"}


@dataclass(frozen=True)
class Entry:
    name: str            # relative, no leading "/"
    mode: int            # st_mode: type and permission bits
    uid: int
    gid: int
    rdev: tuple[int, int]
    data: bytes          # file content, or a symlink's target


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def read_cpio(blob: bytes) -> list[Entry]:
    """The entries of a newc archive, in order; raises ValueError on anything malformed."""
    entries, off = [], 0
    while True:
        head = blob[off:off + HEADER_LEN]
        if len(head) < HEADER_LEN or head[:6] != NEWC_MAGIC:
            raise ValueError(f"no newc header at offset {off}")
        f = [int(head[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, filesize, rmaj, rmin, namesize = f[1], f[2], f[3], f[6], f[9], f[10], f[11]
        name_at = off + HEADER_LEN
        name = blob[name_at:name_at + namesize].rstrip(b"\0").decode()
        data_at = _pad4(name_at + namesize)
        data = blob[data_at:data_at + filesize]
        if len(data) != filesize:
            raise ValueError(f"{name}: truncated data")
        off = _pad4(data_at + filesize)
        if name == TRAILER:
            return entries
        name = name.lstrip("/")
        if not name or name == "." or ".." in name.split("/"):
            raise ValueError(f"unsafe name {name!r} in the archive")
        entries.append(Entry(name, mode, uid, gid, (rmaj, rmin), data))


def _stage(entries: list[Entry], root: Path) -> None:
    for e in entries:
        path = root / e.name
        kind = stat.S_IFMT(e.mode)
        if kind == stat.S_IFDIR:
            path.mkdir(exist_ok=True)
        elif kind == stat.S_IFREG:
            path.write_bytes(e.data)
        elif kind == stat.S_IFLNK:
            os.symlink(e.data.decode(), path)
        else:
            continue                  # device nodes: made by debugfs (step 3)
        if kind != stat.S_IFLNK:
            os.chmod(path, stat.S_IMODE(e.mode))
    for name, target in EXTRA_SYMLINKS.items():
        if not os.path.lexists(root / name):
            os.symlink(target, root / name)
    for path in [root, *root.rglob("*")]:      # last: adding a child changes a directory's mtime
        os.utime(path, (0, 0), follow_symlinks=False)


def _debugfs_script(entries: list[Entry]) -> str:
    """debugfs commands: owners for everything, and the device nodes."""
    lines = ["sif / uid 0", "sif / gid 0"]
    for e in entries:
        p = "/" + e.name
        kind = stat.S_IFMT(e.mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):      # mknod makes its name in the cwd
            parent, _, base = p.rpartition("/")
            lines.append(f"cd {parent or '/'}")
            lines.append(f"mknod {base} {'c' if kind == stat.S_IFCHR else 'b'} {e.rdev[0]} {e.rdev[1]}")
            lines.append(f"sif {p} mode 0{e.mode:o}")
            lines.append(f"sif {p} mtime 0")
        lines.append(f"sif {p} uid {e.uid}")
        lines.append(f"sif {p} gid {e.gid}")
    for name in EXTRA_SYMLINKS:
        lines += [f"sif /{name} uid 0", f"sif /{name} gid 0"]
    return "\n".join(lines) + "\n"


def _run(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def make_rootfs(cpio: Path, out: Path, size_mib: int) -> None:
    entries = read_cpio(cpio.read_bytes())
    env = dict(os.environ, LC_ALL="C")
    with tempfile.TemporaryDirectory(prefix="pyvmm-rootfs-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        _stage(entries, root)
        out.unlink(missing_ok=True)
        _run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", LABEL,
              "-E", "root_owner=0:0", "-d", str(root),
              str(out), f"{size_mib}M"], env)
        script = Path(tmp) / "owners.debugfs"
        script.write_text(_debugfs_script(entries))
        log = _run(["debugfs", "-w", "-f", str(script), str(out)], env)
        # debugfs echoes each command ("debugfs: CMD") and reports a failed one on its output,
        # but still exits 0: any other line is an error
        errors = [l for l in log.splitlines()
                  if l and not l.startswith(("debugfs", "Allocated inode: "))]
        if errors:
            raise RuntimeError("debugfs: " + "\n".join(errors[:20]))
    _run(["e2fsck", "-fn", str(out)], env)


def main(argv: list[str]) -> int:
    if len(argv) != 4 or not argv[3].isdigit():
        print(__doc__.rsplit("Usage: ", 1)[1].strip(), file=sys.stderr)
        return 64
    make_rootfs(Path(argv[1]), Path(argv[2]), int(argv[3]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
