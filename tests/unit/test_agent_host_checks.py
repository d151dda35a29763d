"""pyvmm.agent's client against a hostile or broken agent (a scripted peer on a socketpair).

The guest is not trusted: whatever the agent sends, the client answers a broken frame with an
ERROR frame, closes and raises AgentProtocolError, keeps to its bounds (FRAME_MAX, max_output,
max_size), and never waits past its timeouts.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from pyvmm.agent import Agent, AgentBusy, AgentError, AgentProtocolError, AgentTimeout
from pyvmm.agent import wire
from pyvmm.agent.wire import ErrorCode, ExitInfo, FrameDecoder, FrameType

TIMEOUT = 10.0
HELLO = wire.encode_hello()
EXIT_0 = wire.encode_exit(ExitInfo(0, None, False, 0, 0))


class FakeAgent:
    """Sends ``first`` at once; after the host's first request frame, sends ``reply`` (then
    shuts its write side down if ``close_after_reply``); records every frame the host sends until it closes (``frames``; ``closed`` is set)."""

    def __init__(self, first: bytes, reply: bytes = b"", close_after_reply: bool = False) -> None:
        self.host_end, self.sock = socket.socketpair()
        self.close_after_reply = close_after_reply
        self.sock.settimeout(TIMEOUT)
        self.first, self.reply = first, reply
        self.frames: list = []
        self.closed = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        dec = FrameDecoder()
        try:
            self.sock.sendall(self.first)
            replied = False
            while data := self.sock.recv(1 << 16):
                self.frames += dec.feed(data)
                if not replied and any(f.type is not FrameType.HELLO for f in self.frames):
                    replied = True
                    self.sock.sendall(self.reply)
                    if self.close_after_reply:
                        self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.closed.set()

    def error_sent(self) -> int:
        """The code of the ERROR frame the host sent before closing."""
        assert self.closed.wait(TIMEOUT), "the client did not close the connection"
        assert self.frames and self.frames[-1].type is FrameType.ERROR, self.frames
        return wire.parse_error(self.frames[-1].payload)[0]


HANDSHAKE_CASES = [
    ("oversized length", struct.pack("<IB", wire.FRAME_MAX + 1, FrameType.HELLO), ErrorCode.BAD_LENGTH),
    ("unknown type", struct.pack("<IB", 0, 99), ErrorCode.BAD_TYPE),
    ("bad magic", wire.encode_frame(FrameType.HELLO, b"XXXX\x01\0\0\0"), ErrorCode.BAD_PAYLOAD),
    ("short HELLO", wire.encode_frame(FrameType.HELLO, b"PVMA"), ErrorCode.BAD_PAYLOAD),
    ("version 2", wire.encode_hello(2), ErrorCode.BAD_VERSION),
    ("STDOUT first", wire.encode_frame(FrameType.STDOUT, b"x"), ErrorCode.BAD_ORDER),
]


@pytest.mark.parametrize("first, code", [(f, c) for _, f, c in HANDSHAKE_CASES],
                         ids=[n for n, _, _ in HANDSHAKE_CASES])
def test_a_bad_first_frame_is_answered_with_error_and_closed(first, code):
    fake = FakeAgent(first)
    with pytest.raises(AgentProtocolError) as e:
        Agent(fake.host_end, io_timeout=TIMEOUT)
    assert e.value.code == code and not e.value.by_agent
    assert fake.error_sent() == code


def test_busy_and_the_agents_own_errors_are_reported():
    with pytest.raises(AgentBusy):
        Agent(FakeAgent(wire.encode_error(ErrorCode.BUSY, "full")).host_end, io_timeout=TIMEOUT)
    with pytest.raises(AgentProtocolError) as e:
        Agent(FakeAgent(wire.encode_error(ErrorCode.TIMEOUT, "slow")).host_end, io_timeout=TIMEOUT)
    assert e.value.by_agent and e.value.code == ErrorCode.TIMEOUT


def test_a_silent_or_vanishing_agent_does_not_hang_the_host():
    t0 = time.monotonic()
    with pytest.raises(AgentTimeout):
        Agent(FakeAgent(b"").host_end, io_timeout=0.3)
    assert time.monotonic() - t0 < TIMEOUT
    host_end, agent_end = socket.socketpair()          # no FakeAgent: closing its socket under
    agent_end.close()                                   # its thread's blocked recv() sends no EOF
    with pytest.raises(AgentError, match="closed the connection before its HELLO"):
        Agent(host_end, io_timeout=TIMEOUT)
    a = Agent(FakeAgent(HELLO).host_end, io_timeout=0.3)       # answers HELLO, then nothing
    with pytest.raises(AgentTimeout):
        a.get("/x")
    assert a.closed
    with pytest.raises(AgentError, match="closed"):
        a.run(["true"])


def run_against(reply: bytes, close_after_reply: bool = False):
    fake = FakeAgent(HELLO, reply, close_after_reply)
    agent = Agent(fake.host_end, io_timeout=TIMEOUT)
    return fake, agent


RUN_CASES = [
    ("EXIT malformed", wire.encode_frame(FrameType.EXIT, b"\0" * 3), ErrorCode.BAD_PAYLOAD),
    ("EXIT signal 0 and code -1", wire.encode_frame(
        FrameType.EXIT, struct.pack("<iIBQQ", -1, 0, 0, 0, 0)), ErrorCode.BAD_PAYLOAD),
    ("DONE instead of EXIT", wire.encode_done(0, 0), ErrorCode.BAD_ORDER),
    ("DATA during run", wire.encode_data(b"x"), ErrorCode.BAD_ORDER),
    ("HELLO again", HELLO, ErrorCode.BAD_ORDER),
    ("more stdout than max_output", wire.encode_frame(FrameType.STDOUT, b"x" * 600) * 2 + EXIT_0,
     ErrorCode.BAD_LENGTH),
    ("more stderr than max_output", wire.encode_frame(FrameType.STDERR, b"x" * 1001) + EXIT_0,
     ErrorCode.BAD_LENGTH),
    ("STDOUT after EXIT", EXIT_0 + wire.encode_frame(FrameType.STDOUT, b"late"), ErrorCode.BAD_ORDER),
    ("oversized frame", struct.pack("<IB", 1 << 31, FrameType.STDOUT), ErrorCode.BAD_LENGTH),
]


@pytest.mark.parametrize("reply, code", [(r, c) for _, r, c in RUN_CASES],
                         ids=[n for n, _, _ in RUN_CASES])
def test_bad_answers_to_run_are_refused(reply, code):
    fake, agent = run_against(reply)
    with pytest.raises(AgentProtocolError) as e:
        agent.run(["true"], max_output=1000)    # "after EXIT": the late frame came with EXIT
    assert e.value.code == code and not e.value.by_agent and agent.closed
    assert fake.error_sent() == code


def test_an_agent_closing_mid_frame_is_an_error_not_a_hang():
    fake, agent = run_against(wire.encode_frame(FrameType.STDOUT, b"abcdef")[:-3],
                              close_after_reply=True)
    with pytest.raises(AgentError, match="in the middle of a frame"):
        agent.run(["true"], timeout=TIMEOUT)


GET_CASES = [
    ("more than max_size", wire.encode_data(b"x" * 60) + wire.encode_data(b"x" * 60)
     + wire.encode_done(0, 120), ErrorCode.BAD_LENGTH),
    ("DONE bytes do not match", wire.encode_data(b"x" * 10) + wire.encode_done(0, 11),
     ErrorCode.BAD_PAYLOAD),
    ("DONE errno out of range", wire.encode_frame(FrameType.DONE, struct.pack("<iQ", 99999, 0)),
     ErrorCode.BAD_PAYLOAD),
    ("EXIT during get", EXIT_0, ErrorCode.BAD_ORDER),
]


@pytest.mark.parametrize("reply, code", [(r, c) for _, r, c in GET_CASES],
                         ids=[n for n, _, _ in GET_CASES])
def test_bad_answers_to_get_are_refused(reply, code):
    fake, agent = run_against(reply)
    with pytest.raises(AgentProtocolError) as e:
        agent.get("/f", max_size=100)
    assert e.value.code == code
    assert fake.error_sent() == code


def test_a_put_whose_done_does_not_match_is_refused():
    fake, agent = run_against(wire.encode_done(0, 3))
    with pytest.raises(AgentProtocolError):
        agent.put("/f", b"four")
    assert fake.error_sent() == ErrorCode.BAD_PAYLOAD


def test_a_frame_between_requests_is_refused_not_taken_for_the_next_ones_output():
    fake, agent = run_against(EXIT_0)
    assert agent.run(["true"]).ok
    fake.sock.sendall(wire.encode_frame(FrameType.STDOUT, b"forged"))
    with pytest.raises(AgentProtocolError) as e:
        agent.run(["true"])
    assert e.value.code == ErrorCode.BAD_ORDER
    assert fake.error_sent() == ErrorCode.BAD_ORDER
