"""The machine's device I/O loop (pyvmm.virtio.eventloop) shared by several virtio devices.

A machine has one EventLoop and one thread, "pyvmm-io", for all its virtio
devices.  Here two vsock devices (two probed guests, vsock_guest.Guest) and a
device that uses only the VirtioDevice defaults share one loop, as the
machine wires them: every callback of every device runs on that one thread,
and a reset of one device from a vCPU-like thread completes while the other
keeps the thread busy.  The test thread waits on events and interrupts,
never sleeps.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from pyvmm.errors import PyvmmError
from pyvmm.virtio.device import VirtioDevice
from pyvmm.virtio.eventloop import IO_THREAD_NAME, EventLoop
from vsock_guest import Guest, Op


class QuietDevice(VirtioDevice):
    """A virtio device with nothing but the machine-facing defaults."""

    device_id = 4
    queue_max_sizes = (8,)
    device_features = 1 << 32

    def activate(self, memory, queues, interrupt) -> None:
        pass

    def queue_notify(self, index: int) -> None:
        pass

    def reset(self) -> None:
        pass


@pytest.fixture
def loop():
    loop = EventLoop()
    yield loop
    loop.stop_thread()
    loop.close()


@pytest.fixture
def two_guests(loop, tmp_path):
    a = Guest(str(tmp_path / "a.sock"), cid=3, loop=loop)
    b = Guest(str(tmp_path / "b.sock"), cid=4, loop=loop)
    loop.start_thread()
    yield a, b
    loop.stop_thread()
    a.close()
    b.close()


def kick_reader(device: VirtioDevice, seen: list, fired: threading.Event) -> int:
    """An eventfd registered as the machine registers a queue's ioeventfd."""
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def cb() -> None:
        os.eventfd_read(efd)
        seen.append(threading.current_thread())
        fired.set()
    device.add_reader(efd, cb)
    return efd


def test_every_device_runs_on_the_one_io_thread(loop, two_guests):
    a, b = two_guests
    quiet = QuietDevice()
    quiet.attach_loop(loop)
    seen: list[threading.Thread] = []
    fds = []
    for dev in (a.dev, b.dev, quiet):
        fired = threading.Event()
        fds.append(kick_reader(dev, seen, fired))
        os.eventfd_write(fds[-1], 1)
        assert fired.wait(5)
    assert seen == [loop.thread] * 3 and loop.thread.name == IO_THREAD_NAME
    assert [t.name for t in threading.enumerate()].count(IO_THREAD_NAME) == 1
    for dev, fd in zip((a.dev, b.dev, quiet), fds):
        dev.remove_reader(fd)
        os.close(fd)
    quiet.close()


def test_two_devices_serve_their_own_guests(two_guests):
    a, b = two_guests
    with a.api.listen(700) as la, b.api.listen(700) as lb:
        a.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 700)
        b.send(Op.VIRTIO_VSOCK_OP_REQUEST, 6000, 700)
        sa, (cid_a, port_a) = la.accept(timeout=5)
        sb, (cid_b, port_b) = lb.accept(timeout=5)
        assert (cid_a, port_a, cid_b, port_b) == (3, 5000, 4, 6000)
        assert [h.op for h, _ in a.wait_packets()] == [Op.VIRTIO_VSOCK_OP_RESPONSE]
        assert [h.op for h, _ in b.wait_packets()] == [Op.VIRTIO_VSOCK_OP_RESPONSE]
        sa.sendall(b"to a")
        sb.sendall(b"to b")
        assert b"".join(p for _, p in a.wait_packets()) == b"to a"
        assert b"".join(p for _, p in b.wait_packets()) == b"to b"
        sa.close()
        sb.close()
    assert a.dev.counters()["conns_added"] == b.dev.counters()["conns_added"] == 1


def test_reset_of_one_device_while_the_other_keeps_the_thread_busy(two_guests, tmp_path):
    """A vCPU resets device a (waiting for the shared thread under the
    transport's lock) while device b's host peer floods the thread."""
    a, b = two_guests
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(str(tmp_path / "b.sock_1234"))
    lst.listen()
    b.send(Op.VIRTIO_VSOCK_OP_REQUEST, 5000, 1234)
    assert [h.op for h, _ in b.wait_packets()] == [Op.VIRTIO_VSOCK_OP_RESPONSE]
    conn, _ = lst.accept()
    conn.setblocking(False)
    try:
        while True:
            conn.send(b"x" * 65536)
    except BlockingIOError:
        pass
    with a.api.listen(9):
        a.send(Op.VIRTIO_VSOCK_OP_REQUEST, 6000, 9)
        a.wait_packets()
        done = threading.Event()
        t = threading.Thread(target=lambda: (a.drv.reset(), done.set()))
        t.start()
        assert done.wait(10), "reset() deadlocked"
        t.join()
    assert a.dev.counters()["connections"] == 0
    assert b.dev.counters()["connections"] == 1       # b was not touched
    assert b.wait_packets()                            # and is still served
    conn.close()
    lst.close()


def test_thread_start_and_stop_are_idempotent(loop):
    loop.start_thread()
    thread = loop.thread
    loop.start_thread()
    assert loop.running and loop.thread is thread and thread.name == IO_THREAD_NAME
    loop.stop_thread()
    loop.stop_thread()
    assert not loop.running and loop.thread is None and not thread.is_alive()


def test_run_in_loop_is_inline_without_a_thread_and_handed_over_with_one(loop):
    ran_on = []
    loop.run_in_loop(lambda: ran_on.append(threading.current_thread()), wait=True)
    assert ran_on == [threading.current_thread()]
    loop.start_thread()
    loop.run_in_loop(lambda: ran_on.append(threading.current_thread()), wait=True)
    assert ran_on[1] is loop.thread                    # wait=True: it has run on return
    nested = threading.Event()
    loop.run_in_loop(lambda: loop.run_in_loop(nested.set, wait=True), wait=True)
    assert nested.is_set()                             # on the loop thread: inline, no self-wait
    loop.stop_thread()
    loop.run_in_loop(lambda: ran_on.append(threading.current_thread()), wait=True)
    assert ran_on[-1] is threading.current_thread()


def test_a_device_attaches_to_one_loop_only(loop):
    dev = QuietDevice()
    dev.attach_loop(loop)
    with pytest.raises(PyvmmError, match="already attached"):
        dev.attach_loop(EventLoop())
