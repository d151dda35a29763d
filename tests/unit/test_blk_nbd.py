"""The NBD client (pyvmm.blk.nbd): the wire format and the handshake on bytes, the plan of a
batch, and NbdBackend against fake servers in a thread, honest and hostile."""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time

import pytest

import pyvmm.blk.nbd as nbd
from harness import UnixServer
from pyvmm.blk.backend import BlockOp, BlockRequest
from pyvmm.blk.nbd import (CLIENT_FLAGS, GREETING, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT,
                           NBD_DEFAULT_MAX_PAYLOAD, NBD_MAGIC, NBD_MAX_EFFECT,
                           NBD_MAX_INFO_REPLIES, NBD_OPTION_REPLY_MAX, NBD_REP_MAGIC,
                           NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC,
                           OPTION, OPTION_REPLY, REQUEST, SIMPLE_REPLY, NbdBackend, NbdCmd,
                           NbdCmdFlag, NbdError, NbdExport, NbdHandshake, NbdHandshakeFlag,
                           NbdInfo, NbdOpt, NbdProtocolError, NbdRefused, NbdRep,
                           NbdTransmissionFlag as F, encode_request, nbd_errno,
                           parse_simple_reply, plan, split_views)
from pyvmm.errors import ConfigError

MiB = 1024 * 1024
#: what qemu-storage-daemon 7.2 announces for a writable qcow2 export (seen: flags 3437)
QSD_FLAGS = (F.NBD_FLAG_HAS_FLAGS | F.NBD_FLAG_SEND_FLUSH | F.NBD_FLAG_SEND_FUA
             | F.NBD_FLAG_SEND_TRIM | F.NBD_FLAG_SEND_WRITE_ZEROES | F.NBD_FLAG_SEND_DF
             | F.NBD_FLAG_CAN_MULTI_CONN | F.NBD_FLAG_SEND_CACHE | F.NBD_FLAG_SEND_FAST_ZERO)
EXPORT = NbdExport(size=4 * 1024 * MiB, flags=QSD_FLAGS)


def info_reply(payload: bytes) -> bytes:
    return OPTION_REPLY.pack(NBD_REP_MAGIC, NbdOpt.NBD_OPT_GO, NbdRep.NBD_REP_INFO,
                             len(payload)) + payload


def option_reply(reply: int, payload: bytes = b"", option: int = NbdOpt.NBD_OPT_GO,
                 magic: int = NBD_REP_MAGIC) -> bytes:
    return OPTION_REPLY.pack(magic, option, reply, len(payload)) + payload


def feed(handshake: NbdHandshake, data: bytes) -> bytes:
    """Give ``data`` to the handshake as a driver reading wanted() bytes at a time would."""
    out = b""
    while data:
        n = handshake.wanted()
        assert n > 0, "the handshake wants nothing but bytes are left"
        out += handshake.receive(data[:n])
        data = data[n:]
    return out


GREET = GREETING.pack(NBD_MAGIC, IHAVEOPT, NbdHandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE
                      | NbdHandshakeFlag.NBD_FLAG_NO_ZEROES)
GOOD_INFOS = (info_reply(INFO_EXPORT.pack(NbdInfo.NBD_INFO_EXPORT, 64 * MiB, QSD_FLAGS))
              + info_reply(INFO_BLOCK_SIZE.pack(NbdInfo.NBD_INFO_BLOCK_SIZE, 1, 4096, 32 * MiB)))


# -- the handshake on bytes ----------------------------------------------------------------------

def test_handshake_transcript_with_qsd_values():
    hs = NbdHandshake("disk0")
    assert hs.wanted() == 18
    sent = feed(hs, GREET)
    # client flags: FIXED_NEWSTYLE | NO_ZEROES (offered); then IHAVEOPT, NBD_OPT_GO, 4+5+2+2
    # bytes: name length, "disk0", one information request, NBD_INFO_BLOCK_SIZE
    assert sent == (b"\x00\x00\x00\x03" + b"IHAVEOPT" + b"\x00\x00\x00\x07" + b"\x00\x00\x00\x0d"
                    + b"\x00\x00\x00\x05disk0" + b"\x00\x01" + b"\x00\x03")
    assert not hs.done
    name_info = info_reply(struct.pack(">H", NbdInfo.NBD_INFO_NAME) + b"disk0")
    unknown_info = info_reply(struct.pack(">H", 77) + b"future")
    assert feed(hs, GOOD_INFOS + name_info + unknown_info + option_reply(NbdRep.NBD_REP_ACK)) == b""
    assert hs.done and hs.wanted() == 0
    assert hs.export == NbdExport(64 * MiB, QSD_FLAGS, 1, 4096, 32 * MiB)


def test_handshake_without_block_size_info_uses_the_defaults():
    hs = NbdHandshake("x")
    feed(hs, GREETING.pack(NBD_MAGIC, IHAVEOPT, NbdHandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE))
    feed(hs, info_reply(INFO_EXPORT.pack(0, 512, F.NBD_FLAG_HAS_FLAGS))
         + option_reply(NbdRep.NBD_REP_ACK))
    assert hs.export == NbdExport(512, int(F.NBD_FLAG_HAS_FLAGS))
    assert hs.export.max_payload == NBD_DEFAULT_MAX_PAYLOAD


def test_the_client_flags_follow_the_servers_offer():
    hs = NbdHandshake("x")
    sent = feed(hs, GREETING.pack(NBD_MAGIC, IHAVEOPT, NbdHandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE))
    assert CLIENT_FLAGS.unpack(sent[:4]) == (1,)           # no NO_ZEROES unless offered


def test_an_export_the_server_does_not_have_is_refused_with_its_message():
    hs = NbdHandshake("nope")
    feed(hs, GREET)
    with pytest.raises(NbdRefused, match=r"NBD_REP_ERR_UNKNOWN: export 'nope' not present"):
        feed(hs, option_reply(NbdRep.NBD_REP_ERR_UNKNOWN, b"export 'nope' not present"))


def test_an_error_reply_with_control_characters_is_made_printable():
    hs = NbdHandshake("x")
    feed(hs, GREET)
    with pytest.raises(NbdRefused) as refused:
        feed(hs, option_reply(NbdRep.NBD_REP_ERR_POLICY, b"no\x1b[2J\xffway"))
    assert str(refused.value) == "NBD_REP_ERR_POLICY: no?[2J\ufffdway"


def _block_size(minimum, preferred, maximum):
    return info_reply(INFO_BLOCK_SIZE.pack(NbdInfo.NBD_INFO_BLOCK_SIZE, minimum, preferred,
                                           maximum))


@pytest.mark.parametrize("server_says,reason", [
    (b"NBDMAGIX" + GREET[8:], "not an NBD server"),
    (GREETING.pack(NBD_MAGIC, 0x00420281861253, 0), "oldstyle"),
    (GREETING.pack(NBD_MAGIC, IHAVEOPT, 0), "fixed newstyle"),
    (GREET + option_reply(NbdRep.NBD_REP_ACK, magic=0x1234), "magic 0x1234"),
    (GREET + option_reply(NbdRep.NBD_REP_ACK, option=NbdOpt.NBD_OPT_LIST), "did not send"),
    (GREET + OPTION_REPLY.pack(NBD_REP_MAGIC, 7, 3, NBD_OPTION_REPLY_MAX + 1), "at most"),
    (GREET + option_reply(NbdRep.NBD_REP_ACK), "without NBD_INFO_EXPORT"),
    (GREET + GOOD_INFOS + option_reply(NbdRep.NBD_REP_ACK, b"x"), "ACK with data"),
    (GREET + option_reply(NbdRep.NBD_REP_SERVER, b"\0\0\0\0"), "type 2"),
    (GREET + info_reply(b"\0"), "shorter than its type"),
    (GREET + info_reply(INFO_EXPORT.pack(0, 1, 1) + b"\0"), "NBD_INFO_EXPORT of 13 bytes"),
    (GREET + info_reply(INFO_EXPORT.pack(0, 1, 0)), "NBD_FLAG_HAS_FLAGS"),
    (GREET + _block_size(3, 4096, 1 << 25), "minimum block size 3"),
    (GREET + _block_size(1 << 17, 1 << 17, 1 << 25), "minimum block size 131072"),
    (GREET + _block_size(1, 256, 1 << 25), "preferred block size 256"),
    (GREET + _block_size(1, 4096, 1024), "maximum payload 1024"),
    (GREET + info_reply(INFO_BLOCK_SIZE.pack(3, 1, 512, 512) + b"\0"), "of 15 bytes"),
    (GREET + info_reply(struct.pack(">H", 1)) * (NBD_MAX_INFO_REPLIES + 1), "more than 16"),
])
def test_handshake_protocol_violations_are_errors(server_says, reason):
    hs = NbdHandshake("disk0")
    with pytest.raises(NbdProtocolError, match=reason):
        feed(hs, server_says)


def test_an_export_with_blocks_larger_than_a_sector_cannot_be_used():
    hs = NbdHandshake("disk0")
    feed(hs, GREET)
    with pytest.raises(NbdError, match="4096-byte blocks"):
        feed(hs, _block_size(4096, 4096, 1 << 25))


def test_the_handshake_never_takes_more_than_it_wants():
    hs = NbdHandshake("disk0")
    with pytest.raises(ValueError):
        hs.receive(GREET + b"\0")


# -- requests and replies on bytes --------------------------------------------------------------

def test_request_layout():
    raw = encode_request(NbdCmd.NBD_CMD_WRITE_ZEROES, NbdCmdFlag.NBD_CMD_FLAG_NO_HOLE,
                         0x0102030405060708, 1 << 33, 4096)
    assert REQUEST.size == 28
    assert raw == (b"\x25\x60\x95\x13" + b"\x00\x02" + b"\x00\x06"
                   + bytes(range(1, 9)) + b"\x00\x00\x00\x02\x00\x00\x00\x00" + b"\x00\x00\x10\x00")
    assert REQUEST.unpack(raw)[0] == NBD_REQUEST_MAGIC


def test_simple_reply_parsing():
    assert parse_simple_reply(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 28, 9)) == (28, 9)
    with pytest.raises(NbdProtocolError, match="structured reply"):
        parse_simple_reply(SIMPLE_REPLY.pack(NBD_STRUCTURED_REPLY_MAGIC, 0, 9))
    with pytest.raises(NbdProtocolError, match="magic 0xdeadbeef"):
        parse_simple_reply(SIMPLE_REPLY.pack(0xDEADBEEF, 0, 9))


@pytest.mark.parametrize("value,expected", [
    (1, errno.EPERM), (5, errno.EIO), (12, errno.ENOMEM), (22, errno.EINVAL),
    (28, errno.ENOSPC), (75, errno.EOVERFLOW), (95, errno.EOPNOTSUPP), (108, errno.ESHUTDOWN),
    (2, errno.EIO), (0xFFFFFFFF, errno.EIO)])
def test_error_values_map_to_errno(value, expected):
    assert nbd_errno(value) == expected


# -- the plan of a batch -----------------------------------------------------------------------

def test_split_views_slices_without_copying():
    a, b = bytearray(b"a" * 10), bytearray(b"b" * 7)
    runs = split_views([memoryview(a), memoryview(b)], 4)
    assert [b"".join(bytes(v) for v in run) for run in runs] == [
        b"aaaa", b"aaaa", b"aabb", b"bbbb", b"b"]
    runs[2][1][0] = ord("X")                     # a view of ``b``, not a copy
    assert b == bytearray(b"Xbbbbbb")


def test_large_reads_and_writes_are_cut_at_the_maximum_payload():
    buf = bytearray(80 * MiB)
    results, waves = plan([BlockRequest(BlockOp.READ, 0, len(buf), [memoryview(buf)])],
                          EXPORT, False)
    assert results == [0] and len(waves) == 1
    assert [(c.cmd, c.offset, c.length) for c in waves[0]] == [
        (NbdCmd.NBD_CMD_READ, 0, 32 * MiB), (NbdCmd.NBD_CMD_READ, 32 * MiB, 32 * MiB),
        (NbdCmd.NBD_CMD_READ, 64 * MiB, 16 * MiB)]
    small = NbdExport(EXPORT.size, QSD_FLAGS, 1, 4096, 1 * MiB + 100)   # not a power of 2
    _, waves = plan([BlockRequest(BlockOp.WRITE, 0, 3 * MiB, [memoryview(buf)[:3 * MiB]])],
                    small, False)
    assert [c.length for c in waves[0]] == [MiB, MiB, MiB]
    huge = NbdExport(EXPORT.size, QSD_FLAGS, 1, 4096, 0xFFFFFFFF)      # "no limit": ours holds
    _, waves = plan([BlockRequest(BlockOp.WRITE, 0, 40 * MiB, [memoryview(buf)[:40 * MiB]])],
                    huge, False)
    assert [c.length for c in waves[0]] == [32 * MiB, 8 * MiB]


def test_discard_and_write_zeroes_map_and_split():
    results, waves = plan([
        BlockRequest(BlockOp.DISCARD, 0, 3 * NBD_MAX_EFFECT),
        BlockRequest(BlockOp.WRITE_ZEROES, 3 * NBD_MAX_EFFECT, 4096, unmap=True),
        BlockRequest(BlockOp.WRITE_ZEROES, 3 * NBD_MAX_EFFECT + 4096, 4096, unmap=False),
    ], EXPORT, False)
    assert results == [0, 0, 0]
    commands = [c for wave in waves for c in wave]
    assert [(c.index, c.cmd, c.offset, c.length, c.flags) for c in commands] == [
        (0, NbdCmd.NBD_CMD_TRIM, 0, NBD_MAX_EFFECT, 0),
        (0, NbdCmd.NBD_CMD_TRIM, NBD_MAX_EFFECT, NBD_MAX_EFFECT, 0),
        (0, NbdCmd.NBD_CMD_TRIM, 2 * NBD_MAX_EFFECT, NBD_MAX_EFFECT, 0),
        (1, NbdCmd.NBD_CMD_WRITE_ZEROES, 3 * NBD_MAX_EFFECT, 4096, 0),
        (2, NbdCmd.NBD_CMD_WRITE_ZEROES, 3 * NBD_MAX_EFFECT + 4096, 4096,
         NbdCmdFlag.NBD_CMD_FLAG_NO_HOLE)]


def _read(offset, length=4096):
    return BlockRequest(BlockOp.READ, offset, length, [memoryview(bytearray(length))])


def _write(offset, length=4096):
    return BlockRequest(BlockOp.WRITE, offset, length, [memoryview(bytearray(length))])


def test_waves_keep_the_batch_in_order():
    def shape(batch):
        return [[c.index for c in wave] for wave in plan(batch, EXPORT, False)[1]]
    # disjoint requests, and reads of the same range, all go at once
    assert shape([_write(0), _read(4096), _write(8192), _read(4096)]) == [[0, 1, 2, 3]]
    # a read of what an earlier request of the batch writes waits for it
    assert shape([_write(0), _read(2048)]) == [[0], [1]]
    assert shape([_read(0), BlockRequest(BlockOp.DISCARD, 0, 512)]) == [[0], [1]]
    # a flush waits for everything before it; what follows it may go with it
    assert shape([_write(0), _write(4096), BlockRequest(BlockOp.FLUSH), _read(8192)]) == [
        [0, 1], [2, 3]]


def test_requests_refused_without_asking_the_server():
    no_extras = NbdExport(1 * MiB, int(F.NBD_FLAG_HAS_FLAGS))
    batch = [BlockRequest(BlockOp.FLUSH), BlockRequest(BlockOp.DISCARD, 0, 512),
             BlockRequest(BlockOp.WRITE_ZEROES, 0, 512), _read(MiB - 512, 1024), _read(100, 512),
             BlockRequest(BlockOp.READ, 0, 1024, [memoryview(bytearray(512))]), _read(0)]
    results, waves = plan(batch, no_extras, False)
    # FLUSH without NBD_FLAG_SEND_FLUSH: nothing to flush, done
    assert results == [0, errno.EOPNOTSUPP, errno.EOPNOTSUPP, errno.EINVAL, errno.EINVAL,
                       errno.EINVAL, 0]
    assert [[c.index for c in w] for w in waves] == [[6]]
    results, waves = plan([_write(0), BlockRequest(BlockOp.DISCARD, 0, 512), _read(0)],
                          EXPORT, True)
    assert results == [errno.EROFS, errno.EROFS, 0]


# -- NbdBackend against fake servers ------------------------------------------------------------

def recv_exact(conn, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


class FakeNbd:
    """An NBD server for one client: the handshake as qemu-storage-daemon answers it, then
    ``serve(self, conn)``; the disk is :attr:`disk`.  Its failures go to ``server.errors``."""

    def __init__(self, path, serve=None, *, size=4 * MiB, flags=QSD_FLAGS,
                 block_size=(1, 4096, 32 * MiB), refuse: bytes | None = None, mute=False):
        self.disk = bytearray(size)
        self.flags, self.block_size, self.refuse, self.mute = flags, block_size, refuse, mute
        self.serve = serve or FakeNbd.honest
        self.requests: list[tuple] = []
        self.disconnected = threading.Event()        # NBD_CMD_DISC arrived
        self.server = UnixServer(path, self._handle)

    def _handle(self, conn):
        conn.settimeout(30)
        if self.mute:
            conn.recv(1)                         # says nothing; ends when the client goes
            return
        conn.sendall(GREET)
        recv_exact(conn, 4)
        magic, option, length = OPTION.unpack(recv_exact(conn, OPTION.size))
        assert (magic, option) == (IHAVEOPT, NbdOpt.NBD_OPT_GO)
        recv_exact(conn, length)
        if self.refuse is not None:
            conn.sendall(option_reply(NbdRep.NBD_REP_ERR_UNKNOWN, self.refuse))
            return
        conn.sendall(info_reply(INFO_EXPORT.pack(0, len(self.disk), self.flags))
                     + _block_size(*self.block_size) + option_reply(NbdRep.NBD_REP_ACK))
        self.serve(self, conn)

    def request(self, conn):
        """The next request, (cmd, flags, cookie, offset, length, payload); None at EOF/DISC."""
        try:
            magic, flags, cmd, cookie, offset, length = REQUEST.unpack(recv_exact(conn, 28))
        except EOFError:
            return None
        assert magic == NBD_REQUEST_MAGIC
        if cmd == NbdCmd.NBD_CMD_DISC:
            self.disconnected.set()
            return None
        payload = recv_exact(conn, length) if cmd == NbdCmd.NBD_CMD_WRITE else b""
        self.requests.append((cmd, flags, offset, length))
        return cmd, flags, cookie, offset, length, payload

    def answer(self, request) -> bytes:
        """The honest reply to ``request`` (with READ data)."""
        cmd, flags, cookie, offset, length, payload = request
        data = b""
        if cmd == NbdCmd.NBD_CMD_READ:
            data = bytes(self.disk[offset:offset + length])
        elif cmd == NbdCmd.NBD_CMD_WRITE:
            self.disk[offset:offset + length] = payload
        elif cmd in (NbdCmd.NBD_CMD_TRIM, NbdCmd.NBD_CMD_WRITE_ZEROES):
            self.disk[offset:offset + length] = bytes(length)
        return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie) + data

    def honest(self, conn):
        while (request := self.request(conn)) is not None:
            conn.sendall(self.answer(request))

    def close(self):
        # shutdown() wakes the thread blocked in accept(); close() alone would leave it
        # there, and a later socket that reuses the descriptor number could be accepted on
        self.server.sock.shutdown(socket.SHUT_RDWR)
        self.server.close()


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "nbd.sock")


@pytest.fixture
def servers():
    """Fake servers and backends made by a test, closed after it: the backends first, so
    that every server thread sees the end of its connection and finishes."""
    made = []
    yield made
    for thing in reversed(made):
        thing.close()


def backend_for(path, servers, serve=None, read_only=False, **kw):
    server = FakeNbd(path, serve, **kw)
    servers.append(server)
    backend = NbdBackend(path, "disk0", read_only)
    backend.open()
    servers.append(backend)
    return server, backend


def test_reads_writes_and_zeroes_round_trip(sock_path, servers):
    server, backend = backend_for(sock_path, servers)
    assert (backend.size, backend.supports_discard, backend.supports_write_zeroes) == (
        4 * MiB, True, True)
    pattern = bytearray(bytes(range(256)) * 16 * 8)              # 32 KiB
    back = bytearray(len(pattern))
    assert backend.execute([
        BlockRequest(BlockOp.WRITE, 4096, len(pattern), [memoryview(pattern)[:512],
                                                          memoryview(pattern)[512:]]),
        BlockRequest(BlockOp.FLUSH),
        BlockRequest(BlockOp.READ, 4096, len(back), [memoryview(back)[:4096],
                                                      memoryview(back)[4096:]]),
        BlockRequest(BlockOp.WRITE_ZEROES, 4096, 512, unmap=True),
    ]) == [0, 0, 0, 0]
    assert back == pattern
    assert server.disk[4096:4608] == bytes(512) and server.disk[4608:4096 + 32768] == pattern[512:]
    assert [r[0] for r in server.requests] == [NbdCmd.NBD_CMD_WRITE, NbdCmd.NBD_CMD_FLUSH,
                                               NbdCmd.NBD_CMD_READ, NbdCmd.NBD_CMD_WRITE_ZEROES]
    backend.close()
    assert backend.failed == "closed"


def test_large_reads_and_writes_go_straight_between_many_views_and_the_socket(sock_path,
                                                                            servers):
    """40 MiB through 2,560 views of 16 KiB (more than IOV_MAX per call, more than one NBD
    request, far more than a socket buffer): the data arrives over many wake-ups."""
    server, backend = backend_for(sock_path, servers, size=64 * MiB)
    source = bytearray((bytes(range(251)) * (40 * MiB // 251 + 1))[:40 * MiB])
    views = [memoryview(source)[i:i + 16384] for i in range(0, len(source), 16384)]
    assert backend.execute([BlockRequest(BlockOp.WRITE, 0, len(source), views)]) == [0]
    assert server.disk[:len(source)] == source
    back = bytearray(len(source))
    views = [memoryview(back)[i:i + 16384] for i in range(0, len(back), 16384)]
    assert backend.execute([BlockRequest(BlockOp.READ, 0, len(back), views)]) == [0]
    assert back == source
    assert [(r[0], r[3]) for r in server.requests] == [
        (NbdCmd.NBD_CMD_WRITE, 32 * MiB), (NbdCmd.NBD_CMD_WRITE, 8 * MiB),
        (NbdCmd.NBD_CMD_READ, 32 * MiB), (NbdCmd.NBD_CMD_READ, 8 * MiB)]


def test_replies_out_of_order_are_matched_by_cookie(sock_path, servers):
    def reverse(self, conn):
        taken = [self.request(conn) for _ in range(8)]
        for request in reversed(taken):
            conn.sendall(self.answer(request))
        self.honest(conn)
    server, backend = backend_for(sock_path, servers, reverse)
    for i in range(8):
        server.disk[i * 512:(i + 1) * 512] = bytes([i]) * 512
    bufs = [bytearray(512) for _ in range(8)]
    assert backend.execute([BlockRequest(BlockOp.READ, i * 512, 512, [memoryview(b)])
                            for i, b in enumerate(bufs)]) == [0] * 8
    assert bufs == [bytearray([i]) * 512 for i in range(8)]


def test_a_server_that_answers_before_reading_everything_does_not_deadlock(sock_path, servers):
    """Reads and writes of 8 MiB each, more than the socket buffers hold both ways: a client
    that sent everything before reading anything would wait forever on a server that
    answers each request before reading the next (this one)."""
    server, backend = backend_for(sock_path, servers, size=160 * MiB)
    server.disk[:] = bytes(range(256)) * (len(server.disk) // 256)
    data = bytearray(b"w" * (8 * MiB))
    reads = [bytearray(8 * MiB) for _ in range(8)]
    batch = []
    for i in range(8):
        batch.append(BlockRequest(BlockOp.READ, i * 16 * MiB, 8 * MiB, [memoryview(reads[i])]))
        batch.append(BlockRequest(BlockOp.WRITE, i * 16 * MiB + 8 * MiB, 8 * MiB,
                                  [memoryview(data)]))
    assert backend.execute(batch) == [0] * 16
    assert all(r == bytes(range(256)) * (8 * MiB // 256) for r in reads)
    assert server.disk[8 * MiB:16 * MiB] == data


def test_error_replies_become_errnos_and_the_backend_goes_on(sock_path, servers):
    def errors(self, conn):
        for error in (28, 1, 0xBAD):
            cmd, flags, cookie, *_ = self.request(conn)
            conn.sendall(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie))
        self.honest(conn)
    server, backend = backend_for(sock_path, servers, errors)
    assert backend.execute([_write(0)]) == [errno.ENOSPC]
    assert backend.execute([_write(0)]) == [errno.EPERM]
    # a READ that fails has no data after its reply: the stream stays in step
    assert backend.execute([_read(0)]) == [errno.EIO]
    assert backend.errors["an error value the NBD spec does not define"] == 1
    assert backend.execute([_read(0), _write(8192)]) == [0, 0]
    assert backend.failed is None


def drain(conn):
    """Read until the client hangs up (closing with unread data would reset the stream)."""
    while conn.recv(1 << 16):
        pass


def _hostile(reply, then_close=False):
    """A server that reads the first wave of the test's batch (three requests) and sends
    ``reply(first request)``: what a bad or buggy server sends; ``then_close``: and then
    closes its end."""
    def serve(self, conn):
        taken = [self.request(conn) for _ in range(3)]
        conn.sendall(reply(taken[0]))
        if then_close:
            conn.shutdown(socket.SHUT_WR)
        drain(conn)
    return serve


@pytest.mark.parametrize("reply,reason", [
    (lambda r: SIMPLE_REPLY.pack(0x12345678, 0, r[2]), "magic 0x12345678"),
    (lambda r: SIMPLE_REPLY.pack(NBD_STRUCTURED_REPLY_MAGIC, 0, r[2]), "structured reply"),
    (lambda r: SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, r[2] + 1000), "not outstanding"),
    (lambda r: SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 108, r[2]), "NBD_ESHUTDOWN"),
    (lambda r: b"", "closed the connection"),                   # hangs up at once
    (lambda r: SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, r[2]) + b"half", "closed"),
])
def test_a_protocol_error_fails_every_outstanding_request_and_the_backend_stays_failed(
        sock_path, servers, reply, reason):
    server, backend = backend_for(sock_path, servers,
                                 _hostile(reply, then_close=reason.startswith("closed")))
    batch = [_read(0), _read(4096), _write(8192), BlockRequest(BlockOp.FLUSH), _read(0)]
    results = backend.execute(batch)
    assert all(r in (errno.EIO, errno.ESHUTDOWN) for r in results) and results.count(errno.EIO) >= 4
    assert reason in backend.failed
    assert backend.errors["NBD connection failed; every request now fails with EIO"] == 1
    assert backend.execute([_read(0)]) == [errno.EIO]            # failed for good
    backend.close()


def test_a_server_that_never_answers_fails_the_batch_within_the_bound(sock_path, servers,
                                                                       monkeypatch):
    monkeypatch.setattr(nbd, "NBD_REPLY_TIMEOUT", 0.5)
    server, backend = backend_for(sock_path, servers, lambda self, conn: drain(conn))
    started = time.monotonic()
    assert backend.execute([_read(0), _write(4096)]) == [errno.EIO, errno.EIO]
    assert time.monotonic() - started < 10       # bounded (0.5 s asked; generous for noise)
    assert "no reply within 0.5 s" in backend.failed


def test_an_unknown_export_is_a_config_error_with_the_servers_message(sock_path, servers):
    servers.append(FakeNbd(sock_path, refuse=b"export 'disk0' not present"))
    with pytest.raises(ConfigError, match=r"NBD_REP_ERR_UNKNOWN: export 'disk0' not present"):
        NbdBackend(sock_path, "disk0", False).open()


def test_a_silent_server_fails_open_within_the_handshake_bound(sock_path, servers, monkeypatch):
    monkeypatch.setattr(nbd, "NBD_HANDSHAKE_TIMEOUT", 0.3)
    servers.append(FakeNbd(sock_path, mute=True))
    with pytest.raises(ConfigError, match="no handshake within 0.3 s"):
        NbdBackend(sock_path, "disk0", False).open()


def test_no_server_is_a_config_error(sock_path):
    with pytest.raises(ConfigError, match="No such file"):
        NbdBackend(sock_path, "disk0", False).open()


def test_a_read_only_export_must_be_opened_read_only(sock_path, servers):
    ro = QSD_FLAGS | F.NBD_FLAG_READ_ONLY
    servers.append(FakeNbd(sock_path, flags=ro))
    with pytest.raises(ConfigError, match="read-only; open the disk read-only"):
        NbdBackend(sock_path, "disk0", False).open()


def test_read_only_backend_never_sends_a_write(sock_path, servers):
    server, backend = backend_for(sock_path, servers, read_only=True)
    assert (backend.supports_discard, backend.supports_write_zeroes) == (False, False)
    assert backend.execute([_write(0), _read(0), BlockRequest(BlockOp.WRITE_ZEROES, 0, 512)]) == [
        errno.EROFS, 0, errno.EROFS]
    assert [r[0] for r in server.requests] == [NbdCmd.NBD_CMD_READ]


def test_close_sends_disc_and_a_closed_backend_fails_requests(sock_path, servers):
    server, backend = backend_for(sock_path, servers)
    backend.close()
    backend.close()                              # idempotent
    assert backend.execute([_read(0)]) == [errno.EIO]
    assert server.disconnected.wait(10)
    assert not server.server.errors
