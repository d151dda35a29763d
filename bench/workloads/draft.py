"""The seed's draft protocol (``--vsock ...,proto=rfc2013``) beside the standard Socket Device.

Same guest ELF, same scenarios, same host side as the standard rows (``bulk.py``,
``echo.py``); only the ``--vsock`` options differ.  Two questions:

* what the draft's wire format costs or saves against the standard's (bulk, 4 KiB and
  64 KiB writes, both directions, one queue pair);
* what N queue pairs buy with N streams: 4 echo streams at once with the draft's 1
  pair and 4 pairs (the guest's driver spreads connections over the pairs it enables),
  and the standard's one rx/tx pair for reference.  pyvmm serves every queue from its
  one I/O thread, so pairs spread the guest's rings, not pyvmm's work.
"""

from __future__ import annotations

from ..common import Context, teststream
from . import metric, workload
from .bulk import _total, bulk_metrics, pyvmm_g2h_once, pyvmm_h2g_once
from .echo import echo_streams

DRAFT = "proto=rfc2013,pairs=1"
SIZES = (4096, 65536)
STREAMS = 4
ECHO_MODES = {"virtio": "", "rfc2013-1pair": DRAFT, f"rfc2013-{STREAMS}pairs": f"proto=rfc2013,pairs={STREAMS}"}

bulk_metrics("draft", SIZES, "draft mode")
for _mode in ECHO_MODES:
    metric(f"modes.echo{STREAMS}.{_mode}", "Gb/s", "higher", f"{STREAMS} echo streams, {_mode}")


@workload("draft-bulk", produces=("draft.",), reps=5, quick_reps=3)
def draft_bulk(ctx: Context) -> dict[str, float]:
    """The draft mode (proto=rfc2013, 1 pair), one stream each way: exactly pyvmm-bulk-g2h and
    pyvmm-bulk-h2g for 4 KiB and 64 KiB writes, with ``--vsock ...,proto=rfc2013,pairs=1``."""
    out: dict[str, float] = {}
    data = teststream(_total(ctx, max(SIZES)))
    for size in SIZES:
        pyvmm_g2h_once(ctx, size, out, "draft", vsock=DRAFT)
        pyvmm_h2g_once(ctx, size, out, "draft", data, vsock=DRAFT)
    return out


@workload("pairs-echo", produces=("modes.",), reps=3, quick_reps=1)
def pairs_echo(ctx: Context) -> dict[str, float]:
    """4 echo streams at once (the pyvmm-echo-stream loop, 64 KiB writes, Gb/s each way):
    standard mode, the draft with 1 queue pair, the draft with 4 (one pyvmm each)."""
    return {f"modes.echo{STREAMS}.{mode}": echo_streams(ctx, STREAMS, vsock)
            for mode, vsock in ECHO_MODES.items()}
