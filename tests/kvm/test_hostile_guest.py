"""KVM level: pyvmm's virtio-mmio transport and vsock device against a hostile driver.

The freestanding guest's ``hostile what=<case>`` scenario (guest/freestanding/
hostile.c, README "Hostile mode") breaks one rule per boot on purpose: bad
descriptor addresses, looping chains, wrong lengths, a corrupt available ring,
credit overruns, packets for connections that do not exist, unknown ops and
types, a REQUEST flood past the connection bound, notifies before DRIVER_OK,
unusable queue configurations, bad indirect tables with VIRTIO_F_INDIRECT_DESC
negotiated, bad event buffers, a device reset mid-traffic, a guest that stops
consuming rx while host peers keep sending (the last three with the host
acting midway: ``hostile(during=...)``, the guest waiting for a byte on its
serial port).  Each test boots one case (well under a second
here) and checks what pyvmm must do per the spec and its documented choices
(pyvmm/virtio/queue.py, mmio.py, vsock/*.py docstrings):

* the answer: the chain returned with used.len 0 / an RST / a drop /
  DEVICE_NEEDS_RESET, as the guest saw it (its ``done`` line) and as pyvmm
  counted it (``counters()``, the transport's and the queue's error logs);
* the specific reason counted (as many times as the guest misbehaved) and
  logged once (the guest misbehaves twice where it can, ``n=2``);
* pyvmm was not hurt: the run ended by the guest's own reset with ``exit 0``,
  no device method or loop callback raised, no connection left behind, and
  (where the device is still usable) a well-behaved echo over a new
  connection afterwards worked (``hostile echo ok``).

The guest decides everything it checks by ordering, never by waiting: after
each bad packet it sends a "probe" (an RW for no connection) and waits for
the RST that answers it; a reply to the bad packet would have arrived first.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import threading
import time

import numpy as np

import pytest


from harness import LiveGuest
from pyvmm import images
from pyvmm.machine import ExitStatus, VsockConfig
from pyvmm.vsock.connection import CONN_TX_BUF_SIZE

pytestmark = pytest.mark.kvm

PORT = 1500             # the host's echo service (guest connects to <uds>_1500)
FLOOD_PORT = 1501       # the REQUEST flood's target (never accepted by the test)
EARLY_PORT = 1502       # notify-early's REQUEST: must never be connected
PREFIX = "pyvmm-test-guest: "
ECHO_OK = PREFIX + "hostile echo ok 3000"


class EchoHost:
    """A Unix listener at ``<uds>_<port>`` that echoes every connection; counts
    accepts and connections ended (EOF or reset)."""

    def __init__(self, path: str, backlog: int = 64, serve: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(backlog)
        self.accepted = self.ended = 0
        self._changed = threading.Condition()
        self._stop = False
        if serve:
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
            except OSError:
                pass            # pyvmm reset the connection: expected in some cases
        with self._changed:
            self.ended += 1
            self._changed.notify_all()

    def wait_ended(self, n: int, timeout: float) -> bool:
        """Have ``n`` connections ended within ``timeout`` seconds?"""
        with self._changed:
            return self._changed.wait_for(lambda: self.ended >= n, timeout)

    def pending(self) -> bool:
        """A connection waiting to be accepted (only for serve=False)?"""
        self.sock.setblocking(False)
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class Outcome:
    def __init__(self, case, run, queue_errors, transport_errors, device_errors, loop_errors):
        self.case, self.run = case, run
        self.queue_errors = queue_errors            # [rx, tx, event]: reason -> count
        self.transport_errors = transport_errors    # reason -> count
        self.device_errors = device_errors          # exceptions that escaped the device
        self.loop_errors = loop_errors              # exceptions in vsock loop callbacks
        self.vsock = run.vsock
        self.snapshot = run.virtio[0]

    @property
    def done(self) -> dict:
        m = re.search(rf"^{PREFIX}hostile {re.escape(self.case)} done (.*)$", self.run.console, re.M)
        assert m, self.run.explain()
        return dict(kv.split("=", 1) for kv in m.group(1).split())

    def reasons(self) -> dict:
        return self.vsock["guest_errors_by_reason"]


@pytest.fixture
def uds(tmp_path):
    path = str(tmp_path / "v.sock")
    echo = EchoHost(f"{path}_{PORT}")
    yield path
    echo.close()


def hostile(uds, case, n=1, extra="", *, echo=True, during=None, **vsock_kw) -> Outcome:
    """Run hostile case ``case``; ``vsock_kw`` go to VsockConfig (proto=, pairs=).

    ``during(g)``, if given, runs while the guest does, ``g`` being the
    :class:`LiveGuest`: ``g.type(b"g")`` sends the byte the guest's
    ``wait_for_host`` waits for on its serial port."""
    cmd = f"hostile what={case} port={PORT} n={n} {extra}".strip()
    with LiveGuest(images.freestanding_guest(), cmdline=cmd, timeout=60, stdin="pipe",
                   vsock=VsockConfig(3, uds, **vsock_kw)) as g:
        if during is not None:
            during(g)
        run = g.finish(60)
        transport = g.vm.virtio_slots[0].transport
        out = Outcome(case, run, [dict(q.errors.counts) for q in transport.queues],
                      dict(transport.errors.counts), dict(transport.device_errors),
                      dict(g.vm.io_loop.callback_errors))
    # pyvmm came through: the guest ended the run itself, successfully
    assert run.result.status == ExitStatus.GUEST_RESET, run.explain()
    assert PREFIX + "exit 0" in run.console, run.explain()
    assert "FAILED" not in run.console, run.explain()
    assert out.device_errors == {} and out.loop_errors == {}, (out.device_errors, out.loop_errors)
    assert out.vsock["connections"] == 0, out.vsock
    if echo:
        assert ECHO_OK in run.console, run.explain()
    return out


def logged(caplog, reason: str) -> int:
    return sum(reason in r.getMessage() for r in caplog.records)


# --- bad descriptor chains: dropped with used.len 0, never answered ----------------

CHAIN_CASES = {
    "tx-addr-outside": "descriptor buffer outside guest memory",       # 0x80000000, RAM is 64 MiB
    "tx-addr-hole": "descriptor buffer outside guest memory",          # 0xd0000000, the device window
    "tx-addr-wrap": "descriptor buffer outside guest memory",          # 2**64 - 4096, len 8 KiB
    "tx-loop": "descriptor chain loops or is longer than its table (ttl)",
    "tx-long": "descriptor chain loops or is longer than its table (ttl)",   # all 64 + back to 1st
    "tx-next-range": "descriptor next index out of range",
    "tx-indirect": "VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC",   # not acked
}


@pytest.mark.parametrize("case", CHAIN_CASES)
def test_bad_tx_chain_is_dropped(uds, case, caplog):
    caplog.set_level(logging.WARNING)
    out = hostile(uds, case, n=2)
    reason = CHAIN_CASES[case]
    assert out.done == {"n": "2", "used_len": "0", "replies": "0"}, out.run.explain()
    assert out.queue_errors[1] == {reason: 2}, out.queue_errors
    assert logged(caplog, reason) == 1
    assert out.snapshot["queues"][1]["broken"] is None
    assert "DEVICE_NEEDS_RESET" not in out.snapshot["status"]


@pytest.mark.parametrize("case", ["rx-addr-outside", "rx-addr-hole", "rx-addr-wrap"])
def test_bad_rx_buffer_address_is_dropped(uds, case, caplog):
    caplog.set_level(logging.WARNING)
    out = hostile(uds, case, n=2)
    reason = "descriptor buffer outside guest memory"
    assert out.done["rx_dropped"] == "2", out.run.explain()      # returned with used.len 0
    assert out.queue_errors[0] == {reason: 2}, out.queue_errors
    assert logged(caplog, reason) == 1
    assert out.vsock["rx_bad_buffers"] == 0


def test_rx_buffer_shorter_than_header(uds, caplog):
    caplog.set_level(logging.WARNING)
    out = hostile(uds, "rx-small", n=2)
    reason = "rx buffer shorter than the 44-byte header"
    assert out.done["rx_dropped"] == "2", out.run.explain()
    assert out.vsock["rx_bad_buffers"] == 2
    assert out.reasons() == {reason: 2}
    assert logged(caplog, reason) == 1


# --- wrong lengths -----------------------------------------------------------------

def test_header_shorter_than_44_bytes(uds, caplog):
    caplog.set_level(logging.WARNING)
    out = hostile(uds, "tx-short-hdr", n=2)
    reason = "tx chain shorter than the header"
    assert out.done == {"n": "2", "replies": "0"}, out.run.explain()   # no header: nothing to answer
    assert out.vsock["tx_bad_chains"] == 2
    # the probe's RW (for no connection) is the only other guest error
    assert out.reasons() == {reason: 2, "guest packet for an unknown connection": 1}
    assert logged(caplog, reason) == 1


@pytest.mark.parametrize("case, reasons", [
    ("tx-len-over", {"tx hdr.len larger than the buffer": 2}),
    ("tx-len-huge", {"tx hdr.len larger than 64 KiB": 2}),
    ("tx-writable", {"tx chain with device-writable descriptors (ignored)": 2,
                     "tx hdr.len larger than the buffer": 2}),
])
def test_bad_length_resets_the_connection(uds, case, reasons, caplog):
    caplog.set_level(logging.WARNING)
    out = hostile(uds, case, n=2)
    assert out.done == {"n": "2", "conn_resets": "2"}, out.run.explain()
    assert out.reasons() == reasons
    assert out.vsock["tx_bad_chains"] == 2
    assert out.vsock["conns_killed"] == 2
    for reason in reasons:
        assert logged(caplog, reason) == 1


def test_len_smaller_than_payload_forwards_only_len(uds):
    out = hostile(uds, "tx-len-under")
    assert out.done == {"round": "0", "echoed": "10"}, out.run.explain()
    assert out.reasons() == {}
    assert out.vsock["tx_bad_chains"] == 0


# --- a corrupt available ring: DEVICE_NEEDS_RESET -------------------------------------

@pytest.mark.parametrize("case, reason", [
    ("avail-jump", "avail.idx moved more than QueueSize entries ahead"),
    ("head-range", "available ring entry (chain head) >= QueueSize"),
])
def test_corrupt_avail_ring_needs_reset(uds, case, reason):
    out = hostile(uds, case)
    done = out.done
    status = int(done["status"], 16)
    assert status & 0x40 and status & 0x04, out.run.explain()   # NEEDS_RESET, DRIVER_OK kept
    assert int(done["isr"], 16) & 0x2, out.run.explain()        # configuration-change interrupt
    assert done["used_idx"] == "0"                              # nothing consumed
    assert out.queue_errors[1] == {reason: 1}, out.queue_errors
    # the guest reset the device, and the second life works (the echo above)
    assert "DEVICE_NEEDS_RESET" not in out.snapshot["status"]
    assert out.snapshot["activated"]


# --- credit ------------------------------------------------------------------------

def test_credit_overrun_is_reset_and_counted(uds, caplog):
    caplog.set_level(logging.WARNING)
    out = hostile(uds, "credit-overrun", n=2)
    reason = "guest exceeded the credit we advertised"
    sent = re.search(r"sent (\d+) bytes against buf_alloc (\d+)", out.run.console)
    assert sent is not None, out.run.explain()
    assert (int(sent[1]), int(sent[2])) == (CONN_TX_BUF_SIZE + 1000, CONN_TX_BUF_SIZE)
    assert out.done == {"n": "2", "conn_resets": "2"}, out.run.explain()
    assert out.vsock["credit_violations"] == 2
    assert out.reasons() == {reason: 2}
    assert logged(caplog, reason) == 1


# --- packets for connections that do not exist ---------------------------------------

def test_packets_for_no_connection_get_rst_but_rst_does_not(uds, caplog):
    caplog.set_level(logging.WARNING)
    out = hostile(uds, "no-conn", n=2)
    reason = "guest packet for an unknown connection"
    # RW, SHUTDOWN, CREDIT_UPDATE, CREDIT_REQUEST answered with RST (bits 0-3); the RST not
    assert out.done == {"n": "2", "rst_mask": "0xf", "rst_for_rst": "0", "replies": "8"}, \
        out.run.explain()
    assert out.reasons() == {reason: 2 * 4 + 1}     # + the probe
    assert out.vsock["rst_received"] == 2
    assert logged(caplog, reason) == 1


@pytest.mark.parametrize("case, reason", [
    ("unknown-op", "guest packet with an unknown op"),
    ("rw-after-shutdown", "guest RW after its SHUTDOWN(SEND)"),
])
def test_protocol_violation_on_a_connection_resets_it(uds, case, reason):
    out = hostile(uds, case, n=2)
    assert out.done == {"n": "2", "conn_resets": "2"}, out.run.explain()
    assert out.reasons() == {reason: 2}
    assert out.vsock["conns_killed"] == 2


def test_unknown_type_gets_rst(uds):
    out = hostile(uds, "unknown-type", n=2)
    done = out.done
    assert (done["rsts"], done["responses"], done["type_echoed"]) == ("2", "0", "2"), out.run.explain()
    assert out.reasons()["guest packet of an unknown or unnegotiated type"] == 2
    assert out.vsock["guest_connects"] == 1         # only the echo


def test_seqpacket_when_not_negotiated_gets_rst(uds):
    out = hostile(uds, "seqpacket-unneg", n=2)
    done = out.done
    assert not int(done["features"], 16) & 0x2, out.run.explain()   # F_SEQPACKET not acked
    assert out.snapshot["driver_features"] & 0x2 == 0
    assert (done["rsts"], done["responses"]) == ("2", "0"), out.run.explain()
    assert out.reasons()["guest packet of an unknown or unnegotiated type"] == 2
    assert out.vsock["guest_connects"] == 1


@pytest.mark.parametrize("case, reason", [
    ("bad-src-cid", "guest packet with a src_cid other than its own (dropped)"),
    ("bad-dst-cid", "guest packet for a CID other than the host (dropped)"),
])
def test_wrong_cid_is_dropped_silently(uds, case, reason):
    out = hostile(uds, case, n=2)
    done = out.done
    assert (done["rsts"], done["responses"]) == ("0", "0"), out.run.explain()
    assert out.reasons()[reason] == 2
    assert out.vsock["guest_connects"] == 1 and out.vsock["conns_refused"] == 0


# --- a REQUEST flood past the connection table's bound -----------------------------------

def test_request_flood_is_bounded(uds, tmp_path):
    sink = EchoHost(f"{uds}_{FLOOD_PORT}", backlog=2048, serve=False)   # connects, never accepted
    try:
        out = hostile(uds, "request-flood", extra="count=1100")
    finally:
        sink.close()
    done = out.done
    assert done == {"requests": "1100", "responses": "1023", "rsts": "77", "reset": "1023"}, \
        out.run.explain()
    v = out.vsock
    assert v["conns_refused"] == 77 and v["guest_connects"] == 1023 + 1, v
    assert v["conns_added"] == v["conns_removed"] == 1024, v
    assert v["connections"] == 0 and v["control_dropped"] == 0, v
    assert out.reasons()["connection table full: REQUEST refused"] == 77


# --- the transport: notifies before DRIVER_OK, unusable queues --------------------------

def test_notify_before_driver_ok_is_dropped(uds):
    never = EchoHost(f"{uds}_{EARLY_PORT}", serve=False)
    try:
        out = hostile(uds, "notify-early")
        assert not never.pending(), "the REQUEST queued before DRIVER_OK was processed"
    finally:
        never.close()
    assert out.done["used_idx"] == "0", out.run.explain()
    assert out.snapshot["notifies_before_driver_ok"] == 3
    assert out.transport_errors == {"QueueNotify before DRIVER_OK (dropped)": 3}
    assert out.vsock["guest_connects"] == 1         # only the echo


@pytest.mark.parametrize("case, reason", [
    ("qsize-npot", "QueueSize is not a power of two"),
    ("ring-misaligned", "descriptor table misaligned"),
    ("ring-outside", "descriptor table outside guest memory"),
    ("ring-hole", "used ring outside guest memory"),
    ("ring-wrap", "available ring outside guest memory"),
])
def test_bad_queue_configuration_is_refused(uds, case, reason):
    out = hostile(uds, case)
    done = out.done
    assert done["queue_ready"] == "0", out.run.explain()
    assert int(done["status"], 16) & 0x40, out.run.explain()    # DEVICE_NEEDS_RESET
    assert out.transport_errors == {f"QueueReady=1 refused: {reason}": 1}, out.transport_errors
    assert "DEVICE_NEEDS_RESET" not in out.snapshot["status"]   # cleared by the reset
    assert out.snapshot["activated"]


def test_rst_flood_with_rx_starved_is_bounded(uds):
    """1000 packets for no connection while the guest reposts no rx buffer:
    64 RSTs fill the posted buffers, MAX_CONTROL_PACKETS (256) wait, the rest
    are dropped and counted; none is lost after that, nothing grows."""
    from pyvmm.vsock.muxer import MAX_CONTROL_PACKETS
    held = 64 + MAX_CONTROL_PACKETS
    out = hostile(uds, "rst-flood", extra=f"count=1000 expect={held}")
    assert out.done == {"sent": "1000", "rsts": str(held)}, out.run.explain()
    v = out.vsock
    assert v["control_dropped"] == 1000 - held, v
    assert v["rst_sent"] == held + 2, v             # + the probe's, + closing the echo
    assert out.reasons()["control queue full: RST dropped"] == 1000 - held


def test_bad_register_accesses_are_counted(uds):
    out = hostile(uds, "mmio-width")
    done = out.done
    assert done["st16"] == "0x0" and done["misaligned"] == "0x0" and done["wo"] == "0x0", done
    assert done["cid_after"] == done["cid"] == "3", done            # config space is read-only
    assert int(done["status"], 16) == 0xF, done
    assert out.transport_errors == {
        "control register access not 32-bit aligned": 3,
        "write to a read-only register": 1,
        "read of a write-only register": 1,
        "write to an undefined register": 1,
        "write to read-only device config space": 1,       # guest_cid
    }, out.transport_errors
    assert out.snapshot["notifies_before_driver_ok"] == 0


@pytest.mark.parametrize("case", ["rst-bad-len", "rst-bad-type", "rst-wrong-type"])
def test_malformed_rst_on_a_connection_is_not_answered(uds, case):
    """The guest resets a connection with an RST that has one field wrong.
    Whatever pyvmm makes of it, it must not answer an RST with an RST, and
    the connection must be gone (Linux: virtio_transport_reset_no_sock never
    replies to an RST)."""
    out = hostile(uds, case, n=2)
    assert out.done == {"n": "2", "answered": "0"}, out.run.explain()


# --- indirect tables, with VIRTIO_F_INDIRECT_DESC negotiated ---------------------------

INDIRECT_CASES = {
    "ind-outside": "indirect table outside guest memory",          # table at 0x80000000
    "ind-len-zero": "indirect table length is 0 or not a multiple of 16",
    "ind-len-odd": "indirect table length is 0 or not a multiple of 16",    # 24 bytes
    "ind-huge": "indirect table longer than the queue size",       # queue size + 1 entries
    "ind-nested": "VIRTQ_DESC_F_INDIRECT inside an indirect table",
    "ind-next": "VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT",
    "ind-loop": "descriptor chain loops or is longer than its table (ttl)",   # entry 1 -> 0
    "ind-range": "descriptor next index out of range",             # entry 1 -> 2, of 2
    "ind-buf": "descriptor buffer outside guest memory",           # entry 1's buffer
}
F_INDIRECT_DESC = 1 << 28


@pytest.mark.parametrize("case", INDIRECT_CASES)
def test_bad_indirect_table_is_dropped(uds, case, caplog):
    """§2.7.5.3.1 with the feature negotiated: a table that breaks a rule is the
    whole chain's error (returned with used.len 0, never answered, counted)."""
    caplog.set_level(logging.WARNING)
    out = hostile(uds, case, n=2)
    reason = INDIRECT_CASES[case]
    assert out.snapshot["driver_features"] & F_INDIRECT_DESC, out.snapshot
    assert out.done == {"n": "2", "used_len": "0", "replies": "0"}, out.run.explain()
    assert out.queue_errors[1] == {reason: 2}, out.queue_errors
    assert logged(caplog, reason) == 1
    assert out.snapshot["queues"][1]["broken"] is None
    assert "DEVICE_NEEDS_RESET" not in out.snapshot["status"]


def test_a_good_indirect_table_is_read_like_a_chain(uds):
    out = hostile(uds, "ind-good", n=2)
    assert out.snapshot["driver_features"] & F_INDIRECT_DESC, out.snapshot
    assert out.done == {"n": "2", "used_len": "0", "replies": "2"}, out.run.explain()
    assert out.queue_errors[1] == {}, out.queue_errors
    # the two RWs (and the probe) for no connection, each answered with an RST
    assert out.reasons() == {"guest packet for an unknown connection": 3}


# --- the event queue: a bad buffer ahead of the good ones ---------------------------------

@pytest.mark.parametrize("case, where, reason", [
    ("ev-short", "device", "event buffer shorter than 4 bytes"),          # 2 bytes
    ("ev-readonly", "device", "event buffer shorter than 4 bytes"),       # no F_WRITE
    ("ev-outside", "queue", "descriptor buffer outside guest memory"),    # 0x80000000
])
def test_a_bad_event_buffer_is_returned_unwritten_and_the_event_uses_the_next(
        uds, case, where, reason, caplog):
    caplog.set_level(logging.WARNING)

    def during(g):
        g.wait_for(PREFIX + f"hostile {case} ready", timeout=30)
        g.vsock.transport_reset()

    out = hostile(uds, case, during=during)
    assert out.done == {"untouched": "1", "resets": "1"}, out.run.explain()
    assert out.vsock["transport_resets"] == 1 and out.vsock["events_sent"] == 1, out.vsock
    errors = out.reasons() if where == "device" else out.queue_errors[2]
    assert errors == {reason: 1}, (out.reasons(), out.queue_errors)
    assert logged(caplog, reason) == 1


# --- a device reset in the middle of traffic ----------------------------------------------

def test_a_device_reset_mid_traffic_ends_the_host_peers_and_a_new_connection_works(
        tmp_path, record_property):
    """Two connections stream both ways; the guest resets the device (status 0)
    with data in flight, sets it up again and waits: both host peers must have
    seen their connection end within 1 s; then a new connection echoes."""
    uds = str(tmp_path / "v.sock")
    echo = EchoHost(f"{uds}_{PORT}")
    seen = {}

    def during(g):
        g.wait_for(PREFIX + "hostile reset-mid resetting", timeout=30)
        t0 = time.monotonic()
        g.wait_for(PREFIX + "hostile reset-mid was-reset", timeout=30)
        seen["ended"] = echo.wait_ended(2, timeout=1.0)
        seen["seconds"] = time.monotonic() - t0
        g.type(b"g")

    try:
        out = hostile(uds, "reset-mid", during=during)
    finally:
        echo.close()
    assert seen["ended"], f"the host peers had not seen the reset 1 s after it: {echo.ended} ended"
    record_property("host peers ended after the reset (s)", round(seen["seconds"], 3))
    assert out.done == {"conns": "2", "ended": "2"}, out.run.explain()
    assert out.vsock["device_resets"] == 1, out.vsock
    assert out.reasons() == {}, out.reasons()
    assert echo.accepted == 3 and echo.ended == 3          # the two streams, then the echo


# --- a guest that stops consuming rx while host peers keep sending --------------------------

STALL_PORT = 1503
STALL_CONNS = 4                 # as hostile.c
STALL_BYTES = 4 << 20           # per peer: far more than the guest's credit and the socket buffers
STALL_BLOCKED = 1.0             # a peer counts as throttled once it could not write for this long


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class StallPeers:
    """The host peers of stop-rx: each accepted connection is sent STALL_BYTES of the
    guest's pattern() (byte i = i * 131 + 7) and closed; ``sent[k]`` is peer k's progress,
    ``blocked[k]`` whether its last wait for the socket to take more timed out."""

    def __init__(self, path: str) -> None:
        self.data = memoryview(((np.arange(STALL_BYTES, dtype=np.uint64) * 131 + 7) & 0xFF)
                               .astype(np.uint8).tobytes())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(STALL_CONNS)
        self.sent = [0] * STALL_CONNS
        self.blocked = [False] * STALL_CONNS
        self.changed = threading.Condition()
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        for k in range(STALL_CONNS):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._send, args=(k, conn), daemon=True).start()

    def _send(self, k: int, conn: socket.socket) -> None:
        conn.setblocking(False)
        with conn:
            try:
                while self.sent[k] < STALL_BYTES:
                    writable = bool(select.select([], [conn], [], STALL_BLOCKED)[1])
                    with self.changed:
                        self.blocked[k] = not writable
                        self.changed.notify_all()
                    if not writable:
                        continue
                    try:
                        self.sent[k] += conn.send(self.data[self.sent[k]:])
                    except BlockingIOError:
                        pass
            except OSError as e:
                self.errors.append(f"peer {k}: {e!r}")

    def close(self) -> None:
        self.sock.close()


def test_a_guest_that_stops_consuming_rx_throttles_the_host_peers_and_loses_nothing(
        uds, record_property):
    """The guest stops taking rx buffers back while four host peers send 4 MiB each:
    pyvmm must stop reading them (every peer blocked, far short of its 4 MiB), hold
    no data of its own (RSS flat), count the starvation, and, once the guest
    consumes again, deliver every byte in order (the guest checks each one)."""
    peers = StallPeers(f"{uds}_{STALL_PORT}")
    seen = {}

    def during(g):
        g.wait_for(PREFIX + "hostile stop-rx stalled", timeout=30)
        rss0 = rss_bytes()
        with peers.changed:
            peers.changed.wait_for(lambda: all(peers.blocked), timeout=60)
        seen.update(blocked=list(peers.blocked), sent=list(peers.sent),
                    grew=rss_bytes() - rss0, counters=g.vm.vsock_device.counters())
        g.type(b"g")

    try:
        out = hostile(uds, "stop-rx", extra=f"fport={STALL_PORT}", during=during)
    finally:
        peers.close()
    assert all(seen["blocked"]), f"pyvmm kept reading while the guest consumed nothing: {seen}"
    assert sum(seen["sent"]) < STALL_CONNS * STALL_BYTES // 2, seen["sent"]
    assert seen["counters"]["rx_starved"] >= 1, seen["counters"]
    assert seen["grew"] < 8 << 20, f"RSS grew {seen['grew']} bytes while the guest was stalled"
    record_property("stop-rx: bytes the peers got in before blocking", sum(seen["sent"]))
    record_property("stop-rx: RSS growth while stalled (bytes)", seen["grew"])
    assert out.done == {"conns": str(STALL_CONNS), "bytes": str(STALL_CONNS * STALL_BYTES),
                        "bad": "0"}, out.run.explain()
    assert peers.errors == [] and peers.sent == [STALL_BYTES] * STALL_CONNS
    assert out.reasons() == {}, out.reasons()
