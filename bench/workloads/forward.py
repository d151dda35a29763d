"""TCP forwarding (``pyvmm run --forward``) beside the Unix host end.

Same guest ELF, same scenarios, same checks as ``pyvmm-bulk-g2h`` / ``-h2g``
(``bulk.py``); only the host end differs: a TCP socket on 127.0.0.1 through
``--forward vsock:5000=tcp:127.0.0.1:P`` (guest -> host) and
``--forward tcp:127.0.0.1:P=vsock:5000`` (host -> guest) instead of ``<uds>_5000`` and
``CONNECT 5000`` on ``<uds>``.  The question: what a loopback TCP host end costs against
a Unix one (pyvmm moves both with the same SocketStream; the kernel's loopback TCP
does more per byte than AF_UNIX).
"""

from __future__ import annotations

from ..common import Context, teststream
from . import workload
from .bulk import _total, bulk_metrics, pyvmm_g2h_once, pyvmm_h2g_once

SIZES = (65536,)

bulk_metrics("fwd", SIZES, "TCP forward")


@workload("forward-bulk", produces=("fwd.",), reps=5, quick_reps=3)
def forward_bulk(ctx: Context) -> dict[str, float]:
    """pyvmm-bulk-g2h and pyvmm-bulk-h2g for 64 KiB writes with a loopback TCP host end
    (``--forward``) instead of the Unix one; one pyvmm process per direction."""
    out: dict[str, float] = {}
    data = teststream(_total(ctx, max(SIZES)))
    for size in SIZES:
        pyvmm_g2h_once(ctx, size, out, "fwd", tcp=True)
        pyvmm_h2g_once(ctx, size, out, "fwd", data, tcp=True)
    return out
