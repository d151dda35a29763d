"""The machine's device I/O loop: one thread, one ``selectors`` selector.

This module owns the loop that every virtio device of a machine runs on (and
that tests drive by hand): file-descriptor callbacks (the queues'
ioeventfds, the devices' host sockets), timers on an injectable clock, a
thread-safe way for other threads (vCPUs, the Python API's callers) to hand
work to the loop, and the loop's one thread, :data:`IO_THREAD_NAME`
("pyvmm-io").  The machine creates one :class:`EventLoop`, gives it to each
device (:meth:`~pyvmm.virtio.device.VirtioDevice.attach_loop`), and starts
and stops its thread (:meth:`EventLoop.start_thread`,
:meth:`EventLoop.stop_thread`).  It is deliberately tiny; the shape is
asyncio's ``selector_events.py`` without coroutines: the callback lives in
the selector key's ``data`` slot (``(reader, writer)``), and a wake-up
eventfd interrupts ``select()`` when another thread queues work.  It knows
nothing about virtio: devices bring their own meaning to each callback.

Rules the devices rely on:

* Every callback runs on the loop thread, one at a time, whichever device it
  belongs to.  State owned by the loop (a device's queues, vsock's muxer and
  connections) is therefore never locked.
* ``call_soon_threadsafe`` is the *only* method other threads may call
  (plus :meth:`EventLoop.run_in_loop`, :meth:`EventLoop.stop` and the
  thread's start/stop).  It never blocks and never waits for the loop.
* Readiness is level-triggered (epoll/poll without EPOLLET): a reader that
  does not drain its fd, or cannot, must remove itself or it spins.
* Time comes from ``clock()`` (default :func:`time.monotonic`).  Tests pass a
  fake clock and call ``run_once(0)`` after advancing it.
* A callback that raises is a pyvmm bug: it is logged (once per callback
  name) and counted in :attr:`EventLoop.callback_errors`; the loop goes on.
* Nobody waits for the loop longer than :data:`LOOP_WAIT` seconds.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from typing import Callable

__all__ = ["IO_THREAD_NAME", "LOOP_WAIT", "EventLoop", "TimerHandle"]

logger = logging.getLogger("pyvmm.io")

#: the name of the loop's thread (one per machine, shared by its virtio devices)
IO_THREAD_NAME = "pyvmm-io"
#: seconds a caller waits for the loop thread to run a job handed to it
#: (a device's activate()/reset(), add_reader) or to stop, before giving up
LOOP_WAIT = 5.0


class TimerHandle:
    """A callback scheduled for ``when`` (loop clock); :meth:`cancel` drops it."""

    __slots__ = ("when", "callback", "args", "cancelled", "_seq")

    def __init__(self, when: float, seq: int, callback: Callable, args: tuple) -> None:
        self.when, self._seq, self.callback, self.args = when, seq, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: TimerHandle) -> bool:
        return (self.when, self._seq) < (other.when, other._seq)


class EventLoop:
    """A selectors-based loop: fd readers/writers, timers, thread-safe calls."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._selector = selectors.DefaultSelector()
        self._ready: collections.deque[tuple[Callable, tuple]] = collections.deque()
        self._threadsafe: collections.deque[tuple[Callable, tuple]] = collections.deque()
        self._timers: list[TimerHandle] = []
        self._seq = itertools.count()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake_fd, selectors.EVENT_READ, (self._drain_wake, None))
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        #: the thread inside run_forever(), or None
        self.thread_id: int | None = None
        #: exceptions that escaped callbacks (pyvmm bugs), by callback name
        self.callback_errors: collections.Counter[str] = collections.Counter()

    # -- time ---------------------------------------------------------------------
    def time(self) -> float:
        return self.clock()

    # -- file descriptors ---------------------------------------------------------
    def _set(self, fd: int, reader: Callable | None, writer: Callable | None) -> None:
        events = (selectors.EVENT_READ if reader else 0) | (selectors.EVENT_WRITE if writer else 0)
        try:
            key = self._selector.get_key(fd)
        except KeyError:
            key = None
        if key is None:
            if events:
                self._selector.register(fd, events, (reader, writer))
        elif events:
            self._selector.modify(fd, events, (reader, writer))
        else:
            self._selector.unregister(fd)

    def _current(self, fd: int) -> tuple[Callable | None, Callable | None]:
        try:
            return self._selector.get_key(fd).data
        except KeyError:
            return None, None

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (until removed)."""
        self._set(fd, callback, self._current(fd)[1])

    def remove_reader(self, fd: int) -> None:
        self._set(fd, None, self._current(fd)[1])

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` is writable (until removed)."""
        self._set(fd, self._current(fd)[0], callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, self._current(fd)[0], None)

    def remove_fd(self, fd: int) -> None:
        """Forget ``fd`` entirely; call before closing it."""
        self._set(fd, None, None)

    def watched(self, fd: int) -> tuple[bool, bool]:
        """(reading, writing) interest currently registered for ``fd``."""
        reader, writer = self._current(fd)
        return reader is not None, writer is not None

    # -- callbacks and timers ---------------------------------------------------------
    def call_soon(self, callback: Callable, *args) -> None:
        """Run ``callback(*args)`` on the next iteration (loop thread only)."""
        self._ready.append((callback, args))

    def call_soon_threadsafe(self, callback: Callable, *args) -> None:
        """Like :meth:`call_soon`, from any thread; wakes the loop."""
        self._threadsafe.append((callback, args))      # deque.append is atomic
        try:
            os.eventfd_write(self._wake_fd, 1)
        except (BlockingIOError, OSError):              # counter saturated, or closed
            pass

    def call_at(self, when: float, callback: Callable, *args) -> TimerHandle:
        handle = TimerHandle(when, next(self._seq), callback, args)
        heapq.heappush(self._timers, handle)
        return handle

    def call_later(self, delay: float, callback: Callable, *args) -> TimerHandle:
        return self.call_at(self.clock() + delay, callback, *args)

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    # -- running ----------------------------------------------------------------------
    def in_loop_thread(self) -> bool:
        return self.thread_id == threading.get_ident()

    @property
    def running(self) -> bool:
        return self.thread_id is not None

    def _run(self, callback: Callable, args: tuple) -> None:
        try:
            callback(*args)
        except Exception:
            name = getattr(callback, "__qualname__", repr(callback))
            self.callback_errors[name] += 1
            if self.callback_errors[name] == 1:
                logger.exception("device I/O loop: callback %s raised", name)

    def run_once(self, timeout: float | None = None) -> int:
        """Wait for events at most ``timeout`` seconds (None: until one), run what
        is due; returns how many callbacks ran (tests use it to run to quiescence)."""
        ran = 0
        if self._ready or self._threadsafe:
            timeout = 0
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            until_timer = max(0.0, self._timers[0].when - self.clock())
            timeout = until_timer if timeout is None else min(timeout, until_timer)
        for key, mask in self._selector.select(timeout):
            reader, writer = key.data
            if mask & selectors.EVENT_READ and reader is not None:
                ran += reader != self._drain_wake
                self._run(reader, ())
            if mask & selectors.EVENT_WRITE and writer is not None:
                # the reader may have removed the writer (or closed the fd)
                if self._current(key.fd)[1] is writer:
                    ran += 1
                    self._run(writer, ())
        now = self.clock()
        while self._timers and (self._timers[0].cancelled or self._timers[0].when <= now):
            handle = heapq.heappop(self._timers)
            if not handle.cancelled:
                handle.cancelled = True
                ran += 1
                self._run(handle.callback, handle.args)
        for _ in range(len(self._threadsafe)):
            self._ready.append(self._threadsafe.popleft())
        for _ in range(len(self._ready)):           # what is queued now; new ones next time
            callback, args = self._ready.popleft()
            ran += 1
            self._run(callback, args)
        return ran

    def run_forever(self, started: threading.Event | None = None) -> None:
        """Run until :meth:`stop`; the calling thread becomes the loop thread.

        ``started`` is set once :attr:`running` is true (so a caller that
        starts the thread can wait for it before relying on it).
        """
        self.thread_id = threading.get_ident()
        if started is not None:
            started.set()
        try:
            while not self._stopping:
                self.run_once(None)
        finally:
            self._stopping = False
            self.thread_id = None

    def stop(self) -> None:
        """Make :meth:`run_forever` return after the current iteration (any thread)."""
        def _stop() -> None:
            self._stopping = True
        self.call_soon_threadsafe(_stop)

    def run_in_loop(self, fn: Callable, *args, wait: bool) -> None:
        """Run ``fn(*args)`` on the loop thread (any thread).

        Inline if the loop is not running (before :meth:`start_thread`, after
        :meth:`stop_thread`, in unit tests: the caller is then the only
        thread) or if the caller is the loop thread.  Otherwise it is handed
        over; with ``wait`` the call returns once it ran, or after
        :data:`LOOP_WAIT` seconds with an error logged.
        """
        if not self.running or self.in_loop_thread():
            fn(*args)
            return
        if not wait:
            self.call_soon_threadsafe(fn, *args)
            return
        done = threading.Event()

        def job() -> None:
            try:
                fn(*args)
            finally:
                done.set()
        self.call_soon_threadsafe(job)
        if not done.wait(LOOP_WAIT):
            logger.error("device I/O loop: %s did not run within %s s",
                         getattr(fn, "__qualname__", fn), LOOP_WAIT)

    # -- the loop thread ------------------------------------------------------------------
    def start_thread(self, name: str = IO_THREAD_NAME) -> None:
        """Run the loop on a new daemon thread ``name``; returns once it runs
        (idempotent).  The thread inherits the caller's signal mask and CPU
        affinity."""
        if self._thread is not None:
            return
        started = threading.Event()
        self._thread = threading.Thread(target=self.run_forever, args=(started,), name=name,
                                        daemon=True)
        self._thread.start()
        started.wait()

    def stop_thread(self) -> None:
        """Stop and join the loop thread (idempotent); afterwards every call
        runs inline (:meth:`run_in_loop`), jobs handed over meanwhile included."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self.stop()
        thread.join(LOOP_WAIT)
        if thread.is_alive():
            logger.error("device I/O loop: thread %s did not stop within %s s", thread.name,
                         LOOP_WAIT)
            return
        self.run_once(0)                # jobs handed over while it was stopping

    @property
    def thread(self) -> threading.Thread | None:
        """The thread started by :meth:`start_thread`, or None."""
        return self._thread

    def close(self) -> None:
        """Release the selector and the wake-up eventfd (after :meth:`stop_thread`)."""
        if self._closed:
            return
        self._closed = True
        self._selector.close()
        os.close(self._wake_fd)
