"""The workloads, and the two small registries the runner reads.

A *workload* is a function ``fn(ctx) -> dict[metric key, value]`` that
measures one repetition; the runner calls it ``reps`` times (``quick_reps``
with ``--quick``) and reports the median and the spread of each metric.  Its
docstring says what it measures and how (the runner prints it with
``--list``).  A *metric* is declared once with its unit and which way is
better, so the table can format it and compute ratios.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Metric:
    key: str
    unit: str
    better: str            # "higher" or "lower"
    label: str


@dataclass
class Workload:
    name: str
    fn: Callable
    reps: int
    quick_reps: int
    produces: tuple[str, ...]       # prefixes of the metric keys it reports
    #: runs under the run's Placement (the VMM workloads); the ceilings do not
    placed: bool = True

    def makes(self, key: str) -> bool:
        return any(key.startswith(p) for p in self.produces)

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()


WORKLOADS: list[Workload] = []
METRICS: dict[str, Metric] = {}


def workload(name: str, *, produces: tuple[str, ...], reps: int = 5, quick_reps: int = 1,
             placed: bool = True):
    def register(fn):
        WORKLOADS.append(Workload(name, fn, reps, quick_reps, produces, placed))
        return fn
    return register


def metric(key: str, unit: str, better: str, label: str) -> None:
    METRICS[key] = Metric(key, unit, better, label)


def load_all() -> list[Workload]:
    """Import every workload module (each registers itself), in table order."""
    from . import ceilings, bulk, echo, connections, startup, draft, forward, vm2vm, blk  # noqa: F401
    return WORKLOADS
