"""The host side of the guest agent: run commands in the guest and move files, over one stream.

This module owns :class:`Agent`, a client of ``pyvmm-agent`` (the protocol:
:mod:`pyvmm.agent.wire`) over any connected stream socket, and the two ways to get one:

* :meth:`Agent.connect_uds` -- through the vsock device's Unix socket of a running ``pyvmm run
  --vsock CID,uds=PATH`` (``CONNECT <port>\\n``, ``OK <host port>\\n``: Firecracker's protocol);
* :meth:`Agent.connect_vsock` -- through a running machine's Python API (``Machine.vsock``).

Every wait has a bound: the handshake and file transfers ``io_timeout`` (default
:data:`IO_TIMEOUT`), a command its ``timeout`` plus :data:`RESULT_GRACE` for the agent to kill it
and report.  ``timeout=None`` runs a command without a deadline; the wait then ends only with
the command or the connection (a guest that dies, a pyvmm that stops, closes it).  The agent's
frames are checked as the agent checks ours: a bad frame, or more output or file than the
bounds, is answered with ERROR, the connection closed and :class:`AgentProtocolError` raised.
After any error the Agent is closed; connect again.
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from . import wire
from .wire import ErrorCode, Frame, FrameType, ProtocolError

__all__ = ["Agent", "AgentBusy", "AgentError", "AgentProtocolError", "AgentTimeout",
           "IO_TIMEOUT", "RESULT_GRACE", "Result", "connect_uds"]

#: seconds for the handshake and for each put/get
IO_TIMEOUT = 60.0
#: seconds beyond a command's timeout for the agent to kill it and send EXIT
RESULT_GRACE = 10.0
#: bytes read from the socket at once
_RECV_SIZE = 1 << 16


class AgentError(Exception):
    """The agent could not be used (the connection, its answers)."""


class AgentProtocolError(AgentError):
    """A frame broke the protocol, ours (the agent's ERROR) or the agent's (``by_agent`` False)."""

    def __init__(self, message: str, code: int, by_agent: bool) -> None:
        super().__init__(message)
        self.code, self.by_agent = code, by_agent


class AgentBusy(AgentError):
    """The agent serves MAX_SESSIONS connections already."""


class AgentTimeout(AgentError, TimeoutError):
    """No answer within the bound."""


@dataclass
class Result:
    """What a command did: ``status`` is its exit code, or 128 + N if signal N killed it."""

    argv: list[str]
    exit_code: int | None
    signal: int | None
    timed_out: bool
    stdout: bytes
    stderr: bytes
    stdout_dropped: int = 0
    stderr_dropped: int = 0

    @property
    def status(self) -> int:
        return self.exit_code if self.exit_code is not None else 128 + (self.signal or 0)

    @property
    def ok(self) -> bool:
        return self.status == 0 and not self.timed_out

    @property
    def truncated(self) -> bool:
        """Output beyond OUTPUT_MAX was dropped (``stdout_dropped``/``stderr_dropped`` bytes)."""
        return bool(self.stdout_dropped or self.stderr_dropped)


def connect_uds(uds: str, port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A stream to guest vsock ``port`` through the device's Unix socket ``uds``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(uds)
        sock.sendall(f"CONNECT {port}\n".encode())
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < 32:
            byte = sock.recv(1)          # one at a time: the agent's bytes follow the line
            if not byte:
                break
            reply += byte
    except socket.timeout:
        sock.close()
        raise AgentTimeout(f"CONNECT {port} on {uds}: no answer in {timeout} s") from None
    except OSError:
        sock.close()
        raise
    if not re.fullmatch(rb"OK \d+\n", reply):
        sock.close()
        raise ConnectionRefusedError(f"CONNECT {port} on {uds}: got {reply!r} "
                                     "(is pyvmm-agent running? pyvmm.agent=1 on the cmdline)")
    return sock


def _argv(cmd) -> list[str]:
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    argv = [os.fsdecode(a) for a in cmd]
    if not argv:
        raise ValueError("an empty argv")
    return argv


class Agent:
    """A connection to ``pyvmm-agent``.  One request at a time; use one Agent per thread."""

    def __init__(self, sock: socket.socket, *, io_timeout: float = IO_TIMEOUT) -> None:
        self._sock = sock
        self._decoder = wire.FrameDecoder()
        self._frames: list[Frame] = []
        self.io_timeout = io_timeout
        self.closed = False
        sock.setblocking(False)
        try:
            first = self._next_frame(time.monotonic() + io_timeout)
            if first.type is FrameType.ERROR:
                code, reason = wire.parse_error(first.payload)
                self.close()
                if code == ErrorCode.BUSY:
                    raise AgentBusy(f"the agent is busy: {reason}")
                raise AgentProtocolError(f"the agent refused: {reason}", code, by_agent=True)
            if first.type is not FrameType.HELLO:
                self._fail(ErrorCode.BAD_ORDER, f"expected HELLO, got {first.type.name}")
            version = self._check(wire.parse_hello, first.payload)
            if version != wire.AGENT_VERSION:
                self._fail(ErrorCode.BAD_VERSION, f"the agent speaks version {version}, "
                           f"we speak {wire.AGENT_VERSION}")
            self._send_all(wire.encode_hello(), time.monotonic() + io_timeout)
        except BaseException:
            self.close()
            raise

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def connect_uds(cls, uds: str, port: int = wire.AGENT_PORT, *,
                    io_timeout: float = IO_TIMEOUT) -> "Agent":
        """Through the Unix socket of ``pyvmm run --vsock CID,uds=PATH``."""
        return cls(connect_uds(uds, port, io_timeout), io_timeout=io_timeout)

    @classmethod
    def connect_vsock(cls, vsock, port: int = wire.AGENT_PORT, *,
                      io_timeout: float = IO_TIMEOUT) -> "Agent":
        """Through a running machine's vsock API (``Machine.vsock``, a VsockApi)."""
        return cls(vsock.connect(port, timeout=io_timeout), io_timeout=io_timeout)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------------------
    def run(self, cmd, *, env: dict[str, str] | None = None, cwd: str | None = None,
            stdin: bytes | None = None, timeout: float | None = None,
            on_output: Callable[[int, bytes], None] | None = None,
            max_output: int = wire.OUTPUT_MAX) -> Result:
        """Run ``cmd`` in the guest: a string is run by ``/bin/sh -c``, a list is the argv
        (``argv[0]`` looked up in the guest's PATH).  ``env`` adds to the agent's
        environment; ``stdin`` is the command's whole input (none: it reads EOF).  At
        ``timeout`` seconds the agent kills the command's process group (``timed_out``).
        ``on_output(fd, data)`` (fd 1 or 2) gets the output as it arrives instead of the
        Result keeping it."""
        argv = _argv(cmd)
        timeout_ms = 0 if timeout is None else max(1, round(timeout * 1000))
        request = wire.encode_exec(wire.ExecRequest(
            tuple(os.fsencode(a) for a in argv),
            tuple(os.fsencode(f"{k}={v}") for k, v in (env or {}).items()),
            os.fsencode(cwd or ""), timeout_ms))
        deadline = None if timeout is None else time.monotonic() + timeout + RESULT_GRACE
        got = {1: bytearray(), 2: bytearray()}
        counts = {1: 0, 2: 0}
        state: dict = {}
        data = memoryview(stdin or b"")

        def outgoing() -> Iterator[bytes]:
            yield request
            for off in range(0, len(data), wire.FRAME_MAX):
                if "exit" in state:          # the command ended: the rest of stdin is moot
                    break
                yield wire.encode_data(bytes(data[off:off + wire.FRAME_MAX]))
            yield wire.encode_data(b"")

        def on_frame(frame: Frame) -> bool:
            if frame.type in (FrameType.STDOUT, FrameType.STDERR) and "exit" not in state:
                fd = 1 if frame.type is FrameType.STDOUT else 2
                counts[fd] += len(frame.payload)
                if counts[fd] > max_output:
                    self._fail(ErrorCode.BAD_LENGTH, f"more than {max_output} bytes of "
                               f"{'stdout' if fd == 1 else 'stderr'}")
                if on_output is not None:
                    on_output(fd, frame.payload)
                else:
                    got[fd] += frame.payload
                return False
            if frame.type is FrameType.EXIT and "exit" not in state:
                state["exit"] = self._check(wire.parse_exit, frame.payload)
                return True
            self._unexpected(frame, "STDOUT, STDERR or EXIT")

        self._converse(outgoing(), on_frame, deadline, f"command {argv!r}")
        info: wire.ExitInfo = state["exit"]
        return Result(argv, info.exit_code, info.signal, info.timed_out, bytes(got[1]),
                      bytes(got[2]), info.stdout_dropped, info.stderr_dropped)

    def put(self, path: str, data: bytes, mode: int = 0o644) -> int:
        """Write ``data`` to the guest file ``path`` (created or truncated, then given
        ``mode``); returns the bytes written; OSError with the guest's errno if it failed."""
        request = wire.encode_put(os.fsencode(path), mode)
        view = memoryview(data)
        state: dict = {}

        def outgoing() -> Iterator[bytes]:
            yield request
            for off in range(0, len(view), wire.FRAME_MAX):
                yield wire.encode_data(bytes(view[off:off + wire.FRAME_MAX]))
            yield wire.encode_data(b"")

        def on_frame(frame: Frame) -> bool:
            if frame.type is FrameType.DONE:
                state["done"] = self._check(wire.parse_done, frame.payload)
                return True
            self._unexpected(frame, "DONE")

        self._converse(outgoing(), on_frame, time.monotonic() + self.io_timeout, f"put {path}")
        err, nbytes = state["done"]
        if err:
            raise OSError(err, os.strerror(err), path)
        if nbytes != len(data):
            self._fail(ErrorCode.BAD_PAYLOAD, f"DONE says {nbytes} bytes, we sent {len(data)}")
        return nbytes

    def get(self, path: str, max_size: int = wire.GET_MAX) -> bytes:
        """The contents of the guest's regular file ``path``, at most ``max_size`` bytes
        (longer: OSError EFBIG); OSError with the guest's errno if it failed."""
        if not 0 <= max_size <= wire.GET_MAX:
            raise ValueError(f"max_size is 0 .. GET_MAX ({wire.GET_MAX})")
        got = bytearray()
        state: dict = {}

        def on_frame(frame: Frame) -> bool:
            if frame.type is FrameType.DATA:
                if len(got) + len(frame.payload) > max_size:
                    self._fail(ErrorCode.BAD_LENGTH, f"more than {max_size} bytes of {path}")
                got.extend(frame.payload)
                return False
            if frame.type is FrameType.DONE:
                state["done"] = self._check(wire.parse_done, frame.payload)
                return True
            self._unexpected(frame, "DATA or DONE")

        self._converse(iter([wire.encode_get(os.fsencode(path), max_size)]), on_frame,
                       time.monotonic() + self.io_timeout, f"get {path}")
        err, nbytes = state["done"]
        if err:
            raise OSError(err, os.strerror(err), path)
        if nbytes != len(got):
            self._fail(ErrorCode.BAD_PAYLOAD, f"DONE says {nbytes} bytes, {len(got)} came")
        return bytes(got)

    # -- the conversation ----------------------------------------------------------------------------
    def _converse(self, outgoing: Iterator[bytes], on_frame: Callable[[Frame], bool] | None,
                  deadline: float | None, what: str) -> None:
        """Send the frames of ``outgoing`` as the socket takes them while passing each frame
        that arrives to ``on_frame``; done when it returned True (no ``on_frame``: at once)
        and all was sent."""
        if self.closed:
            raise AgentError("this Agent is closed (after an error, or by close())")
        if on_frame is not None:         # between requests the agent has nothing to say
            self._receive_now()
            if self._frames:
                self._unexpected(self._frames[0], "nothing between requests")
        pending = memoryview(b"")
        finished = on_frame is None
        exhausted = False
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self._sock, selectors.EVENT_READ)
                while not (finished and exhausted and not pending):
                    if not pending and not exhausted:
                        frame = next(outgoing, None)
                        if frame is None:
                            exhausted = True
                        else:
                            pending = memoryview(frame)
                    while self._frames and not finished:
                        finished = on_frame(self._frames.pop(0))
                    if self._frames and on_frame is not None:
                        self._unexpected(self._frames[0], "nothing more")
                    if finished and exhausted and not pending:
                        break
                    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0)
                    sel.modify(self._sock, events)
                    wait = None if deadline is None else deadline - time.monotonic()
                    if wait is not None and wait <= 0:
                        raise AgentTimeout(f"{what}: no answer from the agent in time")
                    for _, mask in sel.select(wait):
                        if mask & selectors.EVENT_WRITE and pending:
                            try:
                                n = self._sock.send(pending)
                            except BlockingIOError:
                                n = 0
                            pending = pending[n:]
                        if mask & selectors.EVENT_READ:
                            self._receive()
        except AgentTimeout:
            self.close()
            raise
        except (AgentError, ProtocolError):
            raise
        except OSError as e:
            self.close()
            raise AgentError(f"{what}: the connection to the agent failed: {e}") from None

    def _receive(self) -> None:
        try:
            data = self._sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        if not data:
            self.close()
            raise AgentError("the agent closed the connection"
                             + (" in the middle of a frame" if self._decoder.mid_frame else ""))
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as e:
            self._fail(e.code, e.reason)
        for frame in frames:
            if frame.type is FrameType.ERROR:
                code, reason = self._check(wire.parse_error, frame.payload)
                self.close()
                raise AgentProtocolError(f"the agent reports an error: "
                                         f"{_code_name(code)}: {reason}", code, by_agent=True)
        self._frames.extend(frames)

    def _receive_now(self) -> None:
        """Take what has arrived already, without waiting."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            if sel.select(0):
                self._receive()

    def _next_frame(self, deadline: float) -> Frame:
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            while not self._frames:
                wait = deadline - time.monotonic()
                if wait <= 0 or not sel.select(wait):
                    raise AgentTimeout("no HELLO from the agent in time")
                self._receive_raw_first()
        return self._frames.pop(0)

    def _receive_raw_first(self) -> None:
        """As _receive, but an ERROR (BUSY) is kept as a frame: the handshake reads it."""
        try:
            data = self._sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        if not data:
            raise AgentError("the agent closed the connection before its HELLO")
        try:
            self._frames.extend(self._decoder.feed(data))
        except ProtocolError as e:
            self._fail(e.code, e.reason)

    def _send_all(self, data: bytes, deadline: float) -> None:
        self._converse(iter([data]), None, deadline, "HELLO")

    def _check(self, parse, payload):
        try:
            return parse(payload)
        except ProtocolError as e:
            self._fail(e.code, e.reason)

    def _unexpected(self, frame: Frame, expected: str):
        self._fail(ErrorCode.BAD_ORDER, f"expected {expected}, got {frame.type.name}")

    def _fail(self, code: ErrorCode, reason: str):
        """The agent broke the protocol: tell it (ERROR), close, raise."""
        try:
            self._sock.send(wire.encode_error(code, reason))
        except OSError:
            pass
        self.close()
        raise AgentProtocolError(f"the agent broke the protocol: {code.name}: {reason}",
                                 code, by_agent=False)


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code}"

