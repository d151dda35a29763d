"""Bad requests give one clear line and exit status 2, never a traceback.

Most cases fail before /dev/kvm is opened, so they run anywhere; the ones
that need KVM's own limits are marked ``kvm``.
"""

import argparse
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from harness import host_processes
from pyvmm import cli
from pyvmm.errors import KvmError


def pyvmm(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "pyvmm", "-q", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture
def elf(tmp_path):
    """A tiny valid PVH ELF (never run: these tests stop before KVM_RUN)."""
    from test_boot import make_elf
    p = tmp_path / "guest.elf"
    p.write_bytes(make_elf([(0x100000, b"\xf4", 1)], 0x100000, pvh_entry=0x100000))
    return str(p)


@pytest.mark.parametrize("args,fragment", [
    (["--kernel", "/nonexistent/vmlinux"], "does not exist"),
    (["--kernel", "/"], "is a directory"),
    (["--kernel", "/etc/hostname"], "too short"),
    (["--kernel", "/bin/sh"], "not an executable (ET_EXEC)"),
    (["--kernel", "/etc/passwd", "--mem", "1M"], "--mem 1 MiB is out of range"),
    (["--kernel", "/etc/passwd", "--mem", "8G"], "out of range"),
    (["--kernel", "/etc/passwd", "--cpus", "0"], "at least one vCPU"),
    (["--kernel", "/etc/passwd", "--vcpu-affinity", "0-"], "--vcpu-affinity '0-': expected CPU"),
    (["--kernel", "/etc/passwd", "--io-affinity", "1-0"], "range 1-0 ends before it starts"),
    (["--kernel", "/etc/passwd", "--io-affinity", "4095"], "CPU 4095 is not available"),
    (["--kernel", "/etc/passwd", "--vcpu-affinity", ""], "--vcpu-affinity '': expected CPU"),
])
def test_bad_requests(args, fragment):
    assert_one_line_error(pyvmm("run", *args), fragment)


def test_not_a_kernel(tmp_path):
    p = tmp_path / "zeros"
    p.write_bytes(bytes(8192))
    assert_one_line_error(pyvmm("run", "--kernel", str(p)), "neither an ELF vmlinux nor a bzImage")


def test_truncated_bzimage(tmp_path):
    from test_boot import make_bzimage
    p = tmp_path / "bzImage"
    p.write_bytes(make_bzimage()[:0x230])
    assert_one_line_error(pyvmm("run", "--kernel", str(p)), "truncated")


def test_missing_and_oversized_initrd(tmp_path, elf):
    assert_one_line_error(pyvmm("run", "--kernel", elf, "--initrd", str(tmp_path / "no")),
                          "does not exist")
    big = tmp_path / "big.cpio"
    big.write_bytes(b"\0" * (20 << 20))
    assert_one_line_error(pyvmm("run", "--kernel", elf, "--initrd", str(big), "--mem", "16M"),
                          "does not fit")


@pytest.mark.parametrize("args", [["--mem", "lots"], ["--timeout", "-1"], ["--cpus", "two"]])
def test_argument_syntax_errors_exit_2(args, elf):
    proc = pyvmm("run", "--kernel", elf, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "invalid" in proc.stderr


@pytest.mark.parametrize("err,fragment", [(errno.ENOENT, "No such file"),
                                          (errno.EACCES, "Permission denied")])
def test_no_kvm_or_no_permission(monkeypatch, capsys, elf, err, fragment):
    def no_kvm(*a, **k):
        raise KvmError("open /dev/kvm", err)
    monkeypatch.setattr("pyvmm.machine.Kvm", no_kvm)
    monkeypatch.setattr(cli, "_setup_logging", lambda *a: None)   # leave pytest's logging alone
    assert cli.main(["-q", "run", "--kernel", elf]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith("pyvmm: error: cannot use KVM") and fragment in line


def test_sizes():
    assert cli.parse_size("64M") == 64 << 20
    assert cli.parse_size("1G") == 1 << 30
    assert cli.parse_size("65536K") == 64 << 20
    assert cli.parse_size("128") == 128 << 20
    assert cli.parse_size("2GiB") == 2 << 30


@pytest.mark.kvm
def test_too_many_cpus(elf):
    assert_one_line_error(pyvmm("run", "--kernel", elf, "--cpus", "999"), "out of range")


@pytest.mark.kvm
def test_vsock_uds_path_in_use(elf, tmp_path):
    """The Unix backend binds while the machine is built: a path another
    program listens on is a bad request, and that program keeps its socket."""
    import socket
    path = str(tmp_path / "v.sock")
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    other.listen()
    try:
        assert_one_line_error(pyvmm("run", "--kernel", elf, "--vsock", f"3,uds={path}"),
                              "is in use by another listener")
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(path)
        probe.close()
    finally:
        other.close()


def test_vsock_window_option():
    assert cli.parse_vsock("3,uds=/tmp/v.sock,buf=1M").conn_buf_size == 1 << 20
    assert cli.parse_vsock("3,buf=128").conn_buf_size == 128 << 10       # KiB by default
    assert cli.parse_vsock("3").conn_buf_size is None                   # the device's default
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_vsock("3,buf=lots")


@pytest.mark.kvm
def test_vsock_window_out_of_range(elf):
    assert_one_line_error(pyvmm("run", "--kernel", elf, "--vsock", "3,buf=4K"),
                          "vsock connection window")


def test_vsock_proto_and_pairs_options():
    cfg = cli.parse_vsock("3,uds=/tmp/v.sock,proto=rfc2013,pairs=4")
    assert (cfg.proto, cfg.pairs) == ("rfc2013", 4)
    assert cli.parse_vsock("3,proto=rfc2013").pairs is None          # one per vCPU
    assert cli.parse_vsock("3").proto == "virtio"


@pytest.mark.parametrize("spec, message", [
    ("3,proto=rfc2014", "unknown proto 'rfc2014'"),
    ("3,proto=rfc2013,pairs=0", "pairs must be 1 .. 16"),
    ("3,proto=rfc2013,pairs=17", "pairs must be 1 .. 16"),
    ("3,pairs=2", "pairs= needs proto=rfc2013"),
])
def test_vsock_proto_and_pairs_errors_are_one_line_and_exit_2(spec, message):
    result = pyvmm("run", "--kernel", "/nonexistent", "--vsock", spec)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert message in result.stderr.strip().splitlines()[-1], result.stderr      # after argparse's usage


def echo_guest(uds, *options, timeout="60", scenario="vsock-echo-server port=1234 conns=1", **popen):
    """``pyvmm run`` of the freestanding guest's echo server (one connection, or as
    ``scenario`` says) on ``uds``, as a process; returns once the guest listens on port
    1234.  ``options`` go to ``pyvmm run``."""
    from pyvmm import images
    proc = subprocess.Popen([sys.executable, "-m", "pyvmm", "run", "--kernel",
                             str(images.freestanding_guest()), "--vsock", f"3,uds={uds}",
                             "--timeout", timeout, *options,
                             "--cmdline", scenario],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            **popen)
    for line in proc.stdout:
        if b"vsock listening 1234" in line:
            return proc
    proc.wait()
    raise AssertionError(proc.stderr.read().decode())


def ping(uds):
    """A host connection to the echo guest (CONNECT, OK, one echo); left open."""
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(uds))
    s.sendall(b"CONNECT 1234\n")
    assert s.recv(64).startswith(b"OK ")
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    return s


def closed(s) -> bool:
    """Whether the peer of ``s`` is gone (EOF, or a reset)."""
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True


def session_members(sid: int) -> list[str]:
    """``pid (comm)`` of every process still in session ``sid``."""
    return [f"{pid} ({comm})" for pid, comm, _, session in host_processes() if session == sid]


@pytest.mark.kvm
@pytest.mark.parametrize("sig, status, name", [(signal.SIGTERM, 143, "SIGTERM"),
                                               (signal.SIGHUP, 129, "SIGHUP"),
                                               (signal.SIGINT, 130, "Ctrl-C")])
def test_termination_signals_clean_up_like_ctrl_c(tmp_path, sig, status, name, record_property):
    """What systemd, Docker and CI runners send, with a host peer mid-conversation: the
    peer sees the end, the process exits with nothing left behind -- no process of its
    session (pyvmm runs in a session of its own, so a child or grandchild that outlived
    it would still be there), no socket file -- and --metrics is written, all within 1 s
    of the signal."""
    import json
    uds, metrics = tmp_path / "v.sock", tmp_path / "m.json"
    proc = echo_guest(uds, "--metrics", str(metrics), start_new_session=True)
    try:
        peer = ping(uds)
        assert uds.exists() and os.path.exists(f"{uds}.seqpacket")
        assert [m.split()[0] for m in session_members(proc.pid)] == [str(proc.pid)]
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(10) == status, proc.stderr.read().decode()
        elapsed = time.monotonic() - t0
        assert closed(peer)
        peer.close()
    finally:
        proc.kill()
        proc.wait()
    record_property("clean_up_seconds", round(elapsed, 3))
    assert elapsed < 1.0, elapsed
    assert session_members(proc.pid) == []
    assert not uds.exists() and not os.path.exists(f"{uds}.seqpacket")
    doc = json.loads(metrics.read_text())
    assert doc["status"] == status and name in doc["reason"], doc["reason"]
    assert doc["vsock"]["host_connects"] == 1, doc["vsock"]


def stream_until_the_end(s, ended: dict, key: str) -> None:
    """Echo traffic on ``s`` (4 KiB out, what comes back in) until the connection ends;
    ``ended[key]`` is then the monotonic time the end was seen."""
    try:
        while s.send(b"x" * 4096) and s.recv(1 << 16):
            pass
    except OSError:                                     # EPIPE, ECONNRESET
        pass
    ended[key] = time.monotonic()


@pytest.mark.kvm
@pytest.mark.parametrize("how, status, reason", [
    ("triple-fault", 1, "triple fault (KVM_EXIT_SHUTDOWN)"),
    ("reset", 0, "the guest requested a reset (i8042)")])
def test_a_guest_dying_mid_transfer_ends_every_host_peer_within_1_s(tmp_path, how, status, reason,
                                                                    record_property):
    """The guest triple-faults (a crash) or resets (a reboot) while host peers on PATH and
    PATH.seqpacket are in the middle of an echo transfer: each peer sees EOF or a reset
    within 1 s of the guest's last line, and pyvmm exits with the documented status
    (ExitStatus.GUEST_CRASH 1, GUEST_RESET 0) and reason, its socket files removed."""
    import json
    import socket
    import threading
    from harness import connect_unix
    uds, metrics = tmp_path / "v.sock", tmp_path / "m.json"
    proc = echo_guest(uds, "--metrics", str(metrics),
                      scenario=f"vsock-echo-server port=1234 conns=3 die={how} after={1 << 20}")
    ended: dict[str, float] = {}
    try:
        peers = {"PATH": ping(uds),
                 "PATH.seqpacket": connect_unix(f"{uds}.seqpacket", 1234, socket.SOCK_SEQPACKET, 30)}
        streams = [threading.Thread(target=stream_until_the_end, args=(s, ended, name))
                   for name, s in peers.items()]
        for t in streams:
            t.start()
        died = None
        for line in proc.stdout:                        # the guest's console, as it comes
            if b"vsock echo: dying by" in line:
                died = time.monotonic()
                break
        assert died is not None, proc.stderr.read().decode()
        assert b"2 connections open" in line, line
        exit_status = proc.wait(10)
        exited = time.monotonic()
        for t in streams:
            t.join(10)
        for s in peers.values():
            s.close()
    finally:
        proc.kill()
        proc.wait()
    assert exit_status == status, proc.stderr.read().decode()
    lags = {name: round(t - died, 3) for name, t in ended.items()}
    record_property("peer_end_after_guest_death_s", lags)
    record_property("exit_after_guest_death_s", round(exited - died, 3))
    assert set(lags) == set(peers) and all(lag < 1.0 for lag in lags.values()), lags
    assert exited - died < 1.0, exited - died
    assert not uds.exists() and not os.path.exists(f"{uds}.seqpacket")
    doc = json.loads(metrics.read_text())
    assert doc["status"] == status and reason in doc["reason"], doc["reason"]


@pytest.mark.kvm
def test_run_raises_its_open_files_limit(tmp_path):
    """Started with the common soft limit of 1024 open files, pyvmm run raises it to
    NOFILE_WANTED (within the hard limit): 1023 vsock connections and 1024 CONNECT
    handshakes need more."""
    import resource
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard open-files limit is {hard}")
    proc = echo_guest(tmp_path / "v.sock",
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)))
    try:
        with open(f"/proc/{proc.pid}/limits") as f:
            row = next(line for line in f if line.startswith("Max open files"))
        soft_now = int(row.split()[3])
        assert soft_now == min(cli.NOFILE_WANTED, hard), row
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.kvm
def test_after_sigkill_the_host_peer_sees_the_end_and_the_next_start_reuses_the_paths(tmp_path):
    """SIGKILL cannot be cleaned up after: a host peer mid-conversation sees EOF or a reset at
    once, the socket files stay behind, and the next pyvmm on the same paths replaces them."""
    uds = tmp_path / "v.sock"
    first = echo_guest(uds)
    try:
        peer = ping(uds)
        first.kill()
        t0 = time.monotonic()
        peer.settimeout(5)
        assert closed(peer) and time.monotonic() - t0 < 1.0
        peer.close()
    finally:
        first.kill()
        first.wait()
    assert uds.exists()                                  # left behind by SIGKILL
    second = echo_guest(uds)                             # binds over the stale files
    try:
        ping(uds).close()
    finally:
        second.terminate()
        second.wait(10)


@pytest.mark.kvm
def test_when_the_guest_is_stopped_mid_conversation_the_host_peer_sees_the_end_at_once(tmp_path):
    """The watchdog (--timeout) ends a guest that is in the middle of a conversation: pyvmm
    exits 124 with its reason, and the host peer sees EOF (or a reset) within 1 s of that."""
    uds = tmp_path / "v.sock"
    proc = echo_guest(uds, timeout="3")
    try:
        peer = ping(uds)
        assert closed(peer)                              # ... once the watchdog fires
        t_end = time.monotonic()
        status = proc.wait(10)
        t_exit = time.monotonic()
        peer.close()
    finally:
        proc.kill()
        proc.wait()
    assert status == 124, proc.stderr.read().decode()
    assert t_exit - t_end < 1.0


def test_disk_option():
    disk = cli.parse_disk("/images/root.img")
    assert (disk.path, disk.read_only, disk.cache, disk.serial) == ("/images/root.img", False,
                                                                    "writeback", None)
    disk = cli.parse_disk("data.img,ro,cache=none,serial=data-1,format=qcow2")
    assert (disk.path, disk.read_only, disk.cache, disk.serial, disk.format) == \
        ("data.img", True, "none", "data-1", "qcow2")
    args = cli.build_parser().parse_args(["run", "--disk", "a.img", "--disk", "b.img,ro"])
    assert [(d.path, d.read_only) for d in args.disk] == [("a.img", False), ("b.img", True)]
    assert cli.build_parser().parse_args(["run"]).disk == []


@pytest.mark.parametrize("spec, message", [
    ("a.img,cache=unsafe", "cache must be writeback or none"),
    ("a.img,rw", "expected PATH[,ro][,cache=writeback|none][,serial=ID]"),
    (",ro", "no path"),
    ("a.img,serial", "expected PATH"),
    ("a.img,format=../x", "expected PATH"),
])
def test_disk_option_errors_are_one_line_and_exit_2(spec, message):
    result = pyvmm("run", "--kernel", "/nonexistent", "--disk", spec)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert message in result.stderr.strip().splitlines()[-1], result.stderr


@pytest.mark.kvm
def test_a_disk_in_use_or_unreadable_is_refused_with_one_line(elf, tmp_path):
    """The image is opened and locked while the machine is built: one in use by
    another process (here a pyvmm RawBackend in this process) is a bad request, and
    so is an image with a qcow2 magic that qemu-img reads as raw (a damaged header)."""
    from pyvmm.blk.raw import RawBackend
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    holder = RawBackend(str(image))
    holder.open()
    try:
        assert_one_line_error(pyvmm("run", "--kernel", elf, "--disk", str(image)),
                              "is in use by another process (QEMU-style lock on byte 201")
    finally:
        holder.close()
    qcow2 = tmp_path / "disk.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + bytes(508))
    assert_one_line_error(pyvmm("run", "--kernel", elf, "--disk", str(qcow2)),
                          "starts with the qcow2 magic but qemu-img reads it as raw"
                          if shutil.which("qemu-img") else
                          "qemu-img is not installed (Debian package qemu-utils")
    assert_one_line_error(pyvmm("run", "--kernel", elf, "--disk", str(tmp_path / "missing.img")),
                          "No such file or directory")


@pytest.mark.kvm
def test_disks_get_virtio_mmio_slots_in_flag_order(elf, tmp_path):
    """Built, never run: each --disk is a virtio-mmio device after vsock, in flag order
    (the guest's vda, vdb), announced on the kernel command line, its image locked."""
    from pyvmm import layout
    from pyvmm.machine import DiskConfig, Machine, MachineConfig, VsockConfig
    paths = []
    for name, size in (("a.img", 1 << 20), ("b.img", 2 << 20)):
        paths.append(tmp_path / name)
        paths[-1].write_bytes(bytes(size))
    config = MachineConfig(kernel=elf, vsock=VsockConfig(3),
                           disks=[DiskConfig(str(paths[0])), DiskConfig(str(paths[1]), read_only=True)])
    with Machine(config) as vm:
        assert [type(s.device).__name__ for s in vm.virtio_slots] == ["VsockDevice", "BlkDevice",
                                                                     "BlkDevice"]
        assert [d.capacity for d in vm.blk_devices] == [2048, 4096]
        assert vm.blk_devices[1].read_only
        for slot in vm.virtio_slots[1:]:
            assert f"virtio_mmio.device=4K@{slot.base:#x}:{slot.irq}" in str(vm.cmdline)
        assert vm.virtio_slots[1].base == layout.mmio_device_base(1)
        first = vm.blk_devices[0].backend
    assert first.fd == -1                   # closed with the machine


@pytest.mark.parametrize("cmdline,attached", [
    ("", True),
    ("pyvmm.run=true", True),
    ("root=/dev/vda", False),
    ('console=ttyS0 root=/dev/vdb pyvmm.run="cat /x"', False),
    ("pyvmm.run=chroot", True),          # a word that only contains "root" names no root device
])
def test_the_default_initramfs_is_attached_unless_the_cmdline_names_a_root(
        monkeypatch, tmp_path, cmdline, attached):
    """With the default kernel, ``root=`` on the cmdline means the root is a disk: the default
    initramfs, which Linux would run instead, stays out; an explicit --initrd is kept."""
    from pyvmm import images
    from pyvmm.errors import ConfigError
    seen = []

    class Recorder:
        def __init__(self, config, host):
            seen.append(config)
            raise ConfigError("recorded")

    monkeypatch.setattr(images, "default_kernel", lambda required=True: tmp_path / "vmlinux")
    monkeypatch.setattr(images, "default_initramfs", lambda required=True: tmp_path / "i.cpio")
    monkeypatch.setattr("pyvmm.machine.Machine", Recorder)
    monkeypatch.setattr(cli, "_setup_logging", lambda *a: None)
    assert cli.main(["-q", "run", "--cmdline", cmdline]) == 2
    assert seen[0].initrd == (str(tmp_path / "i.cpio") if attached else None)
    assert cli.main(["-q", "run", "--initrd", "/x.cpio", "--cmdline", cmdline]) == 2
    assert seen[1].initrd == "/x.cpio"
