"""The vsock device's event loop: one thread, one ``selectors`` selector.

This module owns the loop that the vsock device thread runs (and that tests
drive by hand): file-descriptor callbacks, timers on an injectable clock,
and a thread-safe way for other threads (vCPUs, the Python API's callers)
to hand work to the loop.  It is deliberately tiny; the shape is asyncio's
``selector_events.py`` without coroutines: the callback lives in the
selector key's ``data`` slot (``(reader, writer)``), and a wake-up eventfd
interrupts ``select()`` when another thread queues work.

Rules the rest of :mod:`pyvmm.vsock` relies on:

* Every callback runs on the loop thread, one at a time.  State owned by the
  loop (the muxer, connections, the virtqueues) is therefore never locked.
* ``call_soon_threadsafe`` is the *only* method other threads may call
  (plus :meth:`EventLoop.stop`).  It never blocks and never waits for the
  loop.
* Readiness is level-triggered (epoll/poll without EPOLLET): a reader that
  does not drain its fd, or cannot, must remove itself or it spins.
* Time comes from ``clock()`` (default :func:`time.monotonic`).  Tests pass a
  fake clock and call ``run_once(0)`` after advancing it.
* A callback that raises is a pyvmm bug: it is logged (once per callback
  name) and counted in :attr:`EventLoop.callback_errors`; the loop goes on.
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

__all__ = ["EventLoop", "TimerHandle"]

logger = logging.getLogger("pyvmm.vsock")


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
                logger.exception("vsock event loop: callback %s raised", name)

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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._selector.close()
        os.close(self._wake_fd)
