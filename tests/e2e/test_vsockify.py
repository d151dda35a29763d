"""Unmodified Debian programs over vsock in a guest with no network device: libvsockify.so.

One guest (module-scoped: CID 3, 1 vCPU, the Firecracker-style Unix socket) boots the default
initramfs with ``vsockify.cpio`` after it (guest/vsockify: dropbear, dbclient, dropbearkey and
wget from Debian, their libraries, the LD_PRELOAD library and the ``vsockify`` wrapper).  In
the guest, dropbear runs under the library on port 22: its TCP listener is a vsock listener.
From the host:

* the SSH banner, read over a plain vsock connection (``CONNECT 22`` on the Unix socket);
* a whole ``ssh`` session through ``--forward tcp:127.0.0.1:0=vsock:22`` (the guest's
  VsockConfig forwards a host TCP port the kernel picks to vsock port 22): the host's
  OpenSSH client as is (``ssh -p PORT root@127.0.0.1``), a key made for this run (the guest
  gets its public half on the console), the host key checked against ``host_key.pub`` from
  the build; its output is the guest's ``uname -r``;
* inside the guest, dbclient under the library reaches the same dropbear through the vsock
  loopback transport (``VSOCKIFY_CID=1``), with a key dropbearkey makes there;
* wget under the library in the guest downloads from a host HTTP server: its connect to
  127.0.0.1:PORT becomes vsock CID 2 port PORT, which pyvmm hands to the host's
  ``<uds>_PORT`` Unix listener; SHA-256 on both ends.

The ssh session's transcript goes to ``.pytest-vsockify-transcript.txt`` in the project (the
lab's output comes at its end; the file is what the README's transcript was taken from).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from harness import ShellGuest, UnixServer, connect_unix
from pyvmm import images
from pyvmm.machine import VsockConfig
from pyvmm.vsock.tcp import TcpToVsock

pytestmark = [pytest.mark.e2e, pytest.mark.own_guests]

ROOT = Path(__file__).resolve().parents[2]
TRANSCRIPT = ROOT / ".pytest-vsockify-transcript.txt"
GUEST_CID = 3
GUEST_MEM = 128 << 20          # the archive (12 MB) is unpacked into the guest's RAM
SSH_PORT = 22
HOST_KEY = "/etc/dropbear/dropbear_ed25519_host_key"
HTTP_PORT = 8080
BLOB = 4 << 20
#: a bound for each ssh/wget run (the lab is slow: a key exchange under TCG, nested)
CLIENT_TIMEOUT = 180


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    """The guest, with dropbear listening on vsock port 22 through the library."""
    tmp = tmp_path_factory.mktemp("vsockify")
    initrd = tmp / "initramfs+vsockify.cpio"
    initrd.write_bytes(images.default_initramfs().read_bytes()
                       + images.vsockify_cpio().read_bytes())
    uds = str(tmp / "v.sock")
    g = ShellGuest(images.default_kernel(), initrd=initrd, cpus=1, mem=GUEST_MEM, timeout=1200,
                   vsock=VsockConfig(GUEST_CID, uds, forwards=[TcpToVsock("127.0.0.1", 0, SSH_PORT)]))
    with g:
        g.wait_ready()
        g.uds = uds
        g.dropbear = g.start_server(f"VSOCKIFY_DEBUG=1 vsockify {SSH_PORT} dropbear -F -E -s "
                                    f"-r {HOST_KEY} -P /run/dropbear.pid -p {SSH_PORT}",
                                    "Not backgrounding")
        yield g
        if not g.ended:
            g.run("kill $(cat /run/dropbear.pid)")


def _ended(g: ShellGuest) -> str:
    return (f"the guest ended (status {g.result.status}: {g.result.reason})\n"
            + "\n".join(g.console.text().splitlines()[-30:]))


def test_the_mapping_is_what_dropbear_got(guest):
    """The library turned dropbear's bind to port 22 into a vsock bind (its debug line)."""
    assert re.search(rf"bind fd \d+ port {SSH_PORT} -> vsock any:{SSH_PORT}",
                     guest.dropbear.output), guest.dropbear.output


def test_ssh_banner_over_vsock(guest):
    with connect_unix(guest.uds, SSH_PORT, timeout=CLIENT_TIMEOUT) as s:
        banner = b""
        while not banner.endswith(b"\n") and len(banner) < 256:
            chunk = s.recv(1)
            if not chunk:
                break
            banner += chunk
    assert banner.startswith(b"SSH-2.0-dropbear"), (banner, guest.dropbear.output)


def test_ssh_session_over_vsock(guest, tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vsockify-test",
                    "-f", str(key)], check=True)
    pub = Path(f"{key}.pub").read_text().strip()
    put = guest.run(f"mkdir -p /root/.ssh && echo '{pub}' >> /root/.ssh/authorized_keys")
    assert put.status == 0, put.explain()
    kernel = guest.run("uname -r")
    assert kernel.status == 0, kernel.explain()
    known = tmp_path / "known_hosts"
    known.write_text(f"vsock-guest {images.vsockify_host_key().read_text()}")
    (_forward, (host, port)), = guest.vm.vsock_forward.listening
    argv = ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}",
            "-o", "StrictHostKeyChecking=yes", "-o", "HostKeyAlias=vsock-guest",
            "-p", str(port), f"root@{host}", "uname -r; echo ok"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    TRANSCRIPT.write_text(f"$ {shlex.join(argv)}\n{done.stdout}{done.stderr}"
                          f"(exit {done.returncode})\n")
    assert not guest.ended, _ended(guest)
    assert done.returncode == 0, f"{done.stderr}\n--- dropbear ---\n{guest.dropbear.output}"
    assert done.stdout.split() == [kernel.output.strip(), "ok"], done.stdout


def _http_file(conn) -> None:
    """A UnixServer handler: one HTTP/1.0 GET answered with the blob."""
    request = b""
    while b"\r\n\r\n" not in request and len(request) < 8192:
        chunk = conn.recv(4096)
        if not chunk:
            return
        request += chunk
    if not request.startswith(b"GET /blob "):
        conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(_http_file.blob) + _http_file.blob)


_http_file.blob = os.urandom(BLOB)


def test_wget_in_the_guest_downloads_from_the_host(guest):
    with UnixServer(f"{guest.uds}_{HTTP_PORT}", _http_file) as server:
        got = guest.run(f"vsockify {HTTP_PORT} wget -q -O /tmp/blob http://127.0.0.1:{HTTP_PORT}"
                        "/blob && sha256sum /tmp/blob && rm /tmp/blob", timeout=CLIENT_TIMEOUT)
        assert got.status == 0, got.explain()
        assert server.errors == [], server.errors
    assert got.output.split()[0] == hashlib.sha256(_http_file.blob).hexdigest(), got.explain()


def test_dbclient_in_the_guest_over_vsock_loopback(guest):
    """Both ends in the guest: dbclient's connect to 127.0.0.1:22 becomes vsock CID 1 port 22
    (VMADDR_CID_LOCAL), which dropbear's vsock listener accepts."""
    keygen = "/opt/vsockify/bin/dropbearkey"
    setup = guest.run(f"rm -f /tmp/dbkey && {keygen} -t ed25519 -f /tmp/dbkey >/dev/null "
                      f"&& mkdir -p /root/.ssh && {keygen} -y -f /tmp/dbkey "
                      "| grep ^ssh-ed25519 >> /root/.ssh/authorized_keys")
    assert setup.status == 0, setup.explain()
    got = guest.run(f"VSOCKIFY_CID=1 VSOCKIFY_DEBUG=1 vsockify {SSH_PORT} dbclient -y "
                    "-i /tmp/dbkey root@127.0.0.1 'echo over-loopback'", timeout=CLIENT_TIMEOUT)
    assert got.status == 0, f"{got.explain()}\n--- dropbear ---\n{guest.dropbear.output}"
    assert re.search(rf"connect fd \d+ 127\.x:{SSH_PORT} -> vsock 1:{SSH_PORT}",
                     got.output), got.output
    assert "over-loopback" in got.output.splitlines(), got.output
