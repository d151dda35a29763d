"""End to end: the guest agent in the shared Linux guest, driven from the host.

The shared guest (tests/e2e/conftest.py) boots with ``pyvmm.agent=1``, so /init has started
``pyvmm-agent`` on vsock port 10000 (wire.AGENT_PORT) before its ready line.  Each test opens
connections of its own, through the Firecracker-style Unix socket (``linux.uds``), the machine's
Python API (``linux.vsock``) or the ``pyvmm exec`` CLI, and leaves nothing behind but files in
its own /tmp directory.  The protocol itself is checked on the host (tests/unit/test_agent_*.py);
here: the same agent, cross-compiled into the initramfs, over the real vsock device.
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


@pytest.fixture
def agent(linux):
    with Agent.connect_uds(linux.uds, io_timeout=TIMEOUT) as a:
        yield a


def test_init_started_the_agent_before_its_ready_line(linux):
    text = linux.console.text()
    listening = re.search(rf"^pyvmm-agent: listening vsock:any:{wire.AGENT_PORT}\r?$", text, re.M)
    assert listening and listening.start() < text.find("pyvmm-guest: ready"), text[-2000:]


def test_run_through_the_unix_socket(agent):
    r = agent.run("uname -s; echo err >&2; exit 5", timeout=TIMEOUT)
    assert (r.status, r.stdout, r.stderr) == (5, b"Linux\n", b"err\n"), r
    r = agent.run(["sh", "-c", 'cat; echo "$GREETING from $(pwd)"'], env={"GREETING": "hi"},
                  cwd="/proc", stdin=b"stdin bytes\n", timeout=TIMEOUT)
    assert r.ok and r.stdout == b"stdin bytes\nhi from /proc\n", r


def test_run_through_the_machines_python_api(linux):
    with Agent.connect_vsock(linux.vsock, io_timeout=TIMEOUT) as a:
        r = a.run(["cat", "/proc/sys/kernel/ostype"], timeout=TIMEOUT)
    assert r.ok and r.stdout == b"Linux\n", r


def test_the_deadline_kills_the_commands_process_group(agent):
    r = agent.run("sleep 1000 & echo $!; wait", timeout=10)
    assert r.timed_out and r.signal == 9, r
    bg = int(r.stdout)
    # the background sleep was in the killed group: no such process is left
    check = agent.run(["sh", "-c", f"kill -0 {bg} 2>/dev/null && echo alive || echo gone"],
                      timeout=TIMEOUT)
    assert check.stdout == b"gone\n", check


def test_put_and_get_a_megabyte(agent):
    data = os.urandom(1 << 20)
    path = f"/tmp/agent-e2e-{os.getpid()}"
    assert agent.put(path, data, mode=0o600) == len(data)
    r = agent.run(["sh", "-c", f"stat -c %a {path}; sha256sum {path}"], timeout=TIMEOUT)
    mode, digest = r.stdout.decode().split()[:2]
    assert (mode, digest) == ("600", hashlib.sha256(data).hexdigest()), r
    assert agent.get(path) == data
    with pytest.raises(FileNotFoundError):
        agent.get(path + ".missing")


def test_large_output_is_streamed_and_bounded(agent):
    total = wire.OUTPUT_MAX + 4096
    r = agent.run(f"head -c {total} /dev/zero", timeout=TIMEOUT)
    assert r.ok and len(r.stdout) == wire.OUTPUT_MAX and r.stdout_dropped == 4096, r.status


def test_sessions_run_at_once(linux):
    """Four connections, each running a command that waits for all four to have started."""
    results = []
    agents = [Agent.connect_uds(linux.uds, io_timeout=TIMEOUT) for _ in range(4)]
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


def test_a_hostile_frame_gets_an_error_frame_and_the_agent_goes_on(linux):
    with connect_unix(linux.uds, wire.AGENT_PORT, timeout=TIMEOUT) as s:
        s.sendall(wire.encode_hello() + b"\xff\xff\xff\xff\x03")    # length 2^32-1
        dec, frames = FrameDecoder(), []
        while data := s.recv(4096):
            frames += dec.feed(data)
    assert [f.type for f in frames] == [FrameType.HELLO, FrameType.ERROR], frames
    assert wire.parse_error(frames[1].payload)[0] == ErrorCode.BAD_LENGTH
    with Agent.connect_uds(linux.uds, io_timeout=TIMEOUT) as a:
        assert a.run(["true"], timeout=TIMEOUT).ok


def test_pyvmm_exec_cli(linux):
    done = subprocess.run([sys.executable, "-m", "pyvmm", "exec", "--uds", linux.uds, "--",
                           "sh", "-c", "echo out; echo err >&2; exit 4"],
                          capture_output=True, timeout=TIMEOUT * 2)
    assert (done.returncode, done.stdout, done.stderr) == (4, b"out\n", b"err\n"), done
