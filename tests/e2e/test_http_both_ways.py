"""The seed's HTTP test, rebuilt with unmodified programs: each side downloads a large file
from the other's HTTP server at the same time, round after round, every file checksummed.

A guest with no network device (the default initramfs plus ``vsockify.cpio``, CID 3) and two
forwards on its vsock device::

    host wget -> tcp:127.0.0.1:0 (forward) -> vsock 1502 -> vsock-tcp-relay -> busybox httpd :8081
    guest wget (Debian's, under libvsockify) -> 127.0.0.1:8090 = vsock CID 2 port 8090
        -> forward vsock:8090=tcp:127.0.0.1:P -> the host's http.server

Every program that speaks HTTP is unmodified: the host's wget and Python's http.server, the
guest's busybox httpd and Debian's wget (its TCP connect made a vsock one by the LD_PRELOAD
library).  In a round both downloads run at once; each file's SHA-256 is compared with the
server's.  The lab (nested, emulated) gets :data:`ROUNDS` rounds of :data:`MIB` MiB each way;
a soak sets more: ``make soak-http ROUNDS=50 HTTP_MIB=64`` (``PYVMM_HTTP_ROUNDS``,
``PYVMM_HTTP_MIB``).  Each round's seconds per direction are recorded (harness.record_figure:
the lab's summary prints them).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import subprocess
import threading
import time

import pytest

from harness import ShellGuest, record_figure
from pyvmm import images
from pyvmm.machine import VsockConfig
from pyvmm.vsock.tcp import TcpToVsock, VsockToTcp

pytestmark = [pytest.mark.e2e, pytest.mark.own_guests]

#: rounds and MiB per file (the lab's Python and guest are 10-40x slower than a host)
ROUNDS = int(os.environ.get("PYVMM_HTTP_ROUNDS", "3"))
MIB = int(os.environ.get("PYVMM_HTTP_MIB", "4"))
GUEST_CID = 3
GUEST_HTTPD_PORT = 8081          # guest TCP, behind the relay
GUEST_SERVICE_PORT = 1502        # the guest's vsock port the host forward reaches
HOST_SERVICE_PORT = 8090         # CID 2's vsock port the guest's wget reaches
#: bound on one round (both downloads)
ROUND_TIMEOUT = 300 + 10 * MIB


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    www = tmp / "www"
    www.mkdir()
    host_blob = os.urandom(MIB << 20)
    (www / "blob-h").write_bytes(host_blob)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, name="http-host", daemon=True).start()
    initrd = tmp / "initramfs+vsockify.cpio"
    initrd.write_bytes(images.default_initramfs().read_bytes()
                       + images.vsockify_cpio().read_bytes())
    forwards = [TcpToVsock("127.0.0.1", 0, GUEST_SERVICE_PORT),
                VsockToTcp(HOST_SERVICE_PORT, "127.0.0.1", server.server_address[1])]
    guest = ShellGuest(images.default_kernel(), initrd=initrd, cpus=1,
                       mem=(160 << 20) + (3 * MIB << 20), timeout=600 + ROUNDS * ROUND_TIMEOUT,
                       vsock=VsockConfig(GUEST_CID, str(tmp / "v.sock"), forwards=forwards))
    try:
        with guest:
            guest.wait_ready()
            made = guest.run(f"ip link set lo up && mkdir -p /tmp/www && head -c {MIB << 20} "
                             "/dev/urandom > /tmp/www/blob-g && sha256sum /tmp/www/blob-g")
            assert made.status == 0, made.explain()
            _relay, relay_pid, httpd_pid = guest.start_relayed_httpd(
                "/tmp/www", GUEST_HTTPD_PORT, GUEST_SERVICE_PORT)
            try:
                yield guest, tmp, hashlib.sha256(host_blob).hexdigest(), made.output.split()[0]
            finally:
                if not guest.ended:
                    guest.run(f"kill {relay_pid} {httpd_pid}")
    finally:
        server.shutdown()
        server.server_close()


def test_both_sides_download_from_each_other_at_once(setup):
    guest, tmp, host_sum, guest_sum = setup
    (_forward, (addr, port)), = guest.vm.vsock_forward.listening
    rounds = []
    for r in range(ROUNDS):
        got = tmp / f"blob-g.{r}"
        t0 = time.monotonic()
        host_wget = subprocess.Popen(["wget", "-q", "-O", str(got),
                                      f"http://{addr}:{port}/blob-g"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        guest_wget = guest.start(
            f"vsockify {HOST_SERVICE_PORT} wget -q -O /tmp/got "
            f"http://127.0.0.1:{HOST_SERVICE_PORT}/blob-h && sha256sum /tmp/got && rm /tmp/got")
        guest_done: list = []                   # (status or the AssertionError, seconds)

        def wait_guest():
            try:
                guest_done.append((guest_wget.wait(ROUND_TIMEOUT), time.monotonic() - t0))
            except AssertionError as e:
                guest_done.append((e, None))

        waiter = threading.Thread(target=wait_guest, name="guest-wget-wait", daemon=True)
        waiter.start()
        try:
            out, _ = host_wget.communicate(timeout=ROUND_TIMEOUT)
        finally:
            if host_wget.poll() is None:
                host_wget.kill()
                host_wget.wait()
        host_s = time.monotonic() - t0
        waiter.join()                           # bounded: wait() gives up after ROUND_TIMEOUT
        (status, guest_s), = guest_done
        assert host_wget.returncode == 0, f"round {r}: host wget: {out.decode(errors='replace')}"
        assert status == 0, f"round {r}: {status if guest_s is None else guest_wget.explain()}"
        assert hashlib.sha256(got.read_bytes()).hexdigest() == guest_sum, f"round {r}: host's copy"
        assert guest_wget.output.split()[0] == host_sum, f"round {r}: {guest_wget.explain()}"
        got.unlink()
        rounds.append((round(host_s, 2), round(guest_s, 2)))
    record_figure(f"HTTP both ways, {ROUNDS} rounds of {MIB} MiB each way: seconds "
                  "(host wget of the guest's file, guest wget of the host's) per round",
                  ", ".join(f"{h} / {g}" for h, g in rounds))
