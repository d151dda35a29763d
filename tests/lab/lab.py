"""The lab: run one command on a Linux machine with a real /dev/kvm (SVM semantics).

Our development and CI hosts give pyvmm a /dev/kvm backed by PVM, on which a stock Linux
guest cannot run userspace (see docs/pvm.md). The lab is the way round:

    host (PVM, no svm flag)
     └─ qemu-system-x86_64 -accel tcg -cpu EPYC,+svm       software CPU that has SVM
         └─ outer Linux: Debian's linux-image-amd64         kvm_amd (nested paging) -> /dev/kvm
             │  /newroot = the host's /, read-only, over 9p
             │  /newroot/<project> = the project, read-write, over 9p
             └─ chroot /newroot: CMD, e.g. python3 -m pytest ...  (host's own python, numpy)
                 └─ pyvmm on /dev/kvm -> inner guest with a working userspace

Public interface (stdlib only: this runs before any virtualenv exists):

    available() -> (bool, reason)
    run(cmd, timeout, cpus=1, ...) -> LabResult(status, output, timings, ...)
    main(argv) -> exit status          # the CLI behind tests/lab/run

What the lab builds and where (``$PYVMM_CACHE``, default ``~/.cache/pyvmm``)::

    lab/<key>/vmlinux           the kernel of the linux-image-6.1.0-*-amd64 package, taken
                                out of its bzImage so that QEMU boots it through PVH
    lab/<key>/initramfs.cpio    busybox-static, init.sh as /init, the modules kvm_amd etc. need
    lab/<key>/manifest.json     written last; an image without it is not valid
    lab/current -> <key>        the newest valid image

``<key>`` hashes the kernel package's name and version, this directory's scripts and the
busybox binary; an image is rebuilt only when its key changes or its files do not match
the manifest. Each run appends a small second cpio archive holding ``/lab/job.sh`` (the
command, its working directory and environment) to a copy of the initramfs, in a memfd.

Inside, init.sh reports on a serial port of its own (ttyS3) and the command's stdout and
stderr have one port each (ttyS1, ttyS2): init.sh describes the lines. The command's exit
status therefore comes back on a channel the command cannot print to.

Exit statuses: the command's own (0..255); 124 when the timeout killed the machine; 125
when the lab itself failed (the error says why: missing package, module, kernel panic).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import selectors
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["LabError", "LabResult", "available", "run", "main",
           "DEFAULT_TIMEOUT", "EXIT_TIMEOUT", "EXIT_LAB_ERROR"]

LAB_DIR = Path(__file__).resolve().parent
PROJECT_DIR = LAB_DIR.parents[1]          # the repository top, which holds tests/lab
INIT_SCRIPT = LAB_DIR / "init.sh"
# The files whose content goes into the cache key, besides the kernel package and busybox.
LAB_SCRIPTS = (LAB_DIR / "lab.py", LAB_DIR / "run", INIT_SCRIPT)

DEFAULT_TIMEOUT = 1200.0
DEFAULT_MEM_MB = 2048
EXIT_TIMEOUT = 124                        # as timeout(1)
EXIT_LAB_ERROR = 125                      # as `docker run`: the launcher, not the command, failed

KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")            # from busybox-static
# The modules the outer Linux needs; their dependencies are found with `modinfo -F depends`.
MODULE_ROOTS = ("kvm_amd", "virtio_pci", "9pnet_virtio", "9p")
# console on ttyS0 only; quiet so that a slow serial console does not slow the boot; a panic
# reboots at once, which QEMU's -no-reboot turns into an exit.
KERNEL_CMDLINE = "console=ttyS0 quiet loglevel=3 panic=-1 8250.nr_uarts=4 mitigations=off"
# The serial ports, in order ttyS0..ttyS3 (see init.sh).
PORTS = ("console", "stdout", "stderr", "status")
MIN_FREE_BYTES_TO_BUILD = 1 << 30         # the .deb (70 MB) unpacks to about 400 MB


class LabError(Exception):
    """The lab could not run the command (as opposed to the command failing)."""


@dataclasses.dataclass
class LabResult:
    """What one lab run produced.

    ``status`` is the command's exit status, or EXIT_TIMEOUT / EXIT_LAB_ERROR, in which case
    ``error`` says what happened. ``output`` is the command's stdout and stderr interleaved in
    the order they reached the host; ``stdout`` and ``stderr`` are the two apart. ``console``
    is the outer kernel's console (and init.sh's messages). ``timings`` are in seconds:

        prepare        host: checking (or building) the cached image
        qemu_to_init   host: from QEMU's start to /init's first status line (firmware + boot)
        boot_to_init   guest uptime when /init started (kernel boot, under TCG)
        init_to_cmd    guest: loading modules and mounting, up to the command's start
        start_to_cmd   host: from run() being called to the command starting
        cmd            guest: the command's wall time
        total          host: the whole run() call
    """

    status: int
    output: str
    timings: dict[str, float]
    stdout: str = ""
    stderr: str = ""
    console: str = ""
    error: str | None = None


# --------------------------------------------------------------------------------------
# Part 1. The host's prerequisites and the kernel package
# --------------------------------------------------------------------------------------

def _cache_root() -> Path:
    base = os.environ.get("PYVMM_CACHE") or Path.home() / ".cache" / "pyvmm"
    return Path(base) / "lab"


def _tool(name: str) -> str | None:
    """Find a tool on PATH or in the sbin directories (modinfo lives in /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def _missing_host_packages() -> list[str]:
    missing = []
    if _tool("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86")
    if not BUSYBOX.is_file():
        missing.append("busybox-static")
    return missing


def _install_host_packages() -> None:
    """Install qemu-system-x86 / busybox-static if they are missing, or say how to."""
    missing = _missing_host_packages()
    if not missing:
        return
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if os.geteuid() != 0 or _tool("apt-get") is None:
        raise LabError(f"missing Debian packages; install them with: {shlex.join(command)}")
    _log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0 or _missing_host_packages():
        raise LabError(f"`{shlex.join(command)}` failed: {_last_line(done.stderr)}")


@dataclasses.dataclass(frozen=True)
class KernelPackage:
    name: str          # e.g. linux-image-6.1.0-56-amd64: the real package, not the metapackage
    version: str       # e.g. 6.1.192-2


def _apt_show(package: str) -> str | None:
    done = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                          capture_output=True, text=True)
    return done.stdout if done.returncode == 0 and done.stdout.strip() else None


def _resolve_kernel_package() -> KernelPackage:
    """Find the package that linux-image-amd64 stands for, with its candidate version.

    The metapackage's record says e.g. ``Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)``.
    """
    if _tool("apt-cache") is None:
        raise LabError("apt-cache not found: the lab takes its kernel from Debian packages")
    record = _apt_show(KERNEL_METAPACKAGE)
    if record is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        record = _apt_show(KERNEL_METAPACKAGE)
    if record is None:
        raise LabError(f"apt knows no package {KERNEL_METAPACKAGE} (run apt-get update)")
    found = re.search(r"^Depends:.*?\b(linux-image-[^\s,]+-amd64)(?: \(= ([^)\s]+)\))?",
                      record, re.MULTILINE)
    if found is None:
        raise LabError(f"cannot find the kernel package in {KERNEL_METAPACKAGE}'s Depends")
    name, version = found.groups()
    if version is None:
        real = _apt_show(name) or ""
        version_line = re.search(r"^Version: (\S+)", real, re.MULTILINE)
        if version_line is None:
            raise LabError(f"apt knows no version of {name}")
        version = version_line.group(1)
    return KernelPackage(name, version)


def _apt_state() -> str:
    """A fingerprint of what apt-cache answers from: its package lists and configuration."""
    digest = hashlib.sha256()
    for top in (Path("/var/lib/apt/lists"), Path("/etc/apt")):
        for path in sorted(top.rglob("*")):
            with contextlib.suppress(OSError):
                status = path.stat()
                digest.update(f"{path} {status.st_size} {status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _kernel_package() -> KernelPackage:
    """_resolve_kernel_package(), remembered in lab/apt.json while apt's state is unchanged.

    apt-cache takes about 0.7 s here, a sixth of a warm lab run; `apt-get update` changes
    the lists and so makes the next run ask apt again.
    """
    memo = _cache_root() / "apt.json"
    state = _apt_state()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(memo.read_text())
        if saved["apt_state"] == state:
            return KernelPackage(saved["name"], saved["version"])
    package = _resolve_kernel_package()
    fresh = memo.with_name(f"apt.json.{os.getpid()}")
    fresh.write_text(json.dumps({"apt_state": state, **dataclasses.asdict(package)}) + "\n")
    fresh.replace(memo)
    return package


def _image_key(package: KernelPackage) -> str:
    digest = hashlib.sha256(f"{package.name}={package.version}\n".encode())
    for path in (*LAB_SCRIPTS, BUSYBOX):
        digest.update(f"{path.name}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Part 2. Building the image: kernel modules and the initramfs
# --------------------------------------------------------------------------------------

def _extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage.

    QEMU boots such an ELF directly through its PVH entry point (the kernel needs
    CONFIG_PVH), which skips the bzImage's decompressor: under TCG that saves about 3.5 s
    per boot. The setup header gives the payload's place: setup_sects at 0x1F1 (the
    protected-mode code starts after (setup_sects + 1) * 512 bytes), payload_offset and
    payload_length at 0x248 (Documentation/x86/boot.rst). The payload's first bytes tell
    its compression.
    """
    if bzimage[0x202:0x206] != b"HdrS":
        raise LabError("the kernel is not a bzImage")
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (bzimage[0x1F1] + 1) * 512 + payload_offset
    payload = bzimage[start:start + payload_length]
    if payload.startswith(b"\xfd7zXZ\0"):
        vmlinux = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        vmlinux = gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        vmlinux = subprocess.run(["zstd", "-dc"], input=payload, capture_output=True,
                                 check=True).stdout
    else:
        raise LabError(f"unknown bzImage payload compression {payload[:4].hex()}")
    if not vmlinux.startswith(b"\x7fELF"):
        raise LabError("the bzImage payload is not an ELF kernel")
    return vmlinux


def _module_name(path: Path) -> str:
    """kvm-amd.ko.xz -> kvm_amd: the kernel treats '-' and '_' in module names alike."""
    return path.name.split(".ko")[0].replace("-", "_")


def _resolve_modules(module_dir: Path, roots: tuple[str, ...]) -> list[Path]:
    """The module files to load for ``roots``, each after the modules it depends on.

    A Debian kernel package has no modules.dep (depmod runs at install time), so each
    module's own ``depends`` field is read with ``modinfo -F depends``. Modules built
    into the kernel (listed in modules.builtin) need no file.
    """
    modinfo = _tool("modinfo")
    if modinfo is None:
        raise LabError("modinfo not found (Debian package kmod)")
    files = {_module_name(path): path for path in module_dir.rglob("*.ko*")}
    builtin_list = module_dir / "modules.builtin"
    builtin = {_module_name(Path(line)) for line in builtin_list.read_text().split()}
    order: list[Path] = []
    visited: set[str] = set()

    def visit(name: str, needed_by: list[str]) -> None:
        if name in visited or name in builtin:
            return
        if name not in files:
            chain = " <- ".join([name, *reversed(needed_by)])
            raise LabError(f"kernel module {name} is not in the kernel package ({chain})")
        visited.add(name)
        depends = subprocess.run([modinfo, "-F", "depends", str(files[name])],
                                 capture_output=True, text=True, check=True).stdout.strip()
        for dependency in filter(None, depends.split(",")):
            visit(dependency.replace("-", "_"), [*needed_by, name])
        order.append(files[name])

    for root in roots:
        visit(root, [])
    return order


def _module_bytes(path: Path) -> bytes:
    """A module's ELF bytes: busybox insmod takes plain .ko files only."""
    if path.name.endswith(".ko"):
        return path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True,
                              check=True).stdout
    raise LabError(f"unknown module compression: {path.name}")


class Cpio:
    """Write a "newc" cpio archive, the format the kernel unpacks into its initramfs.

    Each entry is a 110-byte ASCII header (magic 070701, then thirteen 8-digit hex fields),
    the NUL-terminated name, and the data, name and data each padded to 4 bytes; the archive
    ends with an entry named TRAILER!!!. Archives may be concatenated: the kernel unpacks
    them in order (Documentation/driver-api/early-userspace/buffer-format.rst). Entries are
    owned by root and dated 0, so the same inputs give the same bytes.
    """

    def __init__(self, out: BinaryIO):
        self._out = out
        self._offset = 0
        self._inode = 0

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)

    def _pad(self) -> None:
        self._write(b"\0" * (-self._offset % 4))

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        self._inode += 1
        encoded = name.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        self._write(b"070701" + b"".join(b"%08X" % field for field in fields) + encoded)
        self._pad()
        self._write(data)
        self._pad()

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, 0o040000 | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def _write_initramfs(path: Path, modules: list[Path]) -> None:
    with path.open("wb") as out:
        cpio = Cpio(out)
        for directory in ("bin", "dev", "lab", "lib", "lib/modules", "newroot", "proc", "sys"):
            cpio.directory(directory)
        # The kernel opens /dev/console for /init's stdio before devtmpfs is mounted.
        cpio.char_device("dev/console", 5, 1)
        cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
        cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
        for module in modules:
            cpio.file(f"lib/modules/{_module_name(module)}.ko", _module_bytes(module))
        names = "".join(f"{_module_name(module)}\n" for module in modules)
        cpio.file("lab/modules", names.encode())
        cpio.close()


@dataclasses.dataclass(frozen=True)
class Image:
    """A built, valid outer-Linux image in the cache."""
    directory: Path
    manifest: dict

    @property
    def kernel(self) -> Path:
        return self.directory / self.manifest["kernel_file"]

    @property
    def initramfs(self) -> Path:
        return self.directory / "initramfs.cpio"

    @classmethod
    def load(cls, directory: Path) -> Image | None:
        """The image in ``directory``, or None unless its manifest matches its files."""
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
            for name, size in manifest["files"].items():
                if (directory / name).stat().st_size != size:
                    return None
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        return cls(directory, manifest)


def _build_image(package: KernelPackage, key: str, destination: Path) -> None:
    """Download and unpack the kernel package, and write the image into ``destination``."""
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=destination.parent))
    try:
        download = ["apt-get", "download", "-q", f"{package.name}={package.version}"]
        if os.geteuid() == 0:          # apt's _apt user cannot write into our directory
            download[2:2] = ["-o", "APT::Sandbox::User=root"]
        done = subprocess.run(download, cwd=work, capture_output=True, text=True)
        debs = list(work.glob("*.deb"))
        if done.returncode != 0 or len(debs) != 1:
            raise LabError(f"`{shlex.join(download)}` failed: {_last_line(done.stderr)}")
        unpacked = work / "package"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], capture_output=True,
                       check=True)
        debs[0].unlink()
        kernels = list(unpacked.glob("boot/vmlinuz-*"))
        module_dirs = [*unpacked.glob("lib/modules/*"), *unpacked.glob("usr/lib/modules/*")]
        if len(kernels) != 1 or len(module_dirs) != 1:
            raise LabError(f"{package.name} does not hold one vmlinuz and one module tree")
        modules = _resolve_modules(module_dirs[0], MODULE_ROOTS)

        image = work / "image"
        image.mkdir()
        config = kernels[0].with_name(kernels[0].name.replace("vmlinuz-", "config-"))
        if "\nCONFIG_PVH=y\n" in config.read_text():
            kernel_file = "vmlinux"
            (image / kernel_file).write_bytes(_extract_vmlinux(kernels[0].read_bytes()))
        else:
            kernel_file = "vmlinuz"
            shutil.copyfile(kernels[0], image / kernel_file)
        _write_initramfs(image / "initramfs.cpio", modules)
        files = {name: (image / name).stat().st_size for name in (kernel_file, "initramfs.cpio")}
        manifest = {
            "key": key,
            "kernel_package": package.name,
            "kernel_version": package.version,
            "kernel_release": module_dirs[0].name,
            "kernel_file": kernel_file,
            "modules": [_module_name(module) for module in modules],
            "files": files,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (image / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if destination.exists():       # an invalid leftover of an interrupted build
            shutil.rmtree(destination)
        image.rename(destination)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive flock on ``path``: one lab at a time checks or builds the cache."""
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _prepare_image() -> tuple[Image, bool]:
    """The valid image for the current kernel package, building it if needed.

    Returns the image and whether it was built now (a cache miss).
    """
    _install_host_packages()
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    try:
        package = _kernel_package()
    except LabError as error:          # e.g. no apt lists: fall back on the last image
        current = Image.load(root / "current")
        if current is None:
            raise
        _log(f"{error}; using the cached image {current.directory.resolve().name}")
        return current, False
    key = _image_key(package)
    with _locked(root / ".lock"):
        image = Image.load(root / key)
        built = image is None
        if built:
            for stale in root.glob(".build-*"):    # builds run under the lock: these are
                shutil.rmtree(stale, ignore_errors=True)   # left by a killed build
            if shutil.disk_usage(root).free < MIN_FREE_BYTES_TO_BUILD:
                raise LabError(f"less than 1 GiB free in {root} to build the lab's image")
            _log(f"building the outer Linux image from {package.name} {package.version} "
                 f"into {root / key} (once)")
            try:
                _build_image(package, key, root / key)
            except subprocess.CalledProcessError as error:
                command = shlex.join(map(str, error.cmd))
                stderr = error.stderr or ""
                if isinstance(stderr, bytes):
                    stderr = stderr.decode(errors="replace")
                raise LabError(f"`{command}` failed: {_last_line(stderr)}") from None
            image = Image.load(root / key)
            if image is None:
                raise LabError(f"the image just built in {root / key} is not valid")
        link = root / ".current.new"
        link.unlink(missing_ok=True)
        link.symlink_to(key)
        link.replace(root / "current")
    return image, built


# --------------------------------------------------------------------------------------
# Part 3. One run: the job, the QEMU command line, and the ports
# --------------------------------------------------------------------------------------

def _job_script(cmd: list[str], cwd: Path, env: dict[str, str]) -> bytes:
    """/lab/job.sh, which init.sh sources: the project path, the cwd and lab_command."""
    assignments = " ".join(shlex.quote(f"{name}={value}") for name, value in env.items())
    return f"""\
# One lab run, written by tests/lab/lab.py and sourced by /init.
LAB_PROJECT={shlex.quote(str(PROJECT_DIR))}
LAB_CWD={shlex.quote(str(cwd))}
# chroot runs the host's /bin/sh with $0 = lab-exec (its name in error messages),
# $1 = the working directory, and the command after it.
lab_command() {{
    exec env -i {assignments} \\
        chroot /newroot /bin/sh -c 'cd "$1" && shift && exec "$@"' \\
        lab-exec {shlex.join([str(cwd), *cmd])}
}}
""".encode()


#: host directories the lab replaces with a fresh tmpfs inside: host paths under them are not
#: visible to the command (the project itself is mounted over them last, so it is)
HIDDEN_INSIDE = (Path("/tmp"), Path("/run"), Path("/var/tmp"))


def _check_cache_visible() -> None:
    """PYVMM_CACHE must be a directory the command inside can see, or every image lookup
    there fails far from the cause."""
    cache = os.environ.get("PYVMM_CACHE")
    if not cache:
        return
    path = Path(cache).resolve()
    if path == PROJECT_DIR or PROJECT_DIR in path.parents:
        return
    for hidden in HIDDEN_INSIDE:
        if path == hidden or hidden in path.parents:
            raise LabError(f"PYVMM_CACHE={cache} is under {hidden}, which the lab replaces with "
                           "a fresh tmpfs, so the command inside would not find the images: "
                           "use a cache directory elsewhere (the default is ~/.cache/pyvmm)")


def _command_env(extra: dict[str, str] | None) -> dict[str, str]:
    """The caller's environment essentials, passed through to the command."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
        "HOME": os.environ.get("HOME", "/root"),
        "TERM": "dumb",
        "PYVMM_IN_LAB": "1",
    }
    for name, value in os.environ.items():       # pyvmm's own settings (PYVMM_CACHE, a
        if name.startswith("PYVMM_") or name == "VIRTUAL_ENV":   # soak's sizes) and the venv
            env[name] = value
    env["PYVMM_IN_LAB"] = "1"
    env.update(extra or {})
    return env


def _working_directory(cwd: str | os.PathLike | None) -> Path:
    """The caller's directory if it is inside the project (shared at the same path), else
    the project's top."""
    path = Path(cwd if cwd is not None else os.getcwd()).resolve()
    return path if path == PROJECT_DIR or PROJECT_DIR in path.parents else PROJECT_DIR


def _qemu_command(image: Image, initrd: str, cpus: int, mem_mb: int) -> list[str]:
    """QEMU's command line, without the serial ports (_boot attaches those)."""
    def escaped(path: Path) -> str:    # QEMU option values double their commas
        return str(path).replace(",", ",,")

    command = [
        _tool("qemu-system-x86_64") or "qemu-system-x86_64",
        "-accel", "tcg,thread=multi" if cpus > 1 else "tcg",
        "-cpu", "EPYC,+svm",           # qemu64 lacks x86-64-v2, which numpy needs
        "-m", str(mem_mb), "-smp", str(cpus),
        "-nographic", "-no-reboot", "-monitor", "none",
        "-nic", "none",                # no network: no way out of the lab. And no vsock device.
        "-kernel", escaped(image.kernel), "-initrd", initrd,
        "-append", KERNEL_CMDLINE,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={escaped(PROJECT_DIR)},mount_tag=project,"
                   "security_model=none,multidevs=remap",
    ]
    return command


def _die_with_parent() -> None:
    """In QEMU's child process, before exec: SIGKILL QEMU when this process dies, so that
    no QEMU outlives the lab, even when the lab itself is killed with SIGKILL."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived: unwind, killing QEMU on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


@contextlib.contextmanager
def _terminate_on_signals():
    """Turn SIGTERM and SIGHUP into _Terminated while a run is going on (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_terminated)
                for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Session:
    """Reads the four ports and QEMU's own output until QEMU exits, or the deadline."""

    def __init__(self, stdout: BinaryIO | None, stderr: BinaryIO | None, verbose: bool):
        self.sinks: dict[str, Callable[[bytes], None]] = {
            "console": self._console, "stdout": self._stdout, "stderr": self._stderr,
            "status": self._status, "qemu": self._qemu}
        self.stdout_stream, self.stderr_stream, self.verbose = stdout, stderr, verbose
        self.chunks: list[tuple[str, bytes]] = []      # (stdout|stderr, bytes) in arrival order
        self.console = bytearray()
        self.qemu_log = bytearray()
        self.status_buffer = b""
        self.events: dict[str, list[str]] = {}         # status word -> its arguments
        self.arrival: dict[str, float] = {}            # status word -> host time it arrived

    def _forward(self, stream: BinaryIO | None, data: bytes) -> bool:
        """Copy ``data`` to ``stream``; False once nobody reads it any more."""
        if stream is None:
            return True
        try:
            stream.write(data)
            stream.flush()
        except BrokenPipeError:
            # e.g. `tests/lab/run -- CMD | head`: the command runs on and its status still
            # counts; what it writes is only kept. Python's documented idiom: point the fd
            # at /dev/null, so that the flush at exit does not fail again.
            with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            return False
        return True

    def _stdout(self, data: bytes) -> None:
        self.chunks.append(("stdout", data))
        if not self._forward(self.stdout_stream, data):
            self.stdout_stream = None

    def _stderr(self, data: bytes) -> None:
        self.chunks.append(("stderr", data))
        if not self._forward(self.stderr_stream, data):
            self.stderr_stream = None

    def _console(self, data: bytes) -> None:
        self.console += data
        if self.verbose:
            self._forward(self.stderr_stream, data)

    def _qemu(self, data: bytes) -> None:
        self.qemu_log += data
        if self.verbose:
            self._forward(self.stderr_stream, data)

    def _status(self, data: bytes) -> None:
        lines = (self.status_buffer + data).split(b"\n")
        self.status_buffer = lines.pop()
        for line in lines:
            word, *arguments = line.decode(errors="replace").strip().split(" ", 1)
            if word and word not in self.events:        # the first of each kind counts
                self.events[word] = arguments[0].split(" ") if arguments else []
                self.arrival[word] = time.monotonic()
                if self.verbose and word in ("init", "kvm", "start"):
                    self._forward(self.stderr_stream, b"lab: " + line + b"\n")

    def pump(self, qemu: subprocess.Popen, read_fds: dict[int, str], deadline: float) -> bool:
        """Copy everything QEMU writes to its sink until all pipes close. When the deadline
        passes first, kill QEMU. Returns whether the deadline was reached."""
        timed_out = False
        with selectors.DefaultSelector() as selector:
            for fd, name in read_fds.items():
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ, name)
            while selector.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not timed_out:
                    timed_out = True
                    qemu.kill()         # the pipes then reach end-of-file
                for key, _ in selector.select(None if timed_out else remaining):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        self.sinks[key.data](data)
                    else:
                        selector.unregister(key.fd)
        return timed_out

    def joined(self, *streams: str) -> str:
        return b"".join(data for name, data in self.chunks if name in streams).decode(
            errors="replace")

    def result(self, status: int, timings: dict[str, float],
               error: str | None = None) -> LabResult:
        return LabResult(status, self.joined("stdout", "stderr"), timings,
                         self.joined("stdout"), self.joined("stderr"),
                         self.console.decode(errors="replace"), error)


def _job_initrd(image: Image, cmd: list[str], cwd: Path, env: dict[str, str]) -> int:
    """A memfd holding the image's initramfs with this run's /lab/job.sh appended as a
    second archive (the kernel unpacks both). QEMU opens it as /dev/fd/N; being memory,
    it vanishes with the last process holding it, so no temporary file can be left behind.
    """
    fd = os.memfd_create("pyvmm-lab-initrd")
    with image.initramfs.open("rb") as base, open(fd, "wb", closefd=False) as out:
        shutil.copyfileobj(base, out)
        job = Cpio(out)
        job.file("lab/job.sh", _job_script(cmd, cwd, env))
        job.close()
    return fd


def _boot(command: list[str], inherit: list[int], session: _Session,
          timeout: float) -> tuple[int, bool, float]:
    """Run QEMU with ``command`` (its ports still to be attached) and the file descriptors
    ``inherit`` (which it names as /dev/fd/N), feeding ``session``.

    Returns QEMU's exit status, whether the timeout killed it, and when it started. QEMU is
    reaped on every way out: normal exit, timeout, an exception such as KeyboardInterrupt
    or _Terminated; and PR_SET_PDEATHSIG kills it if this process dies without unwinding.
    """
    pipes = {port: os.pipe() for port in PORTS}
    qemu_read, qemu_write = os.pipe()
    for port, (_, write_end) in pipes.items():
        command += ["-chardev", f"file,id={port},path=/dev/fd/{write_end}",
                    "-serial", f"chardev:{port}"]
    read_fds = {read_end: port for port, (read_end, _) in pipes.items()}
    read_fds[qemu_read] = "qemu"
    qemu = None
    try:
        try:
            qemu = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=qemu_write, stderr=qemu_write,
                pass_fds=[*inherit, *(write_end for _, write_end in pipes.values())],
                start_new_session=True,     # a terminal's Ctrl-C reaches us, and we stop QEMU
                preexec_fn=_die_with_parent)
        finally:                            # from here on only QEMU holds the write ends
            for _, write_end in pipes.values():
                os.close(write_end)
            os.close(qemu_write)
        qemu_started = time.monotonic()
        timed_out = session.pump(qemu, read_fds, qemu_started + timeout)
        return qemu.wait(), timed_out, qemu_started
    finally:
        if qemu is not None and qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        for fd in read_fds:
            os.close(fd)


def run(cmd: list[str], timeout: float = DEFAULT_TIMEOUT, cpus: int = 1, *,
        mem_mb: int = DEFAULT_MEM_MB, cwd: str | os.PathLike | None = None,
        env: dict[str, str] | None = None, stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None, verbose: bool = False) -> LabResult:
    """Run ``cmd`` in the lab and return its status, output and timings.

    ``timeout`` (seconds) counts from QEMU's start; the image build before it is not
    counted. ``cwd`` defaults to the caller's directory when it is inside the project, else
    the project's top. ``env`` adds variables to the passed-through essentials (PATH, HOME,
    every PYVMM_* variable, VIRTUAL_ENV, TERM=dumb, PYVMM_IN_LAB=1). The command's output is also
    copied, as it arrives, to ``stdout`` / ``stderr`` when given; ``verbose`` copies the
    outer console and QEMU's messages to ``stderr`` too. Lab failures give status 124 or
    125 with ``error`` set. KeyboardInterrupt, and SIGTERM/SIGHUP as _Terminated (in the
    main thread), propagate after QEMU has been reaped.
    """
    if not cmd:
        raise ValueError("run() needs a command")
    started = time.monotonic()
    timings: dict[str, float] = {}
    session = _Session(stdout, stderr, verbose)
    with _terminate_on_signals():
        try:
            _check_cache_visible()
            image, built = _prepare_image()
        except LabError as error:
            timings["total"] = time.monotonic() - started
            return session.result(EXIT_LAB_ERROR, timings, str(error))
        timings["prepare"] = time.monotonic() - started
        if built:
            timings["build"] = timings["prepare"]
        initrd = _job_initrd(image, cmd, _working_directory(cwd), _command_env(env))
        try:
            command = _qemu_command(image, f"/dev/fd/{initrd}", cpus, mem_mb)
            returncode, timed_out, qemu_started = _boot(command, [initrd], session, timeout)
        finally:
            os.close(initrd)
    timings["total"] = time.monotonic() - started
    _fill_timings(timings, session, started, qemu_started)

    events = session.events
    if timed_out:
        return session.result(EXIT_TIMEOUT, timings, f"timed out after {timeout:g} s")
    if "error" in events:
        return session.result(EXIT_LAB_ERROR, timings, "init: " + " ".join(events["error"]))
    if "exit" not in events:
        return session.result(EXIT_LAB_ERROR, timings, _why_no_status(session, returncode))
    return session.result(int(events["exit"][0]), timings)


def _fill_timings(timings: dict[str, float], session: _Session, started: float,
                  qemu_started: float) -> None:
    events, arrival = session.events, session.arrival

    def uptime(word: str, index: int = 0) -> float | None:
        try:
            return float(events[word][index])
        except (KeyError, IndexError, ValueError):
            return None

    init, start, end = uptime("init"), uptime("start"), uptime("exit", 1)
    if init is not None:
        timings["boot_to_init"] = init
        timings["qemu_to_init"] = arrival["init"] - qemu_started
    if init is not None and start is not None:
        timings["init_to_cmd"] = start - init
    if "start" in arrival:
        timings["start_to_cmd"] = arrival["start"] - started
    if start is not None and end is not None:
        timings["cmd"] = end - start


def _why_no_status(session: _Session, returncode: int) -> str:
    console = session.console.decode(errors="replace")
    panic = re.search(r"Kernel panic - not syncing:.*", console)
    if panic:
        return f"the outer kernel panicked: {panic.group(0).strip()}"
    qemu_said = _last_line(session.qemu_log.decode(errors="replace"))
    if returncode != 0 and qemu_said:
        return f"QEMU failed (exit status {returncode}): {qemu_said}"
    return f"the machine stopped without reporting the command's status (QEMU exit {returncode})"


# --------------------------------------------------------------------------------------
# Part 4. Availability, and the command line
# --------------------------------------------------------------------------------------

def available() -> tuple[bool, str]:
    """Whether run() can work here, and why not (or what it will do first)."""
    if sys.platform != "linux":
        return False, "the lab needs Linux"
    if os.environ.get("PYVMM_IN_LAB") == "1":
        return False, "already inside the lab"
    try:
        _check_cache_visible()
    except LabError as error:
        return False, str(error)
    notes = []
    missing = _missing_host_packages()
    if missing:
        if os.geteuid() != 0 or _tool("apt-get") is None:
            return False, f"missing Debian packages {' '.join(missing)}"
        notes.append(f"will install {' '.join(missing)}")
    current = Image.load(_cache_root() / "current")
    if current is None:
        if _tool("apt-cache") is None or _apt_show(KERNEL_METAPACKAGE) is None:
            return False, f"no cached image and apt knows no {KERNEL_METAPACKAGE}"
        probe = _cache_root()
        while not probe.exists():
            probe = probe.parent
        if shutil.disk_usage(probe).free < MIN_FREE_BYTES_TO_BUILD:
            return False, f"less than 1 GiB free under {probe} to build the image"
        notes.append("will build the image (about a minute)")
    else:
        notes.append(f"image {current.directory.resolve().name} "
                     f"({current.manifest['kernel_package']} "
                     f"{current.manifest['kernel_version']})")
    return True, "; ".join(notes)


def _log(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def _format_timings(timings: dict[str, float]) -> str:
    labels = [("build", "image build"), ("prepare", "prepare"),
              ("qemu_to_init", "QEMU start to init"), ("boot_to_init", "boot to init (guest)"), ("init_to_cmd", "init to command"),
              ("start_to_cmd", "lab start to command"), ("cmd", "command"),
              ("total", "total")]
    return ", ".join(f"{label} {timings[key]:.2f} s" for key, label in labels if key in timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tests/lab/run",
        description="Run CMD inside the lab: a QEMU TCG machine with SVM whose Linux has a "
                    "real /dev/kvm, the host's / read-only and the project read-write.",
        epilog="Exit status: CMD's, or 124 on timeout, or 125 when the lab itself failed.")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"kill the machine after this long (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--cpus", type=int, default=1, metavar="N",
                        help="virtual CPUs; more than 1 uses multi-threaded TCG (default 1)")
    parser.add_argument("--mem", type=int, default=DEFAULT_MEM_MB, metavar="MB",
                        help=f"memory of the machine (default {DEFAULT_MEM_MB})")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="pass one more environment variable to CMD")
    parser.add_argument("--verbose", action="store_true",
                        help="show the outer console, QEMU's messages and the timings on stderr")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given (put it after --)")
    if args.cpus < 1 or args.mem < 256 or args.timeout <= 0:
        parser.error("--cpus must be >= 1, --mem >= 256, --timeout > 0")
    extra = dict(item.partition("=")[::2] for item in args.env)

    try:
        result = run(cmd, args.timeout, args.cpus, mem_mb=args.mem, env=extra,
                     stdout=sys.stdout.buffer, stderr=sys.stderr.buffer, verbose=args.verbose)
    except KeyboardInterrupt:
        _log("interrupted; nothing is left running")
        return 130
    except _Terminated as terminated:
        _log(f"terminated by signal {terminated.signum}; nothing is left running")
        return 128 + terminated.signum
    if result.error is not None:
        _log(result.error)
        if result.status == EXIT_LAB_ERROR and not args.verbose and result.console:
            tail = result.console.strip().splitlines()[-15:]
            _log("last lines of the outer console:\n  " + "\n  ".join(tail))
    if args.verbose:
        _log("timings: " + _format_timings(result.timings))
    return result.status


if __name__ == "__main__":
    sys.exit(main())
