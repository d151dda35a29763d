"""KVM level, draft mode only (proto=rfc2013, device ID 13): datagrams and the hostile cases
the draft adds.  The connection scenarios run in both modes in test_freestanding_vsock.py.

Datagram content (guest/freestanding/README.md): the first 8 bytes are the datagram's index k
(little-endian), then byte i is (k + i) & 0xff; the guest checks what it receives."""

from __future__ import annotations

import re
import socket
import threading

import pytest

from harness import LiveGuest
from pyvmm import images
from pyvmm.machine import VsockConfig
from test_hostile_guest import PORT, hostile, uds  # noqa: F401  (uds: the fixture, with an echo host)

pytestmark = pytest.mark.kvm

PREFIX = "pyvmm-test-guest: "


def draft_guest(uds, scenario, pairs=2, timeout=120, stdin=None):
    return LiveGuest(images.freestanding_guest(), cmdline=scenario, timeout=timeout, stdin=stdin,
                     vsock=VsockConfig(3, uds, proto="rfc2013", pairs=pairs))


def pattern(k: int, n: int) -> bytes:
    return (k.to_bytes(8, "little") + bytes((k + i) & 0xFF for i in range(8, n)))[:n]


def finished(run, *patterns):
    for p in patterns:
        assert re.search(p, run.console, re.M), run.explain()
    assert PREFIX + "exit 0" in run.console and "FAILED" not in run.console, run.explain()
    assert run.vsock["guest_errors"] == 0, run.vsock["guest_errors_by_reason"]


def test_datagram_echo_through_the_unix_end(uds):
    with draft_guest(uds, "vsock-dgram-echo port=700 count=20") as g:
        g.wait_for(PREFIX + "vsock dgram bound 700")
        me = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        me.bind(f"{uds}_5555.dgram")
        me.settimeout(30)
        got = []
        for k in range(20):                     # one at a time: each waits for its echo
            me.sendto(b"700\n" + pattern(k, 100 + k), f"{uds}.dgram")
            got.append(me.recv(8192))
        run = g.finish(60)
        me.close()
    assert got == [b"700\n" + pattern(k, 100 + k) for k in range(20)]
    finished(run, r"vsock dgram echo done echoed 20 bytes 2190 noreply 0$")


def test_datagram_client_against_a_python_echo_on_three_pairs(uds):
    # the guest waits for a byte on its serial port: datagrams sent before dgram(800) is
    # bound would be dropped (nobody there), and counted lost (seen once on a loaded host)
    with draft_guest(uds, "vsock-dgram-client port=800 count=300 size=1000 go=serial",
                     pairs=3, stdin="pipe") as g:
        d = g.vsock.dgram(800)
        g.wait_for(PREFIX + "vsock dgram client waiting")
        g.type(b"g")

        def echo():
            for _ in range(300):
                data, (_cid, port) = d.recvfrom(60)
                d.sendto(data, port)

        threading.Thread(target=echo, daemon=True).start()
        run = g.finish(120)
        d.close()
    finished(run, r"vsock dgram client sent 300 received 300 lost 0 bad 0 reordered 0$")


def test_datagram_flood_every_datagram_is_delivered_or_counted(uds):
    """The guest sends as fast as its tx buffers allow; the host reads as fast as it can.
    Nothing may vanish: host received + dropped (counted by the device) == sent."""
    n = 2000
    got = []
    with draft_guest(uds, f"vsock-dgram-flood port=900 count={n} size=1024") as g:
        d = g.vsock.dgram(900)

        def rx():
            try:
                while True:
                    got.append(d.recvfrom(10)[0])
            except TimeoutError:
                pass

        reader = threading.Thread(target=rx, daemon=True)
        reader.start()
        run = g.finish(120)
        reader.join(30)
        d.close()
    finished(run, rf"vsock dgram flood sent {n} datagrams of 1024 bytes")
    keys = [int.from_bytes(x[:8], "little") for x in got]
    assert all(x == pattern(k, 1024) for k, x in zip(keys, got)), "a datagram's content changed"
    assert len(set(keys)) == len(keys), "a datagram arrived twice"
    assert len(got) + run.vsock["dgram_dropped"] == n, (len(got), run.vsock["dgram_dropped"])
    print(f"dgram flood: sent {n}, received {len(got)}, lost (counted) {run.vsock['dgram_dropped']}")


def test_host_datagrams_to_a_guest_sink_are_received_or_counted(uds):
    n = 100
    with draft_guest(uds, f"vsock-dgram-sink port=1000 count={n} check=1", pairs=4) as g:
        g.wait_for(PREFIX + "vsock dgram bound 1000")
        with g.vsock.dgram(77) as d:
            for k in range(n):
                d.sendto(pattern(k, 500), 1000)
            run = g.finish(60)
    m = re.search(r"vsock dgram sink received (\d+) bytes (\d+) bad 0", run.console)
    assert m, run.explain()
    assert int(m.group(1)) + run.vsock["dgram_dropped"] == n, (m.group(0), run.vsock["dgram_dropped"])


# -- the draft's hostile cases (guest/freestanding/hostile.c) ------------------------------------
@pytest.mark.parametrize("case, pairs, done", [
    ("draft-attach-first", 2, {"n": "2", "rsts": "2", "replies": "2"}),
    ("draft-offer-first", 4, {"n": "2", "rsts": "2", "replies": "2"}),
    ("draft-offer-again", 2, {"n": "2", "conn_resets": "2"}),
    ("draft-dgram-oversize", 2, {"n": "2", "used_len": "0", "replies": "0"}),
    ("draft-request-on-controlq", 2, {"n": "2", "used_len": "0", "replies": "0"}),
    ("draft-pair-hop", 3, {"n": "2", "conn_resets": "2", "rst_on_pair": "2"}),
])
def test_draft_hostile_case(uds, case, pairs, done):
    out = hostile(uds, case, n=2, proto="rfc2013", pairs=pairs)
    assert out.done == done, out.run.explain()
    reasons = out.reasons()
    expected = {
        "draft-attach-first": "guest packet for an unknown connection",
        "draft-offer-first": "guest packet for an unknown connection",
        "draft-offer-again": "guest handshake op on an open connection",
        "draft-dgram-oversize": "guest datagram larger than 4096 bytes or not RW (dropped)",
        "draft-request-on-controlq": "controlq buffer (nothing is defined for it: used length 0)",
        "draft-pair-hop": "guest packet on the wrong queue pair",
    }[case]
    assert reasons.get(expected, 0) >= 1, reasons


def test_datagram_credit_fields_are_ignored(uds):
    """A guest datagram with nonzero fwd_cnt/buf_alloc is still a datagram (not hostile).
    The echo is bound at <uds>_<PORT>.dgram before the guest boots: it sends at once."""
    me = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    me.bind(f"{uds}_{PORT}.dgram")
    me.settimeout(60)

    def serve():
        for _ in range(2):
            me.sendto(me.recv(8192), f"{uds}.dgram")     # "<guest port>\n" + payload, back

    threading.Thread(target=serve, daemon=True).start()
    out = hostile(uds, "draft-dgram-credit", n=2, proto="rfc2013", pairs=2)
    me.close()
    assert out.done == {"n": "2", "echoed": "2", "content_ok": "2", "echo_credit": "0"}, out.run.explain()
