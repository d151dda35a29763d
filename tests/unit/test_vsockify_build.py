"""guest/vsockify: libvsockify.so and its guest image, checked where AF_VSOCK is off limits.

What can be checked without AF_VSOCK (the guest-side mapping itself is tests/e2e/test_vsockify.py):

* the library, compiled here from guest/vsockify/libvsockify.c as build.sh compiles it: it
  exports exactly the wrapped functions and needs only libc; loaded into a real program (this
  Python) it passes ordinary TCP on 127.0.0.1 through untouched when the port is not configured
  (connect, bind, listen, accept, getpeername, getsockname, TCP options); with the port
  configured and ``VSOCKIFY_DRY_RUN=1`` it takes the mapping decisions (logged) but maps
  nothing; a bad ``VSOCKIFY_PORTS``/``VSOCKIFY_CID`` is reported once and maps nothing.
* the built archive (``make vsockify``; these tests skip without it): its entries, every
  library each program needs present in it (DT_NEEDED, PT_INTERP), no path of the default
  initramfs overwritten, its size; and, as root, the image's own userland run in a chroot made
  of the default initramfs plus the archive: the Debian wget under the wrapper downloads from a
  host HTTP server, and dropbear under the library serves a real ``ssh`` session (over TCP:
  the port is not configured), so the image's passwd, shell, host key and libraries are known
  to work before a guest boots.

Every program run under the library here runs under a seccomp filter that fails any
``socket(AF_VSOCK, ...)`` with EPERM (:func:`no_vsock`), checked installed before the program
starts: a bug in the library cannot reach this host's AF_VSOCK.
"""

from __future__ import annotations

import ctypes
import hashlib
import http.server
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pyvmm import images
from pyvmm.errors import ConfigError
from test_vsock_test_build import read_newc

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "guest" / "vsockify" / "libvsockify.c"
BUILD = ROOT / "guest" / "vsockify" / "build.sh"
WRAPPED = {"socket", "connect", "bind", "accept", "accept4", "getsockname", "getpeername", "setsockopt",
           "getsockopt", "close", "dup", "dup2", "dup3"}
PROGRAMS = ("dropbear", "dbclient", "dropbearkey", "wget")
LOADER = "lib64/ld-linux-x86-64.so.2"
#: the archive's size bound (11.9 MB when written: wget's TLS libraries are most of it)
MAX_CPIO = 16 << 20
AF_VSOCK = 40
#: the image's wrapper, run inside the chroot (so not a host program: a name, not a literal argv)
WRAPPER = "/usr/bin/vsockify"


# --- a seccomp filter: socket(AF_VSOCK, ...) fails with EPERM ------------------------------------
def _vsock_filter() -> bytes:
    """A classic-BPF seccomp program (x86-64) returning EPERM for socket(AF_VSOCK, ...)."""
    ld, jeq, ret = 0x20, 0x15, 0x06                    # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    audit_arch_x86_64, nr_socket = 0xC000003E, 41
    allow, eperm = 0x7FFF0000, 0x00050000 | 1          # SECCOMP_RET_ALLOW, RET_ERRNO|EPERM
    prog = [(ld, 0, 0, 4),                             # seccomp_data.arch
            (jeq, 0, 5, audit_arch_x86_64),
            (ld, 0, 0, 0),                             # .nr
            (jeq, 0, 3, nr_socket),
            (ld, 0, 0, 16),                            # .args[0], low 32 bits
            (jeq, 0, 1, AF_VSOCK),
            (ret, 0, 0, eperm),
            (ret, 0, 0, allow)]
    return b"".join(struct.pack("<HBBI", *insn) for insn in prog)


CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 0x40000


def no_vsock(chroot: Path | None = None):
    """A preexec_fn: install the filter and check it is there; with ``chroot``, first enter a
    mount namespace of its own, mount /proc in ``chroot`` (as the guest's /init does: busybox
    then runs its applets in preference to programs of the same name, as in a guest) and
    chroot there."""
    def setup() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if chroot is not None:
            if libc.unshare(CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
            # private first: a mount in a namespace sharing / would appear on the host too
            if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
            if libc.mount(b"proc", bytes(chroot / "proc"), b"proc", 0, None) != 0:
                raise OSError(ctypes.get_errno(), "mount proc")
            os.chroot(chroot)
            os.chdir("/")
        code = _vsock_filter()
        buf = ctypes.create_string_buffer(code, len(code))

        class Fprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        fprog = Fprog(len(code) // 8, ctypes.addressof(buf))
        if libc.prctl(38, 1, 0, 0, 0) != 0:                             # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:           # SECCOMP_MODE_FILTER
            raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")
        if libc.prctl(21, 0, 0, 0, 0) != 2:                             # PR_GET_SECCOMP
            raise OSError("the seccomp filter is not installed")
    return setup


# --- the library, compiled here -----------------------------------------------------------------
@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    """libvsockify.so compiled from the source with build.sh's own flags."""
    flags = re.search(r"^cflags=\((.*)\)$", BUILD.read_text(), re.M).group(1).split()
    out = tmp_path_factory.mktemp("vsockify") / "libvsockify.so"
    subprocess.run(["gcc", *flags, "-o", str(out), str(SOURCE)], check=True)
    return out


def test_exports_exactly_the_wrapped_functions(lib):
    nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                        check=True)
    assert {line.split()[-1] for line in nm.stdout.splitlines() if " T " in line} == WRAPPED
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True)
    assert re.findall(r"\(NEEDED\).*\[(.*)\]", needed.stdout) == ["libc.so.6"]


#: run under the library by test_tcp_*: a TCP server and client on 127.0.0.1 in one process,
#: printing what the socket calls returned, one ``key value`` a line
TCP_CLIENT = r"""
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(1)
port = srv.getsockname()[1]
c = socket.socket()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.connect(("127.0.0.1", port))
conn, peer = srv.accept()
c.sendall(b"ping")
print("received", conn.recv(4).decode())
print("nodelay", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
print("peer_matches", peer == c.getsockname() and c.getpeername() == ("127.0.0.1", port))
print("family", c.family.name, conn.family.name)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect(("127.0.0.1", port))
print("udp ok")
"""


def _run_python(lib: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LD_PRELOAD": str(lib), **env}
    return subprocess.run([sys.executable, "-c", TCP_CLIENT, *args], env=full, capture_output=True,
                          text=True, timeout=60, preexec_fn=no_vsock())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp_ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr
    assert "received ping" in done.stdout
    assert "nodelay 1" in done.stdout               # a real TCP socket: the option was kept
    assert "peer_matches True" in done.stdout
    assert "family AF_INET AF_INET" in done.stdout
    assert "udp ok" in done.stdout


def test_tcp_passes_through_on_ports_not_configured(lib):
    port = _free_port()
    other = port + 1 if port < 65535 else port - 1
    done = _run_python(lib, {"VSOCKIFY_PORTS": f"{other},1-2", "VSOCKIFY_DEBUG": "1"}, str(port))
    _tcp_ok(done)
    assert "connect fd" not in done.stderr and "bind fd" not in done.stderr, done.stderr


def test_dry_run_decides_but_maps_nothing(lib):
    """The configured port's bind and loopback connect are picked (logged), UDP is not; with
    the dry run the sockets stay TCP, so the same exchange works."""
    port = _free_port()
    done = _run_python(lib, {"VSOCKIFY_PORTS": f"1,{port}", "VSOCKIFY_DRY_RUN": "1"}, str(port))
    _tcp_ok(done)
    assert re.search(rf"\(dry run\) bind fd \d+ port {port} -> vsock any:{port}$", done.stderr,
                     re.M), done.stderr
    assert re.search(rf"\(dry run\) connect fd \d+ 127\.x:{port} -> vsock 2:{port}$", done.stderr,
                     re.M), done.stderr
    assert len(re.findall(r"\(dry run\)", done.stderr)) == 2, done.stderr     # not the UDP one


def test_all_ports_and_a_cid(lib):
    port = _free_port()
    done = _run_python(lib, {"VSOCKIFY_PORTS": "all", "VSOCKIFY_CID": "7", "VSOCKIFY_DRY_RUN": "1"},
                       str(port))
    _tcp_ok(done)
    assert "ports all, cid 7, dry run" in done.stderr
    assert re.search(rf"connect fd \d+ 127\.x:{port} -> vsock 7:{port}$", done.stderr, re.M)


@pytest.mark.parametrize("env, complaint", [
    ({"VSOCKIFY_PORTS": "22,x"}, "VSOCKIFY_PORTS=22,x: expected"),
    ({"VSOCKIFY_PORTS": "70000"}, "VSOCKIFY_PORTS=70000: expected"),
    ({"VSOCKIFY_PORTS": "0"}, "VSOCKIFY_PORTS=0: expected"),
    ({"VSOCKIFY_PORTS": "30-20"}, "VSOCKIFY_PORTS=30-20: expected"),
    ({"VSOCKIFY_PORTS": "22,"}, "VSOCKIFY_PORTS=22,: expected"),
    ({"VSOCKIFY_PORTS": ",".join(["5"] * 65)}, "expected \"all\" or up to 64"),
    ({"VSOCKIFY_PORTS": "all", "VSOCKIFY_CID": "2x"}, "VSOCKIFY_CID=2x is not a CID"),
    ({"VSOCKIFY_PORTS": "all", "VSOCKIFY_CID": "4294967295"}, "is not a CID"),
])
def test_a_bad_configuration_is_reported_once_and_maps_nothing(lib, env, complaint):
    port = _free_port()
    done = _run_python(lib, {**env, "VSOCKIFY_DRY_RUN": "1"}, str(port))
    _tcp_ok(done)
    assert done.stderr.count(complaint) == 1, done.stderr
    assert "connect fd" not in done.stderr and "bind fd" not in done.stderr, done.stderr


# --- the built archive --------------------------------------------------------------------------
def test_the_paths_and_the_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    assert images.vsockify_cpio(required=False) is None
    with pytest.raises(ConfigError, match="make vsockify"):
        images.vsockify_host_key()
    built = tmp_path / "vsockify" / "k1"
    built.mkdir(parents=True)
    (built / "vsockify.cpio").write_bytes(b"")
    (built / "host_key.pub").write_text("ssh-ed25519 AAAA\n")
    (tmp_path / "vsockify" / "current").symlink_to("k1")
    assert images.vsockify_cpio() == tmp_path / "vsockify" / "current" / "vsockify.cpio"
    assert images.vsockify_host_key() == tmp_path / "vsockify" / "current" / "host_key.pub"


@pytest.fixture(scope="module")
def archive() -> dict[str, tuple[int, bytes]]:
    cpio = images.vsockify_cpio(required=False)
    if cpio is None:
        pytest.skip(f"no vsockify build in {images.cache_dir()}: run make vsockify")
    return {name: (mode, body) for name, mode, _uid, body in read_newc(cpio.read_bytes())}


def _dynamic(body: bytes) -> tuple[str | None, list[str]]:
    """(PT_INTERP, DT_NEEDED names) of an x86-64 ELF64 file."""
    phoff, = struct.unpack_from("<Q", body, 32)
    phentsize, phnum = struct.unpack_from("<HH", body, 54)
    interp, dynamic = None, None
    loads = []
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", body, phoff + i * phentsize)
        if p_type == 3:
            interp = body[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
        elif p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
    if dynamic is None:
        return interp, []
    entries = [struct.unpack_from("<qQ", body, dynamic[0] + 16 * i)
               for i in range(dynamic[1] // 16)]
    strtab = next(v for tag, v in entries if tag == 5)                 # DT_STRTAB (a vaddr)
    strtab_off = next(off + strtab - va for va, off, size in loads if va <= strtab < va + size)
    names = [body[strtab_off + v:body.index(b"\0", strtab_off + v)].decode()
             for tag, v in entries if tag == 1]                        # DT_NEEDED
    return interp, names


def test_the_archive_holds_the_programs_and_everything_they_load(archive):
    for path in [f"opt/vsockify/bin/{p}" for p in PROGRAMS] + [
            "opt/vsockify/lib/libvsockify.so", "usr/bin/vsockify", LOADER, "etc/passwd",
            "etc/dropbear/dropbear_ed25519_host_key"]:
        assert path in archive, path
    assert archive["etc/dropbear/dropbear_ed25519_host_key"][0] & 0o777 == 0o600
    assert archive["etc/passwd"][1].startswith(b"root:x:0:0:root:/root:/bin/sh\n")
    libs = {name.rsplit("/", 1)[1] for name in archive if name.startswith("lib/x86_64-linux-gnu/")}
    elves = [n for n, (mode, body) in archive.items()
             if stat.S_ISREG(mode) and body[:4] == b"\x7fELF"]
    assert len(elves) > len(PROGRAMS) + 1
    for name in elves:
        interp, needed = _dynamic(archive[name][1])
        if name.startswith("opt/vsockify/bin/"):
            assert interp == "/" + LOADER, name
        missing = [n for n in needed if n not in libs and f"lib64/{n}" not in archive]
        assert not missing, f"{name} needs {missing}, not in the archive"


def test_the_archive_overwrites_nothing_of_the_default_initramfs(archive):
    base = images.default_initramfs(required=False)
    if base is None:
        pytest.skip(f"no default initramfs in {images.cache_dir()}: run make initramfs")
    clash = [name for name, mode, _uid, _body in read_newc(base.read_bytes())
             if name in archive and not (stat.S_ISDIR(mode) and stat.S_ISDIR(archive[name][0]))]
    assert not clash


def test_the_archive_is_small_and_the_host_key_is_an_openssh_line(archive):
    assert images.vsockify_cpio().stat().st_size < MAX_CPIO
    assert re.fullmatch(r"ssh-ed25519 [A-Za-z0-9+/]+=*\n", images.vsockify_host_key().read_text())


# --- the image's userland in a chroot -----------------------------------------------------------
@pytest.fixture(scope="module")
def tree(tmp_path_factory, archive) -> Path:
    """The default initramfs and the archive unpacked into a directory, as the kernel would."""
    if os.geteuid() != 0:
        pytest.skip("the chroot needs root (chroot(2))")
    base = images.default_initramfs(required=False)
    if base is None:
        pytest.skip(f"no default initramfs in {images.cache_dir()}: run make initramfs")
    root = tmp_path_factory.mktemp("vsockify-root")
    for name, mode, _uid, body in read_newc(base.read_bytes()) + [
            (n, m, 0, b) for n, (m, b) in archive.items()]:
        path = root / name
        if stat.S_ISDIR(mode):
            path.mkdir(exist_ok=True)
            path.chmod(stat.S_IMODE(mode))
        elif stat.S_ISLNK(mode):
            path.symlink_to(body.decode())
        elif stat.S_ISREG(mode):
            path.write_bytes(body)
            path.chmod(stat.S_IMODE(mode))
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return root


class _Blob(http.server.BaseHTTPRequestHandler):
    body = os.urandom(3 << 20)

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_the_image_wget_downloads_through_the_wrapper(tree):
    """Debian's wget from the archive, its libraries only, under /usr/bin/vsockify (the port
    not configured: plain TCP), then a dry run that picks the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Blob)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        for ports, extra in (("1", {"VSOCKIFY_DEBUG": "1"}),
                             (str(port), {"VSOCKIFY_DRY_RUN": "1"})):
            done = subprocess.run([WRAPPER, ports, "wget", "-q", "-O", "-",
                                   f"http://127.0.0.1:{port}/blob"],
                                  env={"PATH": "/usr/bin:/bin", **extra}, capture_output=True,
                                  timeout=60, preexec_fn=no_vsock(tree))
            assert done.returncode == 0, done.stderr.decode()
            assert hashlib.sha256(done.stdout).digest() == hashlib.sha256(_Blob.body).digest()
            picked = re.search(rb"\(dry run\) connect fd \d+ 127\.x:%d -> vsock 2:%d"
                               % (port, port), done.stderr)
            assert bool(picked) == ("VSOCKIFY_DRY_RUN" in extra), done.stderr.decode()
            # the library was loaded (not busybox's static wget applet, which ignores it)
            assert re.search(rb"vsockify\[\d+\]: ports %s, cid 2" % ports.encode(), done.stderr)
    finally:
        server.shutdown()
        server.server_close()


def test_the_image_dropbear_serves_an_ssh_session(tree, tmp_path):
    """dropbear from the archive under the library (port not configured: TCP on 127.0.0.1)
    with the archive's host key, passwd and shell, a key made for this run, and the host's
    OpenSSH client checking the host key against host_key.pub."""
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ssh_dir = tree / "root" / ".ssh"
    ssh_dir.mkdir(exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    known = tmp_path / "known_hosts"
    port = _free_port()
    known.write_text(f"[127.0.0.1]:{port} {images.vsockify_host_key().read_text()}")
    server = subprocess.Popen([WRAPPER, "1", "dropbear", "-F", "-E", "-s", "-r",
                               "/etc/dropbear/dropbear_ed25519_host_key", "-P",
                               "/run/dropbear.pid", "-p", f"127.0.0.1:{port}"],
                              env={"PATH": "/usr/bin:/bin"}, stderr=subprocess.PIPE, text=True,
                              preexec_fn=no_vsock(tree))
    try:
        lines = []
        for line in server.stderr:                  # dropbear says when it listens
            lines.append(line)
            if "Not backgrounding" in line:
                break
        done = subprocess.run(["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes",
                               "-o", f"UserKnownHostsFile={known}",
                               "-o", "StrictHostKeyChecking=yes",
                               "root@127.0.0.1", "echo $USER; pwd; echo ok"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr + "".join(lines)
        assert done.stdout.split() == ["root", "/root", "ok"], done.stdout
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(ssh_dir)
