"""Microbenchmark of the split virtqueue's device side: us per chain by batch size.

    python bench/micro_queue.py [--reps 200] [--shape tx,tx-indirect,rx] [--batches 1,4,...] [--json]

What is timed: the device taking 256 published chains off the available
ring and handing them back, in batches of B (1, 4, 16, 64, 128, 256): per batch
``pop_batch(B)``, ``add_used_batch([(head, 0), ...])`` and one
``needs_notification()`` (EVENT_IDX on).  The driver's work (publishing the
256 ring entries) is outside the timed region.  No KVM, no guest: a
GuestMemory, pyvmm.virtio.mock.MockQueue to lay out the rings and
descriptors, and pyvmm.virtio.queue.Queue over them.

Both read paths of ``Queue.pop_batch`` are timed at every batch size by
forcing ``queue._NUMPY_MIN_BATCH``: "struct" (ring entries with one
``struct.unpack_from``, every chain walked descriptor by descriptor) and
"numpy" (ring slice copied with numpy, one- and two-descriptor chains
gathered and checked elementwise by ``Queue._prewalk``, the rest walked).  The figure is the minimum over ``--reps`` rounds (the median is
printed too): the machine is shared and noisy, the minimum is the cost.

With a pyvmm that has no ``pop_batch`` (before the batched queue) it times
``pop()`` + ``add_used()`` per chain and ``needs_notification()`` per batch,
as the "single" column: run it with PYTHONPATH pointing at such a tree for a
before/after comparison.

Chain shapes (each chain a vsock-sized packet):
  tx            2 readable descriptors, 44 + 4096 bytes (Linux <= 6.1 tx)
  tx-indirect   one VIRTQ_DESC_F_INDIRECT descriptor -> table of those 2
  rx            2 writable descriptors, 44 + 4096 bytes (Linux <= 6.1 rx)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))   # this tree's pyvmm, unless PYTHONPATH says otherwise

from pyvmm.memory import GuestMemory  # noqa: E402
from pyvmm.virtio import queue as queue_mod  # noqa: E402
from pyvmm.virtio.device import VirtioFeature, feature_mask  # noqa: E402
from pyvmm.virtio.mock import MockDriver, MockQueue  # noqa: E402

SIZE = 256
BATCHES = (1, 4, 16, 64, 128, 256)
SHAPES = ("tx", "tx-indirect", "rx")


def build(shape: str):
    memory = GuestMemory(16 << 20)
    drv = MockDriver(memory, transport=None)
    drv.features = feature_mask(VirtioFeature.VIRTIO_F_EVENT_IDX, VirtioFeature.VIRTIO_F_INDIRECT_DESC)
    mq = MockQueue(drv, 0, SIZE)
    heads = []
    while True:
        try:
            if shape == "rx":
                heads.append(mq.add_chain(writable=[44, 4096]))
            else:
                heads.append(mq.add_chain([bytes(44), bytes(4096)], indirect=shape == "tx-indirect"))
        except Exception:               # out of descriptors: enough distinct chains
            break
        if len(heads) == SIZE:
            break
    q = queue_mod.Queue(memory, SIZE, mq.desc_gpa, mq.avail_gpa, mq.used_gpa,
                        event_idx=True, indirect_desc=True)
    # the chains add_chain published: consume them once, untimed
    while q.has_available():
        for c in (q.pop_batch(SIZE) if hasattr(q, "pop_batch") else [q.pop()]):
            q.add_used(c.head, 0)
    q.needs_notification()
    return memory, mq, q, heads


def publish(mq: MockQueue, heads: list[int]) -> None:
    """The driver puts SIZE entries on the available ring (cycling the heads)."""
    start = mq.avail_idx
    for i in range(SIZE):
        mq.avail_ring[(start + i) % SIZE] = heads[i % len(heads)]
    mq.set_avail_idx(start + SIZE)


def round_batched(q, b: int) -> None:
    left = SIZE
    while left:
        chains = q.pop_batch(b if b < left else left)
        q.add_used_batch([(c.head, 0) for c in chains])
        q.needs_notification()
        left -= len(chains)


def round_single(q, b: int) -> None:
    left = SIZE
    while left:
        for _ in range(b if b < left else left):
            c = q.pop()
            q.add_used(c.head, 0)
            left -= 1
        q.needs_notification()


def measure(shape: str, b: int, mode: str, reps: int) -> tuple[float, float]:
    memory, mq, q, heads = build(shape)
    if mode == "single":
        fn = round_single
    else:
        queue_mod._NUMPY_MIN_BATCH = 1 if mode == "numpy" else 1 << 30
        fn = round_batched
    times = []
    gc.disable()
    try:
        for _ in range(reps):
            publish(mq, heads)
            t0 = time.perf_counter_ns()
            fn(q, b)
            times.append((time.perf_counter_ns() - t0) / 1000 / SIZE)
    finally:
        gc.enable()
    if q.errors.total() or q.broken or q.in_flight:
        raise SystemExit(f"benchmark queue misbehaved: {q.snapshot()}")
    return min(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--shape", default=",".join(SHAPES))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes (comma-separated)")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args()
    batched = hasattr(queue_mod.Queue, "pop_batch")
    modes = ("struct", "numpy") if batched else ("single",)
    chosen = getattr(queue_mod, "_NUMPY_MIN_BATCH", None)
    print(f"pyvmm {queue_mod.__file__}: us per chain, min (median) of {args.reps} rounds of {SIZE} chains")
    results = {}
    for shape in args.shape.split(","):
        print(f"\n{shape}")
        print(f"{'batch':>6}  " + "  ".join(f"{m:>16}" for m in modes) + ("  uses" if batched else ""))
        for b in map(int, args.batches.split(",")):
            row = {m: measure(shape, b, m, args.reps) for m in modes}
            results[f"{shape}/{b}"] = {m: {"min": v[0], "median": v[1]} for m, v in row.items()}
            cells = "  ".join(f"{v[0]:7.2f} ({v[1]:6.2f})" for v in row.values())
            uses = ("  numpy" if b >= chosen else "  struct") if batched else ""
            print(f"{b:>6}  {cells}{uses}")
    if batched:
        queue_mod._NUMPY_MIN_BATCH = chosen
        print(f"\n_NUMPY_MIN_BATCH = {chosen}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
