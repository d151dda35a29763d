"""VM-to-VM: two pyvmm processes in one vsock group (pyvmm.vsock.group), guest to guest.

Both are ``pyvmm run`` subprocesses with the freestanding guest and ``--vsock CID,group=DIR``
(receiver CID 3, sender CID 4); nothing on the host side touches the bytes.  The time is
taken from the console lines as this process reads them (the guest's TSC frequency is not
known on every host, PVM's included): from the second guest's ``vsock cid`` line (its driver
is up, it connects next) to the result line of the guest that finishes.  The host-guest rows of the same table (``pyvmm-bulk-*``, ``pyvmm-rtt``)
are the figures to read these beside.

Every byte is checked by the receiving guest (``verify=V``, as for the other workloads).
Credit is end to end between the two guests (their 256 KiB windows), so one stream moves at
most a window per round trip of a credit update: the RTT row is that round trip's scale.
"""

from __future__ import annotations

import tempfile

from ..common import Context, GuestProcess, check_guest_result, gbit, pyvmm_argv
from . import metric, workload

PORT = 5000
RECEIVER, SENDER = 3, 4
RTT_SIZE = 64
RTT_COUNT, RTT_COUNT_QUICK = 20000, 2000

metric("v2v.bulk.64k", "Gb/s", "higher", "VM-to-VM one stream, 64 KiB packets")
metric("v2v.rtt.64b.mean", "us", "lower", "VM-to-VM round trip of 64 B (mean)")


def _seconds(start: GuestProcess, end: GuestProcess, end_line: str) -> float:
    """From ``start``'s ``vsock cid`` line to ``end``'s ``end_line`` (both as read here)."""
    return (end.line_time(end_line) or 0.0) - (start.line_time(r"^vsock cid ") or 0.0)


def _pair(ctx: Context, name: str, first: str, second: str):
    """The two members: ``first`` (CID 3) started and listening, then ``second`` (CID 4)."""
    elf = ctx.need_elf()
    group = f"group={tempfile.mkdtemp(prefix=name + '-group-', dir=ctx.tmp)}"   # fresh per run
    one = GuestProcess(pyvmm_argv(elf, first, ctx.path(f"{name}-3.sock"), placement=ctx.placement,
                                  vsock=group, cid=RECEIVER),
                       "pyvmm-3", stderr_path=ctx.stderr(f"{name}-3"))
    try:
        one.wait_for(rf"^vsock listening {PORT}$")
        two = GuestProcess(pyvmm_argv(elf, second, ctx.path(f"{name}-4.sock"),
                                      placement=ctx.placement, vsock=group, cid=SENDER),
                           "pyvmm-4", stderr_path=ctx.stderr(f"{name}-4"))
    except BaseException:
        one.close()
        raise
    return one, two


@workload("pyvmm-v2v-bulk", produces=("v2v.bulk.",), reps=5, quick_reps=3)
def v2v_bulk(ctx: Context) -> dict[str, float]:
    """Guest to guest through a group, one stream: CID 4 ``vsock-bulk-send bytes=N
    chunk=65536 cid=3 verify=V`` to CID 3 ``vsock-bulk-recv bytes=N listen=1 verify=V``; N is
    256 MiB (64 MiB quick); timed from the sender's driver start to the receiver's result."""
    total = (64 if ctx.quick else 256) << 20
    receiver, sender = _pair(ctx, "v2v-bulk",
                             f"vsock-bulk-recv port={PORT} bytes={total} listen=1 verify={ctx.verify}",
                             f"vsock-bulk-send port={PORT} bytes={total} chunk=65536 cid={RECEIVER} "
                             f"verify={ctx.verify}")
    with receiver, sender:
        sender.expect_exit0(300)
        receiver.expect_exit0(60)
        check_guest_result(receiver, "vsock bulk received", ctx.verify, total)
        return {"v2v.bulk.64k": gbit(total, _seconds(sender, receiver, r"^vsock bulk received "))}


@workload("pyvmm-v2v-rtt", produces=("v2v.rtt.",), reps=3, quick_reps=1)
def v2v_rtt(ctx: Context) -> dict[str, float]:
    """Guest to guest round trips through a group: CID 4 ``vsock-echo-client size=64
    count=20000`` (2,000 quick) against CID 3 ``vsock-echo-server``; the mean from the
    client's driver start to its result line (the connect is one round trip more)."""
    count = RTT_COUNT_QUICK if ctx.quick else RTT_COUNT
    server, client = _pair(ctx, "v2v-rtt", f"vsock-echo-server port={PORT} conns=1",
                           f"vsock-echo-client port={PORT} cid={RECEIVER} size={RTT_SIZE} "
                           f"count={count}")
    with server, client:
        client.expect_exit0(300)
        server.expect_exit0(60)
        client.wait_for(rf"vsock echo {count} round trips of {RTT_SIZE} bytes")
        seconds = _seconds(client, client, r"^vsock echo \d+ round trips")
    return {"v2v.rtt.64b.mean": seconds / count * 1e6}
