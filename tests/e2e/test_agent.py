"""End to end: the guest agent in a Linux guest, driven from the host.

The guest is the pytest plugin's (pyvmm.pytest_plugin: the ``vm`` fixture, one boot shared by
these tests): the default kernel and initramfs with ``pyvmm.agent=1``, so /init has started
``pyvmm-agent`` on vsock port 10000 (wire.AGENT_PORT) before its ready line.  Each test talks
to it through the fixture (``vm.run``/``put``/``get``: the Firecracker-style Unix socket) or
opens connections of its own, through that socket (``vm.uds``), the machine's Python API
(``vm.vsock``) or the ``pyvmm exec`` CLI, and leaves nothing behind but files in its own /tmp
directory.  The protocol itself is checked on the host (tests/unit/test_agent_*.py); here:
the same agent, compiled into the initramfs, over the real vsock device.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading

import pytest

from harness import connect_unix
from pyvmm.agent import Agent, wire
from pyvmm.agent.wire import ErrorCode, FrameDecoder, FrameType

pytestmark = pytest.mark.e2e

#: seconds for one request in the lab (Python runs ~30-40x slower there than on a host)
TIMEOUT = 120.0


def test_init_started_the_agent_before_its_ready_line(vm):
    text = vm.console.text()
    listening = re.search(rf"^pyvmm-agent: listening vsock:any:{wire.AGENT_PORT}\r?$", text, re.M)
    assert listening and listening.start() < text.find("pyvmm-guest: ready"), text[-2000:]


def test_run_through_the_unix_socket(vm):
    r = vm.run("uname -s; echo err >&2; exit 5", timeout=TIMEOUT)
    assert (r.status, r.stdout, r.stderr) == (5, b"Linux\n", b"err\n"), r
    r = vm.run(["sh", "-c", 'cat; echo "$GREETING from $(pwd)"'], env={"GREETING": "hi"},
                  cwd="/proc", stdin=b"stdin bytes\n", timeout=TIMEOUT)
    assert r.ok and r.stdout == b"stdin bytes\nhi from /proc\n", r


def test_run_through_the_machines_python_api(vm):
    with Agent.connect_vsock(vm.vsock, io_timeout=TIMEOUT) as a:
        r = a.run(["cat", "/proc/sys/kernel/ostype"], timeout=TIMEOUT)
    assert r.ok and r.stdout == b"Linux\n", r


def test_the_deadline_kills_the_commands_process_group(vm):
    r = vm.run("sleep 1000 & echo $!; wait", timeout=10)
    assert r.timed_out and r.signal == 9, r
    bg = int(r.stdout)
    # the background sleep was in the killed group: no such process is left
    check = vm.run(["sh", "-c", f"kill -0 {bg} 2>/dev/null && echo alive || echo gone"],
                      timeout=TIMEOUT)
    assert check.stdout == b"gone\n", check


def test_put_and_get_a_megabyte(vm):
    data = os.urandom(1 << 20)
    path = f"/tmp/agent-e2e-{os.getpid()}"
    assert vm.put(path, data, mode=0o600) == len(data)
    r = vm.run(["sh", "-c", f"stat -c %a {path}; sha256sum {path}"], timeout=TIMEOUT)
    mode, digest = r.stdout.decode().split()[:2]
    assert (mode, digest) == ("600", hashlib.sha256(data).hexdigest()), r
    assert vm.get(path) == data
    with pytest.raises(FileNotFoundError):
        vm.get(path + ".missing")


def test_large_output_is_streamed_and_bounded(vm):
    total = wire.OUTPUT_MAX + 4096
    r = vm.run(f"head -c {total} /dev/zero", timeout=TIMEOUT)
    assert r.ok and len(r.stdout) == wire.OUTPUT_MAX and r.stdout_dropped == 4096, r.status


def test_sessions_run_at_once(vm):
    """Four connections, each running a command that waits for all four to have started."""
    results = []
    agents = [Agent.connect_uds(vm.uds, io_timeout=TIMEOUT) for _ in range(4)]
    tag = f"/tmp/agent-e2e-c{os.getpid()}"

    def run(i, a):
        results.append(a.run(f"touch {tag}.{i}; until [ $(ls {tag}.* | wc -l) = 4 ]; do "
                             "sleep 0.05; done", timeout=TIMEOUT))

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT + 30)
    for a in agents:
        a.close()
    assert len(results) == 4 and all(r.ok for r in results), results


def test_a_hostile_frame_gets_an_error_frame_and_the_agent_goes_on(vm):
    with connect_unix(vm.uds, wire.AGENT_PORT, timeout=TIMEOUT) as s:
        s.sendall(wire.encode_hello() + b"\xff\xff\xff\xff\x03")    # length 2^32-1
        dec, frames = FrameDecoder(), []
        while data := s.recv(4096):
            frames += dec.feed(data)
    assert [f.type for f in frames] == [FrameType.HELLO, FrameType.ERROR], frames
    assert wire.parse_error(frames[1].payload)[0] == ErrorCode.BAD_LENGTH
    assert vm.run(["true"], timeout=TIMEOUT).ok


def test_pyvmm_exec_cli(vm):
    done = subprocess.run([sys.executable, "-m", "pyvmm", "exec", "--uds", vm.uds, "--",
                           "sh", "-c", "echo out; echo err >&2; exit 4"],
                          capture_output=True, timeout=TIMEOUT * 2)
    assert (done.returncode, done.stdout, done.stderr) == (4, b"out\n", b"err\n"), done
