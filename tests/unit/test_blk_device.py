"""BlkDevice end to end: MockDriver as the guest, a raw image in tmp_path as the disk.

Every request type, as Linux lays it out and framed otherwise; read-only disks;
the hostile requests of SECURITY.md's table, each answered, counted, and the
image untouched; one backend call per wake-up.  No KVM, no I/O thread.
"""

from __future__ import annotations

import errno
import os

import pytest

from blk_guest import (IMAGE_SIZE, T, BlkGuest, RecordingBackend, file_hash, hdr, make_image,
                       raw_guest, segment)
from pyvmm.blk.backend import BlockOp
from pyvmm.blk.device import (BATCH, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS,
                              MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, SEG_MAX, SIZE_MAX)
from pyvmm.blk.raw import RawBackend
from pyvmm.blk.wire import VIRTIO_BLK_CONFIG, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, VirtioBlkFeature
from pyvmm.errors import ConfigError
from pyvmm.virtio.device import VirtioFeature, feature_mask

F = VirtioBlkFeature
OK, IOERR, UNSUPP = 0, 1, 2
SECTORS = IMAGE_SIZE // 512
CFG = {name: VIRTIO_BLK_CONFIG.fields[name][1] for name in VIRTIO_BLK_CONFIG.names}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    make_image(path)
    return path


@pytest.fixture
def guest(image):
    g = raw_guest(image, serial="pyvmm-disk-0")
    yield g
    g.close()


def test_config_layout_is_linuxs():
    """struct virtio_blk_config up to write_zeroes_may_unmap: Linux's offsets."""
    assert VIRTIO_BLK_CONFIG.itemsize == 60
    assert (CFG["capacity"], CFG["size_max"], CFG["seg_max"], CFG["blk_size"], CFG["writeback"],
            CFG["num_queues"], CFG["max_discard_sectors"], CFG["max_write_zeroes_seg"],
            CFG["write_zeroes_may_unmap"]) == (0, 8, 12, 20, 32, 34, 36, 52, 56)


def test_probe_features_and_config(guest):
    offered = guest.drv.device_features
    for bit in (F.VIRTIO_BLK_F_SIZE_MAX, F.VIRTIO_BLK_F_SEG_MAX, F.VIRTIO_BLK_F_BLK_SIZE,
                F.VIRTIO_BLK_F_FLUSH, F.VIRTIO_BLK_F_DISCARD, F.VIRTIO_BLK_F_WRITE_ZEROES,
                VirtioFeature.VIRTIO_F_VERSION_1, VirtioFeature.VIRTIO_F_EVENT_IDX,
                VirtioFeature.VIRTIO_F_INDIRECT_DESC):
        assert offered >> bit & 1, bit
    assert not offered >> F.VIRTIO_BLK_F_RO & 1
    assert not offered >> F.VIRTIO_BLK_F_MQ & 1
    assert guest.transport.read(0x008, 4) == (2).to_bytes(4, "little")        # VIRTIO_ID_BLOCK
    assert guest.drv.mmio_read(0x034) == QUEUE_SIZE
    assert guest.config(CFG["capacity"], 8) == SECTORS
    assert guest.config(CFG["size_max"], 4) == SIZE_MAX
    assert guest.config(CFG["seg_max"], 4) == SEG_MAX
    assert guest.config(CFG["blk_size"], 4) == 512
    assert guest.config(CFG["max_discard_sectors"], 4) == MAX_DISCARD_SECTORS
    assert guest.config(CFG["max_discard_seg"], 4) == MAX_DISCARD_SEG
    assert guest.config(CFG["max_write_zeroes_sectors"], 4) == MAX_WRITE_ZEROES_SECTORS
    assert guest.config(CFG["max_write_zeroes_seg"], 4) == MAX_WRITE_ZEROES_SEG
    assert guest.config(CFG["write_zeroes_may_unmap"], 1) == 1


@pytest.mark.parametrize("segments, indirect", [(1, False), (3, False), (8, True)])
def test_read_returns_the_image_bytes(guest, image, segments, indirect):
    data = image.read_bytes()
    status, used_len, got = guest.read(10, 4096, segments, indirect=indirect)
    assert (status, used_len) == (OK, 4097)
    assert got == data[10 * 512:10 * 512 + 4096]
    assert guest.dev.counters()["bytes_read"] == 4096


@pytest.mark.parametrize("segments, indirect", [(1, False), (4, True)])
def test_write_reaches_the_file(guest, image, segments, indirect):
    before = image.read_bytes()
    payload = os.urandom(8192)
    assert guest.write(SECTORS - 16, payload, segments, indirect=indirect) == (OK, 1)
    after = image.read_bytes()
    assert after[-8192:] == payload and after[:-8192] == before[:-8192]
    assert guest.read(SECTORS - 16, 8192)[2] == payload


def test_header_and_status_framed_any_way_are_understood(guest, image):
    """§2.6.4: the header split over two descriptors, the status byte in the same
    descriptor as the data it follows."""
    data = image.read_bytes()
    h = hdr(T.VIRTIO_BLK_T_IN, 4)
    guest.submit([h[:5], h[5:]], [100, 412 + 1])
    status, used_len, got = guest.one()
    assert (status, used_len, got[:512]) == (OK, 513, data[2048:2560])
    payload = os.urandom(1024)
    guest.submit([h[:0] + hdr(T.VIRTIO_BLK_T_OUT, 6) + payload[:7], payload[7:]], [1])
    assert guest.one()[:2] == (OK, 1)
    assert image.read_bytes()[3072:4096] == payload


def test_flush_reaches_the_backend_in_order(guest):
    guest.write(0, b"\1" * 512)
    assert guest.request(T.VIRTIO_BLK_T_FLUSH)[:2] == (OK, 1)
    assert guest.backend.ops == [BlockOp.WRITE, BlockOp.FLUSH]
    assert guest.dev.counters()["write_through_flushes"] == 0      # FLUSH negotiated


def test_flush_calls_fdatasync(image, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    g = raw_guest(image, record=False)
    try:
        assert g.request(T.VIRTIO_BLK_T_FLUSH)[:2] == (OK, 1)
        assert calls == [g.backend.fd]
    finally:
        g.close()


def test_without_flush_negotiated_writes_are_write_through(image):
    """§5.2.6.2 case 1: FLUSH offered, not negotiated: a write is stable when completed."""
    features = feature_mask(VirtioFeature.VIRTIO_F_VERSION_1)
    g = raw_guest(image, features=features)
    try:
        g.submit([hdr(T.VIRTIO_BLK_T_OUT, 0), b"\2" * 512], [1], kick=False)
        g.submit([hdr(T.VIRTIO_BLK_T_IN, 0)], [512, 1])
        assert [a[0] for a in g.answers()] == [OK, OK]
        assert g.backend.batches == [[(BlockOp.WRITE, 0, 512, False), (BlockOp.READ, 0, 512, False),
                                      (BlockOp.FLUSH, 0, 0, False)]]
        assert g.dev.counters()["write_through_flushes"] == 1
    finally:
        g.close()


@pytest.mark.parametrize("serial, expected", [
    ("pyvmm-disk-0", b"pyvmm-disk-0" + b"\0" * 8),
    ("A" * 20, b"A" * 20),                  # exactly 20: no NUL terminator
    (None, b"\0" * 20),
])
def test_get_id(image, serial, expected):
    g = raw_guest(image, serial=serial)
    try:
        status, used_len, data = g.request(T.VIRTIO_BLK_T_GET_ID, in_bytes=20)
        assert (status, used_len, data[:20]) == (OK, 21, expected)
    finally:
        g.close()


@pytest.mark.parametrize("serial", ["A" * 21, "caf\u00e9", "tab\there"])
def test_bad_serial_is_a_config_error(image, serial):
    backend = RawBackend(str(image))
    with pytest.raises(ConfigError, match="at most 20 printable ASCII"):
        BlkGuest(backend, serial=serial)


def test_discard_and_write_zeroes_reach_the_backend(guest, image):
    status = guest.request(T.VIRTIO_BLK_T_DISCARD, segment(8, 16) + segment(100, 8))[0]
    assert status == OK
    status = guest.request(T.VIRTIO_BLK_T_WRITE_ZEROES,
                           segment(200, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) + segment(300, 1))[0]
    assert status == OK
    assert guest.backend.batches == [
        [(BlockOp.DISCARD, 8 * 512, 16 * 512, False), (BlockOp.DISCARD, 100 * 512, 8 * 512, False)],
        [(BlockOp.WRITE_ZEROES, 200 * 512, 8 * 512, True), (BlockOp.WRITE_ZEROES, 300 * 512, 512, False)]]
    data = image.read_bytes()
    assert data[200 * 512:208 * 512] == bytes(4096) and data[300 * 512:301 * 512] == bytes(512)
    assert guest.read(8, 8192)[2] == image.read_bytes()[8 * 512:8 * 512 + 8192]


def _fd_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return int(next(l for l in f if l.startswith("flags:")).split()[1], 8)


def test_read_only_disk_refuses_writes_and_is_never_opened_for_writing(image):
    before = file_hash(image)
    g = raw_guest(image, read_only=True)
    try:
        assert _fd_flags(g.backend.inner.fd) & os.O_ACCMODE == os.O_RDONLY
        offered = g.drv.device_features
        assert offered >> F.VIRTIO_BLK_F_RO & 1
        assert not offered >> F.VIRTIO_BLK_F_DISCARD & 1 and not offered >> F.VIRTIO_BLK_F_WRITE_ZEROES & 1
        assert g.write(0, b"\3" * 512) == (IOERR, 1)
        assert g.request(T.VIRTIO_BLK_T_DISCARD, segment(0, 8))[:2] == (IOERR, 1)
        assert g.request(T.VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 8))[:2] == (IOERR, 1)
        assert g.read(0, 512)[0] == OK
        assert g.request(T.VIRTIO_BLK_T_FLUSH)[0] == OK
        assert g.dev.counters()["read_only_refusals"] == 3
        assert g.backend.ops == [BlockOp.READ, BlockOp.FLUSH]
    finally:
        g.close()
    assert file_hash(image) == before


def _many_segments():
    """An OUT whose 256-entry indirect table holds SEG_MAX + 1 data pieces: the header
    shares its descriptor with the first one."""
    return [hdr(T.VIRTIO_BLK_T_OUT, 0) + b"\0" * 512] + [b"\0" * 512] * SEG_MAX, [1]


HOSTILE = {
    # name: (readable, writable, indirect, expected status, reason counted)
    "sector beyond the end": ([hdr(T.VIRTIO_BLK_T_IN, SECTORS)], [512, 1], False, IOERR,
                              "sector range beyond the end of the disk"),
    "range crossing the end": ([hdr(T.VIRTIO_BLK_T_OUT, SECTORS - 1), b"\0" * 1024], [1], False, IOERR,
                               "sector range beyond the end of the disk"),
    "u64 sector wrapping": ([hdr(T.VIRTIO_BLK_T_OUT, 2**64 - 1), b"\0" * 1024], [1], False, IOERR,
                            "sector range beyond the end of the disk"),
    "short header": ([hdr(T.VIRTIO_BLK_T_IN, 0)[:15]], [512, 1], False, IOERR,
                     "request header shorter than 16 bytes"),
    "status descriptor read-only": ([hdr(T.VIRTIO_BLK_T_OUT, 0), b"\0" * 512, b"\0"], [], False, None,
                                    "request without a device-writable status byte (returned unanswered)"),
    "IN data device-readable": ([hdr(T.VIRTIO_BLK_T_IN, 0), b"\0" * 512], [1], False, IOERR,
                                "IN request with device-readable data"),
    "OUT data device-writable": ([hdr(T.VIRTIO_BLK_T_OUT, 0)], [512, 1], False, IOERR,
                                 "OUT request with device-writable data besides the status"),
    "data not whole sectors": ([hdr(T.VIRTIO_BLK_T_OUT, 0), b"\0" * 100], [1], False, IOERR,
                               "IN/OUT data empty or not a multiple of 512 bytes"),
    "no data": ([hdr(T.VIRTIO_BLK_T_IN, 0)], [1], False, IOERR,
                "IN/OUT data empty or not a multiple of 512 bytes"),
    "too many segments": (*_many_segments(), True, IOERR,
                          f"IN/OUT with more than seg_max ({SEG_MAX}) data segments"),
    "segment larger than size_max": ([hdr(T.VIRTIO_BLK_T_IN, 0)], [2 * SIZE_MAX, 1], False, IOERR,
                                     f"IN/OUT data segment larger than size_max ({SIZE_MAX})"),
    "unknown type": ([hdr(3, 0)], [1], False, UNSUPP, "unsupported request type (VIRTIO_BLK_S_UNSUPP)"),
    "GET_ID buffer too short": ([hdr(T.VIRTIO_BLK_T_GET_ID)], [19, 1], False, IOERR,
                                "GET_ID buffer shorter than 20 bytes"),
    "FLUSH with data": ([hdr(T.VIRTIO_BLK_T_FLUSH), b"\0" * 512], [1], False, IOERR, "FLUSH request with data"),
    "discard crossing the end": ([hdr(T.VIRTIO_BLK_T_DISCARD), segment(SECTORS - 8, 16)], [1], False, IOERR,
                                 "sector range beyond the end of the disk"),
    "discard with unmap": ([hdr(T.VIRTIO_BLK_T_DISCARD), segment(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
                           [1], False, UNSUPP,
                           "DISCARD segment with an unknown or forbidden flag (VIRTIO_BLK_S_UNSUPP)"),
    "write zeroes unknown flag": ([hdr(T.VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 8, 2)], [1], False, UNSUPP,
                                  "WRITE_ZEROES segment with an unknown or forbidden flag "
                                  "(VIRTIO_BLK_S_UNSUPP)"),
    "too many discard segments": ([hdr(T.VIRTIO_BLK_T_DISCARD),
                                   b"".join(segment(i, 1) for i in range(MAX_DISCARD_SEG + 1))],
                                  [1], False, IOERR, "DISCARD with more segments than advertised"),
    "discard payload not whole segments": ([hdr(T.VIRTIO_BLK_T_DISCARD), segment(0, 8)[:12]], [1], False,
                                           IOERR, "DISCARD payload is not whole 16-byte segments"),
    "write zeroes segment too long": ([hdr(T.VIRTIO_BLK_T_WRITE_ZEROES),
                                       segment(0, MAX_WRITE_ZEROES_SECTORS + 1)], [1], False, IOERR,
                                      "WRITE_ZEROES segment longer than advertised"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_request_is_answered_counted_and_leaves_the_image_untouched(image, case):
    readable, writable, indirect, status, reason = HOSTILE[case]
    before = file_hash(image)
    g = raw_guest(image)
    try:
        g.submit(readable, writable, indirect=indirect)
        got_status, used_len, _ = g.one()
        if status is None:
            assert used_len == 0 and g.dev.counters()["chains_unanswered"] == 1
        else:
            assert (got_status, used_len) == (status, 1)
        errors = g.dev.counters()["guest_errors_by_reason"]
        assert errors == {reason: 1}, errors
        assert all(op is not BlockOp.WRITE for op in g.backend.ops)
        # the device keeps serving
        assert g.read(0, 512)[:2] == (OK, 513)
    finally:
        g.close()
    assert file_hash(image) == before


def test_a_bad_request_is_logged_once_and_counted_every_time(guest, caplog):
    for _ in range(3):
        guest.submit([hdr(T.VIRTIO_BLK_T_IN, SECTORS)], [512, 1])
    assert [a[0] for a in guest.answers()] == [IOERR] * 3
    assert guest.dev.counters()["guest_errors_by_reason"] == {"sector range beyond the end of the disk": 3}
    assert sum("beyond the end" in r.getMessage() for r in caplog.records) == 1


def test_discard_not_negotiated_is_unsupported(image):
    features = feature_mask(VirtioFeature.VIRTIO_F_VERSION_1, F.VIRTIO_BLK_F_FLUSH)
    g = raw_guest(image, features=features)
    try:
        assert g.request(T.VIRTIO_BLK_T_DISCARD, segment(0, 8))[:2] == (UNSUPP, 1)
        assert g.backend.ops == []
    finally:
        g.close()


def test_a_batch_of_many_requests_is_one_backend_call_and_one_interrupt(guest, image):
    data = image.read_bytes()
    n = 100
    for i in range(n):
        guest.submit([hdr(T.VIRTIO_BLK_T_IN, i)], [512, 1], kick=False, indirect=True)
    irqs = guest.irqs
    guest.q.kick(force=True)
    answers = guest.answers()
    assert [(s, l) for s, l, _ in answers] == [(OK, 513)] * n
    assert [d[:512] for _, _, d in answers] == [data[i * 512:(i + 1) * 512] for i in range(n)]
    assert len(guest.backend.batches) == 1 and len(guest.backend.batches[0]) == n
    assert guest.irqs - irqs == 1


def test_after_a_full_batch_the_device_comes_back_by_itself(image):
    """A turn ends after BATCH chains with notifications still off; the rescheduled
    turn serves what the driver added meanwhile without a kick."""
    g = raw_guest(image)
    try:
        for i in range(BATCH):
            g.submit([hdr(T.VIRTIO_BLK_T_IN, i)], [512, 1], kick=False, indirect=True)
        g.q.kick(force=True)
        assert len(g.answers()) == BATCH
        for i in range(10):
            g.submit([hdr(T.VIRTIO_BLK_T_IN, i)], [512, 1], kick=False, indirect=True)
        assert g.loop.run_once(0) == 1
        assert [a[0] for a in g.answers()] == [OK] * 10
        assert [len(b) for b in g.backend.batches] == [BATCH, 10]
    finally:
        g.close()


def test_backend_errors_are_ioerr_and_counted(image):
    backend = RawBackend(str(image))
    backend.open()
    rec = RecordingBackend(backend, fail={BlockOp.READ: errno.EIO})
    g = BlkGuest(rec)
    try:
        assert g.read(0, 512)[:2] == (IOERR, 1)
        assert g.write(0, b"\4" * 512) == (OK, 1)
        c = g.dev.counters()
        assert c["backend_errors"] == 1 and c["host_errors_by_reason"] == {"image I/O failed": 1}
    finally:
        g.close()


def test_a_backend_that_raises_fails_the_batch_not_the_loop(image):
    backend = RawBackend(str(image))
    backend.open()
    g = BlkGuest(RecordingBackend(backend, raise_exc=RuntimeError("bug")))
    try:
        assert g.read(0, 512)[:2] == (IOERR, 1)
        assert g.dev.counters()["host_errors_by_reason"] == {"backend raised": 1, "image I/O failed": 1}
        assert g.loop.callback_errors == {}
    finally:
        g.close()


def test_reset_and_probe_again(guest, image):
    assert guest.read(0, 512)[0] == OK
    guest.drv.reset()
    assert guest.dev.counters()["device_resets"] == 1
    assert guest.drv.probe(1)
    guest.q = guest.drv.queues[0]
    assert guest.read(1, 512)[2] == image.read_bytes()[512:1024]


def test_close_closes_the_backend_once(image):
    g = raw_guest(image)
    g.close()
    g.dev.close()
    assert g.backend.closed == 1
