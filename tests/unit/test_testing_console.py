"""pyvmm.testing.Console: what a test waits on (every guest-booting test uses it)."""

import threading

import pytest

from pyvmm.testing import Console


def test_a_line_is_matched_only_once_it_is_whole_and_an_earlier_line_is_found():
    c, done = Console(), threading.Event()
    c.write(b"boot\r\npid 7")
    with pytest.raises(AssertionError, match="no console line matching"):
        c.wait_for(r"^pid (\d+)$", 0.05, done)              # "pid 7" may yet be "pid 70"
    c.write(b"0\r\n")
    assert c.wait_for(r"^pid (\d+)$", 1, done).group(1) == "70"
    assert c.wait_for(r"^boot$", 1, done)                   # searched from the start again


def test_a_line_written_while_waiting_wakes_the_waiter_byte_by_byte():
    c, done = Console(), threading.Event()
    c.write(b"x" * 100_000 + b"\n")

    def type_slowly():
        for byte in b"ready now\n":
            c.write(bytes([byte]))
    t = threading.Thread(target=type_slowly)
    t.start()
    assert c.wait_for(r"^ready now$", 5, done)
    t.join()


def test_once_the_guest_ended_the_last_partial_line_counts_and_the_wait_fails_at_once():
    c, done = Console(), threading.Event()
    c.write(b"a\nlast words")
    done.set()
    assert c.wait_for(r"^last words$", 5, done)
    with pytest.raises(AssertionError, match=r"guest ended\)\n--- console tail ---\na\nlast words"):
        c.wait_for(r"never", 60, done)
    assert c.tail(1) == "last words"
