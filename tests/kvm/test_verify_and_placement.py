"""KVM level: the benchmark's instrument on the freestanding guest.

* ``verify=word``, the guest's cheap check (teststream.h): a word-wise check
  of every byte and the word hash, in the bulk scenarios both ways and in
  ``stream-cost``; a corrupted byte is reported where it is, like the full
  check (which the other tests use).
* ``pyvmm run --vcpu-affinity / --io-affinity``: the vCPU thread, named
  ``pyvmm-vcpu0``, and the I/O thread, named ``pyvmm-io``, run where they
  were told.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

import teststream
from harness import LiveGuest, connect_unix, freestanding, listen_unix, recv_all
from pyvmm import images
from pyvmm.machine import VsockConfig

pytestmark = pytest.mark.kvm

PREFIX = "pyvmm-test-guest: "
N = (1 << 20) + 5                   # not a whole number of words


@pytest.fixture
def uds(tmp_path):
    return str(tmp_path / "v.sock")


def test_word_mode_guest_to_host_sends_the_stream_and_its_word_hash(uds):
    listener = listen_unix(f"{uds}_2010")
    got = {}

    def sink():
        conn, _ = listener.accept()
        with conn:
            got["data"] = recv_all(conn, N + 1)

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    with LiveGuest(images.freestanding_guest(), timeout=120, vsock=VsockConfig(3, uds),
                   cmdline=f"vsock-bulk-send port=2010 bytes={N} chunk=1000 verify=word") as g:
        run = g.finish(120)
    t.join(60)
    m = re.search(rf"vsock bulk sent {N} bytes whash ([0-9a-f]+)", run.console)
    assert m, run.explain()
    assert got["data"] == teststream.stream(N)
    assert int(m.group(1), 16) == teststream.whash(got["data"])


@pytest.mark.parametrize("corrupt", [None, 0, 4099, N - 1])
def test_word_mode_host_to_guest_checks_every_byte(uds, corrupt):
    data = bytearray(teststream.stream(N))
    if corrupt is not None:
        data[corrupt] ^= 0x10
    with LiveGuest(images.freestanding_guest(), timeout=120, vsock=VsockConfig(3, uds),
                   cmdline=f"vsock-bulk-recv port=1240 bytes={N} listen=1 verify=word") as g:
        g.wait_for(PREFIX + "vsock listening 1240")
        with connect_unix(uds, 1240) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            recv_all(s)                          # until the guest closes
        run = g.finish(120)
    if corrupt is None:
        m = re.search(rf"vsock bulk received {N} bytes whash ([0-9a-f]+)", run.console)
        assert m, run.explain()
        assert int(m.group(1), 16) == teststream.whash(bytes(data))
        assert "exit 0" in run.console
    else:
        assert re.search(rf"vsock bulk recv: FAILED: {N} bytes \(want {N}\), first bad byte "
                         rf"{corrupt}\b", run.console), run.explain()
        assert PREFIX + "exit 1" in run.console


@pytest.mark.parametrize("verify,chunk,corrupt", [
    ("word", 4096, None), ("word", 999, None), ("word", 1, None), ("full", 999, None),
    ("word", 999, 123_457), ("full", 4096, 123_457), ("word", 7, N - 1),
])
def test_stream_cost_modes_agree_and_find_a_flipped_byte(verify, chunk, corrupt):
    extra = f" corrupt={corrupt}" if corrupt is not None else ""
    run = freestanding(f"stream-cost bytes={N} chunk={chunk} verify={verify}{extra}", timeout=60)
    assert re.search(rf"stream cost verify={verify} bytes={N} chunk={chunk} send \d+ copy \d+ "
                     rf"recv \d+ ticks", run.console), run.explain()
    if corrupt is None:
        name, want = (("whash", teststream.whash(teststream.stream(N))) if verify == "word"
                      else ("fnv", teststream.fnv1a64(teststream.stream(N))))
        m = re.search(rf"stream cost ok {name} ([0-9a-f]+)", run.console)
        assert m and int(m.group(1), 16) == want, run.explain()
    else:
        assert re.search(rf"stream cost: FAILED: first bad byte {corrupt},", run.console), \
            run.explain()


def test_a_bad_verify_mode_is_refused():
    run = freestanding("vsock-bulk-recv port=1 bytes=8 verify=some", timeout=60)
    assert PREFIX + "vsock-bulk-recv: bad verify=some (full, word)" in run.console, run.explain()
    assert PREFIX + "exit 1" in run.console


def test_vcpu_and_io_threads_run_where_they_were_told(uds):
    cpus = sorted(os.sched_getaffinity(0))
    vcpu_cpu, io_cpu = cpus[0], cpus[-1]
    argv = [sys.executable, "-m", "pyvmm", "-q", "run", "--kernel",
            str(images.freestanding_guest()), "--cmdline", "loop", "--vsock", f"3,uds={uds}",
            "--vcpu-affinity", str(vcpu_cpu), "--io-affinity", str(io_cpu), "--timeout", "60"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:                       # the guest is in its CPL3 loop
            if "loop: spinning" in line:
                break
        else:
            pytest.fail(f"no 'loop: spinning' line; stderr: {proc.stderr.read()}")
        threads = {}
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{tid}/comm") as f:
                threads[int(tid)] = (f.read().strip(), os.sched_getaffinity(int(tid)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    vcpus = [cpus for comm, cpus in threads.values() if comm == "pyvmm-vcpu0"]
    assert vcpus == [{vcpu_cpu}], threads
    # the one I/O thread of the virtio devices is pinned; the main thread, which
    # created it, is back to the whole mask
    assert threads[proc.pid][1] == set(cpus), threads
    assert [c for comm, c in threads.values() if comm == "pyvmm-io"] == [{io_cpu}], threads
