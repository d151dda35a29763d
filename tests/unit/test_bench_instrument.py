"""The benchmark's instrument (bench/common.py): per-thread CPU attribution from
fabricated /proc lines, the host's stream check, the guest's word hash, placement."""

from __future__ import annotations

import pytest

import teststream
from bench.common import (Placement, StreamCheck, ThreadCpu, WorkloadFailed, cpu_delta,
                          parse_stat, stream_whash, whash)

TICK = 100


def stat_line(tid: int, comm: str, utime: int, stime: int, gtime: int) -> str:
    """A /proc/<pid>/task/<tid>/stat line (proc(5)): fields 14, 15 and 43 set, the rest 0."""
    fields = ["S"] + ["0"] * 49                 # fields 3..52
    fields[14 - 3], fields[15 - 3], fields[43 - 3] = str(utime), str(stime), str(gtime)
    return f"{tid} ({comm}) " + " ".join(fields) + "\n"


def snap(*threads, sched=None):
    """{tid: ThreadCpu} from (tid, comm, utime, stime, gtime) tuples, optionally schedstat ns."""
    out = {}
    for i, (tid, comm, u, s, g) in enumerate(threads):
        ss = f"{sched[i]} 0 0\n" if sched is not None else None
        out[tid] = parse_stat(stat_line(tid, comm, u, s, g), ss, tick=TICK)
    return out


def test_parse_stat_counts_fields_from_the_last_parenthesis():
    t = parse_stat(stat_line(9, "CPU 0/KVM", 250, 30, 240), None, tick=TICK)
    assert t == ThreadCpu("CPU 0/KVM", 2.5, 0.3, 2.4, None)
    odd = parse_stat(stat_line(9, "a) (b", 1, 2, 3), "1500000000 7 8\n", tick=TICK)
    assert (odd.comm, odd.user, odd.system, odd.guest, odd.run) == ("a) (b", 0.01, 0.02, 0.03, 1.5)
    assert parse_stat(stat_line(9, "x", 1, 0, 0), "0 0 0\n", tick=TICK).run is None   # not kept


def test_pvm_guest_time_above_utime_does_not_cancel_the_io_thread():
    # seen on PVM: the vCPU thread's guest_time exceeds its utime; the old formula
    # (sum of utime - sum of guest_time + stime) cancelled the I/O thread's work to 0
    before = snap((1, "python", 100, 10, 0), (2, "pyvmm-vsock", 0, 0, 0),
                  (3, "pyvmm-vcpu0", 0, 0, 0))
    after = snap((1, "python", 100, 10, 0), (2, "pyvmm-vsock", 30, 20, 0),
                 (3, "pyvmm-vcpu0", 100, 0, 160))
    d = cpu_delta(before, after)
    assert d["vmm"] == pytest.approx(0.5)             # the I/O thread's 30 + 20 ticks
    assert d["vcpu"] == pytest.approx(1.0)
    assert d["total"] == pytest.approx(1.5)
    assert d["guest"] == pytest.approx(1.0)           # capped at the thread's own CPU time
    assert d["vcpu_exits"] == pytest.approx(0.0)


def test_hardware_kvm_split_of_the_vcpu_thread():
    before = snap((5, "CPU 0/KVM", 0, 0, 0), (6, "qemu-system-x86", 0, 0, 0))
    after = snap((5, "CPU 0/KVM", 100, 40, 70), (6, "qemu-system-x86", 20, 10, 0))
    d = cpu_delta(before, after)
    assert d["vmm"] == pytest.approx(0.3)
    assert d["vcpu"] == pytest.approx(1.4)
    assert d["guest"] == pytest.approx(0.7)
    assert d["vcpu_exits"] == pytest.approx(0.7)      # utime - guest_time + stime


def test_schedstat_run_time_is_preferred_and_threads_born_late_count_from_zero():
    before = snap((1, "pyvmm-vcpu0", 10, 0, 10), sched=[100_000_000])
    after = snap((1, "pyvmm-vcpu0", 20, 0, 25), (2, "pyvmm-vsock", 1, 0, 0),
                 sched=[250_000_000, 12_345_678])
    d = cpu_delta(before, after)
    assert d["vcpu"] == pytest.approx(0.15)           # ns, not ticks
    assert d["vmm"] == pytest.approx(0.012345678)
    assert d["guest"] == pytest.approx(0.15)          # 0.15 s of guest ticks, capped at 0.15


def test_a_counter_going_backwards_is_not_negative_cpu():
    before = snap((1, "python", 10, 10, 0))
    after = snap((1, "python", 9, 10, 0))
    assert cpu_delta(before, after)["vmm"] == 0.0


def test_word_hash_matches_the_header_s_python_and_the_guest():
    M = (1 << 64) - 1

    def reference(data):                          # guest/freestanding/teststream.h
        h = 0xCBF29CE484222325
        data = bytes(data) + bytes(-len(data) % 8)
        for i in range(0, len(data), 8):
            h = (h + int.from_bytes(data[i:i + 8], "little")) * 0x100000001B3 & M
        return h

    for n in (0, 1, 7, 8, 9, 4096, 10_001):
        data = teststream.stream(n)
        assert whash(data) == reference(data) == teststream.whash(data)
    # printed by the guest's stream-cost scenario for these lengths
    assert stream_whash(1_000_003) == 0xB97D145304213801
    flipped = bytearray(teststream.stream(10_001))
    flipped[5000] ^= 0x80
    assert whash(flipped) != whash(teststream.stream(10_001))


@pytest.mark.parametrize("verify", ["word", "full"])
def test_stream_check_accepts_the_stream_in_any_pieces(verify):
    data = teststream.stream(100_000)
    check = StreamCheck(verify, len(data), "t")
    for a, b in ((0, 1), (1, 4097), (4097, 70_000), (70_000, 100_000)):
        check.feed(memoryview(data)[a:b])
    assert check.offset == 100_000
    assert check.checked == (100_000 if verify == "full" else 1 + 32 * 3)


def test_stream_check_finds_what_it_looks_at():
    data = bytearray(teststream.stream(8192))
    data[4000] ^= 1
    with pytest.raises(WorkloadFailed, match="byte 4000 is"):
        StreamCheck("full", 8192, "t").feed(memoryview(data))
    # the sample is the first and last 16 bytes of each read: a read starting at
    # 3990 sees it, and so does one ending at 4010; one from 3000 to 5000 does not
    word = StreamCheck("word", 8192, "t")
    word.feed(memoryview(data)[:3990])
    with pytest.raises(WorkloadFailed, match="byte 4000 is"):
        word.feed(memoryview(data)[3990:])
    word = StreamCheck("word", 8192, "t")
    with pytest.raises(WorkloadFailed, match="byte 4000 is"):
        word.feed(memoryview(data)[:4010])
    word = StreamCheck("word", 8192, "t")
    word.feed(memoryview(data)[:3000])
    word.feed(memoryview(data)[3000:5000])               # sampled, not checked: the cheap mode
    assert word.checked == 64
    with pytest.raises(WorkloadFailed, match="more than the 10 sent"):
        StreamCheck("word", 10, "t").feed(memoryview(bytes(11)))


def test_default_placement():
    p = Placement.default({0, 1})
    assert p.label() == "vCPU 0, I/O 1, client 1"
    assert p.pyvmm_args() == ["--vcpu-affinity", "0", "--io-affinity", "1"]
    assert p.as_dict() == {"vcpu": "0", "io": "1", "client": "1"}
    assert Placement.default({3, 5, 7}).label() == "vCPU 3, I/O 5, client 5"
    one = Placement.default({0})
    assert not one.pinned and one.label() == "unpinned" and one.pyvmm_args() == []


def test_qemu_blk_runs_the_same_guest_and_loads_with_no_nic_and_no_vsock(tmp_path):
    from pathlib import Path

    from bench.common import qemu_blk_argv
    from bench.runner import _rows
    from bench.workloads import METRICS, load_all
    from bench.workloads.blk import LOADS

    argv = qemu_blk_argv(Path("/g.elf"), "blk-load mode=seqread bs=4096 mb=8", tmp_path / "d.raw")
    assert argv[argv.index("-nic") + 1] == "none" and "-nodefaults" in argv
    assert not any("vsock" in a or "netdev" in a for a in argv)
    assert argv[argv.index("-drive") + 1] == (f"file={tmp_path / 'd.raw'},if=none,id=d0,"
                                               "format=raw,cache=writeback,aio=threads")
    assert argv[argv.index("-device") + 1] == "virtio-blk-device,drive=d0"
    assert argv[argv.index("-append") + 1] == "blk-load mode=seqread bs=4096 mb=8"

    names = {w.name for w in load_all()}
    assert {"pyvmm-blk", "qemu-blk"} <= names
    rows = {r.pyvmm: r.qemu for title, rows, *_ in _rows() if "virtio-blk" in title for r in rows}
    assert len(rows) == len(LOADS) == 4
    for _mode, _bs, name, unit in LOADS:
        mine, peer = f"pyvmm.blk.{name}", f"qemu.blk.{name}"
        assert rows[mine] == peer
        assert METRICS[mine].unit == METRICS[peer].unit == unit
