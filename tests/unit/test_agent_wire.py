"""pyvmm/agent/wire.py: the guest agent's frames, encoded and parsed; every hostile frame refused.

The same names and values are in guest/progs/pyvmm-agent.c: the first tests read them from the
C source, so the two descriptions cannot drift apart.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from pyvmm.agent import wire
from pyvmm.agent.wire import (ErrorCode, ExecRequest, ExitInfo, Frame, FrameDecoder, FrameType,
                              ProtocolError)

SOURCE = Path(__file__).resolve().parents[2] / "guest" / "progs" / "pyvmm-agent.c"
C = SOURCE.read_text()


def c_define(name: str) -> int:
    m = re.search(rf"^#define {name} (.+?)(?:\s*/\*.*)?$", C, re.MULTILINE)
    assert m, f"#define {name} not in {SOURCE.name}"
    value = re.sub(r"(\d+)U?L*L?\b", r"\1", m.group(1))
    return value.strip('"') if value.startswith('"') else eval(value, {})   # digits, * and ( )


@pytest.mark.parametrize("name", ["AGENT_PORT", "AGENT_VERSION", "FRAME_HEADER_SIZE",
                                  "FRAME_MAX", "OUTPUT_MAX", "GET_MAX", "EXEC_STRINGS_MAX",
                                  "MAX_SESSIONS", "FRAME_TIMEOUT_S", "SEND_TIMEOUT_S",
                                  "EXIT_DRAIN_MS"])
def test_limits_are_the_same_in_c_and_python(name):
    assert c_define(name) == getattr(wire, name)


def test_magic_frame_types_and_error_codes_are_the_same_in_c_and_python():
    assert c_define("AGENT_MAGIC") == wire.AGENT_MAGIC.decode()
    for enum in (FrameType, ErrorCode):
        for member in enum:
            assert re.search(rf"\b{member.name} = {member.value}\b", C), member


def test_default_port_is_clear_of_the_other_guest_programs_ports():
    assert wire.AGENT_PORT not in (1234, 1235, 9999)      # vsock_test, its +1, vsock-tcp-relay
    assert wire.AGENT_PORT < 1 << 30                        # below the host's ephemeral ports


# -- round trips ---------------------------------------------------------------------------------
def decode_one(data: bytes) -> Frame:
    frames = FrameDecoder().feed(data)
    assert len(frames) == 1
    return frames[0]


def test_hello_round_trip():
    frame = decode_one(wire.encode_hello())
    assert frame.type is FrameType.HELLO
    assert frame.payload == b"PVMA\x01\x00\x00\x00"
    assert wire.parse_hello(frame.payload) == wire.AGENT_VERSION


@pytest.mark.parametrize("req", [
    ExecRequest((b"true",)),
    ExecRequest((b"sh", b"-c", b"echo $A"), (b"A=1", b"B="), b"/tmp", 1500),
    ExecRequest((b"x",) * 100, (b"K=" + b"v" * 1000,), b"", 0xFFFF_FFFF),
    ExecRequest((b"printf", b"", b"\xff\xfe"), (), b"/"),          # empty args and any bytes
])
def test_exec_round_trip(req):
    frame = decode_one(wire.encode_exec(req))
    assert frame.type is FrameType.EXEC
    assert wire.parse_exec(frame.payload) == req


def test_exec_layout_is_head_then_nul_terminated_strings():
    frame = decode_one(wire.encode_exec(ExecRequest((b"ls", b"-l"), (b"A=1",), b"/tmp", 7)))
    assert frame.payload == struct.pack("<IHH", 7, 2, 1) + b"/tmp\0ls\0-l\0A=1\0"


def test_put_get_data_round_trip():
    assert wire.parse_put(decode_one(wire.encode_put(b"/tmp/f", 0o4755)).payload) == (b"/tmp/f", 0o4755)
    assert wire.parse_get(decode_one(wire.encode_get(b"/etc/x", 10)).payload) == (b"/etc/x", 10)
    assert wire.parse_get(decode_one(wire.encode_get(b"/x", 1 << 63)).payload) == (b"/x", wire.GET_MAX)
    assert decode_one(wire.encode_data(b"abc")) == Frame(FrameType.DATA, b"abc")
    assert decode_one(wire.encode_data()) == Frame(FrameType.DATA, b"")


@pytest.mark.parametrize("info", [
    ExitInfo(0, None, False, 0, 0), ExitInfo(255, None, False, 1, 2),
    ExitInfo(None, 9, True, 1 << 40, 0), ExitInfo(None, 64, False, 0, 5)])
def test_exit_round_trip(info):
    assert wire.parse_exit(decode_one(wire.encode_exit(info)).payload) == info


def test_done_and_error_round_trip():
    assert wire.parse_done(decode_one(wire.encode_done(2, 0)).payload) == (2, 0)
    assert wire.parse_done(decode_one(wire.encode_done(0, 1 << 33)).payload) == (0, 1 << 33)
    assert wire.parse_error(decode_one(wire.encode_error(ErrorCode.BUSY, "full")).payload) == (6, "full")
    long = decode_one(wire.encode_error(ErrorCode.BAD_ORDER, "x" * 1000)).payload
    assert len(long) == 4 + wire.ERROR_MESSAGE_MAX


def test_decoder_takes_any_split_and_several_frames_at_once():
    stream = (wire.encode_hello() + wire.encode_data(b"x" * 70) + wire.encode_data()
              + wire.encode_done(0, 70) + wire.encode_data(b"y" * wire.FRAME_MAX))
    for step in (1, 2, 3, 5, 7, 4096, len(stream)):
        dec, got = FrameDecoder(), []
        for i in range(0, len(stream), step):
            got += dec.feed(stream[i:i + step])
        assert [f.type for f in got] == [FrameType.HELLO, FrameType.DATA, FrameType.DATA,
                                         FrameType.DONE, FrameType.DATA]
        assert got[4].payload == b"y" * wire.FRAME_MAX
        assert not dec.mid_frame


def test_decoder_says_when_it_holds_part_of_a_frame():
    dec = FrameDecoder()
    assert dec.feed(wire.encode_data(b"abc")[:-1]) == []
    assert dec.mid_frame


# -- what is refused -------------------------------------------------------------------------------
def header(length: int, type_: int) -> bytes:
    return struct.pack("<IB", length, type_)


@pytest.mark.parametrize("data, code", [
    (header(wire.FRAME_MAX + 1, FrameType.DATA), ErrorCode.BAD_LENGTH),
    (header(0xFFFF_FFFF, FrameType.STDOUT), ErrorCode.BAD_LENGTH),
    (header(0, 0), ErrorCode.BAD_TYPE),
    (header(0, 11), ErrorCode.BAD_TYPE),
    (header(3, 255) + b"abc", ErrorCode.BAD_TYPE),
    (wire.encode_data(b"ok") + header(1 << 20, FrameType.DATA), ErrorCode.BAD_LENGTH),
], ids=["length FRAME_MAX+1", "length 2^32-1", "type 0", "type 11", "type 255",
        "good frame then oversized"])
def test_hostile_headers_are_refused_as_soon_as_the_header_is_in(data, code):
    with pytest.raises(ProtocolError) as e:
        FrameDecoder().feed(data)        # no payload needed: refused before it is waited for
    assert e.value.code is code


PAYLOAD_CASES = [
    (wire.parse_hello, b"PVMA\x01\x00\x00", "short HELLO"),
    (wire.parse_hello, b"PVMB\x01\x00\x00\x00", "HELLO magic"),
    (wire.parse_hello, b"PVMA\x01\x00\x00\x00\x00", "long HELLO"),
    (wire.parse_exec, b"\x00" * 7, "EXEC shorter than its head"),
    (wire.parse_exec, struct.pack("<IHH", 0, 0, 0) + b"\0", "argc 0"),
    (wire.parse_exec, struct.pack("<IHH", 0, 1, 0) + b"\0true", "missing last NUL"),
    (wire.parse_exec, struct.pack("<IHH", 0, 1, 0) + b"\0true\0extra", "bytes left over"),
    (wire.parse_exec, struct.pack("<IHH", 0, 2, 0) + b"\0true\0", "fewer strings than argc"),
    (wire.parse_exec, struct.pack("<IHH", 0, 1, 0) + b"\0\0", "empty argv[0]"),
    (wire.parse_exec, struct.pack("<IHH", 0, 1, 1) + b"\0true\0NOEQUALS\0", "env without ="),
    (wire.parse_exec, struct.pack("<IHH", 0, 1, 1) + b"\0true\0=x\0", "env with empty name"),
    (wire.parse_exec, struct.pack("<IHH", 0, 4000, 97) + b"\0" * 10, "argc + envc over max"),
    (wire.parse_put, b"\x00\x00", "PUT shorter than its head"),
    (wire.parse_put, struct.pack("<I", 0o10000) + b"/x", "PUT mode over 0o7777"),
    (wire.parse_put, struct.pack("<I", 0o644) + b"rel/x", "PUT relative path"),
    (wire.parse_put, struct.pack("<I", 0o644), "PUT empty path"),
    (wire.parse_put, struct.pack("<I", 0o644) + b"/a\0b", "PUT NUL in path"),
    (wire.parse_put, struct.pack("<I", 0o644) + b"/" * wire.PATH_MAX, "PUT path too long"),
    (wire.parse_get, b"\x00" * 7, "GET shorter than its head"),
    (wire.parse_get, struct.pack("<Q", 1) + b"x", "GET relative path"),
    (wire.parse_exit, b"\x00" * 24, "EXIT short"),
    (wire.parse_exit, struct.pack("<iIBQQ", 256, 0, 0, 0, 0), "exit code 256"),
    (wire.parse_exit, struct.pack("<iIBQQ", -1, 0, 0, 0, 0), "killed by signal 0"),
    (wire.parse_exit, struct.pack("<iIBQQ", -1, 65, 0, 0, 0), "signal 65"),
    (wire.parse_exit, struct.pack("<iIBQQ", 0, 9, 0, 0, 0), "exit code and a signal"),
    (wire.parse_exit, struct.pack("<iIBQQ", 0, 0, 2, 0, 0), "timed_out 2"),
    (wire.parse_done, b"\x00" * 11, "DONE short"),
    (wire.parse_done, struct.pack("<iQ", -1, 0), "DONE errno -1"),
    (wire.parse_done, struct.pack("<iQ", 5000, 0), "DONE errno 5000"),
    (wire.parse_error, b"\x01\x00", "ERROR short"),
    (wire.parse_error, b"\x01\x00\x00\x00" + b"x" * 201, "ERROR reason too long"),
]


@pytest.mark.parametrize("parse, payload, what", PAYLOAD_CASES, ids=[c[2] for c in PAYLOAD_CASES])
def test_malformed_payloads_are_bad_payload(parse, payload, what):
    with pytest.raises(ProtocolError) as e:
        parse(payload)
    assert e.value.code is ErrorCode.BAD_PAYLOAD


@pytest.mark.parametrize("make", [
    lambda: wire.encode_exec(ExecRequest(())),
    lambda: wire.encode_exec(ExecRequest((b"",))),
    lambda: wire.encode_exec(ExecRequest((b"a\0b",))),
    lambda: wire.encode_exec(ExecRequest((b"a",), (b"NOEQ",))),
    lambda: wire.encode_exec(ExecRequest((b"a",), timeout_ms=1 << 32)),
    lambda: wire.encode_exec(ExecRequest((b"a" * wire.FRAME_MAX,))),
    lambda: wire.encode_exec(ExecRequest((b"a",) * (wire.EXEC_STRINGS_MAX + 1))),
    lambda: wire.encode_put(b"relative", 0o644),
    lambda: wire.encode_put(b"/x", 0o10000),
    lambda: wire.encode_get(b"/x\0", 1),
    lambda: wire.encode_data(b"x" * (wire.FRAME_MAX + 1)),
])
def test_the_encoder_refuses_what_the_agent_would_refuse(make):
    with pytest.raises(ValueError):
        make()
